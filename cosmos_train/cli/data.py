"""`data check` and `data convert-embeddings`: look at and prepare a dataset before training."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cosmos_train.cli.common import console, err_console, handle_errors

if TYPE_CHECKING:  # the data modules import torch, PyAV and zarr: only when a command runs
    from cosmos_train.data.check import DatasetReport

app = typer.Typer(name="data", help="Inspect and prepare datasets (upstream layout).", no_args_is_help=True)

DatasetArg = Annotated[Path, typer.Argument(help="Dataset directory (metas/, videos/, t5_xxl.zarr).",
                                            show_default=False)]


def _report_table(report: DatasetReport) -> Table:
    table = Table(title=f"dataset {report.root}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("complete clips", str(report.clips))
    table.add_row("captions (metas/*.txt)", str(report.captions))
    table.add_row("videos (videos/*.mp4)", str(report.videos))
    table.add_row("embeddings (t5_xxl.zarr)", "missing" if report.embeddings is None else str(report.embeddings))
    if report.pickles:
        table.add_row("upstream pickles (t5_xxl/)", str(report.pickles))
    if report.frames:
        lo, med, hi = report.frames
        table.add_row("frames min / median / max", f"{lo} / {med:g} / {hi}")
    table.add_row("resolutions (H x W)", ", ".join(f"{h}x{w} ({n})" for (h, w), n in report.resolutions.most_common()))
    table.add_row("fps", ", ".join(f"{f:g} ({n})" for f, n in report.fps.most_common()))
    if report.num_frames is not None:
        table.add_row(f"shorter than {report.num_frames} frames", str(len(report.too_short)))
    table.add_row("fail to decode", str(len(report.undecodable)) if report.decoded else "not checked (--decode)")
    return table


@handle_errors
def check(dataset_dir: DatasetArg,
          num_frames: Annotated[int | None, typer.Option(help="Report clips shorter than this.")] = None,
          decode: Annotated[bool, typer.Option("--decode", help="Decode every frame of every clip (slow; finds "
                                                               "corrupt packets the metadata hides).")] = False
          ) -> None:
    """Report clip counts, frame counts, resolutions and missing or orphan files; exit 2 on errors.

    Example: cosmos-train data check datasets/my_clips --num-frames 93 --decode
    """
    from cosmos_train.data.check import check_dataset

    report = check_dataset(dataset_dir, num_frames=num_frames, decode=decode)
    console.print(_report_table(report))
    for line in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {line}", highlight=False, soft_wrap=True)
    for line in report.errors:
        err_console.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(2)
    console.print(f"[green]ok[/green] {report.clips} clips")


@handle_errors
def convert_embeddings(
        dataset_dir: DatasetArg,
        overwrite: Annotated[bool, typer.Option(help="Rewrite keys already in the store.")] = False,
        out: Annotated[Path | None, typer.Option(help="Store path (default DATASET_DIR/t5_xxl.zarr).")] = None,
) -> None:
    """Convert upstream t5_xxl/*.pickle embeddings into DATASET_DIR/t5_xxl.zarr (no pickle code runs).

    Example: cosmos-train data convert-embeddings datasets/cosmos_nemo_assets
    """
    from cosmos_train.data.embeddings import convert_embeddings as convert

    report = convert(dataset_dir, out=out, overwrite=overwrite)
    console.print(f"[green]ok[/green] {len(report.converted)} converted, "
                  f"{len(report.skipped_existing)} already present -> {report.store}")


app.command("check")(check)
app.command("convert-embeddings")(convert_embeddings)
