"""`cosmos-train plot`: a run's metrics as a PNG, or a static HTML report with samples and checkpoints.

Reads `RUN_DIR/logs/metrics.jsonl` (the records `train_log.TrainLog` writes) and draws, against
the step: the loss (raw and smoothed), the validation loss per sigma, the learning rate, the
gradient norm, iter/s and the checkpoint blocking time. Several run dirs are overlaid, one
colour per run. The `.html` form is one self-contained file (images embedded, no server, no
script): the figure, then per run the newest contact sheets with links to their mp4s, and the
checkpoint list (iteration, size, verified).

matplotlib is an optional extra (`pip install 'cosmos-train[plot]'`); without it the command
says so and exits 2.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from cosmos_train.errors import CosmosTrainError

METRICS_PATH = Path("logs") / "metrics.jsonl"
SAMPLES_DIR = "samples"  # samples.SAMPLES_DIR; not imported, to keep `plot` free of torch
SHEET_FILE, INDEX_FILE = "contact_sheet.png", "samples.json"
PANELS = (("loss", "training loss"), ("val", "validation loss per σ"), ("lr", "learning rate"),
          ("grad_norm", "gradient norm"), ("iter_per_s", "iterations / s (sampling excluded)"),
          ("ckpt_blocking_s", "checkpoint blocking time per window (s)"))


@dataclass
class RunMetrics:
    """One run's records by kind, one per step (a resumed run's later record wins)."""

    run_dir: Path
    label: str
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    skipped_lines: int = 0


def read_metrics(run_dir: str | Path, label: str | None = None) -> RunMetrics:
    """Parse RUN_DIR/logs/metrics.jsonl; unreadable lines (a write cut by a crash) are counted, not fatal."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_PATH
    if not path.is_file():
        raise CosmosTrainError(f"{path}: not found; RUN_DIR must be a run directory made by `cosmos-train run`")
    by_kind: dict[str, dict[int, dict]] = {}
    skipped = 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            by_kind.setdefault(record["kind"], {})[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            skipped += bool(line.strip())
    rows = {k: [v[s] for s in sorted(v)] for k, v in by_kind.items()}
    return RunMetrics(run_dir, label or run_dir.name, rows.get("train", []), rows.get("val", []), skipped)


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing); weight in [0, 1)."""
    if not 0 <= weight < 1:
        raise CosmosTrainError(f"--smoothing: must be in [0, 1) (got {weight})")
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def _labels(run_dirs: list[Path]) -> list[str]:
    """group/name of each run; the full path where two runs would look the same."""
    short = ["/".join(p.resolve().parts[-2:]) for p in run_dirs]
    return [s if short.count(s) == 1 else str(p) for s, p in zip(short, run_dirs)]


def _sigma_keys(val: list[dict]) -> list[str]:
    keys = {k for r in val for k in r if k.startswith("loss_sigma_")}
    return sorted(keys, key=lambda k: float(k.removeprefix("loss_sigma_")))


def figure(runs: list[RunMetrics], *, smoothing: float = 0.6):
    """The matplotlib Figure of the six panels (no pyplot: no global state, no display needed)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise CosmosTrainError("`cosmos-train plot` needs matplotlib: pip install 'cosmos-train[plot]'") from None
    fig = Figure(figsize=(15, 8), dpi=100, layout="constrained")
    axes = dict(zip((k for k, _ in PANELS), fig.subplots(2, 3).ravel()))
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for run, colour in zip(runs, colours):
        steps = [r["step"] for r in run.train]
        loss = [r.get("loss", math.nan) for r in run.train]
        if steps:
            axes["loss"].plot(steps, loss, color=colour, alpha=0.3, lw=1)
            axes["loss"].plot(steps, smooth(loss, smoothing), color=colour, lw=2, label=run.label)
        for key in ("lr", "grad_norm", "iter_per_s", "ckpt_blocking_s"):
            pts = [(r["step"], r[key]) for r in run.train if isinstance(r.get(key), (int, float))]
            if pts:
                axes[key].plot(*zip(*pts), color=colour, marker=".", label=run.label)
        markers = "os^vD<>p*h"
        sigma_keys = _sigma_keys(run.val)
        series = [(k, f"σ={k.removeprefix('loss_sigma_')}") for k in sigma_keys] or [("loss", "mean over σ")]
        for (key, name), marker in zip(series, markers * len(series)):
            pts = [(r["step"], r[key]) for r in run.val if isinstance(r.get(key), (int, float))]
            if pts:
                axes["val"].plot(*zip(*pts), color=colour, marker=marker, label=f"{run.label} {name}")
    for key, title in PANELS:
        ax = axes[key]
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
            ys = [y for line in ax.lines for y in line.get_ydata() if math.isfinite(y)]
            if key in ("loss", "val", "grad_norm") and ys and min(ys) > 0 and max(ys) / min(ys) > 20:
                ax.set_yscale("log")  # only when the values span decades; else the linear axis reads better
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# ------------------------------------------------------------------------------ html
def latest_samples(run_dir: Path, count: int = 1) -> list[Path]:
    """The newest `count` RUN_DIR/samples/iter_* dirs holding a contact sheet, newest first."""
    root = run_dir / SAMPLES_DIR
    dirs = sorted(p for p in root.glob("iter_*") if (p / SHEET_FILE).is_file()) if root.is_dir() else []
    return dirs[::-1][:count]


@dataclass(frozen=True)
class CheckpointRow:
    step: int
    bytes: int
    status: str  # "verified" (sizes/checksums and DCP metadata), "partial", or the first problem


def checkpoint_rows(run_dir: Path, *, checksums: bool = False) -> list[CheckpointRow]:
    """Every iteration dir of the run, with its size and the integrity check's verdict."""
    from cosmos_train import layout
    from cosmos_train.checkpoint.integrity import verify

    ckpt_dir = layout.checkpoints_dir(run_dir)
    rows = []
    for e in layout.list_iterations(ckpt_dir) if ckpt_dir.is_dir() else []:
        size = sum(f.stat().st_size for f in e.path.rglob("*") if f.is_file())
        if not e.committed:
            rows.append(CheckpointRow(e.step, size, "partial (not committed)"))
            continue
        problems = verify(e.path, checksums=checksums)
        ok = "verified (checksums)" if checksums else "verified (sizes)"
        rows.append(CheckpointRow(e.step, size, ok if not problems else f"FAILED: {problems[0]}"))
    return rows


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _samples_html(sdir: Path, out_dir: Path) -> str:
    e = html.escape
    index = json.loads((sdir / INDEX_FILE).read_text()) if (sdir / INDEX_FILE).is_file() else {}
    step = index.get("step", sdir.name)
    items = []
    for s in index.get("samples", []):
        link = Path(os.path.relpath((sdir / s["video"]).resolve(), out_dir.resolve())).as_posix()
        items.append(f'<li><a href="{e(link)}">{e(s["name"])}.mp4</a> seed {int(s["seed"])}'
                     + (f" — {e(s['caption'])}" if s.get("caption") else "") + "</li>")
    settings = (f"<p>{e(str(index.get('weights', '')))} weights, {e(str(index.get('steps', '')))} steps, "
                f"guidance {e(str(index.get('guidance', '')))}; the orange frame is the conditioning input.</p>"
                if index else "")
    return (f"<h3>Samples at step {e(str(step))}</h3>\n{_img((sdir / SHEET_FILE).read_bytes(), f'contact sheet, step {step}')}"
            f"\n{settings}<ul>{''.join(items)}</ul>")


def _run_section(run: RunMetrics, out_dir: Path, *, checksums: bool, sheets: int) -> str:
    e = html.escape
    parts = [f"<h2>{e(run.label)}</h2>", f"<p class=path>{e(str(run.run_dir.resolve()))}</p>"]
    found = latest_samples(run.run_dir, sheets)
    parts += [_samples_html(d, out_dir) for d in found] or ["<p>No samples (set <code>trainer.sample_iter</code>).</p>"]
    rows = checkpoint_rows(run.run_dir, checksums=checksums)
    if rows:
        body = "".join(f"<tr><td>{r.step}</td><td>{r.bytes / 1e6:.2f} MB</td>"
                       f"<td class={'ok' if r.status.startswith('verified') else 'bad'}>{e(r.status)}</td></tr>"
                       for r in rows)
        parts.append(f"<h3>Checkpoints</h3><table><tr><th>iteration</th><th>size</th><th>verified</th></tr>"
                     f"{body}</table>")
    else:
        parts.append("<p>No checkpoints.</p>")
    return "\n".join(parts)


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1600px;background:#fff;color:#111}
img{max-width:100%;border:1px solid #ccc}table{border-collapse:collapse}td,th{border:1px solid #ccc;
padding:.2em .6em;text-align:right}.ok{color:#070}.bad{color:#b00}.path{color:#666;font-size:small}"""


def report_html(runs: list[RunMetrics], fig_png: bytes, out_dir: Path, *, checksums: bool = False,
                sheets: int = 3) -> str:
    """The static page: figure, then per run the newest `sheets` contact sheets and the checkpoint list."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = "\n".join(_run_section(r, out_dir, checksums=checksums, sheets=sheets) for r in runs)
    names = ", ".join(html.escape(r.label) for r in runs)
    return (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>cosmos-train report: {names}"
            f"</title><style>{_STYLE}</style></head><body>\n<h1>cosmos-train report</h1>\n"
            f"<p>{names} — generated {now}</p>\n{_img(fig_png, 'metrics')}\n{sections}\n</body></html>\n")


def plot(run_dirs: list[str | Path], out: str | Path, *, smoothing: float = 0.6, checksums: bool = False,
         sheets: int = 3) -> Path:
    """Write `out` (.png: the figure; .html: the report page) for one or more run dirs."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".html"):
        raise CosmosTrainError(f"-o {out}: must end in .png or .html")
    if not run_dirs:
        raise CosmosTrainError("plot: give at least one RUN_DIR")
    if sheets < 0:
        raise CosmosTrainError(f"--sheets: must be >= 0 (got {sheets})")
    paths = [Path(p) for p in run_dirs]
    runs = [read_metrics(p, label) for p, label in zip(paths, _labels(paths))]
    png = _png_bytes(figure(runs, smoothing=smoothing))
    if out.suffix.lower() == ".png":
        _write_atomic(out, png)
    else:
        _write_atomic(out, report_html(runs, png, out.parent, checksums=checksums, sheets=sheets).encode())
    return out
