"""The `cosmos-train` command line: wiring only; each command lives in its own module."""

from __future__ import annotations

import typer

from cosmos_train.cli import consolidate, data, infer, inspect, plan, plot, run_cmds, spec_cmds

app = typer.Typer(
    name="cosmos-train",
    help="Post-train Cosmos-Predict2-style video diffusion transformers from one TOML spec.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

app.command()(run_cmds.run)
app.command()(run_cmds.resume)
app.command()(consolidate.consolidate)
app.command()(consolidate.convert)
app.command()(infer.infer)
app.command()(inspect.inspect)
app.command()(plot.plot)
app.command()(spec_cmds.validate)
app.command()(spec_cmds.show)
app.command()(spec_cmds.schema)
app.command()(plan.plan)
app.add_typer(data.app, name="data", help="Check a dataset; convert upstream T5 embeddings.")


def main() -> None:
    """Console-script entry point."""
    app()
