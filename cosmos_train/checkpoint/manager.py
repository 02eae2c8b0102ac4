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
Background saves use their own gloo group so their collectives never interleave
with the training ones.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict)

from cosmos_train.checkpoint import layout
from cosmos_train.checkpoint.collectives import IdentityStager, agree, barrier, describe_failure, dist_on, rank, world
from cosmos_train.checkpoint.dcp_safe import SafePlanner, SafeReader, read_metadata
from cosmos_train.checkpoint.disk import disk_full_message, is_disk_full
from cosmos_train.checkpoint.integrity import (
    ChecksummingFileSystem, adopt_uncommitted, check_loadable, data_files, file_entry, read_manifest, verify_reads, write_manifest)
from cosmos_train.checkpoint.sources import (
    format_key_problems, load_full_weights, map_keys, matches_prefix, resolve_load_path, unexpected_keys)
from cosmos_train.errors import CheckpointError, CorruptCheckpointError

log = logging.getLogger(__name__)

REG, EMA = "net.", "net_ema."
# DCP's CheckpointException derives from BaseException, so it is named explicitly.
_FAILURES = (Exception, CheckpointException)
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
    extra: dict = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        """Write throughput of the checkpoint bytes (all ranks) over the write time, GB/s."""
        return self.bytes / self.write_s / 1e9 if self.write_s else 0.0


class Checkpointer:
    """Saves/loads `model/optim/scheduler/trainer` under `RUN_DIR/checkpoints` (see module docstring).

    `ckpt` is the spec's CheckpointSpec. `ema` is an object with `state_dict()` /
    `load_state_dict()` keyed like the model. `lora_only` saves only adapter weights
    (`lora_` keys) in the model part. `writer_factory` swaps the DCP storage writer
    (tests inject slow or failing writers). `async_process=True` picks torch's
    process-based writer for `async_pinned` (experimental: not exercised by the tests,
    and it cannot start from a daemonic process such as tests/dist.py's ranks).
    """

    def __init__(self, ckpt, run_dir: str | Path, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                 trainer_state=None, ema=None, lora_only: bool = False,
                 writer_factory: WriterFactory | None = None, async_process: bool = False,
                 writer_threads: int | None = None) -> None:
        self.ckpt = ckpt
        self.run_dir = Path(run_dir)
        self.dir = layout.checkpoints_dir(self.run_dir)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.trainer_state, self.ema, self.lora_only = trainer_state, ema, lora_only
        self.mode = ckpt.async_mode
        self._checksums = ChecksummingFileSystem()
        self._writer_factory = writer_factory or (
            lambda p: self._checksummed(FileSystemWriter(p, sync_files=True,
                                                         thread_count=writer_threads or ckpt.write_threads)))
        self.stats: list[SaveStats] = []
        self._future: Future | None = None
        self._pending: SaveStats | None = None
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
        self._pg = None
        self._executor = self._stager = None
        self._process = False
        if self.mode != "off":
            # A dedicated gloo group: background collectives must not interleave with training ones.
            self._pg = dist.new_group(backend="gloo") if dist_on() else None
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
            # torch's process-based writer needs a process group (it builds one of its own).
            self._process = self.mode == "async_pinned" and dist_on() and async_process
            if self.mode == "async_pinned":
                from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

                pin = torch.cuda.is_available()
                # Staging buffers are cached per source storage and reused by every later save.
                self._stager = DefaultStager(StagingOptions(use_pinned_memory=pin, use_shared_memory=self._process,
                                                            use_async_staging=False, use_non_blocking_copy=False))
                if not pin or not self._process:
                    log.info("async_pinned: %s staging buffers, %s-based writing%s",
                             "pinned" if pin else "plain (no CUDA) reusable CPU",
                             "process" if self._process else "thread",
                             "" if self._process else " (process writing: Checkpointer(async_process=True), experimental)")

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
        stats = SaveStats(step=step, mode=self.mode + ("/process" if self._process else ""))
        tmp = layout.temp_iteration_dir(self.dir, step, self._token)
        parts = self._state_dicts()
        self._refuse_nonfinite(parts["model"], step)
        if self.mode == "off":
            self._write_and_commit(parts, tmp, step, stats, pg=None)
            stats.blocking_s = time.perf_counter() - t0
            self._finish(stats)
        else:
            t1 = time.perf_counter()
            if self._stager is not None:
                staged = {k: self._stager.stage(v) for k, v in parts.items()}
            else:
                from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

                # Plain async: fresh CPU copies each time (no memory kept between saves).
                stager = DefaultStager(StagingOptions(False, False, False, False))
                staged = {k: stager.stage(v) for k, v in parts.items()}
                stager.close()
            stats.staging_s = time.perf_counter() - t1
            del parts
            self._pending = stats
            self._future = self._executor.submit(self._background, staged, tmp, step, stats)
            stats.blocking_s = time.perf_counter() - t0
        self._last_saved = step
        return True

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

    def _background(self, staged, tmp, step, stats) -> None:
        self._write_and_commit(staged, tmp, step, stats, pg=self._pg)
        self._finish(stats)

    def _finish(self, stats: SaveStats) -> None:
        stats.done = True
        self.stats.append(stats)
        if rank() == 0:
            log.info("checkpoint %s saved (%s): %.2f GB, blocking %.3fs, staging %.3fs, write %.3fs "
                     "(%.2f GB/s), commit %.3fs", layout.iteration_dir_name(stats.step), stats.mode,
                     stats.bytes / 1e9, stats.blocking_s, stats.staging_s, stats.write_s, stats.gbps,
                     stats.commit_s)

    def _write_and_commit(self, parts: dict, tmp: Path, step: int, stats: SaveStats, pg) -> None:
        t0 = time.perf_counter()
        try:
            for name, sd in parts.items():
                self._write_part(sd, tmp / name, pg)
        except _FAILURES as e:
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
        except Exception as e:
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

    def _write_part(self, sd: dict, part_dir: Path, pg) -> None:
        writer = self._writer_factory(part_dir)
        if self._process:
            from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

            dcp.async_save(sd, storage_writer=writer, process_group=pg, async_stager=IdentityStager(),
                           async_checkpointer_type=AsyncCheckpointerType.PROCESS,
                           no_dist=not dist_on()).result()
        else:
            dcp.save(sd, storage_writer=writer, process_group=pg, no_dist=not dist_on())

    def _commit(self, tmp: Path, step: int, shares: list) -> int | str:
        """Rank 0: manifest, rename, COMMITTED, latest file, retention. Returns bytes or an error."""
        errors = [s for s in shares if isinstance(s, str)]
        if errors:
            return "; ".join(errors)
        try:
            entries = {k: v for s in shares for k, v in s.items()}
            for rel in data_files(tmp):
                if rel not in entries:  # DCP's renamed .metadata, or files written by a subprocess
                    entries[rel] = file_entry(tmp, rel)
            write_manifest(tmp, entries, extra={"step": step, "world_size": world(),
                                                "lora_only": self.lora_only})
            layout.fsync_dir(tmp)
            final = layout.commit(tmp, self.dir / layout.iteration_dir_name(step))
            layout.purge(self.dir, self.ckpt.keep_last, self.ckpt.keep_every, protect=[final])
            return sum(v["size"] for v in entries.values())
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)  # only if the rename did not happen yet
            if is_disk_full(e):
                return disk_full_message(tmp, need=None, what=f"the manifest/marker of step {step}")
            return f"{type(e).__name__}: {e}"

    def _state_dicts(self) -> dict[str, dict]:
        """The four parts' state dicts (sharded DTensors stay sharded)."""
        msd = get_model_state_dict(self.model)
        keep = (lambda k: "lora_" in k) if self.lora_only else (lambda k: True)
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
        if self._future is not None and self._future.done():
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight save (if any) is written and committed; raise its error."""
        fut, self._future = self._future, None
        if fut is None:
            return
        try:
            fut.result()
        except CheckpointError:
            raise
        except _FAILURES as e:
            raise CheckpointError(f"background save of step {self._pending.step} failed: {describe_failure(e)}") from e

    def close(self) -> None:
        """Wait for the last save, then release the writer thread, staging memory and gloo group."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            if self._stager is not None:
                self._stager.close()
            if self._pg is not None and dist_on():
                dist.destroy_process_group(self._pg)
                self._pg = None

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
                try:  # the CRCs of what is read are checked while reading; damage found there falls back too
                    self._load_iteration(it_dir, parts, strict=self.ckpt.strict_resume, skip=(), ema_to_reg=False,
                                         ema_required=True)
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
        skip = tuple(self.ckpt.keys_not_to_resume)
        if source.kind == "dcp":
            parts = ("model",)
            if self.ckpt.load_training_state:
                parts += tuple(p for p, o in (("optim", self.optimizer), ("scheduler", self.scheduler),
                                              ("trainer", self.trainer_state)) if o is not None)
            problem = agree(self._problem(source.path, parts))
            if problem:
                raise CheckpointError(problem)
            self._load_iteration(source.path, parts, strict=self.ckpt.strict_resume, skip=skip,
                                 ema_to_reg=self.ckpt.load_ema_to_reg, ema_required=False)
        else:
            if self.ckpt.load_training_state:
                log.warning("checkpoint.load_training_state has no effect for %s (a weights-only file)", source)
            load_full_weights(source, self.model, self.ema, strict=self.ckpt.strict_resume, skip=skip,
                              ema_to_reg=self.ckpt.load_ema_to_reg)
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

    def _load_iteration(self, it_dir: Path, parts: tuple[str, ...], *, strict: bool, skip: tuple[str, ...],
                        ema_to_reg: bool, ema_required: bool) -> None:
        readers = {p: SafeReader(it_dir / p) for p in parts}
        try:
            if "model" in parts:
                self._load_model(readers["model"], strict=strict, skip=skip, ema_to_reg=ema_to_reg,
                                 ema_required=ema_required)
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
        except CheckpointError:
            raise
        except _FAILURES as e:
            err = CorruptCheckpointError if _damage(e) else CheckpointError
            raise err(f"loading checkpoint {it_dir.name} ({it_dir}) failed: {describe_failure(e)}") from e
        self._verify_loaded(it_dir, {p: r.segments for p, r in readers.items()})

    @staticmethod
    def _verify_loaded(it_dir: Path, segments: dict) -> None:
        """Rank 0 compares the CRCs every rank took while reading with MANIFEST.json; all ranks raise alike."""
        shares = [segments]
        if world() > 1:
            shares = [None] * world()
            dist.all_gather_object(shares, segments)
        problems = None
        if rank() == 0:
            try:
                manifest = read_manifest(it_dir)
                problems = [p for part in segments
                            for p in verify_reads(it_dir, part, [s.get(part, {}) for s in shares], manifest)]
            except (CheckpointError, OSError) as e:
                problems = [str(e)]
        problems = agree(problems)
        if problems:
            raise CorruptCheckpointError(f"checkpoint {it_dir.name} ({it_dir}) is damaged:\n  " + "\n  ".join(problems))

    def _load_model(self, reader: SafeReader, *, strict: bool, skip: tuple[str, ...], ema_to_reg: bool,
                    ema_required: bool) -> None:
        part_dir = Path(reader.path)
        have = set(read_metadata(part_dir).state_dict_metadata)
        msd = get_model_state_dict(self.model)
        # Adapter-only checkpoints lack the base weights (they come from load_path).
        optional = (lambda k: "lora_" not in k) if self.lora_only else (lambda k: False)
        reg_map, missing = map_keys(msd, have, EMA if ema_to_reg else REG, skip=skip, optional=optional)
        request = {ck: msd[k] for k, ck in reg_map.items()}
        used = set(reg_map.values())
        esd = None
        if self.ema is not None:
            esd = self.ema.state_dict()
            ema_map, ema_missing = map_keys(esd, have, EMA, skip=skip, optional=optional)
            if ema_map or ema_required:
                request.update({ck: esd[k] for k, ck in ema_map.items()})
                used |= set(ema_map.values())
                missing += ema_missing
            else:
                log.warning("%s has no EMA weights; the EMA starts from the loaded regular weights", part_dir.parent)
                esd = "copy"
        if ema_to_reg:  # the regular weights of the checkpoint are deliberately not used
            used |= {k for k in have if k.startswith(REG)}
        unexpected = unexpected_keys(have, used, (REG, EMA) if (self.ema is not None or ema_to_reg) else (REG,),
                                     skip=skip)
        if missing or unexpected:
            msg = format_key_problems(missing, unexpected, source=str(part_dir.parent))
            if strict:
                raise CheckpointError(msg + "\n(set checkpoint.strict_resume=false to load anyway, or list "
                                            "prefixes in checkpoint.keys_not_to_resume)")
            log.warning("%s", msg)
        dcp.load(request, storage_reader=reader, planner=SafePlanner(source=part_dir), no_dist=not dist_on())
        set_model_state_dict(self.model, msd)
        if esd == "copy":
            self.ema.load_state_dict(get_model_state_dict(self.model))
        elif esd is not None:
            self.ema.load_state_dict(esd)


def _nbytes(parts: dict) -> int:
    """Bytes of the tensors in (nested) state dicts: this rank's share of a save, all ranks for a DTensor."""
    total = 0
    for v in parts.values():
        if isinstance(v, dict):
            total += _nbytes(v)
        elif isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()  # a DTensor reports its global size
    return total


def _damage(e: BaseException) -> bool:
    """True if DCP's error carries a CorruptCheckpointError from a rank's reader."""
    failures = getattr(e, "failures", None) or {}
    return isinstance(e, CorruptCheckpointError) or any(
        isinstance(f[0] if isinstance(f, tuple) else f, CorruptCheckpointError) for f in failures.values())


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
