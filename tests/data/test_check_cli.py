"""check_dataset and the `data` CLI group (through typer.testing.CliRunner)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import typer
from typer.testing import CliRunner

from cosmos_train.cli import data as data_cli
from cosmos_train.data.check import check_dataset
from tests.data.media import make_dataset

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root (a group, so `data` stays a sub-command)."""

    app.add_typer(data_cli.app, name="data")
    return app


def test_report_counts_and_problems(tmp_path):
    root = make_dataset(tmp_path, {"a": (9, 16, 16), "b": (13, 16, 24), "c": (5, 16, 16)})
    (root / "metas" / "no_video.txt").write_text("x")
    (root / "videos" / "c.mp4").rename(root / "videos" / "no_caption.mp4")
    (root / "metas" / "c.txt").unlink()
    report = check_dataset(root, num_frames=9)
    assert (report.captions, report.videos, report.embeddings, report.clips) == (3, 3, 3, 2)
    assert report.captions_without_video == ["no_video"] and report.videos_without_caption == ["no_caption"]
    assert report.orphan_embeddings == ["c"] and report.frames == (5, 9, 13)
    assert report.resolutions == {(16, 16): 2, (16, 24): 1} and report.too_short == {}
    assert not report.ok and len(report.errors) == 2


def test_cli_check_ok_and_too_short(tmp_path):
    root = make_dataset(tmp_path, {"a": (9, 16, 16), "b": (5, 8, 8)})
    result = runner.invoke(_app(), ["data", "check", str(root), "--num-frames", "9"])
    assert result.exit_code == 0, result.output
    assert "complete clips" in result.output and "5 / 7 / 9" in result.output
    assert "shorter than 9 frames" in result.output and "b (5)" in result.output and "ok" in result.output


def test_cli_check_exits_2_on_errors(tmp_path):
    root = make_dataset(tmp_path, {"a": (9, 16, 16)})
    (root / "metas" / "ghost.txt").write_text("caption without a video")
    result = runner.invoke(_app(), ["data", "check", str(root)])
    assert result.exit_code == 2
    assert "captions without a video: ghost" in result.output


def test_cli_check_missing_store_suggests_conversion(tmp_path):
    (tmp_path / "metas").mkdir()
    (tmp_path / "videos").mkdir()
    (tmp_path / "t5_xxl").mkdir()
    (tmp_path / "t5_xxl" / "a.pickle").write_bytes(pickle.dumps([np.ones((2, 1024), np.float16)]))
    result = runner.invoke(_app(), ["data", "check", str(tmp_path)])
    assert result.exit_code == 2 and "convert-embeddings" in result.output


def test_cli_convert_embeddings(tmp_path):
    (tmp_path / "t5_xxl").mkdir()
    (tmp_path / "t5_xxl" / "a.pickle").write_bytes(pickle.dumps([np.ones((2, 1024), np.float16)]))
    result = runner.invoke(_app(), ["data", "convert-embeddings", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "1 converted" in result.output and (tmp_path / "t5_xxl.zarr" / "a" / "zarr.json").is_file()
    result = runner.invoke(_app(), ["data", "convert-embeddings", str(tmp_path), "--overwrite"])
    assert result.exit_code == 0 and "1 converted, 0 already present" in result.output


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cli_convert_refuses_malicious_pickle(tmp_path):
    (tmp_path / "t5_xxl").mkdir()
    (tmp_path / "t5_xxl" / "bad.pickle").write_bytes(pickle.dumps([_Evil(tmp_path / "PWNED")]))
    result = runner.invoke(_app(), ["data", "convert-embeddings", str(tmp_path)])
    assert result.exit_code == 2 and "refused" in result.output and "bad.pickle" in result.output
    assert not (tmp_path / "PWNED").exists()
