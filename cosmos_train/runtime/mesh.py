"""Device mesh from `spec.parallel`: dims (dp_replicate, dp_shard, cp) and named sub-meshes.

Sub-meshes (the names other parts use):

- ``dp``          dp_replicate x dp_shard, flattened: ranks that see different data
                  (the data loader shards over it; cp ranks of one group read the same sample).
- ``dp_shard_cp`` dp_shard x cp, flattened: FSDP2 shards parameters over it, as in
                  torchtitan -- cp ranks hold different tokens of the same sample, so they
                  can share (shard) the parameters and their gradients are summed like dp's.
- ``cp``          the context-parallel group (ring / all-to-all attention).
- fsdp mesh       1-D ``dp_shard_cp``, or 2-D ``(dp_replicate, dp_shard_cp)`` for HSDP.
- hybrid groups   (cp_mode "hybrid" only) each cp group split into a2a groups, blocks of
                  ``cp_a2a_degree`` consecutive cp ranks (inside a node), and ring groups, the
                  ranks at the same position of their a2a block (across nodes).

Rank layout is row-major over (dp_replicate, dp_shard, cp): cp ranks are adjacent,
so on GPUs a cp group stays inside a node when cp <= GPUs per node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from cosmos_train.errors import CosmosTrainError
from cosmos_train.runtime.distributed import warn
from cosmos_train.spec import ParallelSpec

MESH_DIMS = ("dp_replicate", "dp_shard", "cp")


@dataclass
class ParallelDims:
    """Validated parallel degrees; `build_mesh` then creates the mesh (collective)."""

    dp_replicate: int
    dp_shard: int
    cp: int
    world_size: int
    cp_mode: str = "ring"
    cp_a2a_degree: int = 1
    _meshes: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)
    _hybrid: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = field(default=None, repr=False)

    # ---------------------------------------------------------------- sizes (no mesh needed)
    @property
    def dp_size(self) -> int:
        """Number of data-parallel replicas of the batch (ranks that read different samples)."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_size(self) -> int:
        return self.dp_shard * self.cp

    @property
    def hsdp(self) -> bool:
        return self.dp_replicate > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    # -------------------------------------------------------------------------- the mesh
    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Create the 3-D world mesh and its named sub-meshes (a collective on every rank)."""
        world = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.cp),
                                 mesh_dim_names=MESH_DIMS)
        # Keep the flattened meshes ourselves: slicing flattened dims back out of the
        # root mesh is deprecated in recent torch.
        dp_shard_cp = world["dp_shard", "cp"]._flatten("dp_shard_cp")
        fsdp = DeviceMesh._concatenate([world["dp_replicate"], dp_shard_cp]) if self.hsdp else dp_shard_cp
        self._meshes = {
            "dp": world["dp_replicate", "dp_shard"]._flatten("dp"),
            "dp_shard_cp": dp_shard_cp,
            "cp": world["cp"],
            "fsdp": fsdp,
        }
        if self.cp_enabled and self.cp_mode == "hybrid":
            self._hybrid = self._build_hybrid_groups(world)
        return world

    def _build_hybrid_groups(self, world: DeviceMesh) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
        """This rank's (a2a, ring) groups; every rank creates every group, in the same order.

        `dist.new_group` is collective over the world even for groups a rank is not in,
        so the full enumeration (all cp groups) is built identically on each rank.
        """
        a2a = self.cp_a2a_degree
        cp_groups = world.mesh.reshape(-1, self.cp).tolist()  # global ranks, one row per cp group
        a2a_lists = [g[i:i + a2a] for g in cp_groups for i in range(0, self.cp, a2a)]
        ring_lists = [g[j::a2a] for g in cp_groups for j in range(a2a)]
        a2a_group, _ = dist.new_subgroups_by_enumeration(a2a_lists)
        ring_group, _ = dist.new_subgroups_by_enumeration(ring_lists)
        return a2a_group, ring_group

    def _mesh(self, name: str) -> DeviceMesh:
        if not self._meshes:
            raise ValueError("ParallelDims.build_mesh(device_type) must be called first")
        return self._meshes[name]

    @property
    def dp_mesh(self) -> DeviceMesh:
        """1-D flattened dp_replicate x dp_shard (data loading)."""
        return self._mesh("dp")

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """The mesh to pass to `apply_fsdp`: 1-D dp_shard_cp, or 2-D (dp_replicate, dp_shard_cp)."""
        return self._mesh("fsdp")

    @property
    def cp_mesh(self) -> DeviceMesh:
        return self._mesh("cp")

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self.cp_mesh.get_group()

    @property
    def dp_rank(self) -> int:
        """Index of this rank's data shard in [0, dp_size)."""
        return self.dp_mesh.get_local_rank()

    @property
    def cp_rank(self) -> int:
        return self.cp_mesh.get_local_rank()

    @property
    def hybrid_groups(self) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
        """(a2a_group, ring_group) of this rank for cp_mode "hybrid" (after `build_mesh`)."""
        if self._hybrid is None:
            raise ValueError("ParallelDims.hybrid_groups needs cp_mode 'hybrid' with cp > 1 and "
                             "build_mesh(device_type) called first")
        return self._hybrid


def build_parallel_dims(parallel: ParallelSpec, world_size: int) -> ParallelDims:
    """Resolve `dp_shard = -1` and check the degrees against the world size (no collectives).

    Raises `CosmosTrainError` naming the numbers when they do not multiply to the
    world size, so a bad spec fails before any process group work.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1 (got {world_size})")
    rep, shard, cp = parallel.dp_replicate, parallel.dp_shard, parallel.cp
    if shard == -1:
        rest, rem = divmod(world_size, rep * cp)
        if rem or rest == 0:
            raise CosmosTrainError(
                f"parallel: dp_replicate*cp = {rep}*{cp} = {rep * cp} does not divide the job's "
                f"{world_size} processes, so dp_shard = -1 cannot take the rest; change "
                f"parallel.dp_replicate/cp or the number of processes")
        shard = rest
    elif rep * shard * cp != world_size:
        raise CosmosTrainError(
            f"parallel: dp_replicate*dp_shard*cp = {rep}*{shard}*{cp} = {rep * shard * cp}, but the job "
            f"has {world_size} processes; set parallel.dp_shard = -1 to use the rest, or change the degrees")
    if parallel.cp == 1 and parallel.cp_mode != "ring":  # "ring" is the default: only warn on a real choice
        warn(f"parallel.cp_mode = {parallel.cp_mode!r} has no effect with parallel.cp = 1")
    if parallel.cp_a2a_degree != 1 and parallel.cp_mode != "hybrid":
        warn(f"parallel.cp_a2a_degree = {parallel.cp_a2a_degree} has no effect with "
             f"parallel.cp_mode = {parallel.cp_mode!r} (only 'hybrid' uses it)")
    if parallel.cp_mode == "hybrid" and cp % parallel.cp_a2a_degree:  # ExperimentSpec checks it too
        raise CosmosTrainError(f"parallel.cp_a2a_degree: must divide parallel.cp ({cp}) "
                               f"(got {parallel.cp_a2a_degree})")
    return ParallelDims(dp_replicate=rep, dp_shard=shard, cp=cp, world_size=world_size,
                        cp_mode=parallel.cp_mode, cp_a2a_degree=parallel.cp_a2a_degree)
