"""The training loop: a `Trainer` built from the spec that owns the loop state; `train` runs it.

Build order: process group and mesh -> DiT on the meta device -> LoRA -> cp / activation
checkpointing / FSDP2 (materialised shard by shard, `models/parallelize.py`) -> EMA ->
optimizer and scheduler -> data -> checkpoint resume (or `load_path`) -> loop.

No host sync in a step: the loss and the gradient norm stay device tensors; the non-finite
check skips the optimizer step on the device (`optim.step_unless_nonfinite`). Every
`trainer.logging_iter` and `trainer.signal_check_iter` steps (a "sync step") the window's
losses and this rank's signal flag go to the host in one all-reduce; that is where losses are
logged and ranks agree to stop after a SIGTERM.

Context parallelism: every cp rank of one data-parallel group sees the same clip and
noise, computes the same full loss (the DiT gathers its output), and back-propagates
only through its own frames. FSDP2 averages gradients over dp x cp ranks, so the loss
is multiplied by cp to turn that average back into a sum over the cp shards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from cosmos_train.checkpoint.collectives import agree
from cosmos_train.layout import checkpoints_dir, remove_partial
from cosmos_train.checkpoint.manager import Checkpointer
from cosmos_train.checkpoint.trainer_state import TrainerState, derived_seed
from cosmos_train.data.loader import build_dataloader
from cosmos_train.errors import CosmosTrainError
from cosmos_train.models.diffusion import training_loss
from cosmos_train.models.ema import PowerEMA
from cosmos_train.models.parallelize import build_dit, parallelize_dit
from cosmos_train.models.tokenizer import build_tokenizer
from cosmos_train.nonfinite import NonFiniteGuard
from cosmos_train.optim import apply_optimizer_spec, build_optimizer, build_scheduler, step_unless_nonfinite
from cosmos_train.plan.startup import log_startup_plan
from cosmos_train.preemption import Preemption
from cosmos_train.run_dir import SPEC_FILE, data_cache_dir, prepare_run_dir
from cosmos_train.run_lock import RunLock
from cosmos_train.runtime.distributed import configure_logging, distributed, log, warn, world_size
from cosmos_train.runtime.fsdp import clip_grad_norm, mixed_precision_dtypes, set_gradient_sync
from cosmos_train.runtime.memory import peak_memory_gb
from cosmos_train.runtime.mesh import ParallelDims, build_parallel_dims
from cosmos_train.samples import TrainingSamples
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
    # Host time of each step, saves excluded. On a GPU the step is not synchronised, so this is
    # the time to enqueue it; the logged iter_per_s (measured across a sync) is the real rate.
    step_seconds: dict[int, float] = field(default_factory=dict)
    preempted: bool = False


def _sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Sum of a float64 vector over all ranks (one all-reduce; none in a single process)."""
    if world_size() > 1:
        dist.all_reduce(values)
    return values


def _sync_generator(generator: torch.Generator, dims: ParallelDims) -> None:
    """cp ranks of one dp group must draw the same noise: take cp-rank 0's generator state."""
    if not dims.cp_enabled:
        return
    state = [generator.get_state() if dims.cp_rank == 0 else None]
    src = dist.get_global_rank(dims.cp_group, 0)
    dist.broadcast_object_list(state, src=src, group=dims.cp_group)
    generator.set_state(state[0])


class _Batches:
    """Endless batches moved to the device: (latent, text embedding)."""

    def __init__(self, loader, tokenizer, device: torch.device):
        self.loader, self.tokenizer, self.device = loader, tokenizer, device
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = self.loader.batches()
        batch = next(self._it)
        emb = batch["t5_text_embeddings"].to(self.device, non_blocking=True)
        return _latent(batch, self.tokenizer, self.device), emb


def _latent(batch: dict, tokenizer, device: torch.device) -> torch.Tensor:
    """The batch's latent: from the latent cache when the loader read it, else encoded here."""
    if "latent" in batch:
        return batch["latent"].to(device, non_blocking=True)
    with torch.no_grad():
        return tokenizer.encode(batch["video"].to(device, non_blocking=True))


@dataclass
class _Window:
    """The steps since the last logging step. Per-step values stay on the device until the next
    sync step (`pending_*`); the host-side sums cover the synced ones."""

    pending_losses: list[torch.Tensor] = field(default_factory=list)  # this rank's mean loss per step
    pending_skipped: list[torch.Tensor] = field(default_factory=list)  # 1.0 where the step was skipped
    steps: int = 0
    loss_sum: float = 0.0  # dp-mean losses of the synced steps
    grad_norm: float = float("nan")  # of the last synced step
    start: float = field(default_factory=time.perf_counter)
    saves: int = 0  # index into Checkpointer.stats at the window start
    sample_s: float = 0.0  # time spent sampling clips (not training: left out of iter/s)


class Trainer:
    """Owns the model, optimizer, data, checkpointer and the loop state; `step()` does one step.

    Build it inside a process group (`train` does); `fit()` resumes, loops to
    `trainer.max_iter` (or a signal), saves and returns a `TrainResult`; `close()` releases
    the checkpointer.
    """

    def __init__(self, spec: ExperimentSpec, dims: ParallelDims, device: torch.device, run_dir: Path, *,
                 is_main: bool, show_progress: bool = True):
        self.spec, self.dims, self.device, self.run_dir = spec, dims, device, run_dir
        self.is_main, self.show_progress = is_main, show_progress
        tr, par = spec.trainer, spec.parallel
        torch.manual_seed(spec.job.seed)
        lora = spec.model.lora if spec.model.train_architecture == "lora" else None
        model = build_dit(spec.model.dit_config(), attention=par.attention, device_type=device.type, lora=lora)
        param_dtype, reduce_dtype = mixed_precision_dtypes(tr.precision, device.type)
        self.model = parallelize_dit(model, dims, device=device, seed=spec.job.seed, param_dtype=param_dtype,
                                     reduce_dtype=reduce_dtype, cp_mode=par.cp_mode,
                                     activation_checkpointing=par.activation_checkpointing,
                                     reshard_after_forward=par.reshard_after_forward)
        self.ema = PowerEMA(self.model, s=spec.model.ema.s) if spec.model.ema.enabled else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(spec.optimizer, self.params)
        self.scheduler = build_scheduler(spec.scheduler, self.optimizer)
        self.tokenizer = build_tokenizer(spec.model.tokenizer, latent_channels=spec.model.dit_config().latent_channels)

        cache_dir = data_cache_dir(spec)
        self.loader = build_dataloader(spec.data, dp_rank=dims.dp_rank, dp_size=dims.dp_size, seed=spec.job.seed,
                                       cache_dir=cache_dir, split="train", tokenizer=self.tokenizer)
        self.val_loader = None
        if tr.validation_iter and spec.data.validation_clips:
            self.val_loader = build_dataloader(spec.data, dp_rank=dims.dp_rank, dp_size=dims.dp_size,
                                               seed=spec.job.seed, cache_dir=cache_dir, split="val",
                                               tokenizer=self.tokenizer)
        self.batches = _Batches(self.loader, self.tokenizer, device)
        self.samples = None
        if tr.sample_iter:  # inputs are read now: a missing file fails before training starts
            self.samples = TrainingSamples(spec, run_dir, tokenizer=self.tokenizer, device=device, dp_rank=dims.dp_rank,
                                           dp_size=dims.dp_size, cp_rank=dims.cp_rank, cache_dir=cache_dir)
        self.generator = torch.Generator().manual_seed(derived_seed(spec.job.seed, 0, dims.dp_rank))
        self.state = TrainerState(seed=spec.job.seed, generator=self.generator, sampler=self.loader)
        lora_only = lora is not None and spec.checkpoint.save_adapters_only
        self.ckpt = Checkpointer(spec.checkpoint, run_dir, model=self.model, optimizer=self.optimizer,
                                 scheduler=self.scheduler, trainer_state=self.state, ema=self.ema, lora_only=lora_only)
        self.preemption = Preemption()
        self.step_count = 0  # optimizer steps done (the checkpoint's step)
        self.grad_norm = torch.zeros((), device=device)  # of the last step, before clipping
        self._window = _Window()
        self._samples_per_step = spec.data.batch_size * dims.dp_size * tr.grad_accum_iter
        self.guard = NonFiniteGuard(tr.max_nonfinite_steps, device)  # read on sync and saving steps only
        self._guard_checked = -1  # the step whose sync last read the guard

    # ------------------------------------------------------------------------- one step
    def step(self) -> None:
        """One optimizer step (grad accumulation, clip, skip if non-finite, schedule, EMA); no host sync."""
        tr = self.spec.trainer
        self.ckpt.check()  # a failed background save raises here, at the next step
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(tr.grad_accum_iter):
            latent, emb = next(self.batches)
            if tr.grad_accum_iter > 1:  # reduce only on the last micro-step
                set_gradient_sync(self.model, micro == tr.grad_accum_iter - 1)
            # Upstream feeds the zero-padded T5 embedding without a key mask; released weights expect it.
            loss, _ = training_loss(self.model, latent, emb, None, generator=self.generator,
                                    num_condition_frames=self.spec.model.train_condition_frames,
                                    text_dropout=self.spec.data.text_dropout, loss_scale=tr.loss_scale)
            (loss * (self.dims.cp / tr.grad_accum_iter)).backward()
            loss_sum += loss.detach()
        self.guard.update(loss_sum)
        self.grad_norm = clip_grad_norm(self.params, tr.grad_clip)
        step_unless_nonfinite(self.optimizer, self.grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:  # upstream passes the iteration before incrementing it: beta(0) = 0 copies
            self.ema.update(self.model, self.step_count)
        self.step_count = self.state.step = self.step_count + 1
        self._window.pending_losses.append(loss_sum / tr.grad_accum_iter)
        self._window.pending_skipped.append((~torch.isfinite(self.grad_norm)).to(torch.float64))
        self._window.steps += 1

    # ---------------------------------------------------------------------- sync steps
    def _is_sync_step(self) -> bool:
        tr, done = self.spec.trainer, self.step_count
        return done % tr.logging_iter == 0 or done % tr.signal_check_iter == 0 or done == tr.max_iter

    def _sync(self, result: TrainResult) -> bool:
        """Bring the pending losses to the host (one all-reduce, one host read) and agree on a
        signal; returns True when any rank was signalled."""
        w, world = self._window, world_size()
        n = len(w.pending_losses)
        flag = torch.tensor([1.0 if self.preemption.requested else 0.0], dtype=torch.float64, device=self.device)
        local = torch.cat([torch.stack(w.pending_losses).double(), torch.stack(w.pending_skipped), flag,
                           self.guard.take_flag()])  # NaN-streak flag: the same all-reduce
        norm = self.grad_norm.detach().to(self.device, torch.float64).reshape(1)
        values = torch.cat([_sum_over_ranks(local), norm]).tolist()
        first = self.step_count - n + 1
        for i in range(n):
            result.losses[first + i] = values[i] / world
        skipped = [first + i for i in range(n) if values[n + i] > 0]
        if skipped:  # the norm is global, so every rank skipped the same steps
            warn(f"steps {skipped}: non-finite gradient norm; optimizer step skipped")
        w.loss_sum += sum(result.losses[first + i] for i in range(n))
        w.grad_norm = values[-1]
        w.pending_losses.clear()
        w.pending_skipped.clear()
        self._guard_checked = self.step_count
        self.guard.raise_if(values[2 * n + 1], self.step_count)  # a diverged run stops here
        return values[2 * n] > 0

    def _log(self, tlog: TrainLog, lr: float) -> None:
        w, done = self._window, self.step_count
        elapsed = time.perf_counter() - w.start - w.sample_s
        blocked = sum(s.blocking_s for s in self.ckpt.stats[w.saves:])
        tlog.write(done, {"loss": w.loss_sum / w.steps, "lr": lr, "grad_norm": w.grad_norm,
                          "iter_per_s": w.steps / elapsed, "samples_per_s": w.steps * self._samples_per_step / elapsed,
                          "ckpt_blocking_s": blocked, "sample_s": w.sample_s, "peak_mem_gb": peak_memory_gb(self.device)})
        self._window = _Window(saves=len(self.ckpt.stats))

    def validation_loss(self) -> dict[str, float]:
        """Mean diffusion loss over the held-out clips, overall ("loss") and at each of the fixed
        `trainer.validation_sigmas` ("loss_sigma_<sigma>")."""
        spec = self.spec
        sigmas = spec.trainer.validation_sigmas
        generator = torch.Generator().manual_seed(derived_seed(spec.job.seed, 0, self.dims.dp_rank))
        totals, batches = torch.zeros(len(sigmas), dtype=torch.float64, device=self.device), 0
        with torch.no_grad():
            for batch in self.val_loader:
                latent = _latent(batch, self.tokenizer, self.device)
                emb = batch["t5_text_embeddings"].to(self.device)
                for i, sigma in enumerate(sigmas):
                    loss, _ = training_loss(self.model, latent, emb, None, generator=generator,
                                            num_condition_frames=spec.model.num_condition_frames, text_dropout=0.0,
                                            loss_scale=spec.trainer.loss_scale, sigma_override=sigma)
                    totals[i] += loss.double()
                batches += 1
        means = (_sum_over_ranks(totals / max(batches, 1)) / world_size()).tolist()  # one all-reduce
        return {"loss": sum(means) / len(means), **{f"loss_sigma_{s:g}": m for s, m in zip(sigmas, means)}}

    def _sample(self, tlog: TrainLog) -> None:
        """Sample clips at this step (`trainer.sample_iter`); the time goes to the log, not to iter/s."""
        report = self.samples.run(self.model, self.ema, self.step_count)
        self._window.sample_s += report.seconds
        tlog.write(self.step_count, {"seconds": report.seconds, "clips": len(self.samples.inputs)}, kind="sample")
        tlog.media(self.step_count, videos=report.videos,
                   images={"contact_sheet": report.sheet} if report.sheet else {})

    # ----------------------------------------------------------------------------- save
    def save(self, *, force: bool = False) -> bool:
        """Checkpoint the current step (every `checkpoint.save_iter` steps, or now with `force`).

        A run whose loss was NaN/inf for `trainer.max_nonfinite_steps` steps stops here instead.
        """
        saving = force or self.step_count % self.spec.checkpoint.save_iter == 0
        if saving and self._guard_checked != self.step_count:  # not already checked by this step's sync
            self.guard.check(self.step_count)
        return self.ckpt.save(self.step_count, force=force)

    # -------------------------------------------------------------------------- the loop
    def fit(self, *, require_checkpoint: bool = False) -> TrainResult:
        """Resume (or initialise), step to `trainer.max_iter` or a signal, save; what happened."""
        tr = self.spec.trainer
        start = self.step_count = self.ckpt.resume_or_initialize()
        if require_checkpoint and start == 0:
            raise CosmosTrainError(f"{self.run_dir}: no committed checkpoint to resume from "
                                   f"(start it with `cosmos-train run {self.run_dir / SPEC_FILE}`)")
        if start > 0:  # the spec (with any resume overrides) trains, not the restored hyperparameters
            for change in apply_optimizer_spec(self.spec.optimizer, self.optimizer, self.scheduler):
                log(f"resume: {change} (from the spec; the checkpoint had the old value)")
        _sync_generator(self.generator, self.dims)
        result = TrainResult(run_dir=self.run_dir, start_step=start, end_step=start)
        if start >= tr.max_iter:
            log(f"nothing to do: step {start} >= trainer.max_iter {tr.max_iter}")
            return result
        d = self.dims
        log(f"training steps {start + 1}..{tr.max_iter} in {self.run_dir} "
            f"(dp={d.dp_size}, cp={d.cp}, world={d.world_size}, device={self.device.type})")
        tlog = TrainLog(self.spec, self.run_dir, enabled=self.is_main, start_step=start,
                        show_progress=self.show_progress)
        self._window = _Window(saves=len(self.ckpt.stats))
        try:
            with self.preemption:
                self._loop(tlog, result)
        finally:
            tlog.close()
        self.save(force=True)
        self.ckpt.wait()
        return result

    def _loop(self, tlog: TrainLog, result: TrainResult) -> None:
        tr = self.spec.trainer
        while self.step_count < tr.max_iter:
            step_start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
            self.step()
            done = result.end_step = self.step_count
            result.step_seconds[done] = time.perf_counter() - step_start
            stop = False
            if self._is_sync_step():
                stop = self._sync(result)
                tlog.step(done, f"loss {result.losses[done]:.4f}")
            else:
                tlog.step(done)
            if self.samples is not None and self.samples.due(done) and not stop:  # after a signal: save first
                self._sample(tlog)
            if self._is_sync_step() and (done % tr.logging_iter == 0 or done == tr.max_iter or stop):
                self._log(tlog, lr)
            if self.val_loader is not None and done % tr.validation_iter == 0:
                val = self.validation_loss()
                result.val_losses[done] = val["loss"]
                tlog.write(done, val, kind="val")
            if stop:
                self.save(force=True)
                result.preempted = True
                log(f"stopped at step {done} after a signal; resume with `cosmos-train resume {self.run_dir}`")
                return
            self.save()

    def close(self) -> None:
        """Release the checkpointer (waits for a background save)."""
        self.ckpt.close()


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
                log_startup_plan(spec, world=info.world_size, device=info.device)
            except CosmosTrainError as e:
                lock.release()
                problem = e
        problem = agree(problem)
        if problem is not None:
            raise problem
        try:
            trainer = Trainer(spec, dims, info.device, run_dir, is_main=info.is_main, show_progress=show_progress)
            try:
                return trainer.fit(require_checkpoint=require_checkpoint)
            finally:
                trainer.close()
        finally:
            lock.release()
