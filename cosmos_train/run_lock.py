"""One process tree per run directory: an exclusive lock held by rank 0 for the run's lifetime.

Without it a second `run`/`resume` on the same run dir deletes the first one's
in-flight `iter_X.tmp-*` save as "partial" and both train into one directory.

`RUN_DIR/.lock` is locked with `fcntl.flock` (released by the kernel when the holder
dies, so a killed run never leaves a stale lock) and holds the holder's pid, host
and start time, which the refusal names. Where the file system has no locks
(`flock` fails with ENOLCK/EOPNOTSUPP, e.g. some network mounts) the recorded
holder decides: a live pid on this host, or any other host, holds the run; a dead
pid on this host is a stale lock and is taken over with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from cosmos_train.errors import CosmosTrainError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class RunLockedError(CosmosTrainError):
    """Another process holds the run directory."""


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 4096) or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _describe(h: dict) -> str:
    if not h:
        return "an unknown process"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("since", 0)))
    return f"pid {h.get('pid')} on host {h.get('host')} (since {when})"


def _alive_here(h: dict) -> bool:
    """True unless `h` is a process on this host that no longer exists."""
    if h.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(h["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


class RunLock:
    """`with RunLock(run_dir):` - exclusive use of `run_dir`; RunLockedError (exit 2) names the holder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunLockedError naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLockedError(f"{self.path.parent}: in use by {_describe(_holder(fd))}; wait for that run "
                                     f"to finish or stop it (lock file {self.path})") from None
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    raise
                h = _holder(fd)  # no kernel locks here: the recorded holder decides
                if h and _alive_here(h) and h.get("pid") != os.getpid():
                    raise RunLockedError(f"{self.path.parent}: in use by {_describe(h)} (this file system has no "
                                         f"locks; delete {self.path} if that process is gone)") from None
                if h:
                    log.warning("%s: stale lock of %s taken over (that process is gone)", self.path, _describe(h))
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, record.encode(), 0)
            except OSError as e:  # e.g. a full disk: the flock holds anyway; only the holder's name is lost
                log.warning("%s: cannot record the lock holder (%s)", self.path, e.strerror)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder record and unlock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
