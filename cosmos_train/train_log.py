"""Training logs: a JSONL file in the run dir, Weights & Biases, and a rich progress bar (rank 0)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cosmos_train.errors import CosmosTrainError
from cosmos_train.run_dir import logs_dir
from cosmos_train.runtime.distributed import log
from cosmos_train.spec import ExperimentSpec

METRICS_FILE = "metrics.jsonl"


def _start_wandb(spec: ExperimentSpec, run_dir: Path):
    mode = spec.job.wandb_mode
    if mode == "disabled":
        return None
    import wandb

    if mode == "online" and not wandb.login(prompt=False, verify=False):
        raise CosmosTrainError("job.wandb_mode: 'online' needs a W&B API key (run `wandb login` or set "
                               "WANDB_API_KEY), or use wandb_mode = \"offline\" / \"disabled\"")
    return wandb.init(project=spec.job.project, group=spec.job.group, name=spec.job.name, mode=mode,
                      dir=str(run_dir), config=spec.model_dump(mode="json"), resume="allow",
                      id=f"{spec.job.group}-{spec.job.name}".replace("/", "-"))


class TrainLog:
    """Rank-0 sink for metrics; other ranks get a no-op instance (`enabled=False`)."""

    def __init__(self, spec: ExperimentSpec, run_dir: Path, *, enabled: bool, start_step: int, show_progress: bool):
        self.enabled = enabled
        self.max_iter = spec.trainer.max_iter
        self._file = self._wandb = self._progress = None
        if not enabled:
            return
        logs_dir(run_dir).mkdir(parents=True, exist_ok=True)
        self._file = open(logs_dir(run_dir) / METRICS_FILE, "a")
        self._wandb = _start_wandb(spec, run_dir)
        if show_progress and Console().is_terminal:  # piped output gets plain log lines instead
            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                                      TimeRemainingColumn(), transient=False)
            self._task = self._progress.add_task("train", total=self.max_iter, completed=start_step, status="")
            self._progress.start()

    def step(self, step: int, status: str | None = None) -> None:
        """Advance the progress bar; `status` (e.g. the loss) replaces the shown text when given."""
        if self._progress is not None:
            fields = {} if status is None else {"status": status}
            self._progress.update(self._task, completed=step, **fields)

    def write(self, step: int, metrics: dict[str, Any], *, kind: str = "train") -> None:
        """Append one record (JSONL + W&B) and print a line."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **metrics}
        # NaN/inf are not JSON: write null (and name the fields) so every line stays parseable
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            record.update({k: None for k in bad}, nonfinite=bad)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in metrics.items()}, step=step)
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        line = f"[{kind}] step {step}/{self.max_iter} {text}"
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            log(line)

    def media(self, step: int, *, videos: dict[str, Path], images: dict[str, Path]) -> None:
        """Log sample videos (mp4 files) and images (PNG files) to W&B, when it is on."""
        if self._wandb is None:
            return
        import wandb

        media = {f"samples/{name}": wandb.Video(str(path), format="mp4") for name, path in videos.items()}
        media.update({f"samples/{name}": wandb.Image(str(path)) for name, path in images.items()})
        self._wandb.log(media, step=step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
