"""Small collective helpers for the checkpoint protocol; every one degrades to a no-op on one process."""

from __future__ import annotations

import torch.distributed as dist

from cosmos_train.runtime.distributed import dist_on, rank
from cosmos_train.runtime.distributed import world_size as world

__all__ = ["agree", "barrier", "dist_on", "rank", "world"]


def agree(value, pg=None):
    """Rank 0's `value`, on every rank."""
    if world(pg) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, group=pg, group_src=0)
    return box[0]


def barrier(pg=None) -> None:
    if world(pg) > 1:
        dist.barrier(group=pg)
