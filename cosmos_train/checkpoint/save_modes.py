"""How a save runs relative to training: one small strategy per `checkpoint.async_mode`.

    off           stage nothing, write and commit inline (training waits for the disk)
    async         copy the state to fresh CPU tensors, write and commit in a background thread
    async_pinned  the same, into staging buffers kept between saves (pinned on CUDA), so the
                  copy is a device->host memcpy into memory that is already there

Every mode has the same surface: `stage(parts)` (on the training thread; its time is
what training is blocked), `submit(job)`, `done()`, `wait()` (raises the job's error),
`close()`. Background modes own a gloo group so their collectives never interleave
with the training ones; creating it is collective, so every rank builds the same mode.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
import torch.distributed as dist

from cosmos_train.checkpoint.collectives import dist_on

log = logging.getLogger(__name__)


class SyncSave:
    """`off`: the job runs inside `submit`; its error raises there."""

    name = "off"
    pg = None  # the default group: nothing else runs collectives meanwhile

    def stage(self, parts: dict) -> dict:
        return parts

    def submit(self, job: Callable[[], None]) -> None:
        job()

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass

    def close(self) -> None:
        pass


class ThreadSave:
    """`async`: fresh CPU copies each save (no memory kept between saves), one writer thread."""

    name = "async"

    def __init__(self) -> None:
        self.pg = dist.new_group(backend="gloo") if dist_on() else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        self.future: Future | None = None

    def stage(self, parts: dict) -> dict:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        stager = DefaultStager(StagingOptions(False, False, False, False))
        try:
            return {k: stager.stage(v) for k, v in parts.items()}
        finally:
            stager.close()

    def submit(self, job: Callable[[], None]) -> None:
        assert self.future is None, "wait() for the previous save first"
        self.future = self._executor.submit(job)

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def wait(self) -> None:
        fut, self.future = self.future, None
        if fut is not None:
            fut.result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self.pg is not None and dist_on():
            dist.destroy_process_group(self.pg)
            self.pg = None


class PinnedThreadSave(ThreadSave):
    """`async_pinned`: staging buffers cached per source storage and reused by every later save."""

    name = "async_pinned"

    def __init__(self) -> None:
        super().__init__()
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        pin = torch.cuda.is_available()
        self._stager = DefaultStager(StagingOptions(use_pinned_memory=pin, use_shared_memory=False,
                                                    use_async_staging=False, use_non_blocking_copy=False))
        if not pin:
            log.info("async_pinned: reusable plain CPU staging buffers (no CUDA to pin memory for)")

    def stage(self, parts: dict) -> dict:
        return {k: self._stager.stage(v) for k, v in parts.items()}

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._stager.close()


MODES = {m.name: m for m in (SyncSave, ThreadSave, PinnedThreadSave)}


def build_save_mode(name: str):
    """The strategy for `checkpoint.async_mode` (collective for the background modes)."""
    try:
        return MODES[name]()
    except KeyError:
        raise ValueError(f"unknown checkpoint.async_mode {name!r}; choose one of {', '.join(MODES)}") from None
