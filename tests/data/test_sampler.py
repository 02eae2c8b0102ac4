"""Global-stream samplers: rank slicing, cp groups, resume, dp_size changes, weights."""

from __future__ import annotations

from collections import Counter

from cosmos_train.data.sampler import GlobalStreamSampler, WeightedStreamSampler


def _step_slices(samplers, steps=None):
    """Per global step, the refs of rank 0, 1, ... concatenated (the global stream order).

    Consumes like the loader does: read one step from every rank, then advance every sampler.
    """
    out = []
    while steps is None or len(out) < steps:
        its = [iter(s) for s in samplers]
        B = samplers[0].batch_size
        chunk = []
        for it in its:
            part = [next(it, None) for _ in range(B)]
            if None in part:
                return out
            chunk += part
        out.append(chunk)
        for s in samplers:
            s.advance()
        if samplers[0].position == 0:  # epoch rolled over
            return out
    return out


def _ranks(n, dp_size, batch_size, seed=0, **kw):
    return [GlobalStreamSampler(n, seed=seed, dp_rank=r, dp_size=dp_size, batch_size=batch_size, **kw)
            for r in range(dp_size)]


def test_dp_ranks_see_disjoint_samples_covering_the_epoch():
    samplers = _ranks(23, dp_size=3, batch_size=2)
    per_rank = [list(s) for s in samplers]
    assert all(len(p) == 3 * 2 for p in per_rank)  # 23 // 6 = 3 steps (drop_last)
    indices = [r.index for p in per_rank for r in p]
    assert len(set(indices)) == 18 and set(indices) <= set(range(23))


def test_cp_ranks_of_one_dp_group_see_the_same_samples():
    # cp ranks share their dp_rank: same indices and same window seeds
    a = GlobalStreamSampler(10, seed=5, dp_rank=1, dp_size=2, batch_size=2)
    b = GlobalStreamSampler(10, seed=5, dp_rank=1, dp_size=2, batch_size=2)
    assert list(a) == list(b)


def test_epochs_reshuffle_and_set_epoch_semantics():
    s = GlobalStreamSampler(16, seed=1, dp_rank=0, dp_size=1, batch_size=4)
    e0 = [r.index for r in s]
    assert sorted(e0) == list(range(16))
    for _ in range(4):
        s.advance()
    assert s.state_dict() == {"epoch": 1, "position": 0}  # moved on by itself
    e1 = [r.index for r in s]
    assert sorted(e1) == list(range(16)) and e1 != e0
    s.set_epoch(0)
    assert [r.index for r in s] == e0
    s.advance()
    s.set_epoch(0)  # same epoch: keeps the position (a resumed run calls this too)
    assert s.position == 4
    s.set_epoch(3)
    assert s.state_dict() == {"epoch": 3, "position": 0}


def test_resume_from_state_continues_exactly():
    full = _step_slices(_ranks(30, dp_size=2, batch_size=3, seed=7))
    run = _ranks(30, dp_size=2, batch_size=3, seed=7)
    first = _step_slices(run, steps=2)
    state = run[0].state_dict()
    assert state == {"epoch": 0, "position": 12}
    resumed = _ranks(30, dp_size=2, batch_size=3, seed=7)
    for s in resumed:
        s.load_state_dict(state)
    assert first + _step_slices(resumed) == full


def test_dp_size_change_continues_the_global_order():
    n = 48
    reference = [r for step in _step_slices(_ranks(n, dp_size=1, batch_size=1, seed=3)) for r in step]
    run = _ranks(n, dp_size=2, batch_size=2, seed=3)
    before = [r for step in _step_slices(run, steps=3) for r in step]  # 12 samples
    resized = _ranks(n, dp_size=3, batch_size=2, seed=3)
    for s in resized:
        s.load_state_dict(run[0].state_dict())
    after = [r for step in _step_slices(resized) for r in step]  # 36 more
    assert before + after == reference[: len(before) + len(after)]
    assert len(before) + len(after) == 48


def test_validation_order_wraps_so_every_sample_is_seen():
    samplers = _ranks(5, dp_size=2, batch_size=2, shuffle=False, drop_last=False)
    seen = [r.index for s in samplers for r in s]
    assert sorted(set(seen)) == [0, 1, 2, 3, 4] and len(seen) == 8  # 2 steps of 4, the last wraps


def test_weighted_datasets_draw_by_weight_and_without_replacement():
    sizes, weights = [4, 40], [3.0, 1.0]
    s = WeightedStreamSampler(sizes, weights, seed=0, dp_rank=0, dp_size=1, batch_size=4)
    drawn = []
    for _ in range(100):  # 100 epochs x 44 samples
        drawn += [r.index for step in _step_slices([s]) for r in step]
    assert s.epoch == 100
    counts = Counter(i < 4 for i in drawn)
    share = counts[True] / len(drawn)
    assert abs(share - 0.75) < 0.02, share
    first = [i for i in drawn if i < 4][:4]
    assert sorted(first) == [0, 1, 2, 3]  # a dataset's clips repeat only after all were drawn
    assert set(i for i in drawn if i >= 4) == set(range(4, 44))


def test_weighted_sampler_resumes_by_position_and_is_rank_disjoint():
    def make(rank, size=2):
        return WeightedStreamSampler([3, 5], [1.0, 2.0], seed=9, dp_rank=rank, dp_size=size, batch_size=1)

    run = [make(0), make(1)]
    steps = []
    for _ in range(9):  # crosses epoch boundaries (8 samples per epoch, 4 steps)
        steps += _step_slices(run, steps=1)
    state = run[0].state_dict()
    tail = _step_slices(run, steps=3)
    resumed = [make(0), make(1)]
    for s in resumed:
        s.load_state_dict(state)
    assert _step_slices(resumed, steps=3) == tail
    fresh = [make(0), make(1)]
    for step in _step_slices(fresh, steps=4):
        assert step[0] != step[1]
