"""Context parallelism over a cp process group: sequence sharding seam, Ulysses (a2a) attention, and
`apply_context_parallel`, which swaps ring / a2a / hybrid attention into the modules it is handed.

The token sequence is laid out frame-major and each cp rank holds a contiguous block of latent frames
(cp divides the latent frame count). The model calls `model.sequence_sharding.split(t, dim)` on every
per-frame tensor after patch embedding and `gather(x, dim=1)` after the final layer; between the two,
each self-attention module the caller lists (the DiT's `blocks[i].self_attn`, chosen in
`models/parallelize.py`) sees only local tokens and must attend to the whole sequence: that is what
RingAttention (ring_attention.py) and UlyssesAttention (here) do. Attention the caller does not list
(the DiT's cross-attention to the replicated text embedding) needs no communication and is left as is.

Gradient convention: every cp rank computes the same full loss from the gathered output, and the
backward of `gather` hands each rank only its own slice of the gradient, so each rank's parameter
gradients are its share, and their SUM over the cp group is the true gradient (the data-parallel
reduction must sum over cp, not average).

Legend: B batch, S_l local sequence (S/cp), S full sequence, H heads, H_l heads per rank (H/cp), D head dim.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from cosmos_train.errors import CosmosTrainError
from cosmos_train.runtime.distributed import log
from cosmos_train.runtime.attention import SDPAAttention
from cosmos_train.runtime.ring_attention import RingAttention


CP_MODES = ("ring", "a2a", "hybrid")


# ------------------------------------------------------------------------------ sequence sharding


class _GatherSeq(torch.autograd.Function):
    """All-gather along `dim`; backward keeps only this rank's slice (see module docstring)."""

    @staticmethod
    def forward(ctx, t, dim: int, group):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t.contiguous(), group=group)
        ctx.dim, ctx.rank, ctx.chunk = dim, rank, t.shape[dim]
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.rank * ctx.chunk, ctx.chunk).contiguous(), None, None


class CPSequenceSharding:
    """The DiT's sequence-sharding seam for a cp group: contiguous split, all-gather back."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def __repr__(self) -> str:
        return f"CPSequenceSharding(cp={self.size}, rank={self.rank})"

    def split(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous chunk of `t` along `dim` (differentiable: grads pad with zeros)."""
        n = t.shape[dim]
        if n % self.size:
            raise CosmosTrainError(
                f"parallel.cp = {self.size} must divide the latent frame count, but dim {dim} has {n} "
                f"(latent frames = (frames - 1) / 4 + 1); change parallel.cp or data.num_frames")
        chunk = n // self.size
        return t.narrow(dim, self.rank * chunk, chunk)

    def gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """All-gather `t` along `dim`; backward returns only this rank's slice of the gradient."""
        return _GatherSeq.apply(t, dim, self.group)


# -------------------------------------------------------------------------------- Ulysses (a2a)


def _seq_to_heads(xs: list[torch.Tensor], group) -> torch.Tensor:
    """N tensors (B, S_l, H, D) sequence-sharded -> (N, B, S, H_l, D) head-sharded (N: packed q/k/v)."""
    size = dist.get_world_size(group)
    b, s_l, h, d = xs[0].shape
    # One send buffer (cp, N, B, S_l, H_l, D), filled straight from the inputs (no stacked copy).
    send = xs[0].new_empty(size, len(xs), b, s_l, h // size, d)
    for i, x in enumerate(xs):
        send[:, i].copy_(x.reshape(b, s_l, size, h // size, d).permute(2, 0, 1, 3, 4))
    n = len(xs)
    recv = torch.empty_like(send)  # (cp, N, B, S_l, H_l, D): chunk j = rank j's sequence block
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(n, b, size * s_l, h // size, d)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(N, B, S, H_l, D) head-sharded -> (N, B, S_l, H, D) sequence-sharded (inverse of above)."""
    size = dist.get_world_size(group)
    n, b, s, h_l, d = x.shape
    send = x.reshape(n, b, size, s // size, h_l, d).permute(2, 0, 1, 3, 4, 5).contiguous()
    recv = torch.empty_like(send)  # (cp, N, B, S_l, H_l, D): chunk j = rank j's head group
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 3, 0, 4, 5).reshape(n, b, s // size, size * h_l, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, *xs):
        ctx.group = group
        return _seq_to_heads(list(xs), group)

    @staticmethod
    def backward(ctx, grad):
        return None, *_heads_to_seq(grad, ctx.group).unbind(0)


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(list(grad.unbind(0)), ctx.group), None


class UlyssesAttention(nn.Module):
    """Context-parallel self-attention by all-to-all (DeepSpeed-Ulysses); same call as SDPAAttention.

    q, k, v (B, S_l, H, D) are re-sharded from sequence to heads with one all-to-all (q, k, v packed),
    attended by `inner` over the full sequence with H/cp heads, and sent back with the inverse
    all-to-all. Requires H divisible by cp. `inner` is any attention module with the common call
    (default SDPA); a RingAttention over another group gives the hybrid mode.
    """

    def __init__(self, group, *, inner: nn.Module | None = None):
        super().__init__()
        self.group = group
        self.inner = SDPAAttention() if inner is None else inner

    def extra_repr(self) -> str:
        return f"cp={dist.get_world_size(self.group)}"

    def forward(self, q, k, v, *, mask: torch.Tensor | None = None):
        if mask is not None:
            raise ValueError("UlyssesAttention shards self-attention only; a key mask (cross-attention) "
                             "is never sequence-sharded: keep that attn_op a regular backend")
        size, heads = dist.get_world_size(self.group), q.shape[2]
        if heads % size:
            raise CosmosTrainError(
                f"parallel.cp_mode = 'a2a' needs the head count ({heads}) divisible by the a2a degree "
                f"({size}); use parallel.cp_mode = 'ring' or a cp that divides {heads}")
        qkv = _SeqToHeads.apply(self.group, q, k, v)  # (3, B, S, H_l, D)
        out = self.inner(qkv[0], qkv[1], qkv[2])  # (B, S, H_l, D)
        return _HeadsToSeq.apply(out.unsqueeze(0), self.group)[0]


# ------------------------------------------------------------------------------------------ apply


def _as_group(group_or_mesh):
    """Accept a ProcessGroup or a 1-D DeviceMesh for the cp dimension."""
    return group_or_mesh.get_group() if hasattr(group_or_mesh, "get_group") else group_or_mesh


def build_cp_attention(cp_group, *, mode: str = "ring", kernel: str = "auto",
                       hybrid_groups: tuple | None = None) -> nn.Module:
    """The cp self-attention module for `mode` (ring | a2a | hybrid).

    hybrid: `hybrid_groups = (a2a_group, ring_group)`; the a2a groups partition the cp group (e.g. the
    ranks of one node) and each ring group holds the ranks with the same position in their a2a group,
    so cp = a2a degree x ring degree. All-to-all then stays inside a node and only the ring crosses nodes.
    """
    if mode == "ring":
        return RingAttention(cp_group, kernel=kernel)
    if mode == "a2a":
        return UlyssesAttention(cp_group)
    if mode == "hybrid":
        if hybrid_groups is None:
            raise ValueError("cp mode 'hybrid' needs hybrid_groups=(a2a_group, ring_group)")
        a2a_group, ring_group = (_as_group(g) for g in hybrid_groups)
        cp = dist.get_world_size(cp_group)
        if dist.get_world_size(a2a_group) * dist.get_world_size(ring_group) != cp:
            raise ValueError(f"hybrid cp: a2a degree {dist.get_world_size(a2a_group)} x ring degree "
                             f"{dist.get_world_size(ring_group)} must equal cp = {cp}")
        return UlyssesAttention(a2a_group, inner=RingAttention(ring_group, kernel=kernel))
    raise ValueError(f"unknown context-parallel mode {mode!r}; valid: {', '.join(CP_MODES)}")


def apply_context_parallel(model: nn.Module, cp_group, *, attention: Iterable[nn.Module] | None = None,
                           mode: str = "ring", kernel: str = "auto", hybrid_groups: tuple | None = None) -> nn.Module:
    """Shard `model`'s sequence over `cp_group` and make the listed self-attention modules cp-aware.

    Sets `model.sequence_sharding = CPSequenceSharding(cp_group)` and replaces the `attn_op` of
    every module in `attention` with the module `build_cp_attention` makes for `mode`. Which
    modules those are is the model's business: `models/parallelize.py` hands the DiT's
    self-attention; without `attention`, the model's own `self_attention_modules()` lists them.
    Apply before activation checkpointing and FSDP2. Returns the model (modified in place).
    """
    group = _as_group(cp_group)
    targets = list(model.self_attention_modules() if attention is None else attention)
    if not targets:
        raise ValueError("apply_context_parallel: no attention modules to make context-parallel")
    probe = build_cp_attention(group, mode=mode, kernel=kernel, hybrid_groups=hybrid_groups)  # validates
    model.sequence_sharding = CPSequenceSharding(group)
    for i, module in enumerate(targets):
        if not hasattr(module, "attn_op"):
            raise ValueError(f"apply_context_parallel: {type(module).__name__} has no `attn_op` to replace")
        module.attn_op = probe if i == 0 else build_cp_attention(
            group, mode=mode, kernel=kernel, hybrid_groups=hybrid_groups)
    log(f"applied {mode} context parallelism to {len(targets)} attention modules, "
        f"cp={dist.get_world_size(group)}")
    return model
