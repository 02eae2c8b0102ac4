"""FSDP2: shard a block-structured model, materialise it from meta, accumulate and clip grads.

Order of application (as torchtitan's `parallelize_llama`; the model side calls it, see
`models/parallelize.py`): context parallelism -> activation checkpointing
(`apply_activation_checkpointing`) -> FSDP2 (`apply_fsdp`) -> `materialize`.

What this module needs from a model (the DiT has it; tests use a stand-in):
- ``model.blocks``: an ``nn.ModuleList`` of transformer blocks, the FSDP2 / AC units;
- ``model.init_buffers()``: (re)compute buffers in place after allocation.
Parameter values come from the `init_value(fqn, shape)` callable the caller hands `materialize`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from cosmos_train.runtime.distributed import log


# ------------------------------------------------------------------------ precision
def mixed_precision_dtypes(precision: str, device_type: str) -> tuple[torch.dtype, torch.dtype]:
    """(param_dtype, reduce_dtype) for `trainer.precision` on a device type.

    auto: bf16 compute / fp32 reduce on CUDA, fp32 on CPU. bf16: bf16 / fp32 anywhere.
    fp32: fp32 / fp32. Sharded master weights and optimizer state stay fp32 always.
    """
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.bfloat16, torch.float32
    if precision == "fp32":
        return torch.float32, torch.float32
    raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16' (got {precision!r})")


# --------------------------------------------------------------------------- wrapping
def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `blocks` ModuleList to wrap")
    return blocks


def _describe(mesh: DeviceMesh) -> str:
    dims = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
    return " x ".join(f"{n}={s}" for n, s in zip(dims, mesh.shape)) + (" (HSDP)" if mesh.ndim == 2 else "")


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype = torch.float32,
               reduce_dtype: torch.dtype = torch.float32, reshard_after_forward: bool = True) -> nn.Module:
    """`fully_shard` every block, then the root, over `mesh` (1-D: FSDP; 2-D: HSDP).

    The last block keeps its parameters gathered after forward (backward needs them
    first); the others follow `reshard_after_forward`. Returns the same module.
    """
    if mesh.ndim not in (1, 2):
        raise ValueError(f"apply_fsdp needs a 1-D (FSDP) or 2-D (HSDP) mesh (got {mesh.ndim}-D)")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and not last)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    log(f"applied FSDP2 to {len(blocks)} blocks, mesh {_describe(mesh)}, "
        f"params {str(param_dtype).removeprefix('torch.')} / reduce {str(reduce_dtype).removeprefix('torch.')}")
    return model


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's forward in backward.

    Uses the composable `checkpoint` (hooks on the block itself), not a wrapper
    module, so parameter FQNs and state_dict keys do not change.
    """
    from torch.distributed._composable import checkpoint

    blocks = _blocks(model)
    for block in blocks:
        checkpoint(block)
    log(f"applied activation checkpointing to {len(blocks)} blocks")
    return model


# ------------------------------------------------------------------------ materialise
@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str, *,
                init_value: Callable[[str, tuple[int, ...]], torch.Tensor]) -> nn.Module:
    """Allocate a meta-built (and usually sharded) model on `device` and initialise it.

    Each parameter's full value comes from `init_value(fqn, full_shape)`, one parameter at a
    time on CPU, and each rank keeps only its local shard (sliced locally, no communication),
    so the result is the same at every world size when `init_value` depends only on the FQN
    (the DiT's seeds per FQN do). FSDP2 keeps the unsharded FQNs, so `fqn` is the plain
    model's name. Buffers come from `model.init_buffers()`.
    """
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        full = init_value(name, tuple(p.shape))
        if tuple(full.shape) != tuple(p.shape):
            raise ValueError(f"init_value({name!r}) returned shape {tuple(full.shape)}, "
                             f"expected {tuple(p.shape)}")
        if isinstance(p, DTensor):
            # src_data_rank=None: every rank holds the same full value, so slice locally.
            local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local)
        else:
            p.copy_(full)
    model.init_buffers()
    return model


# ----------------------------------------------------------------------- grad sync
def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Turn gradient reduction on/off for the next backward (off on inner micro-steps).

    With sync off, FSDP2 accumulates unsharded gradients locally without any
    reduce-scatter/all-reduce; the micro-step that turns it back on reduces the sum.
    A model without FSDP needs nothing.
    """
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip gradients to a global L2 norm of `max_norm`; return the norm before clipping (a tensor).

    torch's `get_total_norm` on the FSDP2 / HSDP DTensor gradients gives a DTensor partial over
    the dims the gradients are sharded on; `full_tensor()` sums it there (one all-reduce, on the
    device, no host sync), not over the replicated HSDP dim. `clip_grads_with_norm_` then scales
    by min(1, max_norm / (norm + 1e-6)) on the device. `max_norm <= 0` only measures. A
    non-finite norm makes the gradients non-finite; the caller skips that step
    (`optim.step_unless_nonfinite`).
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
