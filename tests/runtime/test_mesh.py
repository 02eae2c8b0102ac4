"""Parallel degrees validation and the device mesh's named sub-meshes."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist

from cosmos_train.errors import CosmosTrainError
from cosmos_train.runtime.mesh import build_parallel_dims
from cosmos_train.spec import ParallelSpec
from tests.dist import run_ranks


def test_product_mismatch_names_the_numbers():
    with pytest.raises(CosmosTrainError) as e:
        build_parallel_dims(ParallelSpec(dp_shard=4, cp=2), 4)
    assert "parallel: dp_replicate*dp_shard*cp = 1*4*2 = 8, but the job has 4 processes" in str(e.value)


def test_rest_of_world_must_divide():
    with pytest.raises(CosmosTrainError, match=r"dp_replicate\*cp = 1\*3 = 3 does not divide the job's 4"):
        build_parallel_dims(ParallelSpec(dp_shard=-1, cp=3), 4)
    with pytest.raises(CosmosTrainError, match="does not divide"):
        build_parallel_dims(ParallelSpec(dp_replicate=2, dp_shard=-1, cp=2), 2)


@pytest.mark.parametrize("rep, shard, cp, world, want_shard", [
    (1, -1, 1, 1, 1), (1, -1, 1, 8, 8), (2, -1, 2, 8, 2), (1, -1, 4, 4, 1), (2, 3, 1, 6, 3),
])
def test_dp_shard_resolution(rep, shard, cp, world, want_shard):
    dims = build_parallel_dims(ParallelSpec(dp_replicate=rep, dp_shard=shard, cp=cp), world)
    assert (dims.dp_replicate, dims.dp_shard, dims.cp, dims.world_size) == (rep, want_shard, cp, world)
    assert dims.dp_size == rep * want_shard and dims.fsdp_size == want_shard * cp
    assert dims.hsdp == (rep > 1)


def test_warns_when_cp_mode_has_no_effect(caplog):
    with caplog.at_level(logging.WARNING, logger="cosmos_train"):
        build_parallel_dims(ParallelSpec(cp=1), 2)  # default cp_mode: nothing to say
        assert caplog.text == ""
        build_parallel_dims(ParallelSpec(cp=1, cp_mode="a2a"), 2)
    assert "parallel.cp_mode = 'a2a' has no effect with parallel.cp = 1" in caplog.text


def test_accessors_need_the_mesh():
    dims = build_parallel_dims(ParallelSpec(), 1)
    with pytest.raises(ValueError, match="build_mesh"):
        _ = dims.fsdp_mesh


def _submeshes(rank, world_size):
    out = {}
    for name, spec in {"cp2": ParallelSpec(cp=2), "hsdp": ParallelSpec(dp_replicate=2, cp=2)}.items():
        dims = build_parallel_dims(spec, world_size)
        world = dims.build_mesh("cpu")
        fsdp = dims.fsdp_mesh
        out[name] = dict(
            world=(world.mesh_dim_names, tuple(world.shape)),
            dp=(dims.dp_rank, dims.dp_size, dims.dp_mesh.mesh.tolist()),
            cp=(dims.cp_rank, dist.get_process_group_ranks(dims.cp_group)),
            fsdp=(fsdp.mesh_dim_names, fsdp.mesh.tolist()),
        )
    return out


def test_submesh_ranks_on_four_ranks_with_cp2():
    out = run_ranks(_submeshes, 4, timeout=60)
    cp_groups = [[0, 1], [0, 1], [2, 3], [2, 3]]
    for rank, o in enumerate(out):
        # cp2: dp_shard resolves to 2; cp neighbours are adjacent ranks and read the same data.
        c = o["cp2"]
        assert c["world"] == (("dp_replicate", "dp_shard", "cp"), (1, 2, 2))
        assert c["dp"] == (rank // 2, 2, [rank % 2, rank % 2 + 2])
        assert c["cp"] == (rank % 2, cp_groups[rank])
        assert c["fsdp"] == (("dp_shard_cp",), [0, 1, 2, 3])  # cp ranks share the parameter shards
        # hsdp: replicate 2 x (shard 1 x cp 2); FSDP shards inside a replica, replicates across.
        h = o["hsdp"]
        assert h["world"] == (("dp_replicate", "dp_shard", "cp"), (2, 1, 2))
        assert h["dp"] == (rank // 2, 2, [rank % 2, rank % 2 + 2])
        assert h["cp"] == (rank % 2, cp_groups[rank])
        assert h["fsdp"] == (("dp_replicate", "dp_shard_cp"), [[0, 1], [2, 3]])


def test_cp_a2a_degree_warns_without_hybrid_and_must_divide_cp(caplog):
    with caplog.at_level(logging.WARNING, logger="cosmos_train"):
        build_parallel_dims(ParallelSpec(cp=2, cp_mode="hybrid", cp_a2a_degree=2), 2)
        assert caplog.text == ""
        build_parallel_dims(ParallelSpec(cp=2, cp_a2a_degree=2), 2)
    assert "parallel.cp_a2a_degree = 2 has no effect with parallel.cp_mode = 'ring'" in caplog.text
    with pytest.raises(CosmosTrainError, match=r"parallel.cp_a2a_degree: must divide parallel.cp \(4\) \(got 3\)"):
        build_parallel_dims(ParallelSpec(cp=4, cp_mode="hybrid", cp_a2a_degree=3), 4)


def _hybrid(rank, world_size):
    dims = build_parallel_dims(ParallelSpec(cp=4, cp_mode="hybrid", cp_a2a_degree=2), world_size)
    dims.build_mesh("cpu")
    a2a, ring = dims.hybrid_groups
    plain = build_parallel_dims(ParallelSpec(cp=4), world_size)
    plain.build_mesh("cpu")
    try:
        _ = plain.hybrid_groups
        plain_error = None
    except ValueError as e:
        plain_error = str(e)
    sums = []
    for group in (a2a, ring):  # the groups are usable: a sum over each gives its members' ranks
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=group)
        sums.append(t.item())
    return dict(cp=dist.get_process_group_ranks(dims.cp_group), a2a=dist.get_process_group_ranks(a2a),
                ring=dist.get_process_group_ranks(ring), sums=sums, plain_error=plain_error)


def test_hybrid_groups_on_four_ranks_with_cp4_a2a2():
    out = run_ranks(_hybrid, 4, timeout=60)
    a2a_groups = [[0, 1], [0, 1], [2, 3], [2, 3]]  # consecutive cp ranks: inside a node
    ring_groups = [[0, 2], [1, 3], [0, 2], [1, 3]]  # same position in their a2a block: across nodes
    for rank, o in enumerate(out):
        assert o["cp"] == [0, 1, 2, 3]
        assert o["a2a"] == a2a_groups[rank] and o["ring"] == ring_groups[rank]
        assert o["sums"] == [sum(a2a_groups[rank]), sum(ring_groups[rank])]
        assert "cp_mode 'hybrid'" in o["plain_error"]
