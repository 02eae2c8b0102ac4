import pytest
import torch
import torch.distributed as dist

from tests.dist import RankError, run_ranks


def _all_reduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fails_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 blocks here; the helper must not hang
    return rank


def test_all_reduce_on_two_ranks():
    assert run_ranks(_all_reduce, 2) == [3.0, 3.0]


def test_failing_rank_is_reported_with_traceback():
    with pytest.raises(RankError, match=r"(?s)rank 1 of 2 failed.*boom on rank one"):
        run_ranks(_fails_on_rank_one, 2, timeout=60)
