"""`infer`: sample a video from a checkpoint and an input frame."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cosmos_train.cli.common import handle_errors


@handle_errors
def infer(
    checkpoint: Annotated[str, typer.Option("--checkpoint", "-c", help="model.pt | .safetensors | DCP iteration dir | run dir | diffusers folder (DIR or DIR/transformer) | hf://org/repo/file | hf://org/repo (diffusers)")],
    input: Annotated[Path, typer.Option("--input", "-i", help="Conditioning image (png/jpg) or clip (mp4: its last frame).")],
    prompt_embedding: Annotated[str, typer.Option("--prompt-embedding", "-p", help="Text embedding: FILE.npy [n_tokens, 1024] or STORE.zarr:KEY.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output mp4.")] = Path("outputs/sample.mp4"),
    spec: Annotated[Path | None, typer.Option("--spec", help="Spec of the model; default: the run's spec.toml beside the checkpoint.")] = None,
    negative_embedding: Annotated[str | None, typer.Option("--negative-embedding", help="Negative prompt embedding (default: empty prompt).")] = None,
    lora: Annotated[Path | None, typer.Option("--lora", help="PEFT adapter dir (adapter_config.json + adapter_model.safetensors).")] = None,
    guidance: Annotated[float, typer.Option(help="Guidance g in x0 = x0_pos + g (x0_pos - x0_neg), as upstream and diffusers; 0 = none.")] = 7.0,
    steps: Annotated[int, typer.Option(help="Sampler steps.")] = 35,
    seed: Annotated[int, typer.Option(help="Noise seed; NumPy RandomState(seed) as upstream, so the same seed gives upstream's sample.")] = 0,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA weights.")] = False,
    num_frames: Annotated[int | None, typer.Option(help="Frames to generate (4k+1; default: the spec's data.num_frames).")] = None,
    fps: Annotated[int, typer.Option(help="Frame rate of the mp4.")] = 16,
    lossless: Annotated[bool, typer.Option("--lossless", help="Exact RGB H.264 (qp 0) instead of the widely playable yuv420p.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Video2World: condition on a frame, sample a clip, write an mp4.

    Example: cosmos-train infer -c outputs/cosmos_train/examples/tiny -i frame.png -p prompt.npy --steps 35 -o out.mp4
    """
    from cosmos_train.infer import InferenceRequest
    from cosmos_train.infer import infer as run_inference
    from cosmos_train.runtime.distributed import configure_logging

    configure_logging()
    run_inference(InferenceRequest(
        checkpoint=checkpoint, input=input, prompt_embedding=prompt_embedding, output=output, spec=spec,
        negative_embedding=negative_embedding, lora=lora, guidance=guidance, steps=steps, seed=seed, ema=ema,
        num_frames=num_frames, fps=fps, lossless=lossless, device=device))
