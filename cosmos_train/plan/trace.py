"""Activation memory of one micro-batch, measured by running the real step on meta tensors.

The DiT of the spec is built on the meta device by the training code (`build_dit`, LoRA
included), activation checkpointing is applied by the runtime's own function, and the real
`tokenizer.encode` and `training_loss` (forward and backward) run on meta tensors of this rank's
shapes. Meta tensors allocate nothing, but every op still returns outputs of the right shape,
dtype and storage, and autograd keeps what it saves alive. `LiveBytes`, a dispatch mode, adds up
the bytes of every meta storage created while it is alive (weak references tell it when one is
freed), so its peak is the step's activation + workspace peak, and its level at the end of the
forward is what the backward needs (the saved activations).

What is not run here: parameters and the FSDP2 buffers (exact arithmetic, `model_states.py` and
`memory.py`); communication (the stand-ins of `standins.py` allocate what the cp code
allocates); gradients are dropped as soon as autograd accumulates them, and the tracker counts
their sharded fp32 size instead (that is what FSDP2 keeps after its reduce-scatter).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cosmos_train.models.diffusion import training_loss
from cosmos_train.plan import standins
from cosmos_train.plan.model_states import fsdp_unit
from cosmos_train.runtime.fsdp import apply_activation_checkpointing

TEXT_TOKENS = 512  # the data pipeline pads every T5 embedding to 512 tokens


class LiveBytes(TorchDispatchMode):
    """Bytes of meta storages alive, and their peak, while the mode is active.

    Storages that exist before the mode (parameters, buffers) are ignored; `extra` is added to
    the level (the planner's sharded gradients, which the trace itself drops).
    """

    def __init__(self, ignore: set[int] = frozenset()):
        super().__init__()
        self._live: dict[int, tuple[int, weakref.ref]] = {}
        self._ignore = set(ignore)
        self.tensors = 0
        self.extra = 0
        self.peak = 0
        self.spike_peak = 0  # highest level + spike seen by `spike`

    @property
    def level(self) -> int:
        return self.tensors + self.extra

    def _freed(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.tensors -= entry[0]

    def add_extra(self, nbytes: int) -> None:
        self.extra += nbytes
        self.peak = max(self.peak, self.level)

    def reset_peak(self) -> None:
        self.peak = self.level
        self.spike_peak = 0

    def spike(self, nbytes: int) -> None:
        """Note a transient of `nbytes` (not a traced tensor) on top of the current level."""
        self.spike_peak = max(self.spike_peak, self.level + nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                st = t.untyped_storage()
                key = st._cdata
                if key in self._ignore or key in self._live:
                    continue
                self._live[key] = (st.nbytes(), weakref.ref(st, lambda _r, k=key: self._freed(k)))
                self.tensors += st.nbytes()
        self.peak = max(self.peak, self.level)
        return out


@dataclass(frozen=True)
class ActivationTrace:
    """Peaks (bytes, this rank) of one micro-batch: tokenizer encode, forward, backward."""

    encode_peak: int  # video + latent + tokenizer temporaries
    batch: int  # what stays on the device from the batch during the step (latent + text embedding)
    forward_peak: int
    saved: int  # alive at the end of the forward: the saved activations (plus the batch)
    backward_peak: int  # includes the sharded gradients as they appear
    reduce_scatter_peak: int  # level + a unit's reduce-scatter buffers, when its last gradient arrives
    attention_workspace: int  # peak of one self-attention call minus what it saves


class _CastInputs(nn.Module):
    """FSDP2's `cast_forward_inputs`: floating inputs of the root forward go to param_dtype."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, *args, **kwargs):
        def cast(x):
            return x.to(self.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        return self.net(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})


def install_standins(model: nn.Module, *, cp: int, cp_mode: str, a2a_degree: int) -> None:
    """Replace attention kernels (and the cp seam when cp > 1) by their meta stand-ins."""
    for block in model.blocks:
        block.cross_attn.attn_op = standins.FlashAttention()
        block.self_attn.attn_op = (standins.cp_attention(cp_mode, cp, a2a_degree) if cp > 1
                                   else standins.FlashAttention())
    if cp > 1:
        model.sequence_sharding = standins.SequenceSharding(cp)


def _attention_workspace(attn: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Peak of one self-attention forward + backward above its inputs and what it saves."""
    q, k, v = (torch.empty(shape, device="meta", dtype=dtype, requires_grad=True) for _ in range(3))
    with LiveBytes() as mem:
        out = attn(q, k, v)
        saved = mem.level
        out.backward(torch.empty_like(out))
        return mem.peak - saved


def trace_step(model: nn.Module, *, latent_shape: tuple[int, ...], video_shape: tuple[int, ...] | None,
               tokenizer, param_dtype: torch.dtype, grad_shard_bytes: dict[str, int],
               reduce_scatter_bytes: dict[int | None, int],
               num_condition_frames: int | tuple[int, int], activation_checkpointing: bool, cp: int, cp_mode: str,
               a2a_degree: int) -> ActivationTrace:
    """Trace one micro-batch of `model` (a meta DiT as `build_dit` returns it; modified in place).

    `grad_shard_bytes`: FQN -> bytes of that parameter's sharded gradient on this rank.
    `reduce_scatter_bytes`: FSDP unit (block index, None for the root) -> bytes its reduce-scatter
    holds at once (unsharded gradients, input and output buffers); noted when the unit's last
    gradient arrives, which is when FSDP2 reduces it.
    `video_shape`: uint8 (B, 3, T, H, W) fed to `tokenizer.encode`, or None to start from the latent.
    """
    install_standins(model, cp=cp, cp_mode=cp_mode, a2a_degree=a2a_degree)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    model.to(param_dtype)
    ignore = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    mem = LiveBytes(ignore)

    pending: dict[int | None, int] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            pending[fsdp_unit(n)] = pending.get(fsdp_unit(n), 0) + 1

    def drop_grad(name: str):
        unit = fsdp_unit(name)

        def hook(p: torch.Tensor) -> None:
            p.grad = None  # FSDP2 frees the unsharded gradient after its reduce-scatter
            pending[unit] -= 1
            if pending[unit] == 0:
                mem.spike(reduce_scatter_bytes.get(unit, 0))
            mem.add_extra(grad_shard_bytes.get(name, 0))
        return hook

    handles = [p.register_post_accumulate_grad_hook(drop_grad(n))
               for n, p in model.named_parameters() if p.requires_grad]
    B = latent_shape[0]
    cfg = model.cfg
    try:
        with mem:
            if video_shape is not None:
                video = torch.empty(video_shape, dtype=torch.uint8, device="meta")
                latent = tokenizer.encode(video)
                if tuple(latent.shape) != tuple(latent_shape):
                    raise AssertionError(f"tokenizer gave {tuple(latent.shape)}, expected {latent_shape}")
            else:
                video, latent = None, torch.empty(latent_shape, device="meta")
            text = torch.empty(B, TEXT_TOKENS, cfg.context_dim, device="meta")
            encode_peak = mem.peak
            del video
            batch = mem.level
            mem.reset_peak()
            generator = torch.Generator().manual_seed(0)
            loss, _ = training_loss(_CastInputs(model, param_dtype), latent, text, None, generator=generator,
                                    num_condition_frames=num_condition_frames)
            forward_peak, saved = mem.peak, mem.level
            mem.reset_peak()
            (loss * cp).backward()
            backward_peak, rs_peak = mem.peak, mem.spike_peak
    finally:
        for h in handles:
            h.remove()
    s_local = latent_shape[2] // cfg.patch_temporal // cp * (latent_shape[3] // cfg.patch_spatial) * (
        latent_shape[4] // cfg.patch_spatial)
    attn_shape = (B, s_local, cfg.num_heads, cfg.head_dim)
    workspace = _attention_workspace(model.blocks[0].self_attn.attn_op, attn_shape, param_dtype)
    return ActivationTrace(encode_peak=encode_peak, batch=batch, forward_peak=forward_peak, saved=saved,
                           backward_peak=backward_peak, reduce_scatter_peak=rs_peak, attention_workspace=workspace)

