"""Shared CLI pieces: option aliases, console, error handling in one place."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cosmos_train.errors import CosmosTrainError

DEBUG_ENV = "COSMOS_TRAIN_DEBUG"

console = Console()
err_console = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="Experiment spec (TOML).", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Overrides as key.path=value (TOML values), e.g. optimizer.lr=3e-5 parallel.cp=2.",
                   show_default=False),
]


def handle_errors(fn):
    """Print project errors as one red block on stderr and exit 2; let other exceptions through."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CosmosTrainError as e:
            if os.environ.get(DEBUG_ENV):
                raise
            for line in str(e).splitlines():
                err_console.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
            err_console.print(f"[dim](set {DEBUG_ENV}=1 for a traceback)[/dim]")
            raise typer.Exit(e.exit_code) from None

    return wrapper
