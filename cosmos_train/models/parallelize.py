"""How the DiT is built and parallelised: meta device -> LoRA -> cp -> activation checkpointing -> FSDP2.

Model-specific, so it lives beside the model (torchtitan keeps `parallelize_llama` in the model's
folder): it decides which attention modules context parallelism swaps (self-attention over the
video tokens, not cross-attention to the text), which modules FSDP2 and activation checkpointing
wrap (the blocks), and how each parameter is initialised (seeded by its FQN). The generic pieces
in `runtime/` get those modules and callables handed to them and import no model. The order is
fixed: cp rewires attention ops, AC wraps blocks, FSDP2 shards what is left, and only then is
memory allocated, each rank holding its shards. Takes plain values, not the spec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from cosmos_train.models.dit import DiT, init_generator
from cosmos_train.presets import DiTConfig
from cosmos_train.runtime.attention import build_attention
from cosmos_train.runtime.context_parallel import apply_context_parallel
from cosmos_train.runtime.distributed import log
from cosmos_train.runtime.fsdp import apply_activation_checkpointing, apply_fsdp, materialize
from cosmos_train.runtime.mesh import ParallelDims

if TYPE_CHECKING:
    from cosmos_train.models.lora import LoraParams


def build_dit(config: DiTConfig, *, attention: str, device_type: str, lora: LoraParams | None = None) -> DiT:
    """The DiT on the meta device with the `attention` backend, LoRA adapters injected when given."""
    with torch.device("meta"):
        model = DiT(config, attention=lambda: build_attention(attention, device_type=device_type))
    if lora is not None:
        from cosmos_train.models.lora import apply_lora, format_lora_summary, lora_summary  # PEFT: only for LoRA

        apply_lora(model, lora)
        log(format_lora_summary(*lora_summary(model)))
    return model


def _describe(op: nn.Module) -> str:
    backend = getattr(op, "backend", None)
    return backend or f"{type(op).__name__}({op.extra_repr()})"


def describe_attention(model: DiT) -> str:
    """What attention actually runs, for the run log (cp replaces the self-attention backend)."""
    block = model.blocks[0]
    return f"attention: self {_describe(block.self_attn.attn_op)}, cross {_describe(block.cross_attn.attn_op)}"


def parallelize_dit(model: DiT, dims: ParallelDims, *, device: torch.device, seed: int,
                    param_dtype: torch.dtype, reduce_dtype: torch.dtype, cp_mode: str = "ring",
                    activation_checkpointing: bool = False, reshard_after_forward: bool = True) -> DiT:
    """Apply cp, activation checkpointing and FSDP2 to a meta DiT, then materialise it on `device`.

    Parameters are initialised as the unsharded `DiT.init_weights(seed)` would, at any world size.
    """
    if dims.cp_enabled:
        hybrid = dims.hybrid_groups if cp_mode == "hybrid" else None
        apply_context_parallel(model, dims.cp_group, attention=model.self_attention_modules(),
                               mode=cp_mode, hybrid_groups=hybrid)
    log(describe_attention(model))
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp(model, dims.fsdp_mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
               reshard_after_forward=reshard_after_forward)
    return materialize(model, device,
                       init_value=lambda name, shape: model.init_parameter(name, shape, init_generator(seed, name)))
