"""Context parallelism: LSE merge rule, block kernels, ring / a2a / hybrid attention on gloo ranks,
the split/gather seam, and a DiT-shaped block stack with cp=2 against cp=1.

Multi-rank checks are grouped into one spawn per world size to keep the suite fast.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cosmos_train.errors import CosmosTrainError
from cosmos_train.runtime.attention import SDPAAttention
from cosmos_train.runtime.context_parallel import (
    CPSequenceSharding, UlyssesAttention, apply_context_parallel, build_cp_attention)
from cosmos_train.runtime.ring_attention import (
    RingAttention, build_block_kernel, math_attention_block, merge_partials)
from tests.dist import run_ranks

# ------------------------------------------------------------------------------ single process


def _full_attention(q, k, v, key_mask=None):
    """(B, H, S, D) reference softmax attention in the input dtype."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 1, 0, 2), (2, 3, 1, 0)])
def test_merge_rule_reproduces_full_attention_in_any_order(order):
    g = torch.Generator().manual_seed(1)
    b, h, s_q, d = 2, 3, 5, 4
    sizes = [3, 4, 2, 5]  # uneven partitions of 14 keys
    q = torch.randn(b, h, s_q, d, generator=g, dtype=torch.float64) * 3  # sharp softmax
    k = torch.randn(b, h, sum(sizes), d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, sum(sizes), d, generator=g, dtype=torch.float64)
    key_mask = torch.rand(b, sum(sizes), generator=g) > 0.3
    key_mask[0, 3:7] = False  # partition 1 fully masked for batch 0
    key_mask[1, :3] = False   # partition 0 fully masked for batch 1
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    out = lse = None
    for i in order:
        sl = slice(bounds[i], bounds[i + 1])
        bo, bl = math_attention_block(q, k[:, :, sl], v[:, :, sl], scale=d ** -0.5, key_mask=key_mask[:, sl])
        out, lse = (bo, bl) if out is None else merge_partials(out, lse, bo, bl)
    ref = _full_attention(q, k, v, key_mask)
    assert (out - ref).abs().max() <= 1e-12
    ref_lse = torch.logsumexp((q @ k.transpose(-1, -2) * d ** -0.5).masked_fill(
        ~key_mask[:, None, None, :], float("-inf")), -1)
    assert (lse - ref_lse).abs().max() <= 1e-12


def test_merge_rule_fully_masked_everywhere_is_finite():
    out = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    neg_inf = torch.full((1, 2, 3), float("-inf"), dtype=torch.float64)
    merged, lse = merge_partials(out, neg_inf, out * 2, neg_inf)
    assert torch.isfinite(merged).all() and (merged == 0).all()
    assert torch.isneginf(lse).all()
    # One fully masked part does not change the other.
    lse_b = torch.randn(1, 2, 3, dtype=torch.float64)
    merged, lse = merge_partials(torch.full_like(out, float("nan")).nan_to_num(7.0), neg_inf, out, lse_b)
    torch.testing.assert_close(merged, out, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_b, rtol=0, atol=0)
    # fp32 inputs merge in fp32; huge lse values do not overflow.
    o32, l32 = merge_partials(out.float(), lse_b.float() + 1e4, out.float(), lse_b.float() + 1e4)
    assert o32.dtype == torch.float32 and torch.isfinite(o32).all() and torch.isfinite(l32).all()


@pytest.mark.parametrize("kernel", ["math", "flash"])
def test_block_kernels_give_exact_share_of_full_gradient(kernel):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ref = _full_attention(q, k, v)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gq, gk, gv = torch.autograd.grad(ref, (q, k, v), dout)
    kern = build_block_kernel(kernel)
    parts = [slice(0, 4), slice(4, 9)]
    out = lse = None
    for sl in parts:
        bo, bl = kern.forward(q.detach(), k.detach()[:, :, sl], v.detach()[:, :, sl], scale=0.5)
        out, lse = (bo, bl) if out is None else merge_partials(out, lse, bo, bl)
    assert (out - ref).abs().max() <= 1e-12
    grads = [kern.backward(dout, q.detach(), k.detach()[:, :, sl], v.detach()[:, :, sl], out, lse, scale=0.5)
             for sl in parts]
    assert (sum(g_[0] for g_ in grads) - gq).abs().max() <= 1e-12
    assert (torch.cat([g_[1] for g_ in grads], 2) - gk).abs().max() <= 1e-12
    assert (torch.cat([g_[2] for g_ in grads], 2) - gv).abs().max() <= 1e-12


def test_unknown_names_raise_listing_valid_ones():
    with pytest.raises(ValueError, match="math, flash, efficient, auto"):
        build_block_kernel("cudnn")
    with pytest.raises(ValueError, match="ring, a2a, hybrid"):
        build_cp_attention(None, mode="zigzag")


# --------------------------------------------------------------------------- multi-rank bodies


def _global_qkv(b, s, h, d, dtype):
    """The same full (B, S, H, D) q, k, v and output gradient on every rank."""
    g = torch.Generator().manual_seed(1234)
    return [torch.randn(b, s, h, d, generator=g, dtype=dtype) for _ in range(4)]


def _cp_errors(module, rank, world, dtype, *, local_s=5, heads=12):
    """Max abs error of out and q/k/v grads of `module` on local blocks vs full SDPA."""
    q, k, v, dout = _global_qkv(2, local_s * world, heads, 4, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = SDPAAttention()(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    sl = slice(rank * local_s, (rank + 1) * local_s)
    local = [t[:, sl].clone().requires_grad_() for t in (q, k, v)]
    out = module(*local)
    grads = torch.autograd.grad(out, local, dout[:, sl])
    errs = [(out - ref[:, sl]).abs().max().item()]
    errs += [(g - r[:, sl]).abs().max().item() for g, r in zip(grads, ref_grads)]
    return max(errs)


def _attention_body(rank, world, kernels):
    group = dist.group.WORLD
    res = {}
    for dtype in (torch.float64, torch.float32):
        for kernel in kernels:
            ring = RingAttention(group, kernel=kernel)
            res[f"ring/{kernel}/{dtype}"] = _cp_errors(ring, rank, world, dtype)
            if dtype == torch.float64 and kernel == kernels[0]:
                res["stats"] = (ring.stats.forward_kv_exchanges, ring.stats.backward_kv_exchanges,
                                ring.stats.backward_dkv_exchanges)
        res[f"a2a/{dtype}"] = _cp_errors(UlyssesAttention(group), rank, world, dtype)
    if world == 2:
        # A kernel failing on every rank mid-ring (no CPU efficient op) leaves no exchange in flight:
        # the next ring call on the same group still works.
        try:
            RingAttention(group, kernel="efficient")(*(torch.zeros(1, 2, 2, 4) for _ in range(3)))
            res["efficient_on_cpu"] = "no error"
        except NotImplementedError:
            res["efficient_on_cpu"] = "raised"
        res["after_error/torch.float64"] = _cp_errors(RingAttention(group, kernel="math"), rank, world,
                                                      torch.float64)
    # Heads not divisible by cp: a clear error.
    try:
        UlyssesAttention(group)(*(torch.zeros(1, 2, world + 1, 4) for _ in range(3)))
        res["a2a_heads_error"] = None
    except CosmosTrainError as exc:
        res["a2a_heads_error"] = str(exc)
    if world == 4:  # hybrid: a2a inside pairs {0,1},{2,3}, ring across {0,2},{1,3}
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        rings = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        hybrid = build_cp_attention(group, mode="hybrid", kernel="math",
                                    hybrid_groups=(pairs[rank // 2], rings[rank % 2]))
        res["hybrid/fp64"] = _cp_errors(hybrid, rank, world, torch.float64)
    return res


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_and_a2a_equal_full_attention(world):
    kernels = ["math", "flash"] if world == 2 else ["math"]
    results = run_ranks(_attention_body, world, kernels, timeout=120)
    for rank, res in enumerate(results):
        for key, err in res.items():
            if "float64" in key or key.endswith("fp64"):
                assert err <= 1e-10, (rank, key, err)
            elif "float32" in key:
                assert err <= 2e-5, (rank, key, err)
        # cp-1 K/V exchanges forward and backward; dK/dV take one more hop back to their owner.
        assert res["stats"] == (world - 1, world - 1, world), res["stats"]
        assert res.get("efficient_on_cpu", "raised") == "raised"
        assert "divisible" in res["a2a_heads_error"] and "parallel.cp_mode" in res["a2a_heads_error"]
    if world == 4:
        assert "hybrid/fp64" in results[0]


def _split_gather_body(rank, world):
    sharding = CPSequenceSharding(dist.group.WORLD)
    g = torch.Generator().manual_seed(7)
    t = torch.randn(2, 2 * world, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2 * world, 3, generator=g, dtype=torch.float64)
    local = sharding.split(t, 1)
    assert local.shape == (2, 2, 3)
    full = sharding.gather(local * 2, 1)
    assert torch.equal(full, t.detach() * 2)
    (full * w).sum().backward()
    grad = t.grad.clone()
    dist.all_reduce(grad)  # per-rank grads are shares: their sum is the true gradient
    try:
        sharding.split(torch.zeros(1, 2 * world + 1), 1)
        err = None
    except CosmosTrainError as exc:
        err = str(exc)
    return (grad - 2 * w).abs().max().item(), t.grad[:, : 2 * rank].abs().max().item() if rank else 0.0, err


def test_split_gather_autograd():
    for err, outside, msg in run_ranks(_split_gather_body, 2, timeout=60):
        assert err <= 1e-12 and outside == 0.0
        assert "parallel.cp" in msg


# ------------------------------------------------------------------- DiT-shaped block stack


class _Identity:
    def split(self, t, dim):
        return t

    def gather(self, t, dim):
        return t


class _Attn(nn.Module):
    def __init__(self, dim, heads, ctx_dim=None):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.v_proj = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.output_proj = nn.Linear(dim, dim, bias=False)
        self.attn_op = SDPAAttention()

    def forward(self, x, ctx=None, mask=None):
        b, s, dim = x.shape
        src = x if ctx is None else ctx
        q = self.q_proj(x).view(b, s, self.heads, -1)
        k = self.k_proj(src).view(b, src.shape[1], self.heads, -1)
        v = self.v_proj(src).view(b, src.shape[1], self.heads, -1)
        out = self.attn_op(q, k, v) if mask is None else self.attn_op(q, k, v, mask=mask)
        return self.output_proj(out.reshape(b, s, dim))


class _Block(nn.Module):
    def __init__(self, dim, heads, ctx_dim):
        super().__init__()
        self.self_attn = _Attn(dim, heads)
        self.cross_attn = _Attn(dim, heads, ctx_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim, bias=False), nn.GELU(), nn.Linear(2 * dim, dim, bias=False))
        self.mod = nn.Linear(dim, dim, bias=False)

    def forward(self, x, t_emb, ctx, mask):  # x (B, T*HW, D), t_emb (B, T*HW, D) per-frame
        x = x + self.self_attn(x * (1 + self.mod(t_emb)))
        x = x + self.cross_attn(x, ctx, mask)
        return x + self.mlp(x)


class _StandInDiT(nn.Module):
    """Follows the DiT seam: split per-frame tensors on latent T, blocks on local frames, gather."""

    def __init__(self, dim=16, heads=4, ctx_dim=8, depth=2, channels=3):
        super().__init__()
        self.embed = nn.Linear(channels, dim, bias=False)
        self.t_embed = nn.Linear(1, dim, bias=False)
        self.blocks = nn.ModuleList(_Block(dim, heads, ctx_dim) for _ in range(depth))
        self.final = nn.Linear(dim, channels, bias=False)
        self.sequence_sharding = _Identity()

    def forward(self, x, t, ctx, mask):  # x (B, T, HW, C); t (B, T) per-frame timesteps
        b, _, hw, _ = x.shape
        x = self.sequence_sharding.split(self.embed(x), 1)                   # (B, T_l, HW, D)
        t_emb = self.sequence_sharding.split(self.t_embed(t[..., None]), 1)  # (B, T_l, D)
        pos = self.sequence_sharding.split(torch.linspace(0, 1, t.shape[1], dtype=x.dtype), 0)  # (T_l,)
        x = x + pos[None, :, None, None]
        t_tok = t_emb[:, :, None].expand(-1, -1, hw, -1).reshape(b, -1, x.shape[-1])
        x = x.reshape(b, -1, x.shape[-1])
        for block in self.blocks:
            x = block(x, t_tok, ctx, mask)
        x = self.final(x).view(b, -1, hw, self.final.out_features)  # (B, T_l, HW, C)
        return self.sequence_sharding.gather(x, 1)


def _model_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=dtype)  # 4 latent frames of 3 tokens
    t = torch.rand(2, 4, generator=g, dtype=dtype)
    ctx = torch.randn(2, 5, 8, generator=g, dtype=dtype)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    return x, t, ctx, mask


def _loss_and_grads(model, dtype):
    out = model(*_model_inputs(dtype))
    loss = (out ** 2).mean()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _dit_body(rank, world, reference):
    ref_out, ref_grads = reference
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    log = logging.getLogger("cosmos_train")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    res = {}
    for mode in ("ring", "a2a"):
        torch.manual_seed(0)
        model = _StandInDiT().double()
        apply_context_parallel(model, dist.group.WORLD, attention=[b.self_attn for b in model.blocks],
                               mode=mode, kernel="math")
        assert model.state_dict().keys() == _StandInDiT().state_dict().keys()
        assert isinstance(model.blocks[1].cross_attn.attn_op, SDPAAttention)  # cross-attn untouched
        out, grads = _loss_and_grads(model, torch.float64)
        grad_err = 0.0
        for name, grad in grads.items():
            dist.all_reduce(grad)  # cp ranks hold shares of the gradient; the sum is the true one
            grad_err = max(grad_err, (grad - ref_grads[name]).abs().max().item())
        res[mode] = ((out - ref_out).abs().max().item(), grad_err)
    return res, records


def test_dit_shaped_stack_cp2_equals_cp1():
    torch.manual_seed(0)
    ref_model = _StandInDiT().double()
    reference = _loss_and_grads(ref_model, torch.float64)
    for rank, (res, records) in enumerate(run_ranks(_dit_body, 2, reference, timeout=60)):
        for mode, (out_err, grad_err) in res.items():
            assert out_err <= 1e-10 and grad_err <= 1e-10, (mode, out_err, grad_err)
        # one log line per job (rank 0), not one per rank
        assert records == (["applied ring context parallelism to 2 attention modules, cp=2",
                            "applied a2a context parallelism to 2 attention modules, cp=2"] if rank == 0 else [])


# ------------------------------------------------------------------------------- the real DiT


def _tiny_dit_run(mode, group):
    """Loss-gradients of the tiny DiT (fp64, perturbed init so no path is zero) with cp `mode`."""
    from cosmos_train.models.dit import DiT
    from cosmos_train.presets import PRESETS

    model = DiT(PRESETS["tiny"]).double()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        model.init_weights(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    if mode is not None:
        apply_context_parallel(model, group, mode=mode, kernel="math")
    x = torch.randn(2, 48, 4, 4, 4, generator=g, dtype=torch.float64)  # 4 latent frames
    t = torch.rand(2, 4, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 3, 1024, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = model(x, t, ctx, crossattn_mask_B_N=mask)
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def _tiny_dit_body(rank, world, reference):
    ref_out, ref_grads = reference
    res = {}
    for mode in ("ring", "a2a"):
        out, grads = _tiny_dit_run(mode, dist.group.WORLD)
        grad_err = 0.0
        for name, grad in grads.items():
            dist.all_reduce(grad)  # shares of the gradient summed over cp ranks
            grad_err = max(grad_err, (grad - ref_grads[name]).abs().max().item())
        res[mode] = ((out - ref_out).abs().max().item(), grad_err)
    return res


def test_tiny_dit_cp2_equals_cp1():
    reference = _tiny_dit_run(None, None)
    assert max(g.abs().max().item() for g in reference[1].values() if g.ndim == 2) > 0
    for res in run_ranks(_tiny_dit_body, 2, reference, timeout=120):
        for mode, (out_err, grad_err) in res.items():
            assert out_err <= 1e-10 and grad_err <= 1e-10, (mode, out_err, grad_err)
