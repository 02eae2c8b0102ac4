"""The README walkthrough through the CLI: run -> resume -> inspect -> consolidate -> infer -> mp4."""

from __future__ import annotations

import av
import torch
from typer.testing import CliRunner

from cosmos_train.layout import checkpoints_dir, read_latest
from cosmos_train.cli import app
from tests.train_fixtures import metrics, small_spec

runner = CliRunner()


def test_run_resume_consolidate_infer(tmp_path):
    spec = small_spec(tmp_path, name="e2e", trainer={"max_iter": 20, "logging_iter": 5},
                      checkpoint={"save_iter": 10})
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(spec.to_toml())
    run_dir = spec.run_dir()

    r = runner.invoke(app, ["run", str(spec_file)])
    assert r.exit_code == 0, r.output
    assert read_latest(checkpoints_dir(run_dir)).name == "iter_000000020"

    r = runner.invoke(app, ["resume", str(run_dir), "trainer.max_iter=30"])
    assert r.exit_code == 0, r.output
    assert read_latest(checkpoints_dir(run_dir)).name == "iter_000000030"
    assert [m["step"] for m in metrics(run_dir) if m["kind"] == "train"] == [5, 10, 15, 20, 25, 30]

    r = runner.invoke(app, ["inspect", str(run_dir)])
    assert r.exit_code == 0 and "30" in r.output, r.output

    out_pt = tmp_path / "model.pt"
    r = runner.invoke(app, ["consolidate", str(run_dir), "-o", str(out_pt), "--ema", "--verify", "--no-progress"])
    assert r.exit_code == 0, r.output
    sd = torch.load(out_pt, weights_only=True, mmap=True)
    assert "net.blocks.0.self_attn.q_proj.weight" in sd and not any(k.startswith("net_ema.") for k in sd)

    data_dir = next((tmp_path / "data").glob("synthetic-*"))
    out_mp4 = tmp_path / "sample.mp4"
    r = runner.invoke(app, ["infer", "--checkpoint", str(out_pt), "--spec", str(run_dir / "spec.toml"),
                            "--input", str(data_dir / "videos" / "clip_0001.mp4"),
                            "--prompt-embedding", f"{data_dir / 't5_xxl.zarr'}:clip_0001",
                            "--steps", "2", "-o", str(out_mp4)])
    assert r.exit_code == 0, r.output
    with av.open(str(out_mp4)) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == spec.data.num_frames and (frames[0].height, frames[0].width) == tuple(spec.data.video_size)
