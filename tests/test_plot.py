"""`cosmos-train plot` on a real tiny run: PNG, HTML (opened in headless Chromium), overlays, bad input."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cosmos_train.cli import app
from cosmos_train.contact_sheet import CONDITION_COLOUR
from cosmos_train.plot import figure, plot, read_metrics, smooth
from cosmos_train.train import train
from tests.train_fixtures import small_spec

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 6-step tiny run with validation every 2 steps and samples every 3."""
    out = tmp_path_factory.mktemp("plot")
    spec = small_spec(out, name="tiny", data={"validation_clips": 2},
                      trainer={"validation_iter": 2, "sample_iter": 3,
                               "samples": {"steps": 2, "num_clips": 2, "columns": 4}})
    return train(spec, show_progress=False).run_dir


def test_png_has_every_panel_and_overlays_runs(run_dir, tmp_path):
    other = tmp_path / "g2" / "tiny"
    shutil.copytree(run_dir, other)
    out = plot([run_dir, other], tmp_path / "r.png")
    assert Image.open(out).size == (1500, 800)
    runs = [read_metrics(run_dir, "a"), read_metrics(other, "b")]
    # the validation records carry one loss per sigma (trainer.validation_sigmas = [0.1, 1, 10])
    assert {"loss_sigma_0.1", "loss_sigma_1", "loss_sigma_10"} <= runs[0].val[0].keys()
    assert [r["step"] for r in runs[0].val] == [2, 4, 6]
    axes = figure(runs).axes
    titles = [ax.get_title() for ax in axes]
    assert titles == ["training loss", "validation loss per σ", "learning rate", "gradient norm",
                      "iterations / s (sampling excluded)", "checkpoint blocking time per window (s)"]
    lines = [len(ax.lines) for ax in axes]
    assert lines == [4, 6, 2, 2, 2, 2]  # raw + smoothed loss and 3 sigmas, per run


def test_html_page_holds_figure_latest_sheet_and_checkpoints(run_dir, tmp_path):
    out = plot([run_dir], tmp_path / "sub" / "report.html")
    page = out.read_text()
    sheets = [(run_dir / "samples" / f"iter_00000000{i}" / "contact_sheet.png").read_bytes() for i in (6, 3)]
    positions = [page.index(base64.b64encode(s).decode()) for s in sheets]  # embedded, newest first
    assert positions == sorted(positions)
    links = re.findall(r'<a href="([^"]+\.mp4)"', page)
    assert len(links) == 4 and all((out.parent / link).resolve().is_file() for link in links)
    assert base64.b64encode(sheets[1]).decode() not in plot([run_dir], tmp_path / "one.html", sheets=1).read_text()
    rows = re.findall(r"<tr><td>(\d+)</td><td>([\d.]+) MB</td><td class=ok>verified \(sizes\)</td></tr>", page)
    assert [int(step) for step, _ in rows] == [3, 6] and all(float(mb) > 0 for _, mb in rows)
    assert "<script" not in page and "http" not in page  # static, nothing fetched

    # a damaged checkpoint is shown as such
    broken = tmp_path / "g" / "broken"
    shutil.copytree(run_dir, broken)
    shard = next((broken / "checkpoints" / "iter_000000003" / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    page = plot([broken], tmp_path / "b.html").read_text()
    assert re.search(r"<tr><td>3</td>.*<td class=bad>FAILED: .*size", page)


def _browser() -> str | None:
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


@pytest.mark.skipif(_browser() is None, reason="no Chromium/Chrome on PATH (Debian: apt-get install chromium)")
def test_html_renders_in_headless_chromium(run_dir, tmp_path):
    out = plot([run_dir], tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'ud'}",
           "--hide-scrollbars", "--window-size=1280,1600", f"--screenshot={shot}", out.resolve().as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert px.shape == (1600, 1280, 3)
    assert px.std() > 20 and len(np.unique(px.reshape(-1, 3), axis=0)) > 50  # not blank
    # the contact sheet rendered: its orange conditioning-frame border is on screen
    orange = (np.abs(px - np.array(CONDITION_COLOUR)).max(axis=-1) <= 8).sum()
    assert orange > 100
    # so did the figure: matplotlib's default blue ("C0" = #1f77b4) lines
    assert (np.abs(px - np.array([0x1F, 0x77, 0xB4])).max(axis=-1) <= 8).sum() > 100


def test_metrics_reader_keeps_the_last_record_per_step_and_skips_a_cut_line(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    records = [{"kind": "train", "step": 2, "loss": 5.0}, {"kind": "train", "step": 4, "loss": 4.0},
               {"kind": "train", "step": 4, "loss": 3.0}, {"kind": "val", "step": 4, "loss": 2.0}]
    (logs / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + '\n{"kind": "tra')
    run = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in run.train] == [(2, 5.0), (4, 3.0)]  # a resume rewrote step 4
    assert run.skipped_lines == 1 and len(run.val) == 1
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected from the start
    assert smooth([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_cli_errors_are_one_line_with_exit_2(run_dir, tmp_path, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(app, ["plot", str(tmp_path / "nope"), "-o", str(tmp_path / "r.png")])
    assert result.exit_code == 2 and "metrics.jsonl: not found" in result.output
    result = runner.invoke(app, ["plot", str(run_dir), "-o", str(tmp_path / "r.jpg")])
    assert result.exit_code == 2 and "must end in .png or .html" in result.output
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    result = runner.invoke(app, ["plot", str(run_dir), "-o", str(tmp_path / "r.png")])
    assert result.exit_code == 2 and "pip install 'cosmos-train[plot]'" in result.output
    assert not (tmp_path / "r.png").exists()
    monkeypatch.undo()
    result = runner.invoke(app, ["plot", str(run_dir), "-o", str(tmp_path / "r.png")])
    assert result.exit_code == 0 and (tmp_path / "r.png").is_file()
