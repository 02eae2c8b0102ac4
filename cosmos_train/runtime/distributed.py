"""Process groups: start from torchrun's environment (or as one process), tear down cleanly;
the package's one logger and its rank helpers.

torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) are read here
and nowhere else; everything below gets a `DistInfo` or a `DeviceMesh` passed in. (The other
environment reads are at the edges: `$COSMOS_TRAIN_OUTPUT_ROOT` in `spec.py`,
`$COSMOS_TRAIN_DEBUG` in the CLI.)

Logging: every module logs through `log` / `warn` here (rank 0 only unless asked), on the
"cosmos_train" logger that `configure_logging` attaches a handler to; modules that use
`logging.getLogger(__name__)` land on the same handler as its children.

Single-process runs (no torchrun) still get a real process group: a 1-rank group
on an in-process `HashStore` (no port, no files). That keeps one code path for
the device mesh, FSDP2 and DCP at every world size, instead of "if distributed"
branches everywhere.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cosmos_train.errors import CosmosTrainError
from cosmos_train.spec import ParallelSpec

logger = logging.getLogger("cosmos_train")

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    # False when the group existed before `init_distributed` (e.g. a test harness made it):
    # then a successful teardown leaves it to its owner.
    owns_group: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda' (got {device!r})")
    if not torch.cuda.is_available():
        raise CosmosTrainError("trainer.device: 'cuda' was asked for but CUDA is not available; "
                               "use device = 'auto' or 'cpu'")
    if local_rank >= torch.cuda.device_count():
        raise CosmosTrainError(f"LOCAL_RANK {local_rank} has no GPU: this node has "
                               f"{torch.cuda.device_count()}; lower torchrun's --nproc_per_node")
    return torch.device("cuda", local_rank)


def _read_launch_env(env: Mapping[str, str]) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's variables, or None without torchrun."""
    present = [k for k in _TORCHRUN_VARS if k in env]
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return None
    missing = [k for k in _TORCHRUN_VARS if k not in env and k != "LOCAL_RANK"]
    if missing:
        raise CosmosTrainError(f"incomplete launcher environment: found {', '.join(present)} but not "
                               f"{', '.join(missing)}; start with torchrun, or unset them for one process")
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise CosmosTrainError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e})") from None
    if not 0 <= rank < world:
        raise CosmosTrainError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return rank, world, local_rank


def init_distributed(parallel: ParallelSpec, *, device: str = "auto",
                     env: Mapping[str, str] | None = None) -> DistInfo:
    """Join (or create) the default process group and pick this rank's device.

    Under torchrun the group is created from MASTER_ADDR/PORT with the spec's
    `parallel.timeout_s`; without it, a 1-rank group on an in-process store. On
    CUDA the backend is `cpu:gloo,cuda:nccl` (NCCL for GPU tensors, gloo for the CPU
    tensors that DCP and object collectives use) and the current device is set
    from LOCAL_RANK; on CPU it is gloo. An already initialised group is reused.
    `env` defaults to `os.environ` (tests pass their own).
    """
    env = os.environ if env is None else env
    launch = _read_launch_env(env)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = launch[2] if launch else rank
        dev = _resolve_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(rank, world, local_rank, dev, str(dist.get_backend()), owns_group=False)

    rank, world, local_rank = launch if launch else (0, 1, 0)
    dev = _resolve_device(device, local_rank)
    backend = "gloo"
    kwargs: dict = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        backend = "cpu:gloo,cuda:nccl"
        kwargs["device_id"] = dev  # eager NCCL init: a bad GPU fails here, not at the first collective
    if launch is None:
        kwargs["store"] = dist.HashStore()
    else:
        # From the mapping we were given, not os.environ (which "env://" would read).
        addr = env["MASTER_ADDR"]
        addr = f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr  # IPv6 literal
        kwargs["init_method"] = f"tcp://{addr}:{env['MASTER_PORT']}"
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=parallel.timeout_s), **kwargs)
    return DistInfo(rank, world, local_rank, dev, backend, owns_group=True)


def teardown(info: DistInfo | None = None) -> None:
    """Destroy the default group after a successful run (only if `init_distributed` created it)."""
    if dist.is_initialized() and (info is None or info.owns_group):
        dist.destroy_process_group()


def abort() -> None:
    """Abort the default group so that peers blocked in a collective fail now, not at the timeout.

    Used after an exception on this rank; the job is going down anyway, so the
    group is aborted even if someone else created it.
    """
    if not dist.is_initialized():
        return
    try:
        # Private but long-standing; aborting (unlike destroying) does not wait on in-flight NCCL work.
        from torch.distributed.distributed_c10d import _abort_process_group
        _abort_process_group()
    except Exception:  # noqa: BLE001 -- fall back to the public call; we are already failing
        dist.destroy_process_group()


@contextmanager
def distributed(parallel: ParallelSpec, *, device: str = "auto",
                env: Mapping[str, str] | None = None) -> Iterator[DistInfo]:
    """`with distributed(spec.parallel) as info:` -- init, run, tear down even on errors.

    On an exception the error is logged as "rank R failed: ..." on every rank, the
    group is aborted (other ranks' pending collectives raise instead of hanging
    until the timeout) and the exception propagates.
    """
    info = init_distributed(parallel, device=device, env=env)
    try:
        yield info
    except BaseException as e:
        if info.world_size > 1:  # one process: the caller reports the error itself
            logger.error("rank %d failed: %s: %s", info.rank, type(e).__name__, e)
        abort()
        raise
    teardown(info)


# ------------------------------------------------------------------ rank helpers (the one set)
def dist_on() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in `group` (default: the world); 0 without a process group."""
    return dist.get_rank(group) if dist_on() else 0


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Size of `group` (default: the world); 1 without a process group."""
    return dist.get_world_size(group) if dist_on() else 1


def is_main() -> bool:
    """True on global rank 0 (and in a single process)."""
    return rank() == 0


# ------------------------------------------------------------------------------- logging
def log(msg: str, *, all_ranks: bool = False, level: int = logging.INFO) -> None:
    """Log `msg` once (rank 0), or on every rank with a "[rank N] " prefix."""
    r = rank()
    if all_ranks:
        logger.log(level, "[rank %d] %s", r, msg)
    elif r == 0:
        logger.log(level, "%s", msg)


def warn(msg: str) -> None:
    """A rank-0 warning, e.g. for an option that has no effect."""
    log(msg, level=logging.WARNING)


def configure_logging(level: int = logging.INFO) -> None:
    """Send the package's log records to stderr (once; a no-op if a handler is attached)."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)
