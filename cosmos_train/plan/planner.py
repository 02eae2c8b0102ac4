"""The plan of one spec at one world size: per-rank memory by phase, checkpoint sizes, verdict.

Per rank, the step goes through phases; the peak is the largest:

- encode:    model states (no gradients: they are freed after every optimizer step)
             + video, latent and tokenizer temporaries (traced).
- forward:   model states + FSDP2 all-gather buffers + the traced forward peak.
- backward:  model states + FSDP2 buffers (the gathered block and the prefetched one) + the
             traced backward peak (which includes the sharded gradients as they appear), or the
             moment of a reduce-scatter, whichever is higher.
- optimizer: model states with gradients + the optimizer's temporaries (non-fused AdamW: two
             tensors of the largest shard; fused: none) + the batch still referenced.

FSDP2 buffers, per rank, in the compute dtype: the root's own parameters stay gathered for
the whole step (FSDP2 never reshards the root after forward); one block is gathered while the
next one's all-gather is in flight (FSDP2 prefetches one block in backward; in forward the
overlap exists on CUDA only, where the CPU runs ahead of the device); `reshard_after_forward =
false` keeps every block gathered from its forward to its backward. When a block's last
gradient arrives, FSDP2 reshards it and reduce-scatters: its unsharded gradients (compute
dtype), the padded reduce-dtype input and the output shard exist at once, with only the
prefetched block still gathered; the trace notes that moment (`reduce_scatter_peak`) and the
backward phase takes the larger of the two. On one rank FSDP2 needs no reduce-scatter buffers.

Not on the device: loading `load_path` (rank 0 memory-maps the file; every rank receives one
full tensor at a time, a `load` phase of its own) and async checkpoint staging (host memory
of the rank's shard; on a CPU run host memory is the device, so it is added to every phase).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from cosmos_train.plan.checkpoint_size import CheckpointSize, checkpoint_size, consolidated_sizes
from cosmos_train.plan.model_states import FP32, ModelInventory, ModelStates, inventory, model_states
from cosmos_train.plan.trace import ActivationTrace, trace_step
from cosmos_train.runtime.fsdp import mixed_precision_dtypes
from cosmos_train.runtime.mesh import ParallelDims, build_parallel_dims
from cosmos_train.spec import ExperimentSpec
from cosmos_train.spec_loading import apply_overrides, validate_spec

GiB = 1 << 30
FIT_FRACTION = 0.95  # above 95 % of the card the CUDA context and allocator fragmentation make it a gamble
TRACE_BLOCKS = (2, 3)  # deeper models: trace 2 and 3 blocks and extrapolate (every block has the same shapes)


@dataclass(frozen=True)
class Hardware:
    """Where the spec would run: ranks, how they sit on nodes, memory and disk."""

    world: int
    gpus_per_node: int
    gpu_mem: int  # bytes per device
    disk_gbps: float = 2.0
    device_type: str = "cuda"

    @property
    def nodes(self) -> int:
        return math.ceil(self.world / self.gpus_per_node)


@dataclass
class Plan:
    """Everything `cosmos-train plan` reports; all sizes are bytes per rank unless named total."""

    spec: ExperimentSpec
    hw: Hardware
    dims: ParallelDims
    inv: ModelInventory
    states: ModelStates
    trace: ActivationTrace
    saved_other_ac: int  # saved activations with activation checkpointing toggled
    fsdp_forward: int
    fsdp_backward: int
    optimizer_transient: int
    staging_host: int  # async checkpoint staging, host bytes per rank
    load_transient: int
    phases: dict[str, int]
    checkpoint: CheckpointSize
    consolidated: dict[str, dict[str, int]]
    param_dtype: torch.dtype
    notes: list[str] = field(default_factory=list)
    fixes: list[dict] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def headroom(self) -> int:
        return self.hw.gpu_mem - self.peak

    @property
    def fits(self) -> bool:
        return self.peak <= FIT_FRACTION * self.hw.gpu_mem

    @property
    def verdict(self) -> str:
        if self.fits:
            return "fits"
        return "tight" if self.peak <= self.hw.gpu_mem else "does not fit"

    def summary(self) -> str:
        """One line for logs: verdict, peak per rank, headroom, checkpoint size."""
        d = self.dims
        return (f"plan: {self.verdict} — peak {self.peak / GiB:.1f} GiB per rank ({self.peak_phase}) of "
                f"{self.hw.gpu_mem / GiB:.0f} GiB, headroom {self.headroom / GiB:.1f} GiB; "
                f"mesh dp_replicate={d.dp_replicate} dp_shard={d.dp_shard} cp={d.cp}; "
                f"checkpoint {self.checkpoint.total / 1e9:.1f} GB "
                f"(~{self.checkpoint.save_seconds:.0f} s at {self.hw.disk_gbps:g} GB/s per node)")


def with_overrides(spec: ExperimentSpec, overrides: list[str]) -> ExperimentSpec:
    """A copy of `spec` with `key.path=value` overrides applied and validated."""
    return validate_spec(apply_overrides(spec.model_dump(mode="json"), overrides), "plan")


def meta_model(spec: ExperimentSpec):
    """The spec's DiT on the meta device, built by the training code (LoRA injected).

    The attention kernels own no parameters, so SDPA is asked for here: the planner must not
    need Transformer Engine installed to plan a run that will use it.
    """
    from cosmos_train.models.parallelize import build_dit

    lora = spec.model.lora if spec.model.train_architecture == "lora" else None
    return build_dit(spec.model.dit_config(), attention="sdpa", device_type="cpu", lora=lora)


def latent_and_video_shapes(spec: ExperimentSpec, latent_channels: int):
    """(latent shape, uint8 video shape or None when the tokenizer is not traced)."""
    d, tok = spec.data, spec.model.tokenizer
    H, W = d.video_size
    s = tok.spatial_factor if tok.kind == "space_to_depth" else 8  # Wan2.1: x8 in space
    latent = (d.batch_size, latent_channels, d.latent_frames, H // s, W // s)
    video = (d.batch_size, 3, d.num_frames, H, W) if tok.kind == "space_to_depth" else None
    return latent, video


def _reduce_scatter_bytes(inv: ModelInventory, shard: int, pbytes: int, rbytes: int) -> dict[int | None, int]:
    """Per FSDP unit: what its reduce-scatter holds at once (module docstring); nothing on one rank."""
    if shard == 1:  # FSDP2 uses the gradients as they are: no reduce-scatter buffers
        return {}
    out: dict[int | None, int] = {}
    for p in inv.params:
        if p.trainable:
            padded = p.shard_numel(shard) * shard
            out[p.block] = out.get(p.block, 0) + p.numel * pbytes + padded * rbytes + padded // shard * rbytes
    return out


def _trace(spec: ExperimentSpec, inv_full: ModelInventory, *, shard: int, param_dtype, ac: bool,
           reduce_scatter: dict[int | None, int]) -> ActivationTrace:
    """Trace the step; for deep models trace 2 and 3 blocks and extrapolate linearly."""
    from cosmos_train.models.tokenizer import build_tokenizer

    cfg = spec.model.dit_config()
    latent, video = latent_and_video_shapes(spec, cfg.latent_channels)
    tokenizer = build_tokenizer(spec.model.tokenizer) if video is not None else None
    grad_bytes = {p.name: p.shard_numel(shard) * FP32 for p in inv_full.params if p.trainable}
    par = spec.parallel

    def run(num_blocks: int | None) -> ActivationTrace:
        s = spec if num_blocks is None else with_overrides(spec, [f"model.architecture.num_blocks={num_blocks}"])
        return trace_step(meta_model(s), latent_shape=latent, video_shape=video, tokenizer=tokenizer,
                          param_dtype=param_dtype, grad_shard_bytes=grad_bytes,
                          reduce_scatter_bytes=reduce_scatter,
                          num_condition_frames=spec.model.train_condition_frames, activation_checkpointing=ac,
                          cp=par.cp, cp_mode=par.cp_mode, a2a_degree=par.cp_a2a_degree)

    n = cfg.num_blocks
    if n <= TRACE_BLOCKS[1]:
        return run(None)
    a, b = (run(k) for k in TRACE_BLOCKS)
    steps = n - TRACE_BLOCKS[1]
    per_block = ("forward_peak", "saved", "backward_peak", "reduce_scatter_peak")
    return ActivationTrace(**{f: getattr(b, f) + steps * (getattr(b, f) - getattr(a, f)) if f in per_block
                              else getattr(b, f) for f in ActivationTrace.__dataclass_fields__})


@contextmanager
def _quiet_build_logs():
    """The meta builds log what a real build logs (attention backend, LoRA summary, AC applied);
    in a plan that is noise, so the package logger shows warnings only while planning."""
    logger = logging.getLogger("cosmos_train")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def plan(spec: ExperimentSpec, hw: Hardware, *, compare_ac: bool = True) -> Plan:
    """Plan `spec` on `hw` (no fixes: see `fixes.find_fixes`).

    `compare_ac=False` skips the second trace (activation checkpointing toggled), whose
    figure is only reported for comparison; `saved_other_ac` is then 0.
    """
    with _quiet_build_logs():
        return _plan(spec, hw, compare_ac=compare_ac)


def _plan(spec: ExperimentSpec, hw: Hardware, *, compare_ac: bool) -> Plan:
    dims = build_parallel_dims(spec.parallel, hw.world)
    inv = inventory(meta_model(spec))
    shard = dims.fsdp_size
    states = model_states(inv, shard_size=shard, ema=spec.model.ema.enabled)
    param_dtype, reduce_dtype = mixed_precision_dtypes(spec.trainer.precision, hw.device_type)
    pbytes, rbytes = torch.finfo(param_dtype).bits // 8, torch.finfo(reduce_dtype).bits // 8
    ac = spec.parallel.activation_checkpointing
    rs = _reduce_scatter_bytes(inv, shard, pbytes, rbytes)
    tr = _trace(spec, inv, shard=shard, param_dtype=param_dtype, ac=ac, reduce_scatter=rs)
    other = (_trace(spec, inv, shard=shard, param_dtype=param_dtype, ac=not ac, reduce_scatter=rs).saved
             if compare_ac else 0)

    # FSDP2 buffers (module docstring).
    blocks = range(inv.num_blocks)
    root = inv.unit_numel(None) * pbytes
    block = max((inv.unit_numel(i) for i in blocks), default=0) * pbytes
    # Blocks gathered at once: the running one and the next one (on CUDA the CPU issues the next
    # all-gather while the device still computes; on CPU forward is synchronous), all of them
    # between forward and backward without reshard_after_forward. Backward prefetches one block.
    # A unit's reduce-scatter moment is in the trace (`reduce_scatter_peak`, `fsdp_reduce` below).
    ahead = 1 if hw.device_type == "cuda" else 0
    if spec.parallel.reshard_after_forward:
        fsdp_forward, fsdp_backward = root + (1 + ahead) * block, root + 2 * block
    else:
        fsdp_forward = fsdp_backward = root + inv.num_blocks * block
    if shard > 1:
        # FSDP2 keeps references that defer frees (torch's _fsdp_param_group.py): in forward the
        # last all-gather result (a block's padded flat buffer) until the next copy-out
        # (`all_gather_state`), also during activation-checkpointing recomputes, which run the
        # forward hooks again; in backward the last reduce-scatter input (`reduce_scatter_states`,
        # one buffer by default) until the next unit's reduce-scatter.
        padded = max((sum(p.shard_numel(shard) * shard for p in inv.block_params(i)) for i in blocks), default=0)
        padded_train = max((sum(p.shard_numel(shard) * shard for p in inv.block_params(i) if p.trainable)
                            for i in blocks), default=0)
        fsdp_forward += padded * pbytes
        fsdp_backward += padded_train * rbytes + (padded * pbytes if ac else 0)
    # At a reduce-scatter the unit is resharded; the prefetched one (or, without reshard_after_forward,
    # every block not yet reached by backward) is still gathered.
    fsdp_reduce = root + (block if spec.parallel.reshard_after_forward else (inv.num_blocks - 1) * block)

    trainable = [p for p in inv.params if p.trainable]
    largest = max((p.shard_numel(shard) for p in trainable), default=0) * FP32
    fused = spec.optimizer.fused != "off"  # optim.build_optimizer: torch's fused AdamW on CPU and CUDA
    optimizer_transient = (0 if fused else 2 * largest) + largest  # + clip_grad_norm's squares of one shard

    ckpt = checkpoint_size(inv, ema=spec.model.ema.enabled, world=hw.world, nodes=hw.nodes, disk_gbps=hw.disk_gbps,
                           lora_only=spec.model.train_architecture == "lora" and spec.checkpoint.save_adapters_only)
    staging = (ckpt.model + ckpt.ema + ckpt.optim) // hw.world if spec.checkpoint.async_mode != "off" else 0
    on_device_staging = staging if hw.device_type == "cpu" else 0

    no_grads = states.total - states.grads + on_device_staging
    phases = {
        "encode": no_grads + tr.encode_peak,
        "forward": no_grads + fsdp_forward + tr.forward_peak,
        "backward": no_grads + max(fsdp_backward + tr.backward_peak, fsdp_reduce + tr.reduce_scatter_peak),
        "optimizer": states.total + on_device_staging + optimizer_transient + tr.batch,
    }
    largest_full = max(p.numel for p in inv.params) * FP32
    load_path = spec.checkpoint.load_path
    # A consolidated file is broadcast one full tensor at a time; a DCP directory is read by shard.
    from_file = bool(load_path) and load_path.rstrip("/").endswith((".pt", ".pth", ".safetensors"))
    load_transient = largest_full if from_file else 0
    notes = []
    if spec.model.tokenizer.kind != "space_to_depth":
        notes.append(f"tokenizer {spec.model.tokenizer.kind}: VAE weights and encode workspace not modeled "
                     "(the VAE is not bundled yet); the latent and text embedding are counted")
    notes.append("text encoder: embeddings are precomputed (t5_xxl), nothing on the device")
    if from_file:
        notes.append(f"load_path {load_path}: rank 0 memory-maps the file (host page cache); every rank "
                     f"receives one full fp32 tensor at a time (+{largest_full / GiB:.2f} GiB, before training)")
    if spec.checkpoint.async_mode != "off":
        where = "device (CPU run)" if hw.device_type == "cpu" else "host"
        notes.append(f"checkpoint.async_mode = {spec.checkpoint.async_mode}: {staging / GiB:.2f} GiB of {where} "
                     f"memory per rank for the staged copy ({staging * min(hw.world, hw.gpus_per_node) / GiB:.1f} "
                     f"GiB per node)")
    return Plan(spec=spec, hw=hw, dims=dims, inv=inv, states=states, trace=tr, saved_other_ac=other,
                fsdp_forward=fsdp_forward, fsdp_backward=fsdp_backward, optimizer_transient=optimizer_transient,
                staging_host=staging, load_transient=load_transient,
                phases={k: int(v) for k, v in phases.items()}, checkpoint=ckpt,
                consolidated=consolidated_sizes(inv, lora=spec.model.train_architecture == "lora"),
                param_dtype=param_dtype, notes=notes)
