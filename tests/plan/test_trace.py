"""The meta-device trace: the byte counter, and how activations respond to AC, cp and batch."""

import torch

from cosmos_train.plan.planner import GiB, Hardware, plan, with_overrides
from cosmos_train.plan.trace import LiveBytes
from cosmos_train.spec_loading import load_spec

CPU = Hardware(world=2, gpus_per_node=2, gpu_mem=64 * GiB, device_type="cpu")


def test_live_bytes_counts_meta_storages_until_freed():
    with LiveBytes() as mem:
        a = torch.empty(10, 10, device="meta")
        b = a.t()  # a view: no new storage
        c = torch.empty(5, device="meta", dtype=torch.float64)
        assert mem.level == 400 + 40
        del a, b
        assert mem.level == 40
        del c
    assert mem.level == 0 and mem.peak == 440


def _tiny(*overrides):
    return load_spec("examples/tiny.toml", ['trainer.device="cpu"', *overrides])


def test_activation_checkpointing_and_cp_shrink_saved_activations():
    base = plan(_tiny(), CPU)
    ac = plan(_tiny("parallel.activation_checkpointing=true"), CPU)
    cp = plan(_tiny("parallel.cp=2"), CPU)
    saved = {k: p.trace.saved - p.trace.batch for k, p in (("base", base), ("ac", ac), ("cp", cp))}
    assert saved["ac"] < saved["base"] / 2
    assert saved["cp"] < saved["base"] * 0.75
    assert base.saved_other_ac == ac.trace.saved and ac.saved_other_ac == base.trace.saved
    assert base.states.total == cp.states.total  # both shard over dp_shard x cp = 2


def test_extrapolated_deep_trace_equals_the_full_trace():
    spec = _tiny("model.architecture.num_blocks=5")
    extrapolated = plan(spec, CPU).trace
    from cosmos_train.plan import planner

    old = planner.TRACE_BLOCKS
    planner.TRACE_BLOCKS = (5, 5)  # n <= 5: the whole model is traced
    try:
        full = plan(spec, CPU).trace
    finally:
        planner.TRACE_BLOCKS = old
    assert extrapolated == full


def test_plan_is_deterministic_and_batch_scales_activations():
    a, b = plan(_tiny(), CPU), plan(_tiny(), CPU)
    assert a.phases == b.phases
    double = plan(with_overrides(_tiny(), ["data.batch_size=4"]), CPU)
    assert double.trace.saved > 1.8 * a.trace.saved
