"""DiT: key/shape parity with released Cosmos-Predict2 checkpoints, forward shapes, init."""

import pytest
import torch

from cosmos_train.models.dit import DiT, NoSequenceSharding, count_parameters, init_generator
from cosmos_train.presets import PRESETS
from cosmos_train.models.rope import rope_split


def reference_shapes(D: int, num_blocks: int) -> dict[str, tuple[int, ...]]:
    """The key list of DESIGN.md "Reference facts", written out independently of the model code."""
    ref = {
        "x_embedder.proj.1.weight": (D, 72),
        "pos_embedder.seq": (128,),
        "pos_embedder.dim_spatial_range": (21,),
        "pos_embedder.dim_temporal_range": (22,),
        "t_embedder.1.linear_1.weight": (D, D),
        "t_embedder.1.linear_2.weight": (3 * D, D),
        "t_embedding_norm.weight": (D,),
        "final_layer.adaln_modulation.1.weight": (256, D),
        "final_layer.adaln_modulation.2.weight": (2 * D, 256),
        "final_layer.linear.weight": (64, D),
        "accum_video_sample_counter": (),
        "accum_image_sample_counter": (),
        "accum_iteration": (),
        "accum_train_in_hours": (),
    }
    for n in range(num_blocks):
        b = f"blocks.{n}."
        for attn in ("self_attn", "cross_attn"):
            ctx = D if attn == "self_attn" else 1024
            ref[b + f"{attn}.q_proj.weight"] = (D, D)
            ref[b + f"{attn}.k_proj.weight"] = (D, ctx)
            ref[b + f"{attn}.v_proj.weight"] = (D, ctx)
            ref[b + f"{attn}.output_proj.weight"] = (D, D)
            ref[b + f"{attn}.q_norm.weight"] = (128,)
            ref[b + f"{attn}.k_norm.weight"] = (128,)
        ref[b + "mlp.layer1.weight"] = (4 * D, D)
        ref[b + "mlp.layer2.weight"] = (D, 4 * D)
        for sub in ("self_attn", "cross_attn", "mlp"):
            ref[b + f"adaln_modulation_{sub}.1.weight"] = (256, D)
            ref[b + f"adaln_modulation_{sub}.2.weight"] = (3 * D, 256)
    return ref


@pytest.mark.parametrize("preset,D,blocks,n_params,n_tensors", [
    ("2b", 2048, 28, 1_956_413_440, 567),
    ("14b", 5120, 36, 14_265_285_632, 727),
])
def test_state_dict_matches_reference(preset, D, blocks, n_params, n_tensors):
    with torch.device("meta"):
        model = DiT(PRESETS[preset])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == reference_shapes(D, blocks)
    sd = model.state_dict()
    assert sd["accum_iteration"].dtype == torch.int64 and sd["accum_train_in_hours"].dtype == torch.float32
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert count_parameters(PRESETS[preset]) == (n_params, n_tensors)


def test_rope_split_and_buffers():
    assert rope_split(128) == (42, 42, 44)
    assert rope_split(32) == (10, 10, 12)
    model = DiT(PRESETS["tiny"])
    torch.testing.assert_close(model.pos_embedder.seq, torch.arange(128.0))
    torch.testing.assert_close(model.pos_embedder.dim_spatial_range, torch.arange(0, 10, 2) / 10)
    angles = model.pos_embedder.angles(3, 4, 5)
    assert angles.shape == (3, 4, 5, 32)
    # layout [t(6), h(5), w(5)] twice: the t part varies only with the frame index
    assert torch.equal(angles[:, 0, 0, :6], angles[:, 3, 4, :6])
    assert torch.equal(angles[..., :16], angles[..., 16:])
    assert torch.equal(angles[1, 2, 3, 6], torch.tensor(2.0))  # h position 2 * freq 1


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = DiT(PRESETS["tiny"])
    model.init_weights(seed)
    return model


def test_forward_shapes_and_masks():
    model = _tiny()
    x = torch.randn(2, 48, 3, 8, 6)
    t = torch.rand(2, 3)
    ctx = torch.randn(2, 7, 1024)
    out = model(x, t, ctx)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # scalar-per-sample timesteps broadcast over frames
    torch.testing.assert_close(model(x, t[:, :1], ctx), model(x, t[:, :1].expand(2, 3), ctx))
    # masks change the output; a text mask hides the masked tokens
    cond = torch.zeros(2, 1, 3, 8, 6)
    cond[:, :, 0] = 1
    assert not torch.allclose(model(x, t, ctx, condition_mask_B_1_T_H_W=cond), out)
    assert not torch.allclose(model(x, t, ctx, padding_mask_B_1_H_W=torch.ones(2, 1, 16, 12)), out)
    mask = torch.tensor([[True] * 4 + [False] * 3] * 2)
    ctx2 = ctx.clone()
    ctx2[:, 4:] = 99.0
    torch.testing.assert_close(model(x, t, ctx, crossattn_mask_B_N=mask), model(x, t, ctx2, crossattn_mask_B_N=mask))


def test_patchify_feature_order_channel_slowest():
    model = _tiny()
    x = torch.arange(2 * 50 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 50, 1, 4, 4)
    tokens = model.x_embedder.proj[0](x)  # (B, T, H, W, 200)
    assert tokens.shape == (2, 1, 2, 2, 200)
    # feature index = c * 4 + m * 2 + n for patch (h=1, w=0)
    for c, m, n in [(0, 0, 0), (3, 1, 0), (49, 1, 1)]:
        assert tokens[1, 0, 1, 0, c * 4 + m * 2 + n] == x[1, c, 0, 2 + m, 0 + n]
    # unpatchify: features ordered (p1, p2, t, C), channel fastest
    feats = torch.randn(1, 1, 2, 2, 4 * 48)
    video = model.unpatchify(feats)
    assert video.shape == (1, 48, 1, 4, 4)
    assert video[0, 5, 0, 2 + 1, 2 * 1 + 0] == feats[0, 0, 1, 1, (1 * 2 + 0) * 48 + 5]


def test_init_is_deterministic_and_name_based():
    a, b = _tiny(0), _tiny(0)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    model = a
    name = "blocks.0.self_attn.q_proj.weight"
    w = model.init_parameter(name, (128, 128), init_generator(3, name))
    w2 = model.init_parameter("blocks.0.self_attn.q_proj.base_layer.weight", (128, 128),
                              init_generator(3, "blocks.0.self_attn.q_proj.base_layer.weight"))
    assert torch.equal(w, w2)  # a LoRA-wrapped weight inits like the plain one
    assert 0.05 < w.std() < 0.12  # ~ 1/sqrt(128)
    assert torch.equal(model.init_parameter("t_embedding_norm.weight", (128,), init_generator(0, "x")), torch.ones(128))
    assert model.final_layer.linear.weight.abs().sum() > 0  # not zero-init: the net trains from step 0
    # meta build + to_empty + init_weights gives the same model
    with torch.device("meta"):
        meta = DiT(PRESETS["tiny"])
    meta.to_empty(device="cpu")
    meta.init_weights(0)
    for (n, p), q in zip(a.state_dict().items(), meta.state_dict().values()):
        assert torch.equal(p, q), n


class _RecordingSharding:
    """Identity seam that records its calls: every per-frame tensor must go through split and
    the output through gather (the model side of context parallelism)."""

    def __init__(self):
        self.calls = []

    def split(self, t, dim):
        self.calls.append(("split", dim, tuple(t.shape)))
        return t

    def gather(self, t, dim):
        self.calls.append(("gather", dim, tuple(t.shape)))
        return t


def test_sequence_sharding_seam_called_on_every_per_frame_tensor():
    model = _tiny()
    assert isinstance(model.sequence_sharding, NoSequenceSharding)
    seam = _RecordingSharding()
    model.sequence_sharding = seam
    model(torch.randn(1, 48, 3, 4, 4), torch.rand(1, 3), torch.randn(1, 2, 1024))
    assert seam.calls == [
        ("split", 1, (1, 3, 2, 2, 128)),   # tokens
        ("split", 0, (3, 2, 2, 32)),       # RoPE table
        ("split", 1, (1, 3, 128)),         # timestep embedding
        ("split", 1, (1, 3, 384)),         # AdaLN-LoRA term
        ("gather", 1, (1, 3, 2, 2, 192)),  # final layer output
    ]
    assert "sequence_sharding" not in dict(model.named_modules())
    assert not any("attn_op" in k for k in model.state_dict())


def test_bf16_forward_backward():
    model = _tiny().to(torch.bfloat16)
    x = torch.randn(1, 48, 2, 4, 4, dtype=torch.bfloat16)
    out = model(x, torch.rand(1, 2), torch.randn(1, 3, 1024), crossattn_mask_B_N=torch.ones(1, 3, dtype=torch.bool))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().pow(2).mean().backward()
    assert model.blocks[0].self_attn.q_proj.weight.grad is not None
