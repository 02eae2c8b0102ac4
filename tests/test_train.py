"""The training loop end to end on tiny specs: exact resume, world-size changes, cp, LoRA, preemption."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cosmos_train.layout import checkpoints_dir, read_latest
from cosmos_train.errors import CosmosTrainError
from cosmos_train.train import train
from tests.dist import run_ranks
from tests.train_fixtures import ROOT, dcp_keys, metrics, read_dcp, small_spec


def _model_tensors(run_dir, tmp):
    return read_dcp(read_latest(checkpoints_dir(run_dir)) / "model", tmp)


def _assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k


def test_exact_resume_single_process(tmp_path):
    full = train(small_spec(tmp_path, name="full"), show_progress=False)
    assert sorted(full.losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in full.losses.values())

    first = train(small_spec(tmp_path, name="split", trainer={"max_iter": 3}), show_progress=False)
    assert first.end_step == 3
    second = train(small_spec(tmp_path, name="split"), show_progress=False)
    assert second.start_step == 3
    assert {k: full.losses[k] for k in (4, 5, 6)} == second.losses  # bitwise: same data, noise, weights
    _assert_bitwise_equal(_model_tensors(full.run_dir, tmp_path / "a"), _model_tensors(second.run_dir, tmp_path / "b"))
    _assert_bitwise_equal(read_dcp(read_latest(checkpoints_dir(full.run_dir)) / "optim", tmp_path / "c"),
                          read_dcp(read_latest(checkpoints_dir(second.run_dir)) / "optim", tmp_path / "d"))
    # the model part carries regular and EMA weights under the released-checkpoint prefixes
    keys = dcp_keys(read_latest(checkpoints_dir(full.run_dir)) / "model")
    assert "net.blocks.0.self_attn.q_proj.weight" in keys and "net_ema.blocks.0.self_attn.q_proj.weight" in keys
    log = metrics(full.run_dir)
    assert [r["step"] for r in log if r["kind"] == "train"] == [2, 4, 6]
    assert {"loss", "lr", "grad_norm", "iter_per_s", "samples_per_s", "ckpt_blocking_s", "peak_mem_gb"} <= log[0].keys()


def _train_on_ranks(rank, world_size, spec_json):
    from cosmos_train.spec import ExperimentSpec

    result = train(ExperimentSpec.model_validate_json(spec_json), show_progress=False)
    return result.losses


def test_exact_resume_on_two_ranks_and_resume_on_another_world_size(tmp_path):
    par = {"dp_shard": 2}
    full = run_ranks(_train_on_ranks, 2, small_spec(tmp_path, name="full", parallel=par).model_dump_json())
    assert full[0] == full[1]  # the logged loss is the dp mean
    run_ranks(_train_on_ranks, 2, small_spec(tmp_path, name="split", parallel=par,
                                             trainer={"max_iter": 3}).model_dump_json())
    resumed = run_ranks(_train_on_ranks, 2, small_spec(tmp_path, name="split", parallel=par).model_dump_json())
    assert resumed[0] == {k: full[0][k] for k in (4, 5, 6)}
    run = small_spec(tmp_path, name="full").run_dir()
    _assert_bitwise_equal(_model_tensors(run, tmp_path / "a"),
                          _model_tensors(small_spec(tmp_path, name="split").run_dir(), tmp_path / "b"))

    # 2 ranks -> 1 process: continues from step 6 with the same weights and keeps training
    before = _model_tensors(run, tmp_path / "c")
    more = train(small_spec(tmp_path, name="full", trainer={"max_iter": 8}), show_progress=False)
    assert more.start_step == 6 and sorted(more.losses) == [7, 8]
    assert all(math.isfinite(v) for v in more.losses.values())
    after = _model_tensors(run, tmp_path / "d")
    assert not torch.equal(before["net.blocks.0.mlp.layer1.weight"], after["net.blocks.0.mlp.layer1.weight"])


def test_context_parallel_run_matches_single_process(tmp_path):
    single = train(small_spec(tmp_path, name="cp1", trainer={"max_iter": 3}), show_progress=False)
    for mode in ("ring", "a2a"):
        spec = small_spec(tmp_path, name=f"cp2-{mode}", parallel={"cp": 2, "cp_mode": mode},
                          trainer={"max_iter": 3})
        losses = run_ranks(_train_on_ranks, 2, spec.model_dump_json())
        assert losses[0] == losses[1]
        for step in (1, 2, 3):  # same clip, same noise; only the attention arithmetic differs
            assert losses[0][step] == pytest.approx(single.losses[step], rel=1e-4), (mode, step)


def test_lora_run_trains_only_adapters(tmp_path):
    spec = small_spec(tmp_path, name="lora", model={"train_architecture": "lora", "num_condition_frames": 2,
                                                    "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "mlp.layer1"],
                                                             "init_lora_weights": True}},
                      trainer={"max_iter": 3})
    train(spec, show_progress=False)
    t = _model_tensors(spec.run_dir(), tmp_path)
    # init_lora_weights = true: B starts at zero; after 3 steps it moved, while the frozen base did not
    assert t["net.blocks.0.self_attn.q_proj.lora_B.default.weight"].abs().sum() > 0
    base = small_spec(tmp_path / "base", name="base", trainer={"max_iter": 1})
    from cosmos_train.models.dit import DiT

    ref = DiT(base.model.dit_config())
    ref.init_weights(spec.job.seed)
    assert torch.equal(t["net.blocks.0.self_attn.q_proj.base_layer.weight"], ref.blocks[0].self_attn.q_proj.weight)


def test_resume_requires_a_checkpoint_and_an_unchanged_architecture(tmp_path):
    spec = small_spec(tmp_path, name="r", trainer={"max_iter": 1})
    with pytest.raises(CosmosTrainError, match="no committed checkpoint"):
        train(spec, require_checkpoint=True, show_progress=False)
    train(spec, show_progress=False)
    with pytest.raises(CosmosTrainError, match=r"model.architecture.num_blocks: 2 -> 3"):
        changed = small_spec(tmp_path, name="r", model={"architecture": {"model_channels": 32, "num_heads": 2,
                                                                          "adaln_lora_dim": 16, "num_blocks": 3}})
        train(changed, show_progress=False)


def test_sigterm_finishes_the_step_saves_and_resumes(tmp_path):
    spec = small_spec(tmp_path, name="sig", trainer={"max_iter": 10_000, "logging_iter": 1},
                      checkpoint={"save_iter": 10_000})
    spec_file = tmp_path / "sig.toml"
    spec_file.write_text(spec.to_toml())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cosmos_train", "run", str(spec_file)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = spec.run_dir() / "logs" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    latest = read_latest(checkpoints_dir(spec.run_dir()))
    step = int(latest.name.removeprefix("iter_"))
    assert 2 <= step < 10_000 and "after a signal" in out
    assert max(r["step"] for r in metrics(spec.run_dir())) == step
    resumed = train(small_spec(tmp_path, name="sig", trainer={"max_iter": step + 1, "logging_iter": 1},
                               checkpoint={"save_iter": 10_000}), show_progress=False)
    assert resumed.start_step == step and list(resumed.losses) == [step + 1]
