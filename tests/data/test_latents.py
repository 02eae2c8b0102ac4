"""Latent cache: `data encode` -> training on cached latents gives the on-the-fly losses; mismatches refused."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cosmos_train.data.latents import CACHE_NAME, LatentStore
from cosmos_train.errors import CosmosTrainError
from cosmos_train.train import train
from tests.data.media import make_dataset
from tests.data.test_check_cli import _app
from tests.tiny_assets import save_vae_both_layouts, tiny_vae
from tests.train_fixtures import small_spec

runner = CliRunner()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    data = make_dataset(root / "data", {f"clip_{i}": (9, 32, 32) for i in range(3)})
    vae_dir, pth = save_vae_both_layouts(tiny_vae(), root / "vae_a")
    other_dir, _ = save_vae_both_layouts(tiny_vae(seed=1), root / "vae_b")
    return root, data, vae_dir, pth, other_dir


def _spec(root, data, vae, *, name, latents="auto", num_frames=9):
    return small_spec(root / "runs", name=name,
                      model={"tokenizer": {"kind": "wan2.1", "path": str(vae)},
                             "architecture": {"latent_channels": 16, "model_channels": 32, "num_heads": 2,
                                              "adaln_lora_dim": 16}},
                      data={"kind": "video_folder", "dataset_dir": str(data), "num_frames": num_frames,
                            "video_size": [32, 32], "latents": latents},
                      trainer={"max_iter": 3, "logging_iter": 1}, checkpoint={"save_iter": 100})


def _encode(spec_path, data, *extra):
    return runner.invoke(_app(), ["data", "encode", str(data), "--spec", str(spec_path), "--device", "cpu", *extra])


def test_cached_latents_give_the_on_the_fly_losses(assets):
    root, data, vae_dir, pth, _ = assets
    spec_path = root / "encode.toml"
    spec_path.write_text(_spec(root, data, pth, name="enc").to_toml())  # upstream layout for encoding
    result = _encode(spec_path, data)
    assert result.exit_code == 0 and "3 encoded, 0 already present" in result.output, result.output
    assert LatentStore(data / CACHE_NAME).keys() == ["clip_0", "clip_1", "clip_2"]
    assert "0 encoded, 3 already present" in _encode(spec_path, data).output  # resumable
    video = train(_spec(root, data, vae_dir, name="video", latents="video"), show_progress=False)
    cached = train(_spec(root, data, vae_dir, name="cached", latents="cached"), show_progress=False)
    assert len(video.losses) == 3
    for step, loss in video.losses.items():
        assert cached.losses[step] == pytest.approx(loss, rel=1e-6, abs=1e-7)


def test_mismatched_cache_is_refused_naming_the_difference(assets):
    root, data, vae_dir, _, other_dir = assets
    spec_path = root / "enc2.toml"
    spec_path.write_text(_spec(root, data, vae_dir, name="enc2").to_toml())
    assert _encode(spec_path, data).exit_code == 0
    with pytest.raises(CosmosTrainError, match="num_frames: cache 9, spec 13"):
        train(_spec(root, data, vae_dir, name="f13", latents="cached", num_frames=13), show_progress=False)
    with pytest.raises(CosmosTrainError, match="VAE weights: cache [0-9a-f]+ from .*vae_a.* spec [0-9a-f]+ from .*vae_b"):
        train(_spec(root, data, other_dir, name="other", latents="cached"), show_progress=False)
    with pytest.warns(UserWarning, match="encoding on the fly"):
        result = train(_spec(root, data, other_dir, name="auto", latents="auto"), show_progress=False)
    assert len(result.losses) == 3
    other_path = root / "enc3.toml"
    other_path.write_text(_spec(root, data, other_dir, name="enc3").to_toml())
    result = _encode(other_path, data)
    assert result.exit_code == 2 and "VAE weights" in result.output and "--overwrite" in result.output
