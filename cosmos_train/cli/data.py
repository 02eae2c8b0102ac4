"""`data check`, `convert-embeddings`, `embed`, `encode`: look at and prepare a dataset before training."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cosmos_train.cli.common import console, err_console, handle_errors
from cosmos_train.errors import CosmosTrainError

if TYPE_CHECKING:  # the data modules import torch, PyAV and zarr: only when a command runs
    from cosmos_train.data.check import DatasetReport

DEFAULT_T5 = "hf://nvidia/Cosmos-Predict2-2B-Video2World/text_encoder"  # TextEncoderSpec().path (a test checks)

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


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@handle_errors
def embed(
        dataset_dir: DatasetArg,
        model: Annotated[str | None, typer.Option(help="T5 encoder: local dir or hf://org/repo/path (tokenizer in it "
                                                       f"or in tokenizer/ beside it); default: --spec's "
                                                       f"model.text_encoder.path, else {DEFAULT_T5}.")] = None,
        spec: Annotated[Path | None, typer.Option(help="Take the encoder (path, dtype) from this spec's "
                                                       "model.text_encoder.")] = None,
        tokenizer: Annotated[str | None, typer.Option(help="T5 tokenizer dir (default: see --model).")] = None,
        batch_size: Annotated[int, typer.Option(help="Captions per encoder call.")] = 8,
        dtype: Annotated[str | None, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 "
                                                       "(default: the spec's, else auto)")] = None,
        device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
        overwrite: Annotated[bool, typer.Option(help="Re-embed clips already in the store.")] = False,
        out: Annotated[Path | None, typer.Option(help="Store path (default DATASET_DIR/t5_xxl.zarr).")] = None,
) -> None:
    """Embed the captions metas/*.txt with T5 into DATASET_DIR/t5_xxl.zarr (resumable).

    Example: cosmos-train data embed datasets/my_clips --model checkpoints/google-t5/t5-11b
    (or --spec examples/2b_lora.toml: the encoder named in the spec)
    """
    from cosmos_train.data.text_embed import embed_captions
    from cosmos_train.models.text_encoder import T5TextEncoder

    from cosmos_train.spec import TextEncoderSpec

    from cosmos_train.spec_loading import load_spec

    section = load_spec(spec).model.text_encoder if spec is not None else TextEncoderSpec()
    dtype = dtype or section.dtype
    if dtype not in ("auto", "fp32", "bf16"):
        raise CosmosTrainError(f"--dtype: must be auto, fp32 or bf16 (got {dtype!r})")
    encoder = T5TextEncoder.load(model or section.path, tokenizer_path=tokenizer, dtype=dtype)
    report = embed_captions(dataset_dir, encoder, batch_size=batch_size, device=_device(device), out=out,
                            overwrite=overwrite)
    if report.truncated:
        console.print(f"[yellow]warning:[/yellow] {len(report.truncated)} captions reached the 512-token limit "
                      f"(truncated, as upstream): {', '.join(report.truncated[:5])}", highlight=False)
    console.print(f"[green]ok[/green] {len(report.embedded)} embedded, "
                  f"{len(report.skipped_existing)} already present -> {report.store}")


@handle_errors
def encode(
        dataset_dir: DatasetArg,
        spec: Annotated[Path, typer.Option(help="Spec whose model.tokenizer, data.num_frames and data.video_size "
                                                "the latents are made with.", show_default=False)],
        device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
        overwrite: Annotated[bool, typer.Option(help="Re-encode every clip (and replace a cache with other "
                                                     "settings).")] = False,
) -> None:
    """Encode every clip with the spec's VAE into DATASET_DIR/latents.zarr (resumable); training reads it.

    Example: cosmos-train data encode datasets/my_clips --spec examples/2b_lora.toml
    """
    from cosmos_train.data.latents import encode_dataset
    from cosmos_train.models.tokenizer import build_tokenizer
    from cosmos_train.spec_loading import load_spec

    exp = load_spec(spec)
    tokenizer = build_tokenizer(exp.model.tokenizer, latent_channels=exp.model.dit_config().latent_channels)
    report = encode_dataset(dataset_dir, tokenizer, num_frames=exp.data.num_frames,
                            video_size=tuple(exp.data.video_size), device=_device(device),
                            short_clips=exp.data.short_clips, overwrite=overwrite)
    if report.longer_than_window:
        console.print(f"[yellow]note:[/yellow] {len(report.longer_than_window)} clips are longer than "
                      f"{exp.data.num_frames} frames; the cache holds their first {exp.data.num_frames} frames "
                      f"(training on the fly draws a random window)", highlight=False)
    console.print(f"[green]ok[/green] {len(report.encoded)} encoded, "
                  f"{len(report.skipped_existing)} already present -> {report.store}")


app.command("check")(check)
app.command("convert-embeddings")(convert_embeddings)
app.command("embed")(embed)
app.command("encode")(encode)
