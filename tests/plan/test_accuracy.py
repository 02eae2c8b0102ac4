"""The plan against a real measured step (CPU allocator bytes, 2 gloo ranks, FSDP2 + ring cp)."""

import torch

from cosmos_train.plan.planner import GiB, Hardware, plan
from cosmos_train.spec_loading import load_spec
from tests.dist import run_ranks

OVERRIDES = ['trainer.device="cpu"', 'trainer.precision="fp32"', "parallel.cp=2", 'parallel.cp_mode="ring"']


def _measure(rank, world_size):
    from cosmos_train.plan.measure import measure_peak
    from cosmos_train.runtime.mesh import build_parallel_dims

    spec = load_spec("examples/tiny.toml", OVERRIDES)
    dims = build_parallel_dims(spec.parallel, world_size)
    dims.build_mesh("cpu")
    return measure_peak(spec, dims, torch.device("cpu"))


def test_planned_peak_is_within_15_percent_of_the_measured_peak():
    measured = max(run_ranks(_measure, 2, timeout=300))
    p = plan(load_spec("examples/tiny.toml", OVERRIDES),
             Hardware(world=2, gpus_per_node=2, gpu_mem=GiB, device_type="cpu"))
    assert measured > p.states.total  # the measurement sees the model states and the step
    assert abs(p.peak / measured - 1) <= 0.15, (p.peak, measured, p.phases)
