"""`plot`: metrics of one or more runs as a PNG, or a static HTML report with samples and checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cosmos_train.cli.common import console, handle_errors


@handle_errors
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (several are overlaid).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="report.png (figure) or report.html (figure, "
                                         "latest contact sheets, checkpoint list; one file, no server).")]
    = Path("report.html"),
    smoothing: Annotated[float, typer.Option(help="Loss smoothing weight in [0, 1) (0 = raw).")] = 0.6,
    sheets: Annotated[int, typer.Option(help="HTML: the newest this many contact sheets per run.")] = 3,
    checksums: Annotated[bool, typer.Option("--checksums", help="HTML: verify checkpoint checksums "
                                            "(reads every file) instead of sizes only.")] = False,
) -> None:
    """Plot loss (raw + smoothed), validation loss per sigma, lr, grad norm, iter/s and checkpoint blocking time.

    Example: cosmos-train plot outputs/cosmos_train/examples/tiny -o report.html
    """
    from cosmos_train.plot import plot as run

    out = run(run_dirs, output, smoothing=smoothing, checksums=checksums, sheets=sheets)
    console.print(f"wrote {out}", highlight=False)
