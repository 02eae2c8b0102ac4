"""Measure what the planner predicts: the real peak memory of training steps on this process.

`measure_peak(spec, dims, device)` builds the model exactly as training does (`build_dit` ->
`parallelize` -> EMA -> AdamW), then runs two training steps (tokenizer encode, loss, backward,
grad clipping, optimizer step, EMA update) and returns the peak of the second, steady-state
step (the first one also creates the optimizer state).

On CPU it counts allocator-level bytes: torch's profiler with `profile_memory=True` records
every allocation and free of the CPU allocator (`[memory]` events carry the signed size),
so the running sum from the start of the profile is the memory this code holds, with
everything allocated before it (the interpreter, the process group) as the subtracted
baseline. On CUDA it uses `torch.cuda.max_memory_allocated` above the level before the build.
Call it inside an initialised process group (gloo or NCCL); `dims.build_mesh` must have run.
"""

from __future__ import annotations

import gc

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from cosmos_train.models.diffusion import training_loss
from cosmos_train.models.ema import PowerEMA
from cosmos_train.models.tokenizer import build_tokenizer
from cosmos_train.optim import build_optimizer, step_unless_nonfinite
from cosmos_train.runtime.fsdp import clip_grad_norm, mixed_precision_dtypes
from cosmos_train.runtime.mesh import ParallelDims
from cosmos_train.spec import ExperimentSpec

STEP_MARK = "plan_measured_step"


def _steps(spec: ExperimentSpec, dims: ParallelDims, device: torch.device, mark) -> None:
    from cosmos_train.models.parallelize import build_dit, parallelize_dit

    # As Trainer.__init__ and Trainer.step do (train.py), without the data loader and checkpointer.
    tr, par = spec.trainer, spec.parallel
    lora = spec.model.lora if spec.model.train_architecture == "lora" else None
    model = build_dit(spec.model.dit_config(), attention=par.attention, device_type=device.type, lora=lora)
    param_dtype, reduce_dtype = mixed_precision_dtypes(tr.precision, device.type)
    model = parallelize_dit(model, dims, device=device, seed=spec.job.seed, param_dtype=param_dtype,
                            reduce_dtype=reduce_dtype, cp_mode=par.cp_mode,
                            activation_checkpointing=par.activation_checkpointing,
                            reshard_after_forward=par.reshard_after_forward)
    ema = PowerEMA(model, s=spec.model.ema.s) if spec.model.ema.enabled else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(spec.optimizer, params)
    tokenizer = build_tokenizer(spec.model.tokenizer)
    d = spec.data
    generator = torch.Generator().manual_seed(0)
    for step in (1, 2):
        with mark(step):
            # The loader's uint8 clip arrives on the device, is encoded, and is dropped.
            video = torch.randint(0, 256, (d.batch_size, 3, d.num_frames, *d.video_size), dtype=torch.uint8,
                                  generator=generator).to(device)
            latent = tokenizer.encode(video)
            del video
            emb = torch.randn(d.batch_size, 512, spec.model.dit_config().context_dim, generator=generator).to(device)
            loss, _ = training_loss(model, latent, emb, None, generator=generator,
                                    num_condition_frames=spec.model.train_condition_frames,
                                    text_dropout=d.text_dropout, loss_scale=spec.trainer.loss_scale)
            (loss * dims.cp).backward()
            step_unless_nonfinite(optimizer, clip_grad_norm(params, spec.trainer.grad_clip))
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model, step - 1)
            del latent, emb, loss


def _cpu_peak(events) -> int:
    """Peak of the running allocation sum inside the measured step's time window."""
    window = [e for e in events if e.name() == STEP_MARK]
    if not window:
        raise RuntimeError("the profiler recorded no measured-step marker")
    start = window[0].start_ns()
    end = start + window[0].duration_ns()
    level, peak = 0, 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        level += e.nbytes()
        if start <= e.start_ns() <= end:
            peak = max(peak, level)
    return peak


def measure_peak(spec: ExperimentSpec, dims: ParallelDims, device: torch.device) -> int:
    """Peak bytes of the second training step on this rank (see the module docstring)."""
    gc.collect()  # garbage of earlier work must not be freed inside the measurement
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)

        def mark(step):
            if step == 2:
                torch.cuda.reset_peak_memory_stats(device)
            return record_function(f"step{step}")

        _steps(spec, dims, device, mark)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _steps(spec, dims, device, lambda step: record_function(STEP_MARK if step == 2 else "warmup_step"))
    return _cpu_peak(prof.profiler.kineto_results.events())
