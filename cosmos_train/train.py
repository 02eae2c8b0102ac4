"""The training loop: build everything from the spec, then step, log, validate and save.

Build order: process group and mesh -> DiT on the meta device -> LoRA -> cp / activation
checkpointing / FSDP2 (materialised shard by shard) -> EMA -> optimizer and scheduler ->
data -> checkpoint resume (or `load_path`) -> loop.

Context parallelism: every cp rank of one data-parallel group sees the same clip and
noise, computes the same full loss (the DiT gathers its output), and back-propagates
only through its own frames. FSDP2 averages gradients over dp x cp ranks, so the loss
is multiplied by cp to turn that average back into a sum over the cp shards.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from cosmos_train.checkpoint.collectives import agree
from cosmos_train.checkpoint.layout import checkpoints_dir, remove_partial
from cosmos_train.checkpoint.manager import Checkpointer
from cosmos_train.checkpoint.trainer_state import TrainerState, derived_seed
from cosmos_train.data.loader import build_dataloader
from cosmos_train.errors import CosmosTrainError
from cosmos_train.models.diffusion import training_loss
from cosmos_train.models.ema import PowerEMA
from cosmos_train.models.tokenizer import build_tokenizer
from cosmos_train.nonfinite import NonFiniteGuard
from cosmos_train.optim import apply_optimizer_spec, build_optimizer, build_scheduler
from cosmos_train.preemption import Preemption
from cosmos_train.run_dir import prepare_run_dir
from cosmos_train.run_lock import RunLock
from cosmos_train.runtime.distributed import configure_logging, distributed, log
from cosmos_train.runtime.fsdp import clip_grad_norm, set_gradient_sync
from cosmos_train.runtime.mesh import ParallelDims, build_parallel_dims
from cosmos_train.runtime.parallelize import build_dit, parallelize
from cosmos_train.spec import ExperimentSpec
from cosmos_train.train_log import TrainLog


@dataclass
class TrainResult:
    """What a call to `train` did (losses are the dp-mean per optimizer step)."""

    run_dir: Path
    start_step: int
    end_step: int
    losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    step_seconds: dict[int, float] = field(default_factory=dict)  # wall time of each step, saves excluded
    preempted: bool = False


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().double().cpu().reshape(1).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def _sync_generator(generator: torch.Generator, dims: ParallelDims) -> None:
    """cp ranks of one dp group must draw the same noise: take cp-rank 0's generator state."""
    if not dims.cp_enabled:
        return
    state = [generator.get_state() if dims.cp_rank == 0 else None]
    src = dist.get_global_rank(dims.cp_group, 0)
    dist.broadcast_object_list(state, src=src, group=dims.cp_group)
    generator.set_state(state[0])


class _Batches:
    """Endless batches moved to the device: (latent, text embedding, text mask)."""

    def __init__(self, loader, tokenizer, device: torch.device):
        self.loader, self.tokenizer, self.device = loader, tokenizer, device
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = self.loader.batches()
        batch = next(self._it)
        with torch.no_grad():
            latent = self.tokenizer.encode(batch["video"].to(self.device, non_blocking=True))
        return latent, batch["t5_text_embeddings"].to(self.device, non_blocking=True)


def _validation_loss(model, val_loader, tokenizer, spec: ExperimentSpec, device, dp_rank: int) -> float:
    """Mean diffusion loss over the held-out clips at the fixed `trainer.validation_sigmas`."""
    generator = torch.Generator().manual_seed(derived_seed(spec.job.seed, 0, dp_rank))
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for batch in val_loader:
            latent = tokenizer.encode(batch["video"].to(device))
            emb = batch["t5_text_embeddings"].to(device)
            for sigma in spec.trainer.validation_sigmas:
                loss, _ = training_loss(model, latent, emb, None, generator=generator,
                                        num_condition_frames=spec.model.num_condition_frames, text_dropout=0.0,
                                        loss_scale=spec.trainer.loss_scale, sigma_override=sigma)
                total += loss.double().cpu()
                count += 1
    return _mean_over_ranks(total / max(count, 1))


def train(spec: ExperimentSpec, *, run_dir: Path | str | None = None, require_checkpoint: bool = False,
          show_progress: bool = True) -> TrainResult:
    """Run (or continue) the experiment described by `spec`; returns what happened."""
    configure_logging()
    with distributed(spec.parallel, device=spec.trainer.device) as info:
        dims = build_parallel_dims(spec.parallel, info.world_size)
        dims.build_mesh(info.device.type)
        run_dir = Path(run_dir) if run_dir is not None else spec.run_dir()
        lock = RunLock(run_dir)
        problem = None
        if info.is_main:  # rank 0 holds the run dir for the whole run; every rank learns a refusal
            try:
                lock.acquire()
                # our own half-written saves first: on a full disk they hold the space the spec needs
                remove_partial(checkpoints_dir(run_dir))
                prepare_run_dir(spec, run_dir)
            except CosmosTrainError as e:
                lock.release()
                problem = e
        problem = agree(problem)
        if problem is not None:
            raise problem
        try:
            return _train(spec, dims, info.device, run_dir, require_checkpoint=require_checkpoint,
                          is_main=info.is_main, show_progress=show_progress)
        finally:
            lock.release()


def _train(spec: ExperimentSpec, dims: ParallelDims, device: torch.device, run_dir: Path, *,
           require_checkpoint: bool, is_main: bool, show_progress: bool) -> TrainResult:
    tr = spec.trainer
    torch.manual_seed(spec.job.seed)
    model = parallelize(build_dit(spec, device_type=device.type), spec, dims, device=device)
    ema = PowerEMA(model, s=spec.model.ema.s) if spec.model.ema.enabled else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(spec.optimizer, params, device_type=device.type)
    scheduler = build_scheduler(spec.scheduler, optimizer)
    tokenizer = build_tokenizer(spec.model.tokenizer)

    cache_dir = run_dir.parent.parent.parent / ".cache"
    loader = build_dataloader(spec.data, dp_rank=dims.dp_rank, dp_size=dims.dp_size, seed=spec.job.seed,
                              cache_dir=cache_dir, split="train")
    val_loader = None
    if tr.validation_iter and spec.data.validation_clips:
        val_loader = build_dataloader(spec.data, dp_rank=dims.dp_rank, dp_size=dims.dp_size,
                                      seed=spec.job.seed, cache_dir=cache_dir, split="val")
    generator = torch.Generator().manual_seed(derived_seed(spec.job.seed, 0, dims.dp_rank))
    state = TrainerState(seed=spec.job.seed, generator=generator, sampler=loader)
    lora_only = spec.model.train_architecture == "lora" and spec.checkpoint.save_adapters_only
    ckpt = Checkpointer(spec.checkpoint, run_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                        trainer_state=state, ema=ema, lora_only=lora_only)
    try:
        start = ckpt.resume_or_initialize()
        if require_checkpoint and start == 0:
            raise CosmosTrainError(f"{run_dir}: no committed checkpoint to resume from "
                                   f"(start it with `cosmos-train run {run_dir / 'spec.toml'}`)")
        if start > 0:  # the spec (with any resume overrides) trains, not the restored hyperparameters
            for change in apply_optimizer_spec(spec.optimizer, optimizer, scheduler):
                log(f"resume: {change} (from the spec; the checkpoint had the old value)")
        _sync_generator(generator, dims)
        result = TrainResult(run_dir=run_dir, start_step=start, end_step=start)
        if start >= tr.max_iter:
            log(f"nothing to do: step {start} >= trainer.max_iter {tr.max_iter}")
            return result
        log(f"training steps {start + 1}..{tr.max_iter} in {run_dir} "
            f"(dp={dims.dp_size}, cp={dims.cp}, world={dims.world_size}, device={device.type})")
        tlog = TrainLog(spec, run_dir, enabled=is_main, start_step=start, show_progress=show_progress)
        try:
            with Preemption() as preemption:
                _loop(spec, dims, device, model, ema, params, optimizer, scheduler, tokenizer, loader, val_loader,
                      generator, state, ckpt, tlog, preemption, result)
        finally:
            tlog.close()
        ckpt.save(result.end_step, force=True)
        ckpt.wait()
        return result
    finally:
        ckpt.close()


def _loop(spec, dims, device, model, ema, params, optimizer, scheduler, tokenizer, loader, val_loader,
          generator, state, ckpt, tlog, preemption, result: TrainResult) -> None:
    tr = spec.trainer
    batches = _Batches(loader, tokenizer, device)
    samples_per_step = spec.data.batch_size * dims.dp_size * tr.grad_accum_iter
    window_loss, window_start, window_steps, window_saves = 0.0, time.perf_counter(), 0, len(ckpt.stats)
    guard = NonFiniteGuard(tr.max_nonfinite_steps, device)
    for step in range(result.start_step, tr.max_iter):
        ckpt.check()  # a failed background save raises here, at the next step
        step_start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        for micro in range(tr.grad_accum_iter):
            latent, emb = next(batches)
            if tr.grad_accum_iter > 1:  # reduce only on the last micro-step
                set_gradient_sync(model, micro == tr.grad_accum_iter - 1)
            # Upstream feeds the zero-padded T5 embedding without a key mask; released weights expect it.
            loss, _ = training_loss(model, latent, emb, None, generator=generator,
                                    num_condition_frames=spec.model.num_condition_frames, text_dropout=spec.data.text_dropout,
                                    loss_scale=tr.loss_scale)
            (loss * (dims.cp / tr.grad_accum_iter)).backward()
            loss_sum += loss.detach()
        guard.update(loss_sum)
        grad_norm = clip_grad_norm(params, tr.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        if math.isfinite(grad_norm):
            optimizer.step()
        else:
            log(f"step {step + 1}: non-finite gradient norm ({grad_norm}); optimizer step skipped")
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema is not None:
            ema.update(model, step + 1)
        done = step + 1
        state.step = result.end_step = done
        loss_value = _mean_over_ranks(loss_sum / tr.grad_accum_iter)
        result.losses[done] = loss_value
        result.step_seconds[done] = time.perf_counter() - step_start
        window_loss, window_steps = window_loss + loss_value, window_steps + 1
        tlog.step(done, f"loss {loss_value:.4f}")

        saving = done % spec.checkpoint.save_iter == 0 or done == tr.max_iter
        if done % tr.logging_iter == 0 or saving:
            guard.check(done)  # never save (or go on logging) a diverged run
        if done % tr.logging_iter == 0 or done == tr.max_iter:
            elapsed = time.perf_counter() - window_start
            blocked = sum(s.blocking_s for s in ckpt.stats[window_saves:])
            tlog.write(done, {"loss": window_loss / window_steps, "lr": lr, "grad_norm": grad_norm,
                              "iter_per_s": window_steps / elapsed,
                              "samples_per_s": window_steps * samples_per_step / elapsed,
                              "ckpt_blocking_s": blocked, "peak_mem_gb": _peak_memory_gb(device)})
            window_loss, window_start, window_steps, window_saves = 0.0, time.perf_counter(), 0, len(ckpt.stats)
        if val_loader is not None and done % tr.validation_iter == 0:
            val = _validation_loss(model, val_loader, tokenizer, spec, device, dims.dp_rank)
            result.val_losses[done] = val
            tlog.write(done, {"loss": val, "sigmas": len(tr.validation_sigmas)}, kind="val")
        if preemption.agreed(device):
            guard.check(done)
            ckpt.save(done, force=True)
            result.preempted = True
            log(f"stopped at step {done} after a signal; resume with `cosmos-train resume {result.run_dir}`")
            return
        ckpt.save(done)
