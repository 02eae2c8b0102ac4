"""Build the DiT of a spec for a mesh: meta device -> LoRA -> cp -> activation checkpointing -> FSDP2.

The order is fixed (as torchtitan's `parallelize_llama`): context parallelism rewires the
attention ops, activation checkpointing wraps blocks, FSDP2 shards what is left, and only
then is memory allocated, each rank holding its shards.
"""

from __future__ import annotations

import torch
from torch import nn

from cosmos_train.models.dit import DiT
from cosmos_train.models.lora import apply_lora, format_lora_summary, lora_summary
from cosmos_train.runtime.attention import build_attention, resolve_attention_backend
from cosmos_train.runtime.context_parallel import apply_context_parallel
from cosmos_train.runtime.distributed import log
from cosmos_train.runtime.fsdp import apply_activation_checkpointing, apply_fsdp, materialize, mixed_precision_dtypes
from cosmos_train.runtime.mesh import ParallelDims
from cosmos_train.spec import ExperimentSpec


def build_dit(spec: ExperimentSpec, *, device_type: str) -> DiT:
    """The spec's DiT on the meta device, with LoRA adapters injected when asked for."""
    backend = spec.parallel.attention
    with torch.device("meta"):
        model = DiT(spec.model.dit_config(), attention=lambda: build_attention(backend, device_type=device_type))
    log(f"attention backend: {resolve_attention_backend(backend, device_type=device_type)}")
    if spec.model.train_architecture == "lora":
        apply_lora(model, spec.model.lora)
        log(format_lora_summary(*lora_summary(model)))
    return model


def parallelize(model: nn.Module, spec: ExperimentSpec, dims: ParallelDims, *, device: torch.device) -> nn.Module:
    """Apply cp, activation checkpointing and FSDP2 to a meta model, then materialise it on `device`."""
    par = spec.parallel
    if dims.cp_enabled:
        hybrid = dims.hybrid_groups if par.cp_mode == "hybrid" else None
        apply_context_parallel(model, dims.cp_group, mode=par.cp_mode, hybrid_groups=hybrid)
    if par.activation_checkpointing:
        apply_activation_checkpointing(model)
    param_dtype, reduce_dtype = mixed_precision_dtypes(spec.trainer.precision, device.type)
    apply_fsdp(model, dims.fsdp_mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
               reshard_after_forward=par.reshard_after_forward)
    return materialize(model, device, seed=spec.job.seed)
