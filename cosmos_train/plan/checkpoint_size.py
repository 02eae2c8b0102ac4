"""Checkpoint and export sizes: bytes per part, per rank and in total; save time; consolidated files.

Parts follow `checkpoint.manager.Checkpointer._state_dicts`: `model` holds `net.<fqn>` for every
parameter and persistent buffer and, with EMA, `net_ema.<fqn>` for the same keys (the EMA of a
frozen LoRA base weight is the weight itself, but it is saved under its own key all the same);
`save_adapters_only` keeps only the adapter keys (`models.lora_keys.is_lora_key`).
`optim` holds AdamW's two fp32 moments per trainable tensor and its `step` scalar. DCP writes each shard once (replicas deduplicated), so a
rank writes about total / world.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cosmos_train.models.lora_keys import is_lora_key
from cosmos_train.plan.model_states import ADAM_STEP_BYTES, FP32, ModelInventory

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class CheckpointSize:
    """Bytes of one saved iteration and how long writing it takes."""

    model: int
    ema: int
    optim: int
    trainer: int
    world: int
    nodes: int
    disk_gbps: float

    @property
    def total(self) -> int:
        return self.model + self.ema + self.optim + self.trainer

    @property
    def per_rank(self) -> int:
        return -(-self.total // self.world)

    @property
    def save_seconds(self) -> float:
        """Every node writes its share at `disk_gbps` (GB/s, 1e9 bytes) in parallel with the others."""
        return self.total / self.nodes / (self.disk_gbps * 1e9)


def _trainer_bytes_per_rank() -> int:
    # TrainerState: the global CPU RNG state and the data generator's state of every rank, plus
    # a few integers (step, sampler position); CUDA RNG states are 16 bytes each.
    return 2 * torch.get_rng_state().numel() + 64


def checkpoint_size(inv: ModelInventory, *, ema: bool, lora_only: bool, world: int, nodes: int,
                    disk_gbps: float) -> CheckpointSize:
    """Sizes of one checkpoint of this model (see the module docstring)."""
    keep = is_lora_key if lora_only else (lambda name: True)
    tensors = [t for t in (*inv.params, *inv.persistent_buffers) if keep(t.name)]
    model = sum(t.numel * t.element_size for t in tensors)
    trainable = [p for p in inv.params if p.trainable]
    optim = sum(2 * p.numel * FP32 + ADAM_STEP_BYTES for p in trainable)
    return CheckpointSize(model=model, ema=model if ema else 0, optim=optim,
                          trainer=world * _trainer_bytes_per_rank(), world=world, nodes=nodes,
                          disk_gbps=disk_gbps)


def consolidated_sizes(inv: ModelInventory, *, lora: bool) -> dict[str, dict[str, int]]:
    """Payload bytes of `consolidate` outputs per dtype (the .pt / .safetensors headers add KiBs).

    Keys: `model` (one set of weights, `--ema` or not), `both` (`--both`: regular and EMA),
    and for LoRA runs `merged` (`--merge-lora`: base weights with the adapters folded in)
    and `adapter` (`--adapter-only`). Buffers keep their own dtype.
    """
    buffers = sum(b.numel * b.element_size for b in inv.persistent_buffers)
    lora_numel = sum(p.numel for p in inv.params if is_lora_key(p.name))
    out: dict[str, dict[str, int]] = {}
    for dtype, size in DTYPE_BYTES.items():
        row = {"model": inv.num_params * size + buffers, "both": 2 * (inv.num_params * size + buffers)}
        if lora:
            row["merged"] = (inv.num_params - lora_numel) * size + buffers
            row["adapter"] = lora_numel * size
        out[dtype] = row
    return out
