"""Run-dir / checkpoint directory layout, atomic commit and retention.

    RUN_DIR/
      spec.toml
      checkpoints/
        iter_000000200/{model,optim,scheduler,trainer}/ + MANIFEST.json + COMMITTED
        iter_000000400.tmp-1a2b3c/          # a save in progress (or a crash leftover)
        latest_checkpoint.txt               # "iter_000000200"

A checkpoint counts only when its directory has the final name *and* a `COMMITTED`
marker. The order of a commit is: everything written into `iter_X.tmp-*` (fsynced),
rename to `iter_X`, fsync `checkpoints/`, write `COMMITTED` atomically, replace
`latest_checkpoint.txt` atomically. A crash at any moment therefore leaves the
previous latest checkpoint intact and findable.

Upstream (Cosmos) iteration directories carry no marker; they are loadable when
named explicitly, and a `checkpoints/` dir without any marker at all is treated as
an upstream one (the latest file is trusted).

Only what this toolkit knows it left half-written is ever removed: its own
`iter_X.tmp-*` / `iter_X.deleting-*` names. An `iter_X` without the marker (a crash
between rename and marker, or an upstream iteration beside committed ones) is kept
with a warning; `integrity.adopt_uncommitted` commits it if its manifest verifies.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cosmos_train.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
LATEST_FILE = "latest_checkpoint.txt"
COMMITTED_MARKER = "COMMITTED"
MANIFEST_FILE = "MANIFEST.json"  # written by checkpoint.integrity before the marker
SPEC_FILE = "spec.toml"
PARTS = ("model", "optim", "scheduler", "trainer")

_ITER_RE = re.compile(r"^iter_(\d{9,})$")
_TMP_RE = re.compile(r"^iter_(\d{9,})\.tmp-[A-Za-z0-9_-]+$")
_DELETING_RE = re.compile(r"^iter_(\d{9,})\.deleting-[A-Za-z0-9_-]+$")


# ------------------------------------------------------------------------ naming
def iteration_dir_name(step: int) -> str:
    """`200 -> "iter_000000200"` (the upstream naming, 9 digits)."""
    if step < 0:
        raise ValueError(f"step must be >= 0 (got {step})")
    return f"iter_{step:09d}"


def parse_iteration(name: str) -> int:
    """`"iter_000000200" -> 200`; raises ValueError for any other name."""
    m = _ITER_RE.match(name)
    if not m:
        raise ValueError(f"{name!r} is not an iteration directory name (expected iter_XXXXXXXXX)")
    return int(m.group(1))


def _try_parse(name: str) -> int | None:
    m = _ITER_RE.match(name)
    return int(m.group(1)) if m else None


def checkpoints_dir(run_dir: str | Path) -> Path:
    """`RUN_DIR/checkpoints`."""
    return Path(run_dir) / CHECKPOINTS_DIRNAME


def temp_iteration_dir(ckpt_dir: str | Path, step: int, token: str) -> Path:
    """Where a save of `step` is written before its commit: `iter_X.tmp-<token>`."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", token):
        raise ValueError(f"bad temp token {token!r}")
    return Path(ckpt_dir) / f"{iteration_dir_name(step)}.tmp-{token}"


def is_committed(iter_dir: str | Path) -> bool:
    """True if the iteration directory carries the `COMMITTED` marker."""
    return (Path(iter_dir) / COMMITTED_MARKER).is_file()


# ----------------------------------------------------------------------- listing
@dataclass(frozen=True)
class IterationEntry:
    """One directory under `checkpoints/`: a committed iteration, or a partial one."""

    step: int
    path: Path
    committed: bool
    partial: bool  # a .tmp-/.deleting- leftover of this toolkit (safe to delete)
    uncommitted: bool = False  # an iter_X without marker beside committed ones (kept, not loaded)


def list_iterations(ckpt_dir: str | Path) -> list[IterationEntry]:
    """All iteration-like directories under `ckpt_dir`, sorted by step then name."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    marked_layout = _has_markers(ckpt_dir)
    out = []
    for p in ckpt_dir.iterdir():
        if not p.is_dir():
            continue
        if (step := _try_parse(p.name)) is not None:
            committed = is_committed(p)
            # Without any marker in the dir this is an upstream run: every iteration counts.
            out.append(IterationEntry(step, p, committed, partial=False,
                                      uncommitted=marked_layout and not committed))
        elif m := (_TMP_RE.match(p.name) or _DELETING_RE.match(p.name)):
            out.append(IterationEntry(int(m.group(1)), p, False, True))
    return sorted(out, key=lambda e: (e.step, e.path.name))


def _has_markers(ckpt_dir: Path) -> bool:
    return any(is_committed(p) for p in ckpt_dir.iterdir() if _try_parse(p.name) is not None and p.is_dir())


def committed_iterations(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """`(step, path)` of every committed iteration, oldest first."""
    return [(e.step, e.path) for e in list_iterations(ckpt_dir) if e.committed]


def partial_dirs(ckpt_dir: str | Path) -> list[Path]:
    """This toolkit's leftovers of interrupted saves or deletions (`.tmp-` / `.deleting-` names only)."""
    return [e.path for e in list_iterations(ckpt_dir) if e.partial]


def uncommitted_dirs(ckpt_dir: str | Path) -> list[Path]:
    """`iter_X` dirs without a marker beside committed ones: kept, never deleted, not loaded."""
    return [e.path for e in list_iterations(ckpt_dir) if e.uncommitted]


def remove_partial(ckpt_dir: str | Path) -> list[Path]:
    """Report (warning) and delete this toolkit's half-written directories; returns what was removed."""
    removed = partial_dirs(ckpt_dir)
    for p in removed:
        log.warning("removing partial checkpoint directory %s (an interrupted save or deletion)", p)
        shutil.rmtree(p, ignore_errors=True)
    return removed


def read_manifest(iter_dir: str | Path) -> dict | None:
    """The parsed manifest, or None if the iteration has none (upstream checkpoint)."""
    p = Path(iter_dir) / MANIFEST_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: manifest is not valid JSON ({e})") from None


def read_latest_file(ckpt_dir: str | Path) -> str | None:
    """The name stored in `latest_checkpoint.txt`, or None if the file is absent/empty."""
    f = Path(ckpt_dir) / LATEST_FILE
    try:
        name = f.read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def read_latest(ckpt_dir: str | Path) -> Path | None:
    """The iteration a resume should start from, or None if there is none.

    The newest committed iteration. This equals the `latest_checkpoint.txt` target
    except after a crash between `COMMITTED` and the latest-file update, when the
    newer (complete) checkpoint wins. A `checkpoints/` dir without any marker is an
    upstream one: its latest file is trusted.
    """
    ckpt_dir = Path(ckpt_dir)
    committed = committed_iterations(ckpt_dir)
    if committed:
        return committed[-1][1]
    name = read_latest_file(ckpt_dir)
    if name is not None and (ckpt_dir / name).is_dir() and not _has_markers(ckpt_dir):
        return ckpt_dir / name
    return None


# ---------------------------------------------------------------------- resolving
def looks_like_iteration(p: Path) -> bool:
    """True for an `iter_X` dir, or any dir holding a DCP `model/` part (upstream naming varies)."""
    return _try_parse(p.name) is not None or (p / "model" / ".metadata").is_file()


def resolve_iteration_dir(path: str | Path, iteration: int | None = None) -> Path:
    """Resolve a user-given path to one iteration directory.

    Accepts an iteration dir (committed, or an upstream one without marker named
    explicitly), a `checkpoints/` dir, or a run dir. For the latter two, `iteration`
    picks `iter_<iteration>`; otherwise the latest committed one is used.
    Raises CheckpointError naming the path and what was expected.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory (expected a checkpoint iteration dir, "
                              f"a checkpoints/ dir or a run dir)")
    if not p.is_dir():
        raise CheckpointError(f"{p}: is a file; expected a checkpoint iteration dir, a checkpoints/ dir "
                              f"or a run dir (consolidated .pt/.safetensors files are loaded via load_path)")
    if looks_like_iteration(p):
        if iteration is not None and _try_parse(p.name) not in (None, iteration):
            raise CheckpointError(f"{p}: is iteration {parse_iteration(p.name)}, but iteration {iteration} "
                                  f"was asked for; pass the checkpoints/ or run dir instead")
        return p
    if (p / CHECKPOINTS_DIRNAME).is_dir() and not _is_checkpoints_dir(p):
        ckpt_dir = p / CHECKPOINTS_DIRNAME
    elif _is_checkpoints_dir(p):
        ckpt_dir = p
    else:
        raise CheckpointError(f"{p}: not a checkpoint location; expected an iter_XXXXXXXXX dir, a "
                              f"checkpoints/ dir (with {LATEST_FILE}) or a run dir containing checkpoints/")
    if iteration is not None:
        it_dir = ckpt_dir / iteration_dir_name(iteration)
        if not it_dir.is_dir():
            have = ", ".join(str(e.step) for e in list_iterations(ckpt_dir) if not e.partial) or "none"
            raise CheckpointError(f"{ckpt_dir}: no iteration {iteration} (available: {have})")
        if _has_markers(ckpt_dir) and not is_committed(it_dir):
            log.warning("%s has no %s marker; loading it because it was asked for", it_dir, COMMITTED_MARKER)
        return it_dir
    latest = read_latest(ckpt_dir)
    if latest is None:
        raise CheckpointError(f"{ckpt_dir}: no committed checkpoint found (no iter_XXXXXXXXX dir with a "
                              f"{COMMITTED_MARKER} marker and no usable {LATEST_FILE})")
    return latest


def _is_checkpoints_dir(p: Path) -> bool:
    if (p / LATEST_FILE).is_file():
        return True
    return any(_try_parse(c.name) is not None or _TMP_RE.match(c.name) for c in p.iterdir() if c.is_dir())


def find_run_dir(iteration_dir: str | Path) -> Path | None:
    """The run dir owning an iteration dir (`.../RUN/checkpoints/iter_X` with `RUN/spec.toml`), else None."""
    p = Path(iteration_dir).resolve()
    if p.parent.name == CHECKPOINTS_DIRNAME and (p.parent.parent / SPEC_FILE).is_file():
        return p.parent.parent
    return None


# ------------------------------------------------------------------------ atomics
def fsync_dir(path: str | Path) -> None:
    """fsync a directory so renames/creations inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it (os.umask would race with writer threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)  # no /proc: the set-and-restore fallback
    os.umask(old)
    return old


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` atomically: temp file in the same dir, fsync, rename, fsync dir.

    The file gets the mode a plain `open(path, "w")` would (0666 minus the umask), like the
    DCP shards beside it; mkstemp alone would make it 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _move_aside(path: Path, suffix: str | None) -> Path:
    (path / COMMITTED_MARKER).unlink(missing_ok=True)  # a dir on its way out never claims to be committed
    aside = path.with_name(path.name + (suffix or f".deleting-{os.getpid()}"))
    os.replace(path, aside)
    return aside


def discard_dir(path: str | Path, *, suffix: str | None = None) -> None:
    """Delete a directory by renaming it aside (`<name>.deleting-<pid>`) first.

    A crash mid-delete then leaves a recognisable leftover (a partial dir that the
    next Checkpointer removes), never a half-deleted dir under the real name.
    """
    shutil.rmtree(_move_aside(Path(path), suffix), ignore_errors=True)


def install(tmp: str | Path, final: str | Path, *, suffix: str | None = None) -> None:
    """Move a finished `tmp` (file or dir) to `final`; an existing dir there is moved aside, then deleted."""
    tmp, final = Path(tmp), Path(final)
    aside = _move_aside(final, suffix) if final.is_dir() else None
    os.replace(tmp, final)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def commit(tmp_dir: str | Path, final_dir: str | Path, *, update_latest: bool = True) -> Path:
    """Make a fully written `tmp_dir` the committed checkpoint `final_dir`.

    Rename into place, fsync the parent, write `COMMITTED`, then (by default) replace
    `latest_checkpoint.txt`. An existing `final_dir` (re-save of the same step) is
    first un-committed and moved aside, so no moment has two dirs claiming the step.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    parent = final_dir.parent
    parse_iteration(final_dir.name)
    install(tmp_dir, final_dir)
    fsync_dir(parent)
    atomic_write_text(final_dir / COMMITTED_MARKER, "committed\n")
    if update_latest:
        atomic_write_text(parent / LATEST_FILE, final_dir.name + "\n")
    return final_dir


# ---------------------------------------------------------------------- retention
def purge(ckpt_dir: str | Path, keep_last: int | None, keep_every: int | None = None, *,
          protect: tuple[str | Path, ...] | list[str | Path] = ()) -> list[Path]:
    """Delete older committed checkpoints; returns the deleted dirs.

    Keeps the newest `keep_last` committed iterations, every iteration whose step
    divides by `keep_every`, everything in `protect`, and the `latest_checkpoint.txt`
    target. Partial dirs are not touched (in-flight saves live there). Deletion drops
    the marker first, so a crash mid-delete leaves a partial dir, never a broken
    committed one.
    """
    if keep_last is None:
        return []
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (got {keep_last})")
    ckpt_dir = Path(ckpt_dir)
    committed = committed_iterations(ckpt_dir)
    keep = {p.resolve() for _, p in committed[-keep_last:]}
    keep |= {Path(p).resolve() for p in protect}
    if (name := read_latest_file(ckpt_dir)) is not None:
        keep.add((ckpt_dir / name).resolve())
    deleted = []
    for step, p in committed:
        if p.resolve() in keep or (keep_every and step % keep_every == 0):
            continue
        discard_dir(p)
        deleted.append(p)
        log.info("retention: deleted %s (keep_last=%s, keep_every=%s)", p, keep_last, keep_every)
    return deleted
