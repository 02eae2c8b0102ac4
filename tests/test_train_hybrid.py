"""Hybrid context parallelism from the spec: Ulysses inside pairs of ranks, ring across them."""

from __future__ import annotations

import pytest

from cosmos_train.train import train
from tests.dist import run_ranks
from tests.train_fixtures import small_spec


def _train_on_ranks(rank, world_size, spec_json):
    from cosmos_train.spec import ExperimentSpec

    return train(ExperimentSpec.model_validate_json(spec_json), show_progress=False).losses


def test_hybrid_cp4_run_matches_single_process(tmp_path):
    steps = {"max_iter": 2, "logging_iter": 1}
    single = train(small_spec(tmp_path, name="cp1", trainer=steps), show_progress=False)
    # 13 frames -> 4 latent frames: one per cp rank; 2 heads split over the a2a degree 2
    spec = small_spec(tmp_path, name="hybrid", trainer=steps,
                      parallel={"cp": 4, "cp_mode": "hybrid", "cp_a2a_degree": 2})
    losses = run_ranks(_train_on_ranks, 4, spec.model_dump_json(), timeout=120)
    assert all(lo == losses[0] for lo in losses)
    assert sorted(single.losses) == [1, 2]
    for step in (1, 2):  # same clip, same noise; only the attention arithmetic differs
        assert losses[0][step] == pytest.approx(single.losses[step], rel=1e-4), step
