"""Memory stand-ins for the parts of a step the planner cannot run on the meta device.

The planner traces the real DiT and loss on meta tensors (`trace.py`). Two things there need
a process group or a real kernel choice, so they are replaced by modules that allocate and
save exactly what the runtime's versions do, with the communication replaced by a local copy
(same buffers, same shapes; the values are meaningless, meta tensors have none):

- `FlashAttention`: the attention kernel (SDPA / TE / flash all save q, k, v, out and an fp32
  log-sum-exp; none keeps the S x S score matrix). It calls the CPU flash op, whose meta
  kernel gives those shapes.
- `RingAttention`: `runtime.ring_attention._RingAttentionFn` with the P2P hop replaced by a copy:
  two K/V buffers in flight, fp32 output accumulator, dK/dV travelling in fp32 in backward.
- `UlyssesAttention`: `runtime.context_parallel`'s all-to-all reshards (send + receive buffer
  each way), attention over the full sequence with H/a2a heads in between.
- `SequenceSharding`: the DiT's cp seam: a narrow on split, an all-gather (cp part buffers,
  then the concatenation) on gather.

benchmarks/plan_accuracy.py checks these against real gloo runs of the runtime modules.
Legend: B batch, S local tokens, H heads, D head dim, cp degree.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class FlashAttention(nn.Module):
    """(B, S, H, D) attention that saves q, k, v, out, lse (flash-style), as the runtime kernels."""

    def forward(self, q, k, v, *, mask=None):
        out, _lse = _flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False)
        return out.transpose(1, 2)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _RingFn(torch.autograd.Function):
    """Allocation-for-allocation copy of `_RingAttentionFn` (forward and backward), hop = copy."""

    @staticmethod
    def forward(ctx, q, k, v, size: int, scale: float):
        kv_cur = torch.stack([k, v])
        kv_next = torch.empty_like(kv_cur)
        out = lse = None
        for step in range(size):
            if step < size - 1:
                kv_next.copy_(kv_cur)
            block_out, block_lse = _flash(q, kv_cur[0], kv_cur[1], 0.0, False, scale=scale)
            if out is None:
                out = block_out.to(_acc(q.dtype), copy=True)
                lse = block_lse.to(_acc(q.dtype))
            else:  # merge_partials(inplace=True): weights of lse's size, one out-sized product
                m = torch.maximum(lse, block_lse.to(lse.dtype))
                w_a, w_b = torch.exp(lse - m), torch.exp(block_lse - m)
                total = w_a + w_b
                lse = m + torch.log(total)
                out.mul_((w_a / total).unsqueeze(-1)).add_(block_out.to(out.dtype) * (w_b / total).unsqueeze(-1))
            del block_out, block_lse
            kv_cur, kv_next = kv_next, kv_cur
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.size, ctx.scale = size, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        acc = _acc(q.dtype)
        dout = dout.contiguous()
        kv_cur = torch.stack([k, v])
        kv_next = torch.empty_like(kv_cur)
        dq = torch.zeros_like(q, dtype=acc)
        dkv_cur = torch.zeros_like(kv_cur, dtype=acc)
        dkv_next = torch.empty_like(dkv_cur)
        for step in range(ctx.size):
            if step < ctx.size - 1:
                kv_next.copy_(kv_cur)
            dq_b, dk_b, dv_b = _flash_bwd(dout, q, kv_cur[0], kv_cur[1], out.to(q.dtype), lse.contiguous(),
                                          0.0, False, scale=ctx.scale)
            dq += dq_b
            del dq_b
            if step > 0:
                dkv_cur, dkv_next = dkv_next, dkv_cur
            dkv_cur[0] += dk_b
            dkv_cur[1] += dv_b
            dkv_next.copy_(dkv_cur)
            kv_cur, kv_next = kv_next, kv_cur
        return dq.to(q.dtype), dkv_next[0].to(k.dtype), dkv_next[1].to(v.dtype), None, None


class RingAttention(nn.Module):
    """Stand-in for `runtime.ring_attention.RingAttention` over a ring of `size` ranks."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, q, k, v, *, mask=None):
        scale = 1.0 / math.sqrt(q.shape[-1])
        out = _RingFn.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.size, scale)
        return out.transpose(1, 2)


def _seq_to_heads(xs: list[torch.Tensor], size: int) -> torch.Tensor:
    b, s_l, h, d = xs[0].shape
    send = xs[0].new_empty(size, len(xs), b, s_l, h // size, d)
    for i, x in enumerate(xs):
        send[:, i].copy_(x.reshape(b, s_l, size, h // size, d).permute(2, 0, 1, 3, 4))
    recv = torch.empty_like(send)
    recv.copy_(send)  # all_to_all_single
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(len(xs), b, size * s_l, h // size, d)


def _heads_to_seq(x: torch.Tensor, size: int) -> torch.Tensor:
    n, b, s, h_l, d = x.shape
    send = x.reshape(n, b, size, s // size, h_l, d).permute(2, 0, 1, 3, 4, 5).contiguous()
    recv = torch.empty_like(send)
    recv.copy_(send)  # all_to_all_single
    return recv.permute(1, 2, 3, 0, 4, 5).reshape(n, b, s // size, size * h_l, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, size, *xs):
        ctx.size = size
        return _seq_to_heads(list(xs), size)

    @staticmethod
    def backward(ctx, grad):
        return None, *_heads_to_seq(grad, ctx.size).unbind(0)


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size):
        ctx.size = size
        return _heads_to_seq(x, size)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(list(grad.unbind(0)), ctx.size), None


class UlyssesAttention(nn.Module):
    """Stand-in for `runtime.context_parallel.UlyssesAttention` over `size` ranks."""

    def __init__(self, size: int, *, inner: nn.Module | None = None):
        super().__init__()
        self.size = size
        self.inner = FlashAttention() if inner is None else inner

    def forward(self, q, k, v, *, mask=None):
        qkv = _SeqToHeads.apply(self.size, q, k, v)
        out = self.inner(qkv[0], qkv[1], qkv[2])
        return _HeadsToSeq.apply(out.unsqueeze(0), self.size)[0]


def cp_attention(mode: str, cp: int, a2a_degree: int = 1) -> nn.Module:
    """The stand-in of the self-attention that `apply_context_parallel` installs for `mode`."""
    if mode == "ring":
        return RingAttention(cp)
    if mode == "a2a":
        return UlyssesAttention(cp)
    if mode == "hybrid":
        return UlyssesAttention(a2a_degree, inner=RingAttention(cp // a2a_degree))
    raise ValueError(f"unknown context-parallel mode {mode!r}; valid: ring, a2a, hybrid")


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, dim: int, size: int):
        parts = [torch.empty_like(t) for _ in range(size)]
        for p in parts:
            p.copy_(t)  # all_gather
        ctx.dim, ctx.chunk = dim, t.shape[dim]
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, 0, ctx.chunk).contiguous(), None, None


class SequenceSharding:
    """Stand-in for `CPSequenceSharding` as seen by cp rank 0."""

    def __init__(self, size: int):
        self.size = size

    def split(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.narrow(dim, 0, t.shape[dim] // self.size)

    def gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return _Gather.apply(t, dim, self.size)
