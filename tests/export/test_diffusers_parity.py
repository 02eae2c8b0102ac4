"""Parity with diffusers' real classes, on CPU with a tiny random configuration.

- Our DiT and diffusers' `CosmosTransformer3DModel`, holding the same weights through our
  mapping, give the same output (fp32, <= 1e-5 relative) for the same latent, per-frame
  timestep, text embedding and condition mask.
- One denoising step of our sampler equals the first step of `Cosmos2VideoToWorldPipeline`
  on the same latents, condition, prompt embeddings and guidance.

Conventions mapped (see README "Compatibility"):
- diffusers' pipeline passes `fps` to the transformer, whose RoPE then scales the temporal
  positions by 24 / fps; upstream Cosmos-Predict2 (and this DiT) has fps modulation off
  (`rope_enable_fps_modulation=False`), so the pipeline is called with fps = 24 (scale 1).
- guidance: both write x0 = cond + g (cond - uncond); diffusers skips the negative branch
  for g <= 1, upstream and we only for g = 0.
- diffusers runs its own Karras schedule over `num_inference_steps` sigmas (Euler), upstream
  and we `steps + 1` sigmas (Euler, then AB2): the first sigma (80) is shared, so the first
  step is compared with diffusers' second sigma as its target.

torchvision is not installable against this CPU torch build (its compiled ops do not load),
and diffusers' transformer calls `torchvision.transforms.functional.resize(padding_mask,
NEAREST)` only to bring the padding mask to latent size. The test supplies that one function
as `torch.nn.functional.interpolate(mode="nearest")` (what torchvision runs for tensors).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan, Cosmos2VideoToWorldPipeline, CosmosTransformer3DModel  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.models.transformers import transformer_cosmos  # noqa: E402

from cosmos_train.export.diffusers import (from_diffusers_config, from_diffusers_state_dict,  # noqa: E402
                                           to_diffusers_config, to_diffusers_state_dict)
from cosmos_train.models.dit import DiT  # noqa: E402
from cosmos_train.presets import PRESETS  # noqa: E402
from cosmos_train.models.sampler import euler_step, make_x0_fn  # noqa: E402

CFG = PRESETS["tiny"].with_overrides(model_channels=64, num_heads=2, num_blocks=2, latent_channels=16,
                                     adaln_lora_dim=16, context_dim=32, rope_h_extrapolation_ratio=3.0,
                                     rope_w_extrapolation_ratio=3.0, rope_t_extrapolation_ratio=0.8333333333333334)


@pytest.fixture(autouse=True)
def _torchvision_resize(monkeypatch):
    def resize(t, size, interpolation=None):
        return F.interpolate(t, size=list(size), mode="nearest")

    shim = types.SimpleNamespace(functional=types.SimpleNamespace(resize=resize),
                                 InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))
    monkeypatch.setattr(transformer_cosmos, "transforms", shim, raising=False)


def _models(seed: int = 0):
    ours = DiT(CFG).eval()
    ours.init_weights(seed)
    with torch.no_grad():  # the zero-init modulation would hide most of the network: randomise it
        g = torch.Generator().manual_seed(seed)
        for name, p in ours.named_parameters():
            if "adaln_modulation" in name:
                p.normal_(0, 0.05, generator=g)
    theirs = CosmosTransformer3DModel(**to_diffusers_config(CFG)).eval()
    missing, unexpected = theirs.load_state_dict(to_diffusers_state_dict(ours.state_dict()), strict=True)
    assert not missing and not unexpected
    return ours, theirs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_presets_map_to_the_released_diffusers_configs():
    # diffusers' scripts/convert_cosmos_to_diffusers.py, TRANSFORMER_CONFIGS["Cosmos-2.0-Diffusion-{2B,14B}-Video2World"]
    released = {"2b": dict(in_channels=17, num_attention_heads=16, num_layers=28, rope_scale=[1.0, 3.0, 3.0]),
                "14b": dict(in_channels=17, num_attention_heads=40, num_layers=36, rope_scale=[20 / 24, 2.0, 2.0])}
    for preset, want in released.items():
        got = to_diffusers_config(PRESETS[preset])
        assert {k: got[k] for k in want} == want, preset
        assert got["max_size"] == [128, 240, 240] and got["patch_size"] == [1, 2, 2]
        assert got["attention_head_dim"] == 128 and got["text_embed_dim"] == 1024 and got["adaln_lora_dim"] == 256
        assert got["extra_pos_embed_type"] is None and got["concat_padding_mask"] is True
        assert from_diffusers_config(got) == PRESETS[preset]


def test_config_round_trip():
    assert from_diffusers_config(to_diffusers_config(CFG)) == CFG
    assert from_diffusers_config(dict(CosmosTransformer3DModel(**to_diffusers_config(CFG)).config)) == CFG


def test_dit_equals_cosmos_transformer_3d_model():
    ours, theirs = _models()
    g = torch.Generator().manual_seed(1)
    B, T, H, W = 2, 3, 8, 6
    x = torch.randn(B, 16, T, H, W, generator=g)
    t_B_T = torch.rand(B, T, generator=g)
    t_B_T[:, 0] = 1e-4 / (1 + 1e-4)  # a condition frame
    emb = torch.randn(B, 7, CFG.context_dim, generator=g)
    cond = torch.zeros(B, 1, T, H, W)
    cond[:, :, 0] = 1
    with torch.no_grad():
        a = ours(x, t_B_T, emb, condition_mask_B_1_T_H_W=cond)
        b = theirs(hidden_states=x, timestep=t_B_T[:, None, :, None, None], encoder_hidden_states=emb,
                   condition_mask=cond, padding_mask=torch.zeros(1, 1, H, W), fps=None, return_dict=False)[0]
    assert a.shape == b.shape
    assert _rel(a, b) <= 1e-5, _rel(a, b)
    # and the weights go back unchanged
    back = from_diffusers_state_dict(theirs.state_dict())
    for k, v in back.items():
        assert torch.equal(v, ours.state_dict()[k]), k


class _NoGuardrail:
    """The pipeline insists on a safety checker; with prompt embeddings and latent output it only moves it."""

    def to(self, *args, **kwargs):
        return self


def _pipeline(theirs):
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        {"use_karras_sigmas": True, "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 1.0,
         "final_sigmas_type": "sigma_min"})
    return Cosmos2VideoToWorldPipeline(text_encoder=None, tokenizer=None, transformer=theirs, vae=vae,
                                       scheduler=scheduler, safety_checker=_NoGuardrail())


def test_one_sampler_step_equals_cosmos2_video_to_world_pipeline():
    ours, theirs = _models(seed=3)
    pipe = _pipeline(theirs)
    g = torch.Generator().manual_seed(5)
    B, C, T, H, W = 1, 16, 3, 4, 4  # 9 frames of 32x32 pixels
    noise = torch.randn(B, C, T, H, W, generator=g)
    pos = torch.randn(B, 6, CFG.context_dim, generator=g)
    neg = torch.randn(B, 6, CFG.context_dim, generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g)
    guidance = 7.0

    seen, after_first = [], {}
    theirs.register_forward_hook(lambda mod, args, kwargs, out: seen.append(kwargs), with_kwargs=True)

    def on_step_end(pipe_, i, t, kw):
        if i == 0:
            after_first["latents"] = kw["latents"].clone()
        return kw

    with torch.no_grad():
        pipe(image=image, prompt_embeds=pos, negative_prompt_embeds=neg, height=32, width=32, num_frames=9,
             num_inference_steps=4, guidance_scale=guidance, fps=24, latents=noise.clone(), output_type="latent",
             callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    sigmas = pipe.scheduler.sigmas.tolist()
    assert abs(sigmas[0] - 80.0) < 1e-3
    clean = seen[0]["hidden_states"] * seen[0]["condition_mask"]  # the pipeline's VAE-encoded condition
    k = 1
    # ours: the sampler's denoiser at sigma_max, then its first (Euler) step to diffusers' next sigma
    x = noise * sigmas[0]
    x0_fn = make_x0_fn(ours, clean_latent=clean, num_condition_frames=k, text_emb=pos, text_mask=None,
                       neg_emb=neg, neg_mask=None, guidance=guidance)
    with torch.no_grad():
        x0 = x0_fn(x, sigmas[0])
    x1 = euler_step(x, x0, sigmas[0], sigmas[1])
    # the pipeline's x0 prediction, recovered from its first step x1 = x + (s1 - s0) (x - x0) / s0
    theirs_x1 = after_first["latents"]
    theirs_x0 = x - sigmas[0] * (theirs_x1 - x) / (sigmas[1] - sigmas[0])
    gen = slice(k, None)  # condition frames: both keep them clean; diffusers does not rewrite its latents there
    assert _rel(x0[:, :, gen], theirs_x0[:, :, gen]) <= 1e-5, _rel(x0[:, :, gen], theirs_x0[:, :, gen])
    assert _rel(x1[:, :, gen], theirs_x1[:, :, gen]) <= 1e-5, _rel(x1[:, :, gen], theirs_x1[:, :, gen])
