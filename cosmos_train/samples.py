"""Sample clips during training: `trainer.sample_iter` and `[trainer.samples]`.

Every `sample_iter` steps (and at the last step) the training model generates one clip per
conditioning input with the sampler `infer` uses (`models.sampler.sample`), and rank 0 writes

    RUN_DIR/samples/iter_XXXXXXXXX/NAME.mp4        one per input
    RUN_DIR/samples/iter_XXXXXXXXX/contact_sheet.png
    RUN_DIR/samples/iter_XXXXXXXXX/samples.json     names, captions, seeds, sampler settings

Distribution: the model stays sharded as it trains (FSDP2 gathers one block at a time, the
cp group splits the latent frames as in training): there is no full-model gather on any rank.
Inputs are dealt round-robin to the data-parallel groups; every rank runs the same number of
sampler calls (a group with fewer inputs repeats one and drops the result), because FSDP's
collectives need every rank in each forward. The cp ranks of a group run the same call.

Determinism: sample i uses its own seed (samples.seed + i) and no global RNG state; the
global CPU/CUDA generators are saved and restored around sampling anyway, so turning samples
on does not change the training stream, and a resumed run writes the same bytes at a step.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cosmos_train.contact_sheet import contact_sheet, sheet_columns, write_png
from cosmos_train.data.video import METAS_DIR, VIDEOS_DIR, read_frames, resize_video, write_mp4
from cosmos_train.errors import CosmosTrainError
from cosmos_train.models.sampler import sample
from cosmos_train.runtime.distributed import log, rank, world_size
from cosmos_train.spec import ExperimentSpec

SAMPLES_DIR = "samples"
SHEET_FILE = "contact_sheet.png"
INDEX_FILE = "samples.json"


def samples_dir(run_dir: Path, step: int) -> Path:
    """RUN_DIR/samples/iter_XXXXXXXXX (the checkpoints' naming)."""
    return Path(run_dir) / SAMPLES_DIR / f"iter_{step:09d}"


@dataclass
class SampleInput:
    """One resolved conditioning input: its name, caption, first frames and text embedding."""

    name: str
    caption: str
    condition: torch.Tensor  # uint8 (3, condition pixel frames, H, W)
    embedding: torch.Tensor  # float32 (512, context_dim), zero padded as the datasets store it


@dataclass
class SampleReport:
    """What one round of sampling did (paths only on rank 0)."""

    step: int
    seconds: float
    videos: dict[str, Path] = field(default_factory=dict)
    sheet: Path | None = None


# ------------------------------------------------------------------------- inputs
def _safe_name(key: str) -> str:
    name = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in key).lstrip(".")
    return name or "clip"


def _dataset_clips(spec: ExperimentSpec, cache_dir: Path) -> list[tuple[object, int]]:
    """(VideoFolderDataset, index) of the first num_clips held-out (else training) clips."""
    from cosmos_train.data.loader import build_dataloader
    from cosmos_train.data.sampler import ConcatDatasets

    split = "val" if spec.data.validation_clips else "train"
    if split == "train":
        log("trainer.samples: data.validation_clips = 0, so samples condition on training clips "
            "(hold clips out to see generalisation)")
    dataset = build_dataloader(spec.data, dp_rank=0, dp_size=1, seed=spec.job.seed, cache_dir=cache_dir,
                               split=split).dataset
    parts = dataset.datasets if isinstance(dataset, ConcatDatasets) else [dataset]
    clips = [(part, i) for part in parts for i in range(len(part))]
    if len(clips) < spec.trainer.samples.num_clips:
        log(f"trainer.samples.num_clips = {spec.trainer.samples.num_clips}, but the {split} split has "
            f"{len(clips)} clips: sampling {len(clips)}")
    return clips[: spec.trainer.samples.num_clips]


def resolve_inputs(spec: ExperimentSpec, *, condition_frames: int, cache_dir: Path) -> list[SampleInput]:
    """The conditioning inputs of `[trainer.samples]`, read and resized to data.video_size.

    Given inputs use `infer`'s readers (an image, or an mp4's last frames; a `.npy` or
    `STORE.zarr:KEY` embedding); errors name the `trainer.samples.inputs[i]` entry.
    """
    from cosmos_train.infer import load_embedding, read_condition_frames

    size = tuple(spec.data.video_size)
    width = spec.model.dit_config().context_dim
    out: list[SampleInput] = []
    for i, given in enumerate(spec.trainer.samples.inputs):
        try:
            cond = read_condition_frames(Path(given.input), size, condition_frames)
            emb, _ = load_embedding(given.prompt_embedding, width=width)
        except CosmosTrainError as e:
            raise CosmosTrainError(f"trainer.samples.inputs[{i}] ({given.name}): {e}") from None
        out.append(SampleInput(given.name, "", cond, emb))
    if out:
        return out
    seen: set[str] = set()
    for ds, i in _dataset_clips(spec, cache_dir):
        key = ds.keys[i]
        frames = read_frames(ds.root / VIDEOS_DIR / f"{key}.mp4", start=0, num_frames=condition_frames)
        cond = resize_video(torch.from_numpy(frames).permute(3, 0, 1, 2), size)  # (3, n, H, W)
        name = _safe_name(key)
        while name in seen:  # the same key in two datasets
            name += "_"
        seen.add(name)
        caption = (ds.root / METAS_DIR / f"{key}.txt").read_text().strip()
        out.append(SampleInput(name, caption, cond, ds.store.get(key)[0]))
    return out


# --------------------------------------------------------------------- generation
def generate(model, tokenizer, inp: SampleInput, *, num_frames: int, num_condition_frames: int,
             steps: int, guidance: float, seed: int, device: torch.device) -> np.ndarray:
    """One clip conditioned on `inp` with `infer`'s sampler: uint8 (T, H, W, 3) on the CPU.

    The negative prompt is the empty (all-zero) embedding, what text dropout trains for.
    """
    _, _, H, W = inp.condition.shape
    C, Tl, Hl, Wl = tokenizer.latent_shape(num_frames, H, W)
    video = torch.zeros(1, 3, num_frames, H, W, dtype=torch.uint8)
    video[0, :, : inp.condition.shape[1]] = inp.condition
    condition_latent = tokenizer.encode(video.to(device))
    emb = inp.embedding[None].to(device)
    latent = sample(model, condition_latent=condition_latent, num_condition_frames=num_condition_frames,
                    shape=(1, C, Tl, Hl, Wl), text_emb=emb, text_mask=None, neg_emb=torch.zeros_like(emb),
                    neg_mask=None, steps=steps, guidance=guidance, seed=seed)
    return tokenizer.decode(latent)[0].permute(1, 2, 3, 0).cpu().numpy()


@torch.no_grad()
def _swap(params: list[torch.Tensor], shadows: list[torch.Tensor]) -> None:
    for p, s in zip(params, shadows):  # exact: copies, one temporary at a time
        tmp = p.detach().clone()
        p.detach().copy_(s)
        s.copy_(tmp)


def _reshard(model: torch.nn.Module) -> None:
    """Free FSDP2's gathered parameters: the root keeps them after a forward (for the backward that
    training would run next), and a later forward would reuse them instead of the sharded values."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextmanager
def sampling_weights(model: torch.nn.Module, ema) -> None:
    """Sample inside the block (with the EMA weights unless `ema` is None); the training weights
    come back exactly, and no gathered copy of either survives the block."""
    pairs = None
    if ema is not None:
        params = dict(model.named_parameters())
        names = list(ema.shadow)
        pairs = ([params[n] for n in names], [ema.shadow[n] for n in names])
    _reshard(model)
    if pairs:
        _swap(*pairs)
    try:
        yield
    finally:
        _reshard(model)
        if pairs:
            _swap(*pairs)


class TrainingSamples:
    """The sampling side of a training run; `due(step)` then `run(model, ema, step)` on every rank."""

    def __init__(self, spec: ExperimentSpec, run_dir: Path, *, tokenizer, device: torch.device,
                 dp_rank: int, dp_size: int, cp_rank: int, cache_dir: Path):
        self.cfg, self.spec, self.run_dir = spec.trainer.samples, spec, Path(run_dir)
        self.every, self.max_iter = spec.trainer.sample_iter, spec.trainer.max_iter
        self.tokenizer, self.device = tokenizer, device
        self.dp_rank, self.dp_size, self.cp_rank = dp_rank, dp_size, cp_rank
        self.num_frames = spec.data.num_frames
        self.k = spec.model.num_condition_frames
        self.condition_pixels = tokenizer.video_frames(self.k)
        self.use_ema = self.cfg.weights == "ema" or (self.cfg.weights == "auto" and spec.model.ema.enabled)
        self.inputs = resolve_inputs(spec, condition_frames=self.condition_pixels, cache_dir=cache_dir)
        self.columns = sheet_columns(self.num_frames, self.cfg.columns)

    def due(self, step: int) -> bool:
        """Sample at every sample_iter-th step and at the last step."""
        return self.every > 0 and (step % self.every == 0 or step == self.max_iter)

    def _mine(self) -> list[int]:
        """Indices of the inputs this rank's dp group generates, padded to the common count."""
        mine = list(range(self.dp_rank, len(self.inputs), self.dp_size))
        calls = -(-len(self.inputs) // self.dp_size)
        return mine + [-1] * (calls - len(mine))  # -1: a call whose result is dropped

    def run(self, model: torch.nn.Module, ema, step: int) -> SampleReport:
        """Generate, write the mp4s (cp-rank 0 of each dp group) and the contact sheet (rank 0)."""
        if self.device.type == "cuda":  # queued training work finishes first: it is not sampling time
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = samples_dir(self.run_dir, step)
        out.mkdir(parents=True, exist_ok=True)
        was_training = model.training
        model.eval()
        rows: list[tuple[int, np.ndarray]] = []
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), sampling_weights(model, ema if self.use_ema else None):
                for i in self._mine():
                    frames = generate(model, self.tokenizer, self.inputs[max(i, 0)], num_frames=self.num_frames,
                                      num_condition_frames=self.k, steps=self.cfg.steps, guidance=self.cfg.guidance,
                                      seed=self.cfg.seed + max(i, 0), device=self.device)
                    if i >= 0 and self.cp_rank == 0:
                        path = out / f"{self.inputs[i].name}.mp4"
                        tmp = path.with_name(f".{path.name}.tmp.mp4")
                        write_mp4(tmp, frames, fps=self.cfg.fps, lossless=False)
                        tmp.replace(path)
                        rows.append((i, frames[self.columns]))
        finally:
            model.train(was_training)
        rows = _gather_to_rank0(rows)
        report = SampleReport(step=step, seconds=0.0)
        if rows is not None:
            rows.sort(key=lambda r: r[0])
            labels = [self._label(i) for i, _ in rows]
            sheet = contact_sheet(list(zip(labels, (f for _, f in rows))), self.columns,
                                  condition_frames=self.condition_pixels)
            report.sheet = write_png(sheet, out / SHEET_FILE)
            report.videos = {self.inputs[i].name: out / f"{self.inputs[i].name}.mp4" for i, _ in rows}
            self._write_index(out, step)
        report.seconds = time.perf_counter() - start
        return report

    def _label(self, i: int) -> str:
        inp = self.inputs[i]
        return f"{inp.name}: {inp.caption}"[:120] if inp.caption else inp.name

    def _write_index(self, out: Path, step: int) -> None:
        index = {"step": step, "weights": "ema" if self.use_ema else "regular", "steps": self.cfg.steps,
                 "guidance": self.cfg.guidance, "num_frames": self.num_frames,
                 "condition_frames": self.condition_pixels, "sheet_columns": self.columns,
                 "samples": [{"name": inp.name, "caption": inp.caption, "seed": self.cfg.seed + i,
                              "video": f"{inp.name}.mp4"} for i, inp in enumerate(self.inputs)]}
        tmp = out / f".{INDEX_FILE}.tmp"
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        tmp.replace(out / INDEX_FILE)


def _gather_to_rank0(rows: list) -> list | None:
    """Every rank's rows on global rank 0 (None elsewhere); only the sheet's frames travel."""
    if world_size() == 1:
        return rows
    gathered = [None] * world_size() if rank() == 0 else None
    dist.gather_object(rows, gathered, dst=0)
    if rank() != 0:
        return None
    return [r for part in gathered for r in part]
