"""`cosmos-train inspect`: list iterations, show one iteration's tensors, verify integrity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cosmos_train.cli.common import console, handle_errors
from cosmos_train.errors import CheckpointError


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _tensor_table(title: str, rows) -> None:
    table = Table(title=title)
    for col in ("part", "name", "shape", "dtype", "bytes"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.part, r.name, "x".join(map(str, r.shape)) or "-", r.dtype, str(r.bytes))
    console.print(table)
    console.print(f"total tensor bytes: {_gb(sum(r.bytes for r in rows))}")


@handle_errors
def inspect(
    path: Annotated[Path, typer.Argument(
        help="Run dir, checkpoints/ dir, iter_XXXXXXXXX dir, or a consolidated .pt / .safetensors file.",
        show_default=False)],
    iteration: Annotated[int | None, typer.Option("--iter", help="Show the tensors of this iteration.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Check manifest checksums and read every tensor back.")]
    = False,
) -> None:
    """Show a run's checkpoints, one iteration's tensors per part, or a consolidated file's tensors.

    Example: cosmos-train inspect outputs/proj/group/run --iter 200 --verify
    """
    from cosmos_train import layout
    from cosmos_train.checkpoint.inspect import (deep_verify, file_tensor_rows, list_iteration_rows,
                                                 resolve_for_inspect, tensor_rows)
    from cosmos_train.checkpoint.integrity import checks_run

    if path.is_file():
        _tensor_table(f"tensors in {path}", file_tensor_rows(path))
        return
    ckpt_dir, iter_dir = resolve_for_inspect(path)
    if iter_dir is None and iteration is not None:
        iter_dir = layout.resolve_iteration_dir(ckpt_dir, iteration)
    if iter_dir is None:
        table = Table(title=f"checkpoints in {ckpt_dir}")
        for col in ("iteration", "status", "size", "modified", "latest"):
            table.add_column(col)
        rows = list_iteration_rows(ckpt_dir)
        for r in rows:
            style = {"partial": "red", "upstream": "yellow", "uncommitted": "yellow"}.get(r.status, "")
            table.add_row(str(r.step), r.status, _gb(r.bytes), r.mtime, "*" if r.latest else "", style=style)
        console.print(table)
        targets = [ckpt_dir / r.name for r in rows if r.status != "partial"] if verify else []
    else:
        _tensor_table(f"tensors in {iter_dir}", tensor_rows(iter_dir))
        targets = [iter_dir] if verify else []
    bad = 0
    for t in targets:
        problems = deep_verify(t)
        bad += bool(problems)
        if problems:
            console.print(f"[red]{t.name}: {len(problems)} problem(s)[/red]")
            for p in problems:
                console.print(f"  {p}", highlight=False)
        else:
            checks = ", ".join(checks_run(t) + ["every tensor read back"])
            console.print(f"[green]{t.name}: OK[/green] ({checks})", highlight=False)
    if bad:
        raise CheckpointError(f"{bad} checkpoint(s) failed verification (see above)")
