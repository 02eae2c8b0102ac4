"""`validate`, `show`, `schema`: look at a spec without running anything."""

from __future__ import annotations

import json

import typer
from rich.syntax import Syntax

from cosmos_train.cli.common import OverridesArg, SpecArg, console, handle_errors

# cosmos_train.spec (pydantic) is imported inside the commands, so `--help` does not pay for it.


@handle_errors
def validate(spec: SpecArg, overrides: OverridesArg = None) -> None:
    """Check a spec; exit 2 with one line per problem.

    Example: cosmos-train validate examples/2b_lora.toml parallel.cp=4
    """
    from cosmos_train.spec_loading import load_spec

    load_spec(spec, overrides or [])
    console.print(f"[green]ok[/green] {spec}")


@handle_errors
def show(spec: SpecArg, overrides: OverridesArg = None) -> None:
    """Print the resolved spec (base files and overrides applied) and the model size.

    Example: cosmos-train show examples/2b_lora.toml parallel.cp=4
    """
    from cosmos_train.models.dit import count_parameters
    from cosmos_train.spec_loading import load_spec

    resolved = load_spec(spec, overrides or [])
    console.print(Syntax(resolved.to_toml(), "toml", theme="ansi_dark", background_color="default"))
    console.print(f"# run directory: {resolved.run_dir()}")
    total, tensors = count_parameters(resolved.model.dit_config())
    console.print(f"# model: preset {resolved.model.preset}, {total:,} parameters in {tensors} tensors")


def schema(
    indent: int = typer.Option(2, help="JSON indentation."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the Markdown field reference instead."),
) -> None:
    """Print the JSON schema of the spec (for editors and validators), or its Markdown reference.

    Example: cosmos-train schema > spec.schema.json
    """
    if markdown:
        from cosmos_train.spec_docs import spec_reference_markdown

        typer.echo(spec_reference_markdown())
        return
    from cosmos_train.spec_loading import json_schema

    typer.echo(json.dumps(json_schema(), indent=indent))
