"""Run a function on N gloo ranks on CPU, one spawned process per rank.

Usage in a test::

    def _body(rank, world_size, tmp):   # module-level, so it pickles
        ...
    run_ranks(_body, 2, tmp_path)

Every rank runs `fn(rank, world_size, *args)` inside an initialised gloo process
group (free port on localhost). The return values come back as a list indexed by
rank. If any rank raises, the others are terminated and `RankError` is raised
with the failing rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from datetime import timedelta


class RankError(RuntimeError):
    """A rank of a multi-process test raised; the message holds its traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, results):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        out = fn(rank, world_size, *args)
        # Pickle here: tensors put on a Queue travel as shared-memory handles that vanish with this process.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # forward everything, including assertion failures
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return per-rank results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: list = [None] * world_size
    try:
        for _ in range(world_size):
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None)]
                raise RankError(f"timed out after {timeout}s waiting for ranks; died: {dead}") from None
            if status == "error":
                raise RankError(f"rank {rank} of {world_size} failed:\n{value}")
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return out
