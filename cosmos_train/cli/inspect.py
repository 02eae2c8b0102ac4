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


@handle_errors
def inspect(
    path: Annotated[Path, typer.Argument(help="Run dir, checkpoints/ dir or iter_XXXXXXXXX dir.", show_default=False)],
    iteration: Annotated[int | None, typer.Option("--iter", help="Show the tensors of this iteration.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Check manifest checksums and read every tensor back.")]
    = False,
) -> None:
    """Show a run's checkpoints, or one iteration's tensors per part.

    Example: cosmos-train inspect outputs/proj/group/run --iter 200 --verify
    """
    from cosmos_train.checkpoint import layout
    from cosmos_train.checkpoint.inspect import deep_verify, list_iteration_rows, resolve_for_inspect, tensor_rows
    from cosmos_train.checkpoint.integrity import checks_run

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
        table = Table(title=f"tensors in {iter_dir}")
        for col in ("part", "name", "shape", "dtype", "bytes"):
            table.add_column(col)
        total = 0
        for r in tensor_rows(iter_dir):
            table.add_row(r.part, r.name, "x".join(map(str, r.shape)) or "-", r.dtype, str(r.bytes))
            total += r.bytes
        console.print(table)
        console.print(f"total tensor bytes: {_gb(total)}")
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
