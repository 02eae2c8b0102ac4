"""Process-group init and teardown: one process, torchrun-style env, reuse, failure on one rank."""

from __future__ import annotations

import logging
import time

import pytest
import torch
import torch.distributed as dist

from cosmos_train.errors import CosmosTrainError
from cosmos_train.runtime.distributed import distributed, init_distributed, log, teardown
from cosmos_train.spec import ParallelSpec
from tests.dist import free_port, run_ranks


def test_single_process_without_torchrun_gets_a_one_rank_group():
    assert not dist.is_initialized()
    with distributed(ParallelSpec(), device="cpu", env={}) as info:
        assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
        assert info.device == torch.device("cpu") and info.backend == "gloo" and info.owns_group
        assert dist.is_initialized() and dist.get_world_size() == 1
        x = torch.ones(3)
        dist.all_reduce(x)  # collectives work, so mesh/DCP code needs no special case
        assert x.tolist() == [1.0, 1.0, 1.0]
    assert not dist.is_initialized()


def test_exception_is_reported_and_group_destroyed(caplog):
    with caplog.at_level(logging.ERROR, logger="cosmos_train"):
        with pytest.raises(ValueError, match="boom"):
            with distributed(ParallelSpec(), device="cpu", env={}):
                raise ValueError("boom")
    assert not dist.is_initialized()
    # one process: the caller (the CLI) reports the error once; "rank R failed" is for multi-rank jobs
    assert "failed" not in caplog.text


@pytest.mark.parametrize("env, match", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "must be integers"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "outside WORLD_SIZE 2"),
])
def test_bad_launcher_env_fails_before_any_group(env, match):
    with pytest.raises(CosmosTrainError, match=match):
        init_distributed(ParallelSpec(), device="cpu", env=env)
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_requested_without_cuda_is_a_user_error():
    with pytest.raises(CosmosTrainError, match="CUDA is not available"):
        init_distributed(ParallelSpec(), device="cuda", env={})
    assert not dist.is_initialized()


def test_log_prints_once_or_with_rank_prefix(caplog):
    with caplog.at_level(logging.INFO, logger="cosmos_train"):
        log("hello")
        log("everyone", all_ranks=True)
    assert [r.getMessage() for r in caplog.records] == ["hello", "[rank 0] everyone"]


# ----------------------------------------------------------------- multi-process
class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _reuse_then_fail_on_one_rank(rank, world_size, port):
    # 1) The harness's group exists: init_distributed reuses it, teardown leaves it alone.
    reused = init_distributed(ParallelSpec(), device="cpu")
    teardown(reused)
    x = torch.tensor([float(rank)])
    dist.all_reduce(x)
    reuse = (reused.rank, reused.world_size, reused.local_rank, reused.owns_group, x.item())

    # 2) Leave it and start our own group from a torchrun-style env with a short
    # timeout: if the abort did not work, rank 1 would wait these 20 s.
    dist.destroy_process_group()
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    records = _Records()
    logging.getLogger("cosmos_train").addHandler(records)
    start = None
    try:
        with distributed(ParallelSpec(timeout_s=20), device="cpu", env=env) as info:
            assert info.owns_group and info.world_size == 2 and info.rank == rank
            dist.barrier()
            start = time.monotonic()
            if rank == 0:
                time.sleep(0.3)  # rank 1 is blocked in all_reduce by now
                raise ValueError("boom")
            dist.all_reduce(torch.ones(1))
        failure = ("no error", None)
    except Exception as e:  # noqa: BLE001 -- the test inspects it
        failure = (type(e).__name__, time.monotonic() - start)
    return reuse, failure, records.lines, dist.is_initialized()


def test_reuse_and_a_failing_rank_does_not_hang_its_peers():
    t0 = time.monotonic()
    out = run_ranks(_reuse_then_fail_on_one_rank, 2, free_port(), timeout=60)
    assert [o[0] for o in out] == [(0, 2, 0, False, 1.0), (1, 2, 1, False, 1.0)]
    (_, (err0, _), lines0, init0), (_, (err1, waited1), lines1, init1) = out
    assert err0 == "ValueError" and "rank 0 failed: ValueError: boom" in lines0
    assert err1 != "no error" and any(line.startswith("rank 1 failed:") for line in lines1)
    assert waited1 < 10, f"rank 1 waited {waited1:.1f}s: the group was not aborted"
    assert not init0 and not init1
    assert time.monotonic() - t0 < 40
