"""Small collective helpers for the checkpoint protocol; every one degrades to a no-op on one process."""

from __future__ import annotations

import torch.distributed as dist


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(pg=None) -> int:
    return dist.get_rank(pg) if dist_on() else 0


def world(pg=None) -> int:
    return dist.get_world_size(pg) if dist_on() else 1


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
