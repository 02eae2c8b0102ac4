"""A LoRA run through the CLI: train -> consolidate --merge-lora / --adapter-only -> infer."""

from __future__ import annotations

import json

import av
import numpy as np
import torch
from typer.testing import CliRunner

from cosmos_train.cli import app
from tests.train_fixtures import small_spec

runner = CliRunner()


def _frames(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24").astype(int) for f in c.decode(video=0)]


def test_lora_run_merge_and_infer(tmp_path):
    spec = small_spec(tmp_path, name="lora", trainer={"max_iter": 4},
                      model={"train_architecture": "lora",
                             "lora": {"rank": 4, "alpha": 8, "target_modules": "q_proj,v_proj,mlp.layer1",
                                      "init_lora_weights": True}})
    spec_file = tmp_path / "lora.toml"
    spec_file.write_text(spec.to_toml())
    run_dir = spec.run_dir()
    r = runner.invoke(app, ["run", str(spec_file)])
    assert r.exit_code == 0, r.output

    merged = tmp_path / "merged.pt"
    r = runner.invoke(app, ["consolidate", str(run_dir), "-o", str(merged), "--merge-lora", "--no-progress"])
    assert r.exit_code == 0, r.output
    sd = torch.load(merged, weights_only=True)
    assert not any("lora_" in k or "base_layer" in k for k in sd)
    adapter = tmp_path / "adapter"
    r = runner.invoke(app, ["consolidate", str(run_dir), "-o", str(adapter), "--adapter-only", "--no-progress"])
    assert r.exit_code == 0, r.output
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)

    data_dir = next((tmp_path / "data").glob("synthetic-*"))
    common = ["--input", str(data_dir / "videos" / "clip_0000.mp4"),
              "--prompt-embedding", f"{data_dir / 't5_xxl.zarr'}:clip_0000", "--steps", "2", "--seed", "4", "--lossless"]
    r = runner.invoke(app, ["infer", "--checkpoint", str(merged), "--spec", str(run_dir / "spec.toml"),
                            "-o", str(tmp_path / "merged.mp4"), *common])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["infer", "--checkpoint", str(run_dir), "-o", str(tmp_path / "lora.mp4"), *common])
    assert r.exit_code == 0, r.output
    a, b = _frames(tmp_path / "merged.mp4"), _frames(tmp_path / "lora.mp4")
    assert len(a) == len(b) == spec.data.num_frames
    assert max(np.abs(x - y).max() for x, y in zip(a, b)) <= 1  # merged weights act like base + adapters
