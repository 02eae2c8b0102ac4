"""The training and sampling recipe pinned to upstream Cosmos-Predict2 (nvidia-cosmos/cosmos-predict2).

Every expected value here is computed from upstream's formula, written out in the test
(with the generator draws replayed by hand), never by calling the function under test:
- RoPE ratios: `configs/base/config_video2world.py` `_PREDICT2_VIDEO2WORLD_NET_{2B,14B}`;
- sigma x sqrt(T): `models/video2world_model.py` `draw_training_sigma_and_epsilon`;
- condition frames per sample: `conditioner.py` `VideoCondition.set_video_condition`;
- loss over all T frames: `video2world_model.py` `training_step` (`kendall_loss.mean()`);
- guidance and initial noise: `pipelines/video2world.py` `get_x0_fn_from_batch`, `__call__`,
  `imaginaire/utils/misc.py` `arch_invariant_rand`.
"""

import math

import numpy as np
import torch

from cosmos_train.models.diffusion import SIGMA_CONDITION, sample_sigma, training_loss
from cosmos_train.models.dit import DiT
from cosmos_train.presets import PRESETS
from cosmos_train.models.sampler import initial_noise, karras_sigmas, sample


class Recorder(torch.nn.Module):
    """A stand-in network with a known output that records what the objective feeds it."""

    def __init__(self, value=0.0):
        super().__init__()
        self.value = value
        self.calls = []

    def forward(self, x, timesteps, emb, *, crossattn_mask_B_N=None, condition_mask_B_1_T_H_W=None):
        self.calls.append(dict(x=x.clone(), t=timesteps.clone(), mask=condition_mask_B_1_T_H_W.clone()))
        return torch.full_like(x, self.value)


# ------------------------------------------------------------------------------- 1. RoPE
def test_rope_ratios_are_the_released_720p_nets():
    ratios = lambda c: (c.rope_h_extrapolation_ratio, c.rope_w_extrapolation_ratio, c.rope_t_extrapolation_ratio)  # noqa: E731
    assert ratios(PRESETS["2b"]) == (3.0, 3.0, 1.0)
    assert ratios(PRESETS["14b"]) == (2.0, 2.0, 0.8333333333333334)  # upstream writes the float literal


def test_rope_ratio_changes_the_angles_as_ntk_scaling():
    # upstream VideoRopePosition3DEmb: theta_h = 10000 * ratio^(dim_h / (dim_h - 2)), freqs = theta^-(2i/dim_h)
    cfg = PRESETS["2b"]
    model_pe = DiT(cfg.with_overrides(num_blocks=1), attention=torch.nn.Identity).pos_embedder
    angles = model_pe.angles(2, 45, 80)  # 720p latent 90x160 -> 45x80 patches
    dim_h, dim_t = 42, 44
    i = torch.arange(0, dim_h, 2)[: dim_h // 2].float() / dim_h
    freqs_h = 1.0 / (10000.0 * 3.0 ** (dim_h / (dim_h - 2))) ** i
    # layout [t, h, w, t, h, w]: the h part of patch row 44 starts after the dim_t/2 t-angles
    got_h = angles[0, 44, 0, dim_t // 2: dim_t // 2 + dim_h // 2]
    torch.testing.assert_close(got_h, 44 * freqs_h)
    plain = 44 / 10000.0 ** i
    assert (plain - got_h).abs().max() > 1.0  # the ratio moves angles by radians at 720p


# ----------------------------------------------------------------------------- 2. sigma
def test_training_sigma_is_scaled_by_sqrt_latent_frames():
    B, T = 6, 24
    x0 = torch.zeros(B, 2, T, 1, 1)
    net = Recorder()
    training_loss(net, x0, torch.zeros(B, 1, 4), None, generator=torch.Generator().manual_seed(5),
                  num_condition_frames=1, text_dropout=0.0, high_sigma_ratio=0.0)
    # upstream: sigma = exp(N(0, 1)) * sqrt(state_t); replay the generator's first draw
    n = torch.randn(B, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sigma = n.exp() * math.sqrt(T)
    t_noisy = net.calls[0]["t"][:, 1:]  # c_noise = sigma / (1 + sigma) on the generated frames
    torch.testing.assert_close(t_noisy, (sigma / (1 + sigma)).float()[:, None].expand(B, T - 1))


def test_sigma_distribution_median_at_24_latent_frames():
    s = sample_sigma(20_000, generator=torch.Generator().manual_seed(0), multiplier=math.sqrt(24),
                     high_sigma_ratio=0.0)
    assert abs(s.log().median().item() - 0.5 * math.log(24)) < 0.03  # ~1.589, not 0
    # the high-sigma draw replaces the scaled sigma (upstream applies it after the multiplier)
    high = sample_sigma(1000, generator=torch.Generator().manual_seed(0), multiplier=1e6, high_sigma_ratio=1.0)
    assert high.min() >= 200 and high.max() <= 1e5


def test_image_batch_is_not_scaled_and_has_no_condition_frame():
    net = Recorder()
    training_loss(net, torch.zeros(3, 2, 1, 1, 1), torch.zeros(3, 1, 4), None,
                  generator=torch.Generator().manual_seed(2), text_dropout=0.0, high_sigma_ratio=1.0)
    # upstream: no sqrt(T) multiplier and no high-sigma draw for images
    sigma = torch.randn(3, generator=torch.Generator().manual_seed(2), dtype=torch.float64).exp()
    torch.testing.assert_close(net.calls[0]["t"][:, 0], (sigma / (1 + sigma)).float())
    assert net.calls[0]["mask"].eq(0).all()


# ------------------------------------------------------------------- 3. condition frames
def _replay_k(seed: int, B: int, shape, lo: int, hi: int) -> torch.Tensor:
    """The condition-frame counts: the generator's draws after sigma (3 x B), eps and text dropout."""
    g = torch.Generator().manual_seed(seed)
    torch.randn(B, generator=g, dtype=torch.float64)
    torch.rand(B, generator=g, dtype=torch.float64)
    torch.rand(B, generator=g, dtype=torch.float64)
    torch.randn(shape, generator=g)
    torch.rand(B, generator=g)
    return torch.randint(lo, hi + 1, (B,), generator=g)


def test_condition_frames_drawn_per_sample_from_min_to_max():
    B, T = 64, 4
    x0 = torch.randn(B, 2, T, 1, 1, generator=torch.Generator().manual_seed(0))
    net = Recorder()
    training_loss(net, x0, torch.zeros(B, 1, 4), None, generator=torch.Generator().manual_seed(9),
                  num_condition_frames=(1, 2), text_dropout=0.0)
    call = net.calls[0]
    k = call["mask"][:, 0, :, 0, 0].sum(dim=1).long()  # first k frames are 1, as set_video_condition
    assert set(k.tolist()) == {1, 2} and 16 < (k == 1).sum() < 48
    expected = torch.arange(T)[None, :] < k[:, None]
    assert torch.equal(call["mask"][:, 0, :, 0, 0].bool(), expected)
    assert torch.equal(k, _replay_k(9, B, x0.shape, 1, 2))  # from the training generator: resumable
    # condition frames: clean latent in, timestep c_noise(1e-4)
    t_cond = SIGMA_CONDITION / (1 + SIGMA_CONDITION)
    torch.testing.assert_close(call["t"][expected], torch.full((int(expected.sum()),), t_cond))
    torch.testing.assert_close(call["x"].permute(0, 2, 1, 3, 4)[expected], x0.permute(0, 2, 1, 3, 4)[expected])


def test_same_generator_state_draws_the_same_condition_frames():
    x0 = torch.zeros(8, 1, 4, 1, 1)
    masks = []
    for _ in range(2):
        net = Recorder()
        training_loss(net, x0, torch.zeros(8, 1, 2), None, generator=torch.Generator().manual_seed(4),
                      num_condition_frames=(0, 3))
        masks.append(net.calls[0]["mask"])
    assert torch.equal(*masks)


# ---------------------------------------------------------------------------- 4. the loss
def test_loss_averages_over_all_latent_frames():
    B, C, T = 4, 3, 5
    x0 = torch.randn(B, C, T, 2, 2, generator=torch.Generator().manual_seed(1))
    loss, _ = training_loss(Recorder(0.0), x0, torch.zeros(B, 1, 4), None,
                            generator=torch.Generator().manual_seed(11), num_condition_frames=(1, 2),
                            text_dropout=0.0, sigma_override=3.0)
    # upstream: x0_pred = c_skip * x_t (net out 0), replaced by gt on condition frames;
    # loss = 10 * mean_{B,C,T,H,W}((1+s)^2/s^2 * (x0 - x0_pred)^2)
    g = torch.Generator().manual_seed(11)
    eps = torch.randn(x0.shape, generator=g)
    torch.rand(B, generator=g)
    k = torch.randint(1, 3, (B,), generator=g)
    s = 3.0
    x0_pred = (1 / (1 + s)) * (x0 + s * eps)
    cond = (torch.arange(T)[None, :] < k[:, None])[:, None, :, None, None]
    x0_pred = torch.where(cond, x0, x0_pred)
    expected = 10.0 * ((1 + s) ** 2 / s ** 2 * (x0 - x0_pred) ** 2).mean()
    torch.testing.assert_close(loss, expected)


# ----------------------------------------------------------------- 5./6. guidance and noise
def test_initial_noise_is_numpy_random_state():
    shape = (1, 16, 3, 4, 6)
    expected = np.random.RandomState(1234).standard_normal(shape).astype(np.float32)
    assert np.array_equal(initial_noise(shape, 1234).numpy(), expected)


class Fixed(torch.nn.Module):
    """Net output depends on the text embedding only: a constant per branch."""

    def forward(self, x, timesteps, emb, *, crossattn_mask_B_N=None, condition_mask_B_1_T_H_W=None):
        return torch.full_like(x, 1.0) * emb.mean()


def test_first_step_uses_upstream_noise_and_guidance():
    shape = (1, 2, 3, 2, 2)
    cond_latent = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    pos, neg, g, seed = torch.full((1, 2, 4), 2.0), torch.full((1, 2, 4), -1.0), 7.0, 42
    kw = dict(condition_latent=cond_latent, num_condition_frames=1, shape=shape, text_emb=pos, text_mask=None,
              neg_emb=neg, neg_mask=None, guidance=g, seed=seed)
    out = sample(Fixed(), steps=1, **kw)
    # upstream: x = arch_invariant_rand(seed) * sigma_max; x0 = cond + g (cond - uncond); Euler to sigma_min;
    # final x0 at sigma_min. Net out is 2 (cond) / -1 (uncond); x0 = c_skip x + c_out out.
    s0, s1 = karras_sigmas(1).tolist()
    x = torch.from_numpy(np.random.RandomState(seed).standard_normal(shape).astype(np.float32)).double() * s0
    x[:, :, :1] = cond_latent[:, :, :1].double()

    def x0_upstream(x, s):
        t = s / (1 + s)
        c, u = (1 - t) * x - t * 2.0, (1 - t) * x - t * -1.0
        x0 = c + g * (c - u)
        x0[:, :, :1] = cond_latent[:, :, :1].double()
        return x0

    x1 = x + (s1 - s0) * (x - x0_upstream(x, s0)) / s0
    expected = x0_upstream(x1, s1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
