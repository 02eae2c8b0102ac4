"""Exact per-rank bytes of the model states: parameters, gradients, AdamW states, EMA, buffers.

The DiT is built on the meta device by the training code itself (`build_dit`: the same
constructor and the same PEFT LoRA injection), so every tensor the run will hold is known by
name, shape, dtype and `requires_grad`. FSDP2 then shards every parameter on dim 0 over the
`dp_shard x cp` ranks (HSDP replicates those shards `dp_replicate` times): each rank's shard is
`ceil(dim0 / n)` rows, because FSDP2 pads dim 0 to a multiple of n, so the per-rank figure is
rank 0's (the largest). Buffers are not sharded.

Dtypes follow the runtime: sharded master parameters, gradients (reduced in fp32), AdamW's
`exp_avg`/`exp_avg_sq` and the EMA shadows are fp32 (LoRA adapters too); the compute dtype
(`param_dtype`) only exists in the all-gathered copies, which `memory.py` accounts for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

FP32 = 4
ADAM_STEP_BYTES = 4  # AdamW keeps one fp32 `step` scalar per parameter tensor


@dataclass(frozen=True)
class TensorInfo:
    """One parameter or buffer of the model: its FQN, full shape, bytes per element."""

    name: str
    shape: tuple[int, ...]
    element_size: int
    trainable: bool
    block: int | None  # index of the transformer block that owns it (its FSDP unit), None for the root

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def shard_numel(self, n: int) -> int:
        """Elements of rank 0's FSDP2 shard over n ranks (dim 0 padded to a multiple of n)."""
        if not self.shape:
            return 1
        return math.ceil(self.shape[0] / n) * math.prod(self.shape[1:])


@dataclass
class ModelInventory:
    """Every parameter and buffer of the spec's model, from a meta-device build."""

    params: list[TensorInfo]
    buffers: list[TensorInfo]
    num_blocks: int
    persistent_buffers: list[TensorInfo] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def num_trainable(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)

    def block_params(self, i: int | None) -> list[TensorInfo]:
        return [p for p in self.params if p.block == i]

    def unit_numel(self, i: int | None, *, trainable_only: bool = False) -> int:
        """Elements of one FSDP unit (block i, or the root's own params for None), unsharded."""
        return sum(p.numel for p in self.block_params(i) if p.trainable or not trainable_only)

    def largest_param(self) -> TensorInfo:
        return max(self.params, key=lambda p: p.numel)


def fsdp_unit(name: str) -> int | None:
    """The FSDP unit that owns a parameter: its block index, or None for the root."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else None


def inventory(model: nn.Module) -> ModelInventory:
    """Names, shapes and trainability of a (meta) model's parameters and persistent buffers."""
    params = [TensorInfo(n, tuple(p.shape), p.element_size(), p.requires_grad, fsdp_unit(n))
              for n, p in model.named_parameters()]
    # Every buffer occupies device memory; only persistent ones are checkpointed.
    persistent = set(model.state_dict().keys())
    buffers = [TensorInfo(n, tuple(b.shape), b.element_size(), False, fsdp_unit(n))
               for n, b in model.named_buffers()]
    return ModelInventory(params=params, buffers=buffers, num_blocks=len(getattr(model, "blocks", [])),
                          persistent_buffers=[b for b in buffers if b.name in persistent])


@dataclass
class ModelStates:
    """Per-rank bytes of the states that live for the whole run (see the module docstring)."""

    params: int
    grads: int
    optimizer: int
    ema: int
    buffers: int
    shard_size: int
    detail: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.ema + self.buffers


def model_states(inv: ModelInventory, *, shard_size: int, ema: bool, master_bytes: int = FP32) -> ModelStates:
    """Bytes per rank with FSDP2 sharding over `shard_size` ranks (dim-0 padding included).

    `master_bytes`: bytes per element of the sharded parameters (fp32 in this runtime).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1 (got {shard_size})")
    params = sum(p.shard_numel(shard_size) * master_bytes for p in inv.params)
    trainable = [p for p in inv.params if p.trainable]
    grads = sum(p.shard_numel(shard_size) * FP32 for p in trainable)
    optimizer = sum(2 * p.shard_numel(shard_size) * FP32 + ADAM_STEP_BYTES for p in trainable)
    ema_bytes = sum(p.shard_numel(shard_size) * FP32 for p in trainable) if ema else 0
    buffers = sum(b.numel * b.element_size for b in inv.buffers)
    padding = sum((p.shard_numel(shard_size) * shard_size - p.numel) * master_bytes for p in inv.params)
    return ModelStates(params=params, grads=grads, optimizer=optimizer, ema=ema_bytes, buffers=buffers,
                       shard_size=shard_size, detail={"padding_bytes_all_ranks": padding,
                                                      "trainable_tensors": len(trainable)})
