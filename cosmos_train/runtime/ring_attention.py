"""Ring attention: exact non-causal attention over a sequence sharded across a cp process group.

Each rank keeps its query block; the key/value blocks (K and V packed in one buffer) travel around
the ring with batched isend/irecv, double-buffered: the exchange for step i+1 is posted before the
block of step i is computed. Every block kernel returns (out, lse) and the partial results are merged
with the log-sum-exp rule in fp32 (fp64 for fp64 inputs). The backward pass is a ring too: it saves
only the local q, k, v, the merged out and lse; dK/dV are accumulated in fp32 in a buffer that travels
with its K/V block and arrives back at the block's owner after one extra hop. Activation memory is
O(S/cp) per rank.

Legend: B batch, H heads, S local sequence (this rank's block), D head dim. Kernels and the autograd
Function work in (B, H, S, D); lse is (B, H, S) fp32. The module takes (B, S, H, D) like every
attention backend.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# --------------------------------------------------------------------------------------------- merge


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs, fp64 for fp64 (keeps the math kernel exact in tests)."""
    return torch.promote_types(dtype, torch.float32)


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                   *, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets.

    out_*: (..., S, D), lse_*: (..., S) log-sum-exp of the scaled scores of each part. Returns the
    (out, lse) of attention over the union, in the accumulation dtype. A fully masked part has
    lse = -inf (its out is ignored); if both parts are fully masked the result is out = 0,
    lse = -inf, never NaN or inf: the exponent shift uses a finite stand-in for -inf maxima.
    inplace=True writes the result into out_a (which must already be in the accumulation dtype),
    saving two temporaries of out's size in the ring loop.
    """
    dtype = _accum_dtype(out_a.dtype)
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)  # in [0, 1], one of them is 1 unless both -inf
    total = w_a + w_b
    lse = m + torch.log(total)  # -inf where both parts are fully masked
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    scale_a, scale_b = (w_a / safe_total).unsqueeze(-1), (w_b / safe_total).unsqueeze(-1)
    if inplace:
        assert out_a.dtype == dtype
        return out_a.mul_(scale_a).add_(out_b.to(dtype) * scale_b), lse
    return out_a.to(dtype) * scale_a + out_b.to(dtype) * scale_b, lse


# ------------------------------------------------------------------------------------------- kernels


class BlockKernel(ABC):
    """A block attention kernel: `forward -> (out, lse)` and the block backward given the *merged*
    out and lse (which makes each block's dq/dk/dv its exact share of the full gradient)."""

    name = "base"

    @abstractmethod
    def forward(self, q, k, v, *, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) of attention of q over this block's k, v."""

    @abstractmethod
    def backward(self, dout, q, k, v, out, lse, *, scale: float) -> tuple[torch.Tensor, ...]:
        """(dq, dk, dv) of this block given the merged out and lse."""


def math_attention_block(q, k, v, *, scale: float, key_mask: torch.Tensor | None = None):
    """Plain-math block attention in the accumulation dtype: (out, lse), exact in fp64.

    key_mask (B, S_k) bool, True = attend. Rows with no visible key give out = 0, lse = -inf.
    """
    dtype = _accum_dtype(q.dtype)
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale  # (B, H, S_q, S_k)
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    return torch.matmul(p, v.to(dtype)), lse


class MathKernel(BlockKernel):
    """Reference kernel in plain torch ops (any device and dtype; exact in fp64)."""

    name = "math"

    def forward(self, q, k, v, *, scale):
        return math_attention_block(q, k, v, scale=scale)

    def backward(self, dout, q, k, v, out, lse, *, scale):
        dtype = _accum_dtype(q.dtype)
        q, k, v, dout, out = (t.to(dtype) for t in (q, k, v, dout, out))
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        p = torch.exp(s - lse.to(dtype).unsqueeze(-1))  # this block's share of the global softmax
        dv = torch.matmul(p.transpose(-1, -2), dout)
        dp = torch.matmul(dout, v.transpose(-1, -2))
        delta = (dout * out).sum(-1, keepdim=True)  # rowsum(dO * O), from the merged output
        ds = p * (dp - delta)
        return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale, dv


class FlashKernel(BlockKernel):
    """torch's flash attention ops, which return the LSE: the CPU flash op on CPU (fp32/fp64/bf16/fp16),
    the CUDA flash op on CUDA (fp16/bf16 only)."""

    name = "flash"

    def forward(self, q, k, v, *, scale):
        if q.device.type == "cuda":
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
            return res[0], res[1]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)

    def backward(self, dout, q, k, v, out, lse, *, scale):
        out = out.to(q.dtype)
        if q.device.type == "cuda":
            empty = torch.empty(0, device=q.device, dtype=torch.int64)
            return torch.ops.aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse, empty, empty, q.shape[2], k.shape[2], 0.0, False,
                empty, empty, scale=scale)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out, lse.contiguous(), 0.0, False, scale=scale)


class EfficientKernel(BlockKernel):
    """torch's CUDA memory-efficient attention op (fp32/fp16/bf16); CUDA only.

    Its LSE comes padded along S to a multiple of 32; it is sliced for the merge and padded back for
    the backward op.
    """

    name = "efficient"
    _ALIGN = 32

    def forward(self, q, k, v, *, scale):
        res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
        return res[0], res[1][..., : q.shape[2]]

    def backward(self, dout, q, k, v, out, lse, *, scale):
        s = q.shape[2]
        padded = math.ceil(s / self._ALIGN) * self._ALIGN
        lse = torch.nn.functional.pad(lse, (0, padded - s)).contiguous()
        empty = torch.empty(0, device=q.device, dtype=torch.int64)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout.contiguous(), q, k, v, None, out.to(q.dtype), lse, empty, empty, 0.0,
            [True, True, True, False], False, scale=scale)
        return dq, dk, dv


class AutoKernel(BlockKernel):
    """flash on CPU; on CUDA flash for fp16/bf16, efficient for fp32, math for fp64."""

    name = "auto"

    def __init__(self):
        self._flash, self._efficient, self._math = FlashKernel(), EfficientKernel(), MathKernel()

    def _pick(self, q) -> BlockKernel:
        if q.device.type != "cuda":
            return self._flash
        if q.dtype in (torch.float16, torch.bfloat16):
            return self._flash
        return self._efficient if q.dtype == torch.float32 else self._math

    def forward(self, q, k, v, *, scale):
        return self._pick(q).forward(q, k, v, scale=scale)

    def backward(self, dout, q, k, v, out, lse, *, scale):
        return self._pick(q).backward(dout, q, k, v, out, lse, scale=scale)


BLOCK_KERNELS = {"math": MathKernel, "flash": FlashKernel, "efficient": EfficientKernel, "auto": AutoKernel}


def build_block_kernel(name: str) -> BlockKernel:
    """Block kernel by name: math | flash | efficient | auto."""
    if name not in BLOCK_KERNELS:
        raise ValueError(f"unknown ring attention kernel {name!r}; valid: {', '.join(BLOCK_KERNELS)}")
    return BLOCK_KERNELS[name]()


# -------------------------------------------------------------------------------------------- ring


@dataclass
class RingStats:
    """Communication counters of one RingAttention module (for tests and logs)."""

    forward_kv_exchanges: int = 0
    backward_kv_exchanges: int = 0
    backward_dkv_exchanges: int = 0


_KV_TAG, _DKV_TAG = 0, 1  # distinct tags: a K/V and a dK/dV exchange with the same peer may overlap


def _ring_exchange(send: torch.Tensor, recv: torch.Tensor, group, *, tag: int) -> list:
    """Post send -> next rank and recv <- previous rank as one batch; returns the requests."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if size == 1:  # a ring of one: the "next rank" is this rank
        recv.copy_(send)
        return []
    ops = [dist.P2POp(dist.isend, send, group=group, group_peer=(rank + 1) % size, tag=tag),
           dist.P2POp(dist.irecv, recv, group=group, group_peer=(rank - 1) % size, tag=tag)]
    return dist.batch_isend_irecv(ops)


def _wait(reqs: list) -> None:
    for req in reqs:
        req.wait()


class _RingAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, kernel: BlockKernel, scale: float, stats: RingStats):
        size = dist.get_world_size(group)
        kv_cur = torch.stack([k, v])  # (2, B, H, S, D): one buffer, one message per hop
        kv_next = torch.empty_like(kv_cur)
        out = lse = None
        for step in range(size):
            reqs = []
            if step < size - 1:  # post the next hop before computing on the current block
                reqs = _ring_exchange(kv_cur, kv_next, group, tag=_KV_TAG)
                stats.forward_kv_exchanges += 1
            try:
                block_out, block_lse = kernel.forward(q, kv_cur[0], kv_cur[1], scale=scale)
            except BaseException:
                _wait(reqs)  # leave no exchange in flight: the group stays usable after the error
                raise
            if out is None:  # a copy when the kernel returns fp32 already: merged in place below
                out = block_out.to(_accum_dtype(q.dtype), copy=True)
                lse = block_lse.to(_accum_dtype(q.dtype))
            else:
                out, lse = merge_partials(out, lse, block_out, block_lse, inplace=True)
            del block_out, block_lse
            _wait(reqs)
            kv_cur, kv_next = kv_next, kv_cur
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.kernel, ctx.scale, ctx.stats = group, kernel, scale, stats
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, kernel, scale, stats = ctx.group, ctx.kernel, ctx.scale, ctx.stats
        size = dist.get_world_size(group)
        acc = _accum_dtype(q.dtype)
        dout = dout.contiguous()
        kv_cur = torch.stack([k, v])
        kv_next = torch.empty_like(kv_cur)
        dq = torch.zeros_like(q, dtype=acc)
        # dK/dV of the block currently held, accumulated by every rank it visits; travels with it.
        dkv_cur = torch.zeros_like(kv_cur, dtype=acc)
        dkv_next = torch.empty_like(dkv_cur)
        dkv_reqs: list = []
        for step in range(size):
            kv_reqs = []
            if step < size - 1:
                kv_reqs = _ring_exchange(kv_cur, kv_next, group, tag=_KV_TAG)
                stats.backward_kv_exchanges += 1
            try:
                dq_b, dk_b, dv_b = kernel.backward(dout, q, kv_cur[0], kv_cur[1], out, lse, scale=scale)
            except BaseException:
                _wait(kv_reqs + dkv_reqs)  # as in forward: nothing left in flight
                raise
            dq += dq_b
            del dq_b
            if step > 0:  # the dK/dV partial sum of this block arrives from the previous rank
                _wait(dkv_reqs)
                dkv_cur, dkv_next = dkv_next, dkv_cur
            dkv_cur[0] += dk_b
            dkv_cur[1] += dv_b
            # After the last step this hop brings every block's total back to its owner.
            dkv_reqs = _ring_exchange(dkv_cur, dkv_next, group, tag=_DKV_TAG)
            stats.backward_dkv_exchanges += 1
            _wait(kv_reqs)
            kv_cur, kv_next = kv_next, kv_cur
        _wait(dkv_reqs)
        dk, dv = dkv_next[0].to(k.dtype), dkv_next[1].to(v.dtype)
        return dq.to(q.dtype), dk, dv, None, None, None, None


def ring_attention(q, k, v, group, *, kernel: BlockKernel, scale: float | None = None,
                   stats: RingStats | None = None) -> torch.Tensor:
    """Ring attention on (B, H, S, D) blocks of a sequence sharded contiguously over `group`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _RingAttentionFn.apply(q, k, v, group, kernel, scale, RingStats() if stats is None else stats)


class RingAttention(nn.Module):
    """Context-parallel self-attention with a K/V ring over `group`; same call as SDPAAttention.

    q, k, v are this rank's (B, S/cp, H, D) block of a sequence laid out contiguously over the cp
    ranks (rank i holds block i). `kernel` names the block kernel (math | flash | efficient | auto).
    `stats` counts K/V exchanges.
    """

    def __init__(self, group, *, kernel: str = "auto"):
        super().__init__()
        self.group = group
        self.kernel = build_block_kernel(kernel)
        self.stats = RingStats()

    def extra_repr(self) -> str:
        return f"cp={dist.get_world_size(self.group)}, kernel={self.kernel.name}"

    def forward(self, q, k, v, *, mask: torch.Tensor | None = None):
        if mask is not None:
            raise ValueError("RingAttention shards self-attention only; a key mask (cross-attention) "
                             "is never sequence-sharded: keep that attn_op a regular backend")
        out = ring_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.group,
                             kernel=self.kernel, stats=self.stats)
        return out.transpose(1, 2)
