"""Save and resume training state as DCP checkpoints: sync or async, atomic commit, retention.

    ckpt = Checkpointer(spec.checkpoint, run_dir, model=model, optimizer=opt, scheduler=sched,
                        trainer_state=state, ema=ema)
    start = ckpt.resume_or_initialize()        # latest committed checkpoint, else checkpoint.load_path
    for step in range(start + 1, total + 1):
        ...; state.step = step
        ckpt.save(step)                          # every save_iter steps; async modes return at once
    ckpt.save(total, force=True); ckpt.close()   # waits for the last write and commits it

Parts (each a DCP dir under iter_X/): model (`net.<fqn>`, `net_ema.<fqn>`), optim
(`get_optimizer_state_dict`, keyed by FQN so it reshards), scheduler, trainer.

Collective protocol of one save (the same on every rank, inline or in the background
thread): dcp.save of each part -> every rank CRC32s its share of the files ->
all_gather of the entries (or of an error) -> rank 0 writes MANIFEST.json, renames
tmp -> final, writes COMMITTED and latest_checkpoint.txt, applies retention ->
broadcast of rank 0's outcome. So every rank learns whether the commit happened,
and a failure anywhere raises on every rank at its next save/wait/check.
How the save runs relative to training (inline, or staged and written in a thread) is
a strategy object per `async_mode` (`save_modes`). Background saves use their own gloo
group so their collectives never interleave with the training ones. Weights are loaded
through `export.load.load_weights` (one key planner for every source).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from cosmos_train import layout
from cosmos_train.checkpoint.collectives import agree, barrier, dist_on, rank, world
from cosmos_train.disk import disk_full_message, is_disk_full
from cosmos_train.checkpoint.integrity import (
    ChecksummingFileSystem, adopt_uncommitted, check_loadable, data_files, file_entry, write_manifest)
from cosmos_train.checkpoint.save_modes import build_save_mode
from cosmos_train.errors import CheckpointError, CorruptCheckpointError
from cosmos_train.export.dcp_safe import SafePlanner, SafeReader, check_reads_on_all_ranks, is_damage, read_metadata
from cosmos_train.export.keys import EMA, REG
from cosmos_train.export.load import Source, gc_paused, load_weights, resolve_load_path
from cosmos_train.export.tensor_source import STORAGE_ERRORS, describe_failure
from cosmos_train.models.lora_keys import is_lora_key

log = logging.getLogger(__name__)

WriterFactory = Callable[[Path], Any]  # part dir -> a DCP StorageWriter


@dataclass
class SaveStats:
    """Timings of one save (seconds). `blocking_s` is what the training loop waited."""

    step: int
    mode: str
    blocking_s: float = 0.0
    staging_s: float = 0.0
    write_s: float = 0.0
    commit_s: float = 0.0
    bytes: int = 0
    done: bool = False

    @property
    def gbps(self) -> float:
        """Write throughput of the checkpoint bytes (all ranks) over the write time, GB/s."""
        return self.bytes / self.write_s / 1e9 if self.write_s else 0.0


class Checkpointer:
    """Saves/loads `model/optim/scheduler/trainer` under `RUN_DIR/checkpoints` (see module docstring).

    `ckpt` is the spec's CheckpointSpec. `ema` is an object with `state_dict()` /
    `load_state_dict()` keyed like the model. `lora_only` saves only adapter weights
    (LoRA keys) in the model part. `writer_factory` swaps the DCP storage writer
    (tests inject slow or failing writers). Construction is collective.
    """

    def __init__(self, ckpt, run_dir: str | Path, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                 trainer_state=None, ema=None, lora_only: bool = False,
                 writer_factory: WriterFactory | None = None, writer_threads: int | None = None) -> None:
        self.ckpt = ckpt
        self.run_dir = Path(run_dir)
        self.dir = layout.checkpoints_dir(self.run_dir)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.trainer_state, self.ema, self.lora_only = trainer_state, ema, lora_only
        self._checksums = ChecksummingFileSystem()
        self._writer_factory = writer_factory or (
            lambda p: self._checksummed(FileSystemWriter(p, sync_files=True,
                                                         thread_count=writer_threads or ckpt.write_threads)))
        self.stats: list[SaveStats] = []
        self._last_saved: int | None = None
        self._closed = False
        if rank() == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            removed = layout.remove_partial(self.dir)
            if removed:
                log.warning("removed %d partial checkpoint dir(s) under %s: %s", len(removed), self.dir,
                            ", ".join(p.name for p in removed))
            adopt_uncommitted(self.dir)
        self._token = agree(secrets.token_hex(4))
        barrier()
        self._saver = build_save_mode(ckpt.async_mode)
        self.mode = self._saver.name

    # ------------------------------------------------------------------ saving
    def save(self, step: int, *, force: bool = False) -> bool:
        """Save at `step` if `step % save_iter == 0` or `force`; returns whether a save started.

        Waits for (and raises the error of) a previous background save first.
        """
        self._check_open()
        if not force and step % self.ckpt.save_iter:
            return False
        self.wait()
        if step == self._last_saved:
            return False
        t0 = time.perf_counter()
        stats = SaveStats(step=step, mode=self.mode)
        tmp = layout.temp_iteration_dir(self.dir, step, self._token)
        parts = self._state_dicts()
        self._refuse_nonfinite(parts["model"], step)
        staged = self._saver.stage(parts)
        del parts
        stats.staging_s = time.perf_counter() - t0

        def job() -> None:
            self._write_and_commit(staged, tmp, step, stats, pg=self._saver.pg)
            if self.mode == "off":  # the whole save blocked training
                stats.blocking_s = time.perf_counter() - t0
            stats.done = True
            self.stats.append(stats)
            self._log_saved(stats)

        self._saver.submit(job)
        if self.mode != "off":
            stats.blocking_s = time.perf_counter() - t0
        self._last_saved = step
        return True

    def _log_saved(self, stats: SaveStats) -> None:
        if rank() == 0:
            log.info("checkpoint %s saved (%s): %.2f GB, blocking %.3fs, staging %.3fs, write %.3fs "
                     "(%.2f GB/s), commit %.3fs", layout.iteration_dir_name(stats.step), stats.mode,
                     stats.bytes / 1e9, stats.blocking_s, stats.staging_s, stats.write_s, stats.gbps,
                     stats.commit_s)

    def _refuse_nonfinite(self, model_sd: dict, step: int) -> None:
        """Raise (on every rank) if a weight is NaN/inf: such a checkpoint is never committed, so
        retention cannot rotate the last finite one away. One host read per save."""
        keys, flags = [], []
        for k, v in model_sd.items():
            t = v.to_local() if isinstance(v, DTensor) else v
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                keys.append(k)
                flags.append(torch.isfinite(t).all())
        bad = None
        if flags:
            ok = torch.stack(flags).cpu()
            bad = None if bool(ok.all()) else keys[int((~ok).nonzero()[0])]
        if world() > 1:
            every = [None] * world()
            dist.all_gather_object(every, bad)
            bad = next((b for b in every if b is not None), None)
        if bad is not None:
            latest = layout.read_latest(self.dir)
            raise CheckpointError(f"refusing to save step {step}: weight {bad} holds NaN/inf (the run diverged); "
                                  f"the last committed checkpoint ({latest.name if latest else 'none'}) is kept")

    def _write_and_commit(self, parts: dict, tmp: Path, step: int, stats: SaveStats, pg) -> None:
        t0 = time.perf_counter()
        try:
            for name, sd in parts.items():
                dcp.save(sd, storage_writer=self._writer_factory(tmp / name), process_group=pg,
                         no_dist=not dist_on())
        except STORAGE_ERRORS as e:
            if rank(pg) == 0:  # our own half-written dir: free its space now (every rank has stopped writing)
                shutil.rmtree(tmp, ignore_errors=True)
            latest = layout.read_latest(self.dir)
            kept = f"; the last committed checkpoint ({latest.name}) is intact" if latest else ""
            if is_disk_full(e):
                raise CheckpointError(disk_full_message(tmp, need=_nbytes(parts), what=f"checkpoint step {step}")
                                      + kept + f" ({describe_failure(e)})") from e
            raise CheckpointError(f"saving step {step} into {tmp} failed: {describe_failure(e)}{kept}") from e
        t1 = time.perf_counter()
        stats.write_s = t1 - t0
        # Every rank reports the checksums of the files it wrote (taken while writing); rank 0
        # reads what nobody recorded. Errors travel as values so no rank hangs.
        try:
            mine = self._checksums.take(tmp)
        except OSError as e:
            mine = f"rank {rank(pg)}: {type(e).__name__}: {e}"
        shares = [mine]
        if world(pg) > 1:
            shares = [None] * world(pg)
            dist.all_gather_object(shares, mine, group=pg)
        outcome = None
        if rank(pg) == 0:
            outcome = self._commit(tmp, step, shares)
        outcome = agree(outcome, pg)
        if isinstance(outcome, str):
            raise CheckpointError(f"committing step {step} ({tmp}) failed: {outcome}")
        stats.bytes = outcome
        stats.commit_s = time.perf_counter() - t1

    def _checksummed(self, writer: FileSystemWriter) -> FileSystemWriter:
        writer.fs = self._checksums  # same layout on disk; the bytes are checksummed on the way
        return writer

    def _commit(self, tmp: Path, step: int, shares: list) -> int | str:
        """Rank 0: manifest, rename, COMMITTED, latest file, retention. Returns bytes or an I/O error."""
        errors = [s for s in shares if isinstance(s, str)]
        if errors:
            return "; ".join(errors)
        try:
            entries = {k: v for s in shares for k, v in s.items()}
            for rel in data_files(tmp):
                if rel not in entries:  # DCP's renamed .metadata
                    entries[rel] = file_entry(tmp, rel)
            write_manifest(tmp, entries, extra={"step": step, "world_size": world(),
                                                "lora_only": self.lora_only})
            layout.fsync_dir(tmp)
            final = layout.commit(tmp, self.dir / layout.iteration_dir_name(step))
            layout.purge(self.dir, self.ckpt.keep_last, self.ckpt.keep_every, protect=[final])
            return sum(v["size"] for v in entries.values())
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)  # only if the rename did not happen yet
            if is_disk_full(e):
                return disk_full_message(tmp, need=None, what=f"the manifest/marker of step {step}")
            return f"{type(e).__name__}: {e}"

    def _state_dicts(self) -> dict[str, dict]:
        """The four parts' state dicts (sharded DTensors stay sharded)."""
        msd = get_model_state_dict(self.model)
        keep = is_lora_key if self.lora_only else (lambda k: True)
        model = {REG + k: v for k, v in msd.items() if keep(k)}
        if self.ema is not None:
            model.update({EMA + k: v for k, v in self.ema.state_dict().items() if keep(k)})
        parts = {"model": model}
        if self.optimizer is not None:
            parts["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        if self.scheduler is not None:
            parts["scheduler"] = self.scheduler.state_dict()
        if self.trainer_state is not None:
            parts["trainer"] = self.trainer_state.state_dict()
        return parts

    # --------------------------------------------------------------- async control
    def check(self) -> None:
        """Raise now if a finished background save failed; never blocks."""
        if self._saver.done():
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight save (if any) is written and committed; raise its error.

        Storage errors arrive as CheckpointError; anything else is a bug and keeps its traceback.
        """
        self._saver.wait()

    def close(self) -> None:
        """Wait for the last save, then release the writer thread, staging memory and gloo group."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._saver.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("Checkpointer is closed")

    # ------------------------------------------------------------------ loading
    def load(self, step: int = -1) -> int | None:
        """Resume from the latest committed checkpoint (or iteration `step`); returns its step.

        Returns None when there is nothing to resume from. Loads all parts that this
        Checkpointer holds. With `fallback_to_previous`, a damaged latest checkpoint
        is skipped for the previous committed one, with a loud warning.
        """
        self._check_open()
        if step == -1:
            it_dir = layout.read_latest(self.dir)
            if it_dir is None:
                return None
        else:
            it_dir = layout.resolve_iteration_dir(self.dir, step)
        parts = tuple(p for p, obj in (("model", self.model), ("optim", self.optimizer),
                                       ("scheduler", self.scheduler), ("trainer", self.trainer_state))
                      if obj is not None)
        while True:
            problem = agree(self._problem(it_dir, parts))
            if problem is None:
                try:  # CRCs are checked while reading: damage found there falls back too
                    # Adapter-only checkpoints lack the base weights (they came from load_path).
                    self._load_iteration(Source("dcp", it_dir, str(it_dir)), parts, skip=(), ema_to_reg=False,
                                         ema_required=True, adapters_only=self.lora_only)
                    break
                except CorruptCheckpointError as e:
                    problem = str(e)
            prev = [p for s, p in layout.committed_iterations(self.dir) if s < layout.parse_iteration(it_dir.name)]
            if not (self.ckpt.fallback_to_previous and prev):
                raise CorruptCheckpointError(problem + ("\n(no earlier committed checkpoint to fall back to)"
                                                        if self.ckpt.fallback_to_previous else
                                                        "\n(set checkpoint.fallback_to_previous=true to load the "
                                                        "previous committed checkpoint instead)"))
            log.error("!!! %s\n!!! FALLING BACK to the previous committed checkpoint %s", problem, prev[-1].name)
            it_dir = prev[-1]
        self._last_saved = layout.parse_iteration(it_dir.name)
        if rank() == 0:
            log.info("resumed from %s", it_dir)
        return self.trainer_state.step if self.trainer_state is not None else self._last_saved

    @staticmethod
    def _problem(it_dir: Path, parts: tuple[str, ...]) -> str | None:
        try:
            check_loadable(it_dir, parts)
        except CheckpointError as e:
            return str(e)
        return None

    def initialize(self, load_path: str | None = None, *, cache_dir: str | Path | None = None,
                   offline: bool = False) -> bool:
        """Initialise from `load_path` (default: `checkpoint.load_path`); False if there is none.

        Weights only, unless `load_training_state` and the source is a DCP checkpoint.
        Honours `load_ema_to_reg`, `keys_not_to_resume` and `strict_resume`.
        """
        load_path = load_path or self.ckpt.load_path
        if not load_path:
            return False
        source = resolve_load_path(load_path, cache_dir=cache_dir, offline=offline)
        parts = ("model",)
        if source.kind == "dcp":
            if self.ckpt.load_training_state:
                parts += tuple(p for p, o in (("optim", self.optimizer), ("scheduler", self.scheduler),
                                              ("trainer", self.trainer_state)) if o is not None)
            problem = agree(self._problem(source.path, parts))
            if problem:
                raise CheckpointError(problem)
        elif self.ckpt.load_training_state:
            log.warning("checkpoint.load_training_state has no effect for %s (a weights-only file)", source)
        self._load_iteration(source, parts, skip=tuple(self.ckpt.keys_not_to_resume),
                             ema_to_reg=self.ckpt.load_ema_to_reg, ema_required=False, adapters_only=False)
        if rank() == 0:
            log.info("initialised %s from %s", "model" + (" and EMA" if self.ema is not None else ""), source)
        return True

    def resume_or_initialize(self) -> int:
        """The start step: resume from the latest checkpoint if any, else `initialize()` and 0.

        LoRA adapter-only checkpoints need their base weights first, so `lora_only`
        runs initialise from `load_path` before resuming.
        """
        if self.lora_only:
            self.initialize()
        step = self.load()
        if step is None:
            if not self.lora_only:
                self.initialize()
            return 0
        return step

    @gc_paused()
    def _load_iteration(self, source: Source, parts: tuple[str, ...], *, skip: tuple[str, ...],
                        ema_to_reg: bool, ema_required: bool, adapters_only: bool) -> None:
        """The model through the shared loader; optimizer, scheduler and trainer state from DCP."""
        if "model" in parts:
            load_weights(source, self.model, self.ema, strict=self.ckpt.strict_resume, skip=skip,
                         ema_to_reg=ema_to_reg, ema_required=ema_required, adapters_only=adapters_only)
        it_dir = source.path
        readers = {p: SafeReader(it_dir / p) for p in parts if p != "model"}
        try:
            if "optim" in parts:
                osd = get_optimizer_state_dict(self.model, self.optimizer)
                dcp.load(osd, storage_reader=readers["optim"], planner=SafePlanner(source=it_dir / "optim"),
                         no_dist=not dist_on())
                set_optimizer_state_dict(self.model, self.optimizer, osd)
            if "scheduler" in parts:
                ssd = _present(self.scheduler.state_dict(), it_dir / "scheduler")
                dcp.load(ssd, storage_reader=readers["scheduler"], planner=SafePlanner(source=it_dir / "scheduler"),
                         no_dist=not dist_on())
                self.scheduler.load_state_dict(ssd)
            if "trainer" in parts:
                tsd = _present(self.trainer_state.state_dict(), it_dir / "trainer")
                dcp.load(tsd, storage_reader=readers["trainer"], planner=SafePlanner(source=it_dir / "trainer"),
                         no_dist=not dist_on())
                self.trainer_state.load_state_dict(tsd)
        except STORAGE_ERRORS as e:
            err = CorruptCheckpointError if is_damage(e) else CheckpointError
            raise err(f"loading checkpoint {it_dir.name} ({it_dir}) failed: {describe_failure(e)}") from e
        if readers:  # the model part was checked by the loader
            check_reads_on_all_ranks(it_dir, {p: r.segments for p, r in readers.items()})


def _nbytes(parts: dict) -> int:
    """Bytes of the tensors in (nested) state dicts (a DTensor counts with its global size)."""
    total = 0
    for v in parts.values():
        if isinstance(v, dict):
            total += _nbytes(v)
        elif isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


def _present(sd: dict, part_dir: Path) -> dict:
    """`sd` restricted to the (flattened) keys that the DCP checkpoint in `part_dir` holds."""
    have = set(read_metadata(part_dir).state_dict_metadata)

    def walk(d: dict, prefix: str) -> dict:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and key not in have:
                sub = walk(v, key + ".")
                if sub or not v:
                    out[k] = sub
            elif key in have:
                out[k] = v
        return out

    return walk(sd, "")
