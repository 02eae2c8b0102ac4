"""The run directory: what lives where, the resolved spec in it, and the check that a resume keeps
the architecture.

    {output_root}/{project}/{group}/{name}/     `ExperimentSpec.run_dir()`
      spec.toml                                 SPEC_FILE, the resolved spec (`write_spec`)
      checkpoints/                              `layout.py`
      logs/metrics.jsonl                        `logs_dir`, `train_log.METRICS_FILE`
    {output_root}/.cache/                       `data_cache_dir`: generated synthetic data, shared by runs
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from cosmos_train.errors import CosmosTrainError, SpecError
from cosmos_train.layout import SPEC_FILE
from cosmos_train.spec import ExperimentSpec
from cosmos_train.spec_loading import load_spec

LOGS_DIR = "logs"
DATA_CACHE_DIR = ".cache"


def logs_dir(run_dir: Path) -> Path:
    """Where a run's metrics (and W&B's offline files) go."""
    return Path(run_dir) / LOGS_DIR


def data_cache_dir(spec: ExperimentSpec) -> Path:
    """Where synthetic data without `data.dataset_dir` is generated: under the output root, so runs
    share it whatever the depth of their run dir (and `resume RUN_DIR` finds the same data)."""
    return spec.output_root() / DATA_CACHE_DIR


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return out


def _architecture(spec: ExperimentSpec) -> dict[str, Any]:
    """The fields that fix the weights' shapes and names, with preset values resolved."""
    arch = {f"model.architecture.{k}": v for k, v in asdict(spec.model.dit_config()).items()}
    arch["model.preset"] = spec.model.preset
    arch["model.train_architecture"] = spec.model.train_architecture
    arch.update(_flatten(spec.model.tokenizer.model_dump(mode="json"), "model.tokenizer."))
    if spec.model.train_architecture == "lora":
        arch.update(_flatten(spec.model.lora.model_dump(mode="json"), "model.lora."))
    return arch


def architecture_changes(old: ExperimentSpec, new: ExperimentSpec) -> list[str]:
    """Dotted fields whose change would make the saved weights not fit: `field: old -> new`."""
    a, b = _architecture(old), _architecture(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def make_run_dir(run_dir: Path) -> None:
    """Create the run dir; a path component that is a file (e.g. job.output_root) is a user error."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), run_dir)
        raise SpecError(f"{blocker}: is a file, so the run directory {run_dir} cannot be created "
                        "(check job.output_root and the job names)") from None
    except PermissionError as e:
        raise SpecError(f"{run_dir}: cannot create the run directory ({e.strerror}); check job.output_root") \
            from None


def write_spec(spec: ExperimentSpec, run_dir: Path) -> Path:
    """Write the resolved spec atomically as RUN_DIR/spec.toml (it holds no secrets)."""
    from cosmos_train.layout import atomic_write_text

    from cosmos_train.disk import disk_full_message, is_disk_full

    make_run_dir(run_dir)
    path = run_dir / SPEC_FILE
    text = spec.to_toml()
    try:
        atomic_write_text(path, text)  # the temp file is removed on any error
    except OSError as e:
        if is_disk_full(e):
            raise CosmosTrainError(disk_full_message(path, need=len(text.encode()), what="the run's spec")) from None
        raise
    return path


def prepare_run_dir(spec: ExperimentSpec, run_dir: Path | None = None) -> Path:
    """Create the run dir and save the spec; refuse an architecture change against a saved spec."""
    run_dir = Path(run_dir) if run_dir is not None else spec.run_dir()
    saved = run_dir / SPEC_FILE
    if saved.exists():
        old = load_spec(saved)
        changes = architecture_changes(old, spec)
        if changes:
            raise SpecError(f"{saved}: the run was created with another architecture; start a new run "
                            "(job.name=...) or restore these fields:\n" + "\n".join(changes))
        from cosmos_train.layout import checkpoints_dir, committed_iterations

        if old.job.seed != spec.job.seed and committed_iterations(checkpoints_dir(run_dir)):
            # the checkpoint's RNG streams and data order win; spec.toml must not claim another seed
            raise SpecError(f"{saved}: job.seed: fixed once a run has checkpoints (the data order and random "
                            f"streams continue from them): {old.job.seed} -> {spec.job.seed}; start a new run "
                            f"(job.name=...) to change it")
    write_spec(spec, run_dir)
    return run_dir
