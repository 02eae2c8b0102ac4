"""Run logs: JSONL always, W&B offline into the run dir, online without a key is a clear error."""

from __future__ import annotations

import json

import pytest

from cosmos_train.errors import CosmosTrainError
from cosmos_train.train_log import TrainLog
from tests.train_fixtures import small_spec


def test_jsonl_records_and_wandb_offline_writes_into_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = small_spec(tmp_path, job={"wandb_mode": "offline", "project": "t", "group": "g", "name": "w",
                                     "output_root": str(tmp_path), "seed": 0})
    run_dir = spec.run_dir()
    run_dir.mkdir(parents=True)
    log = TrainLog(spec, run_dir, enabled=True, start_step=0, show_progress=False)
    log.write(1, {"loss": 1.5, "lr": 1e-3})
    log.write(1, {"loss": 2.0}, kind="val")
    log.close()
    records = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"], r["loss"]) for r in records] == [("train", 1, 1.5), ("val", 1, 2.0)]
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs, "W&B offline run not written into the run directory"


def test_wandb_online_without_an_api_key_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    spec = small_spec(tmp_path, job={"wandb_mode": "online", "output_root": str(tmp_path)})
    with pytest.raises(CosmosTrainError, match="job.wandb_mode: 'online' needs a W&B API key"):
        TrainLog(spec, tmp_path, enabled=True, start_step=0, show_progress=False)


def test_other_ranks_write_nothing(tmp_path):
    log = TrainLog(small_spec(tmp_path), tmp_path, enabled=False, start_step=0, show_progress=False)
    log.write(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "logs").exists()


def test_sample_media_go_to_wandb_as_video_and_image(tmp_path, monkeypatch):
    import numpy as np

    from cosmos_train.contact_sheet import contact_sheet, write_png
    from cosmos_train.data.video import write_mp4

    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = small_spec(tmp_path, job={"wandb_mode": "offline", "project": "t", "group": "g", "name": "m",
                                     "output_root": str(tmp_path), "seed": 0})
    run_dir = spec.run_dir()
    run_dir.mkdir(parents=True)
    frames = np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    write_mp4(tmp_path / "a.mp4", frames, fps=8, lossless=False)
    write_png(contact_sheet([("a", frames[[0, 4]])], [0, 4], condition_frames=1), tmp_path / "sheet.png")
    log = TrainLog(spec, run_dir, enabled=True, start_step=0, show_progress=False)
    log.media(3, videos={"a": tmp_path / "a.mp4"}, images={"contact_sheet": tmp_path / "sheet.png"})
    log.close()
    media = list((run_dir / "wandb").glob("offline-run-*/files/media/*/samples/*"))
    assert sorted(p.suffix for p in media) == [".mp4", ".png"]
    # without W&B it is a no-op
    quiet = TrainLog(small_spec(tmp_path), tmp_path, enabled=False, start_step=0, show_progress=False)
    quiet.media(3, videos={"a": tmp_path / "a.mp4"}, images={})
    quiet.close()
