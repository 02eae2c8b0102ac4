"""The loop does no host sync and no collective of its own on a step that neither logs nor checks
for a signal: losses, the grad norm and the skip decision stay on the device until a sync step."""

from __future__ import annotations

import functools
import sys
from collections import defaultdict

import torch
import torch.distributed as dist

from tests.dist import run_ranks
from tests.train_fixtures import small_spec

# Ways to read a tensor's value on the host (each stalls the host on a GPU) ...
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
# ... and the collectives a loop could issue besides FSDP2's own all-gather / reduce-scatter
# (the grad norm's reduction is a device-side functional all-reduce inside DTensor).
COLLECTIVES = ("all_reduce", "broadcast", "barrier", "all_gather", "all_gather_object", "broadcast_object_list",
               "gather", "scatter", "reduce", "all_to_all", "send", "recv", "monitored_barrier")
# The data pipeline reads its own CPU tensors (sampler indices, frame counts) before a batch goes
# to the device: host work, not a device sync, so calls from there are not counted.
DATA_PIPELINE = ("/torch/utils/data/", "/cosmos_train/data/")


def _from_data_pipeline() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if any(part in frame.f_code.co_filename for part in DATA_PIPELINE):
            return True
        frame = frame.f_back
    return False


def _count_per_step(rank, world_size, spec_json):
    from cosmos_train.spec import ExperimentSpec
    from cosmos_train.train import Trainer, train

    events: dict[int, list[str]] = defaultdict(list)  # step being run (0: before the first) -> calls
    current = [0]

    def counting(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not _from_data_pipeline():
                events[current[0]].append(name)
            return fn(*args, **kwargs)
        return wrapper

    originals = {}
    for name in HOST_READS:
        originals[(torch.Tensor, name)] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    for name in COLLECTIVES:
        originals[(dist, name)] = getattr(dist, name)
        setattr(dist, name, counting(name, getattr(dist, name)))
    step = Trainer.step

    def marked_step(self):
        current[0] = self.step_count + 1  # everything until the next step() belongs to this one
        return step(self)

    Trainer.step = marked_step
    try:
        result = train(ExperimentSpec.model_validate_json(spec_json), show_progress=False)
    finally:
        Trainer.step = step
        for (owner, name), fn in originals.items():
            setattr(owner, name, fn)
    return {s: list(v) for s, v in events.items()}, result.losses


def _check(per_rank, sync_steps, quiet_steps):
    for events, losses in per_rank:
        assert sorted(losses) == list(range(1, 9))  # every step's loss still arrives, at the sync steps
        for s in quiet_steps:
            assert events.get(s, []) == [], (s, events.get(s))
        for s in sync_steps:  # the counter sees the sync step's host read, so it can fail above
            assert "tolist" in events[s], (s, events[s])


def test_no_host_sync_or_collective_between_sync_steps(tmp_path):
    # 2 ranks, FSDP over both; log every 4 steps, signal check every 2; checkpoints only at the end.
    spec = small_spec(tmp_path, name="sync2", parallel={"dp_shard": 2},
                      trainer={"max_iter": 8, "logging_iter": 4, "signal_check_iter": 2, "grad_clip": 0.5},
                      checkpoint={"save_iter": 1000})
    per_rank = run_ranks(_count_per_step, 2, spec.model_dump_json())
    _check(per_rank, sync_steps=(2, 4, 6, 8), quiet_steps=(1, 3, 5, 7))
    for events, _ in per_rank:
        assert events[2].count("all_reduce") == 1  # losses, skip flags and the signal flag together
    assert per_rank[0][1] == per_rank[1][1]


def test_single_process_sync_steps_only_when_logging(tmp_path):
    spec = small_spec(tmp_path, name="sync1", trainer={"max_iter": 8, "logging_iter": 4, "signal_check_iter": 4},
                      checkpoint={"save_iter": 1000})
    events, losses = _count_per_step(0, 1, spec.model_dump_json())  # in this process: no spawn
    _check([(events, losses)], sync_steps=(4, 8), quiet_steps=(1, 2, 3, 5, 6, 7))
