"""`cosmos-train consolidate` and `cosmos-train convert`: parse flags, call the library, print a summary."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cosmos_train.cli.common import console, handle_errors


class DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class ConvertTarget(str, Enum):
    dcp = "dcp"


class Format(str, Enum):
    cosmos = "cosmos"
    diffusers = "diffusers"


@handle_errors
def consolidate(
    ckpt_dir: Annotated[Path, typer.Argument(
        help="DCP iteration dir (iter_XXXXXXXXX), a checkpoints/ dir or a run dir (latest checkpoint).",
        show_default=False)],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o",
        help="Output file: .pt or .safetensors (a directory with --adapter-only or --format diffusers). Default: "
             "RUN_DIR/consolidated/iter_XXXXXXXXX[_ema][_merged][_bf16].pt "
             "(RUN_DIR/consolidated/iter_XXXXXXXXX[_ema]_adapter/ with --adapter-only).",
        show_default=False)] = None,
    iteration: Annotated[int | None, typer.Option(
        "--iter", help="Iteration to export from a run/checkpoints dir (default: latest).",
        show_default=False)] = None,
    ema: Annotated[bool, typer.Option("--ema", help="Export the EMA weights (written under the prefix).")] = False,
    both: Annotated[bool, typer.Option("--both", help="Keep net. and net_ema. like upstream full checkpoints.")
                    ] = False,
    dtype: Annotated[DType | None, typer.Option(
        "--dtype", help="Convert floating tensors (integers untouched). Default: as stored.",
        show_default=False)] = None,
    prefix: Annotated[str, typer.Option("--prefix", help="Key prefix of the exported weights ('' for none).")
                      ] = "net.",
    merge_lora: Annotated[bool, typer.Option(
        "--merge-lora", help="Fold LoRA adapters into the base weights (a plain DiT state dict).")] = False,
    adapter_only: Annotated[bool, typer.Option(
        "--adapter-only", help="Write the PEFT adapter dir (adapter_config.json + adapter_model.safetensors).")
                            ] = False,
    lora_rank: Annotated[int | None, typer.Option(
        "--lora-rank", help="LoRA rank (default: the run's spec.toml, else the stored shapes).",
        show_default=False)] = None,
    lora_alpha: Annotated[int | None, typer.Option(
        "--lora-alpha", help="LoRA alpha (default: the run's spec.toml).", show_default=False)] = None,
    max_shard_size: Annotated[str | None, typer.Option(
        "--max-shard-size", help="Shard .safetensors output, e.g. 5GB, with a model.safetensors.index.json.",
        show_default=False)] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Re-read the output and compare it with the source.")
                      ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    format: Annotated[Format, typer.Option(
        "--format", help="cosmos: released Cosmos-Predict2 keys (net.*); diffusers: OUT_DIR/transformer/ "
                         "(config.json + sharded safetensors) for diffusers' CosmosTransformer3DModel.")
                      ] = Format.cosmos,
    base_pipeline: Annotated[str | None, typer.Option(
        "--base-pipeline", help="With --format diffusers: a diffusers pipeline folder or hf://org/repo; OUT_DIR "
                                "becomes a full pipeline (model_index.json, other components symlinked).",
        show_default=False)] = None,
) -> None:
    """Stream a DCP training checkpoint into one .pt / .safetensors file (or a diffusers folder) in bounded memory.

    Example: [bold]cosmos-train consolidate outputs/proj/group/run -o model.safetensors --ema --dtype bf16[/bold]

    Example: [bold]cosmos-train consolidate outputs/proj/group/run --format diffusers -o my_model --ema --merge-lora[/bold]
    """
    from cosmos_train.export.consolidate import consolidate as run

    report = run(ckpt_dir, output, iteration=iteration, ema=ema, both=both,
                 dtype=dtype.value if dtype is not None else None, prefix=prefix, merge_lora=merge_lora,
                 adapter_only=adapter_only, lora_rank=lora_rank, lora_alpha=lora_alpha,
                 max_shard_size=max_shard_size, verify=verify, progress=progress, format=format.value,
                 base_pipeline=base_pipeline)
    console.print(report.summary(), highlight=False, soft_wrap=True)


@handle_errors
def convert(
    src: Annotated[Path, typer.Argument(
        help="Consolidated .pt, .safetensors or model.safetensors.index.json.", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(
        help="Iteration dir to write; the DCP model part goes to OUT_DIR/model/.", show_default=False)],
    to: Annotated[ConvertTarget, typer.Option("--to", help="Target format.")] = ConvertTarget.dcp,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty dir or a committed iteration "
                                                        "(which is then un-committed).")] = False,
) -> None:
    """Write a consolidated checkpoint as DCP (for sharded loading at scale), one tensor at a time.

    Example: [bold]cosmos-train convert model.pt ckpt/iter_000000000 --to dcp[/bold]
    """
    from cosmos_train.export.convert import convert as run

    report = run(src, out_dir, to=to.value, progress=progress, force=force)
    console.print(report.summary(), highlight=False, soft_wrap=True)
