"""`run` and `resume`: start or continue a training run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.syntax import Syntax

from cosmos_train.cli.common import OverridesArg, SpecArg, console, handle_errors
from cosmos_train.errors import CosmosTrainError

# The spec (pydantic) and the trainer (torch) are imported inside the commands: `--help` stays fast.


@handle_errors
def run(
    spec: SpecArg,
    overrides: OverridesArg = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Resolve, validate, write spec.toml; train nothing.")] = False,
) -> None:
    """Start a run (or continue it, if its run directory already has checkpoints).

    Example: cosmos-train run examples/tiny.toml trainer.max_iter=100
    Multi-process: torchrun --nproc_per_node=2 -m cosmos_train run examples/tiny.toml parallel.cp=2 job.name=cp2
    """
    from cosmos_train.run_dir import SPEC_FILE, prepare_run_dir
    from cosmos_train.spec_loading import load_spec

    resolved = load_spec(spec, overrides or [])
    if dry_run:
        run_dir = prepare_run_dir(resolved)
        console.print(Syntax(resolved.to_toml(), "toml", theme="ansi_dark", background_color="default"))
        console.print(f"dry run: spec written to {run_dir / SPEC_FILE}; nothing started")
        return
    from cosmos_train.train import train

    train(resolved)


@handle_errors
def resume(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (holds spec.toml and checkpoints/).")],
    overrides: OverridesArg = None,
) -> None:
    """Continue a run from its latest committed checkpoint (the spec comes from RUN_DIR/spec.toml).

    Example: cosmos-train resume outputs/cosmos_train/examples/tiny trainer.max_iter=120
    """
    from cosmos_train.run_dir import SPEC_FILE
    from cosmos_train.spec_loading import load_spec

    spec_path = run_dir / SPEC_FILE
    if not spec_path.exists():
        raise CosmosTrainError(f"{spec_path}: not found; RUN_DIR must be a run directory made by `cosmos-train run`")
    resolved = load_spec(spec_path, overrides or [])
    from cosmos_train.train import train

    train(resolved, run_dir=run_dir, require_checkpoint=True)
