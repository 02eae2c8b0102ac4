"""Video2World inference: condition on an input frame, sample a clip, decode, write an mp4.

The architecture comes from `--spec`, else from the checkpoint itself: a DCP checkpoint's
run dir keeps `spec.toml`, and a consolidated file records the spec it was exported with
(`export.described`). LoRA adapters come from their PEFT directory (rank, alpha and
targets from `adapter_config.json`), so nobody repeats them by hand. Weights load through
`export.load.load_weights`, the loader that training uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.distributed as dist

from cosmos_train.layout import find_run_dir
from cosmos_train.data.embeddings import EmbeddingStore
from cosmos_train.data.video import resize_video, write_mp4
from cosmos_train.errors import CosmosTrainError
from cosmos_train.export.described import read_described_spec
from cosmos_train.export.load import Source, load_weights, resolve_load_path
from cosmos_train.export.tensor_source import open_source
from cosmos_train.models.dit import DiT
from cosmos_train.models.lora import apply_lora, load_adapter
from cosmos_train.models.lora_keys import is_lora_key
from cosmos_train.models.sampler import sample
from cosmos_train.models.tokenizer import build_tokenizer
from cosmos_train.run_dir import SPEC_FILE
from cosmos_train.runtime.attention import build_attention
from cosmos_train.runtime.context_parallel import apply_context_parallel
from cosmos_train.runtime.distributed import distributed, log
from cosmos_train.spec import ExperimentSpec, LoraSpec, ParallelSpec
from cosmos_train.spec_loading import load_spec, load_spec_text

MAX_TEXT_TOKENS = 512


@dataclass
class InferenceRequest:
    """Everything one `infer` call needs; the CLI fills it from flags."""

    checkpoint: Path | str
    input: Path
    prompt_embedding: str | None  # None: `prompt` is encoded with the text encoder
    output: Path
    spec: Path | None = None
    negative_embedding: str | None = None
    lora: Path | None = None
    guidance: float = 7.0
    steps: int = 35
    seed: int = 0
    ema: bool = False
    num_frames: int | None = None
    fps: int = 16
    lossless: bool = False  # exact RGB H.264 (for comparisons); the default plays everywhere
    device: str = "auto"
    prompt: str | None = None
    negative_prompt: str | None = None
    text_encoder: str | None = None  # default: the spec's model.text_encoder.path
    offload: bool = True  # text encoder and VAE off the GPU while the DiT samples


# --------------------------------------------------------------------- inputs
def load_embedding(ref: str, *, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A text embedding, padded to 512 tokens: `.npy` [n, 1024] or `STORE.zarr:KEY` -> (emb, mask).

    `width` (the model's context_dim) is checked when given.
    """
    if ref.rstrip("/").endswith(".zarr"):
        raise CosmosTrainError(f"{ref}: name the clip in the store as STORE.zarr:KEY")
    if ".zarr:" in ref:
        store, key = ref.rsplit(":", 1)
        if not Path(store).exists():
            raise CosmosTrainError(f"{store}: embedding store not found")
        emb, mask = EmbeddingStore(store).get(key)
    else:
        emb, mask = _load_npy_embedding(Path(ref))
    if width is not None and emb.shape[-1] != width:
        raise CosmosTrainError(f"{ref}: embedding width {emb.shape[-1]} does not match the model's "
                               f"context_dim {width} (T5-XXL embeddings are 1024 wide)")
    return emb, mask


def _load_npy_embedding(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.exists():
        raise CosmosTrainError(f"{path}: embedding file not found (expected .npy [n_tokens, 1024] or STORE.zarr:KEY)")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # not .npy, object dtype (needs pickle), truncated
        raise CosmosTrainError(f"{path}: not a numeric .npy embedding ({e})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise CosmosTrainError(f"{path}: expected a float array [n_tokens, dim] (got "
                               f"{getattr(array, 'dtype', type(array).__name__)})")
    if array.ndim != 2 or not 0 < array.shape[0] <= MAX_TEXT_TOKENS:
        raise CosmosTrainError(f"{path}: expected an array [n_tokens <= {MAX_TEXT_TOKENS}, dim] (got {array.shape})")
    emb = torch.zeros(MAX_TEXT_TOKENS, array.shape[1], dtype=torch.float32)
    emb[: array.shape[0]] = torch.from_numpy(array.astype(np.float32))
    mask = torch.zeros(MAX_TEXT_TOKENS, dtype=torch.bool)
    mask[: array.shape[0]] = True
    return emb, mask


def read_condition_frames(path: Path, size: tuple[int, int], count: int) -> torch.Tensor:
    """The last `count` frames of a clip (or an image, repeated) as uint8 (3, count, H, W)."""
    if not path.exists():
        raise CosmosTrainError(f"{path}: input frame/clip not found")
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise CosmosTrainError(f"{path}: has no video stream (expected an image or a clip)")
            for frame in container.decode(container.streams.video[0]):
                frames = (frames + [frame.to_ndarray(format="rgb24")])[-count:]
    except av.FFmpegError as e:
        raise CosmosTrainError(f"{path}: cannot decode ({e})") from None
    if not frames:
        raise CosmosTrainError(f"{path}: no video frame in it")
    if len(frames) == 1:
        frames = frames * count  # a still image conditions every condition frame
    elif len(frames) < count:
        raise CosmosTrainError(f"{path}: has {len(frames)} frames; {count} are needed to condition "
                               f"on the spec's model.num_condition_frames")
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)  # (3, count, H, W)
    return resize_video(video, size)


# ---------------------------------------------------------------------- model
def resolve_spec(req: InferenceRequest, source: Source) -> ExperimentSpec:
    """`--spec`, else the DCP run's spec.toml, else the spec a consolidated file records; else a clear error."""
    if req.spec is not None:
        return load_spec(req.spec)
    if source.kind == "dcp":
        run_dir = find_run_dir(source.path)
        if run_dir is not None:
            return load_spec(run_dir / SPEC_FILE)
    else:
        text = read_described_spec(source.path)
        if text is not None:
            return load_spec_text(text, source=f"{source} (recorded spec)")
    raise CosmosTrainError(f"{source}: the checkpoint records no spec (not in a run dir, not exported by "
                           f"`cosmos-train consolidate` from one); pass --spec SPEC.toml (the spec the model "
                           f"was trained with)")


def _without_lora(spec: ExperimentSpec) -> ExperimentSpec:
    data = spec.model_dump()  # a merged export holds plain DiT weights: build the DiT without adapters
    data["model"].update(train_architecture="full", lora=LoraSpec().model_dump())
    return ExperimentSpec.model_validate(data)


def build_inference_model(req: InferenceRequest, device: torch.device) -> tuple[DiT, ExperimentSpec]:
    """The DiT with the checkpoint's weights (and the optional adapter), in eval mode on `device`."""
    source = resolve_load_path(req.checkpoint)
    spec = resolve_spec(req, source)
    if source.kind != "dcp" and spec.model.train_architecture == "lora" and \
            not any(is_lora_key(k) for k in open_source(source.path).entries):  # --spec of the run, merged file
        spec = _without_lora(spec)
    model = DiT(spec.model.dit_config(), attention=lambda: build_attention(spec.parallel.attention,
                                                                            device_type=device.type))
    if spec.model.train_architecture == "lora":
        apply_lora(model, spec.model.lora)
    load_weights(source, model, ema_to_reg=req.ema)
    if req.lora is not None:
        load_adapter(model, req.lora)
    log(f"loaded {'EMA ' if req.ema else ''}weights from {source}" + (f" + adapter {req.lora}" if req.lora else ""))
    return model.to(device).eval(), spec


# ----------------------------------------------------------------------- main
def _device(name: str, info) -> torch.device:
    if name == "auto":
        return info.device
    return torch.device(name)


def check_request(req: InferenceRequest) -> None:
    """The flag values that cannot sample a clip, as one-line errors naming the flag (before any loading)."""
    if req.steps < 1:
        raise CosmosTrainError(f"--steps: must be >= 1 (got {req.steps})")
    if not math.isfinite(req.guidance):
        raise CosmosTrainError(f"--guidance: must be a finite number (got {req.guidance})")
    if req.fps < 1:
        raise CosmosTrainError(f"--fps: must be >= 1 (got {req.fps})")
    if req.num_frames is not None and (req.num_frames < 1 or (req.num_frames - 1) % 4):
        raise CosmosTrainError(f"--num-frames: must be 4k+1 (got {req.num_frames})")
    out = Path(req.output)
    if out.is_dir():
        raise CosmosTrainError(f"--output {out}: is a directory; give a file name such as {out / 'sample.mp4'}")
    if not Path(req.input).is_file():
        raise CosmosTrainError(f"--input {req.input}: no such file (expected an image or an mp4)")


def infer(req: InferenceRequest) -> Path:
    """Sample one clip conditioned on `req.input` and write it to `req.output` (mp4).

    Under torchrun the processes form one context-parallel group over the latent frames
    (every rank computes the same sample; rank 0 writes the file).
    """
    check_request(req)
    with distributed(ParallelSpec(), device=req.device) as info:
        return _infer(req, info)


def _infer(req: InferenceRequest, info) -> Path:
    device = _device(req.device, info)
    if (req.prompt is None) == (req.prompt_embedding is None):
        raise CosmosTrainError("give the text condition as --prompt TEXT or --prompt-embedding FILE, exactly one")
    model, spec = build_inference_model(req, device)
    tokenizer = build_tokenizer(spec.model.tokenizer, latent_channels=spec.model.dit_config().latent_channels)
    H, W = spec.data.video_size
    T = req.num_frames or spec.data.num_frames
    C, Tl, Hl, Wl = tokenizer.latent_shape(T, H, W)
    k = spec.model.num_condition_frames
    if k >= Tl:
        raise CosmosTrainError(f"--num-frames {T} gives {Tl} latent frames; more than the "
                               f"{k} condition frame(s) are needed")
    if info.world_size > 1:
        if Tl % info.world_size:
            raise CosmosTrainError(f"{info.world_size} processes must divide the {Tl} latent frames "
                                   f"(context parallelism); change --num-frames or --nproc_per_node")
        # hybrid needs node-local sub-groups; sampling over one group uses the ring (same result)
        mode = "ring" if spec.parallel.cp_mode == "hybrid" else spec.parallel.cp_mode
        apply_context_parallel(model, dist.group.WORLD, mode=mode)

    cond_pixels = tokenizer.video_frames(k)
    video = torch.zeros(1, 3, T, H, W, dtype=torch.uint8)
    video[0, :, :cond_pixels] = read_condition_frames(Path(req.input), (H, W), cond_pixels)
    condition_latent = tokenizer.encode(video.to(device))
    if req.offload and hasattr(tokenizer, "offload"):
        tokenizer.offload()  # back on the GPU for decoding, after sampling
    context_dim = spec.model.dit_config().context_dim
    if req.prompt is not None:
        from cosmos_train.prompt import encode_prompt

        emb, neg = encode_prompt(req.prompt, req.negative_prompt, spec.model.text_encoder, device=device,
                                 width=context_dim, path=req.text_encoder, offload=req.offload)
    else:
        emb, _ = load_embedding(req.prompt_embedding, width=context_dim)
        # the empty prompt by default: what text dropout trains for
        neg = (load_embedding(req.negative_embedding, width=context_dim)[0] if req.negative_embedding
               else torch.zeros_like(emb))
    guided = req.guidance != 0.0  # upstream's convention: g = 0 is no guidance
    # Upstream conditions on the zero-padded embedding without a key mask; released weights expect it.
    latent = sample(model, condition_latent=condition_latent, num_condition_frames=k,
                    shape=(1, C, Tl, Hl, Wl), text_emb=emb[None].to(device), text_mask=None,
                    neg_emb=neg[None].to(device) if guided else None, neg_mask=None,
                    steps=req.steps, guidance=req.guidance, seed=req.seed)
    out = Path(req.output)
    if info.rank == 0:
        frames = tokenizer.decode(latent)[0].permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, 3)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp.mp4")
        try:
            write_mp4(tmp, frames, fps=req.fps, lossless=req.lossless)
            tmp.replace(out)
        except BaseException:
            tmp.unlink(missing_ok=True)  # no half-written clip left behind
            raise
        log(f"wrote {out}: {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]}")
    if info.world_size > 1:
        dist.barrier()
    return out
