"""Video folder dataset in the upstream layout, decoded with PyAV.

    DATASET/metas/<key>.txt      caption
    DATASET/videos/<key>.mp4     clip
    DATASET/t5_xxl.zarr          text embeddings (see `embeddings.py`)

An item is a random contiguous window of `num_frames` frames (a clip with exactly `num_frames`
frames is valid: its only window starts at 0), resized to `video_size` (H, W) by direct bilinear
interpolation with antialiasing on float values, rounded back to uint8 (the aspect ratio is not
preserved, as upstream). The window start comes from a `torch.Generator` seeded per sample, so an
item is reproducible from its (index, seed).

Item: video uint8 (C, T, H, W), t5_text_embeddings float32 (512, 1024), t5_text_mask bool (512,)
(True = real token), caption str, key str.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cosmos_train.data.embeddings import PICKLE_DIR, STORE_NAME, EmbeddingStore
from cosmos_train.data.sampler import SampleRef
from cosmos_train.errors import CosmosTrainError

METAS_DIR = "metas"
VIDEOS_DIR = "videos"
_LIST_LIMIT = 20  # clips named in one message before "... and N more"


class BadClipError(CosmosTrainError):
    """A clip whose frames cannot be decoded (corrupt packets); its message names the file."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    height: int
    width: int
    fps: float


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, size and fps from the container metadata (counts packets if the count is absent)."""
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise CosmosTrainError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            frames = stream.frames
            if frames <= 0:  # some muxers leave nb_frames empty: count packets (no decoding)
                frames = sum(1 for p in container.demux(stream) if p.size > 0)
            rate = stream.average_rate or stream.guessed_rate
            return VideoInfo(frames=int(frames), height=stream.codec_context.height,
                             width=stream.codec_context.width, fps=float(rate) if rate else 0.0)
    except av.error.FFmpegError as e:
        raise CosmosTrainError(f"{path}: cannot read video: {e}") from None


def _frames(container: "av.container.InputContainer", path: Path):
    """The clip's decoded frames, in order; BadClipError when it has no video stream."""
    if not container.streams.video:
        raise BadClipError(f"{path}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container.decode(stream)


def read_frames(path: str | Path, *, start: int, num_frames: int) -> np.ndarray:
    """Decode frames [start, start + num_frames) as uint8 (T, H, W, 3) RGB."""
    path = Path(path)
    out: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            # Sequential decode from the first frame: exact for any frame timing, at the cost of
            # decoding the frames before the window.
            for i, frame in enumerate(_frames(container, path)):
                if i >= start:
                    out.append(frame.to_ndarray(format="rgb24"))
                    if len(out) == num_frames:
                        break
    except av.error.FFmpegError as e:
        raise BadClipError(f"{path}: cannot decode frame {start + len(out)}: {e}") from None
    if len(out) < num_frames:
        raise CosmosTrainError(f"{path}: decoded only {start + len(out)} frames, needed frames "
                               f"{start}..{start + num_frames - 1} (the container metadata is wrong?)")
    return np.stack(out)


def decode_all(path: str | Path) -> int:
    """Decode every frame of the clip (what `data check --decode` does); returns the count.

    Raises BadClipError naming the file and the first frame that fails.
    """
    path = Path(path)
    n = 0
    try:
        with av.open(str(path)) as container:
            for _ in _frames(container, path):
                n += 1
    except av.error.FFmpegError as e:
        raise BadClipError(f"{path}: cannot decode frame {n}: {e}") from None
    return n


def resize_video(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize uint8 (C, T, H, W) to (C, T, *size): bilinear + antialias in float, rounded to uint8."""
    if tuple(video.shape[-2:]) == tuple(size):
        return video
    x = video.permute(1, 0, 2, 3).float()  # (T, C, H, W): frames as the batch
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(1, 0, 2, 3).contiguous()


def write_mp4(path: str | Path, frames: np.ndarray, *, fps: int = 24, lossless: bool = True) -> None:
    """Write uint8 (T, H, W, 3) RGB frames as an mp4.

    lossless: H.264 RGB at qp 0 (libx264rgb; exact, what the datasets use). Otherwise H.264
    yuv420p at crf 18, which every player shows (needs even H and W).
    """
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) uint8 (got {frames.shape})")
    if lossless and "libx264rgb" in av.codecs_available:
        codec, pix_fmt, options = "libx264rgb", "rgb24", {"qp": "0", "preset": "ultrafast"}
    elif "libx264" in av.codecs_available:
        if lossless is False and (frames.shape[1] % 2 or frames.shape[2] % 2):
            raise ValueError(f"yuv420p needs even frame sizes (got {frames.shape[1]}x{frames.shape[2]})")
        codec, pix_fmt, options = "libx264", "yuv444p" if lossless else "yuv420p", {"crf": "0" if lossless else "18"}
    else:
        codec, pix_fmt, options = "mpeg4", "yuv420p", {"qscale": "1"}
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = pix_fmt
        stream.options = options
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def frame_rule(num_frames: int) -> str:
    """Why clips need num_frames frames and what 4k+1 means (appended to short-clip messages)."""
    return (f"every clip needs at least num_frames = {num_frames} frames; num_frames must be 4k+1 because the "
            f"video tokenizer keeps the first frame and compresses the rest 4x in time "
            f"({num_frames} frames -> {(num_frames - 1) // 4 + 1} latent frames)")


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else "")


@dataclass
class Layout:
    """The clip keys found in each part of a dataset directory."""

    captions: set[str]
    videos: set[str]
    embeddings: set[str] | None  # None: no zarr store
    pickles: set[str]

    @property
    def clips(self) -> list[str]:
        """Keys with a caption, a video and an embedding."""
        return sorted(self.captions & self.videos & (self.embeddings or set()))


def scan_layout(dataset_dir: str | Path) -> Layout:
    """List the keys under metas/, videos/, t5_xxl.zarr and t5_xxl/ of a dataset directory."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise CosmosTrainError(f"{root}: dataset directory not found")

    def stems(sub: str, pattern: str) -> set[str]:
        d = root / sub
        return {p.stem for p in d.glob(pattern) if p.is_file()} if d.is_dir() else set()

    store = root / STORE_NAME
    embeddings = set(EmbeddingStore(store).keys()) if (store / "zarr.json").is_file() else None
    return Layout(captions=stems(METAS_DIR, "*.txt"), videos=stems(VIDEOS_DIR, "*.mp4"),
                  embeddings=embeddings, pickles=stems(PICKLE_DIR, "*.pickle"))


def _layout_errors(root: Path, layout: Layout) -> list[str]:
    errors = []
    if layout.embeddings is None:
        hint = (" (found t5_xxl/*.pickle: run `cosmos-train data convert-embeddings " f"{root}`)"
                if layout.pickles else "")
        errors.append(f"{root / STORE_NAME}: missing text-embedding store{hint}")
    no_video = sorted(layout.captions - layout.videos)
    no_caption = sorted(layout.videos - layout.captions)
    no_embedding = sorted((layout.captions & layout.videos) - (layout.embeddings or set()))
    if no_video:
        errors.append(f"captions without a video in {VIDEOS_DIR}/: {_names(no_video)}")
    if no_caption:
        errors.append(f"videos without a caption in {METAS_DIR}/: {_names(no_caption)}")
    if no_embedding and layout.embeddings is not None:
        errors.append(f"clips without a text embedding in {STORE_NAME}: {_names(no_embedding)}")
    return errors


class VideoFolderDataset(Dataset):
    """Map-style dataset over `DATASET/{metas,videos,t5_xxl.zarr}`; see the module docstring.

    `keys` restricts the dataset to those clips (e.g. a train/validation split). Indexing with an
    int uses the index as the window seed; samplers pass `SampleRef(index, seed)`.
    """

    def __init__(self, dataset_dir: str | Path, *, num_frames: int, video_size: tuple[int, int],
                 short_clips: Literal["skip", "error"] = "skip", keys: Sequence[str] | None = None,
                 bad_clips: Literal["skip", "error"] = "skip"):
        self.root = Path(dataset_dir)
        self.bad_clips = bad_clips
        self._warned: set[str] = set()
        self.num_frames = num_frames
        self.video_size = (int(video_size[0]), int(video_size[1]))
        layout = scan_layout(self.root)
        errors = _layout_errors(self.root, layout)
        if errors:
            raise CosmosTrainError(f"{self.root}: dataset is incomplete:\n" + "\n".join(errors) +
                                   f"\n(run `cosmos-train data check {self.root}` for a full report)")
        candidates = layout.clips if keys is None else sorted(keys)
        unknown = sorted(set(candidates) - set(layout.clips))
        if unknown:
            raise CosmosTrainError(f"{self.root}: no such clips: {_names(unknown)}")
        frames = {k: probe_video(self.root / VIDEOS_DIR / f"{k}.mp4").frames for k in candidates}
        short = [k for k in candidates if frames[k] < num_frames]
        if short:
            listing = _names([f"{k} ({frames[k]} frames)" for k in short])
            message = (f"{self.root}: {len(short)} of {len(candidates)} clips are shorter than "
                       f"{num_frames} frames: {listing}; {frame_rule(num_frames)}")
            if short_clips == "error":
                raise CosmosTrainError(message + "\n(set data.short_clips = \"skip\" to skip them, "
                                       "or lower data.num_frames)")
            if len(short) == len(candidates):
                raise CosmosTrainError(message + "\nno clip is long enough: lower data.num_frames")
            warnings.warn(message + ". These clips are skipped (data.short_clips = \"skip\")", stacklevel=2)
        self.keys: list[str] = [k for k in candidates if frames[k] >= num_frames]
        self.frame_counts: list[int] = [frames[k] for k in self.keys]
        self.store = EmbeddingStore(self.root / STORE_NAME)

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, keys: Sequence[str]) -> "VideoFolderDataset":
        """The same dataset restricted to `keys` (without probing the videos again)."""
        pos = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in pos]
        if missing:
            raise CosmosTrainError(f"{self.root}: no such usable clips: {_names(missing)}")
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.keys = sorted(keys)
        out.frame_counts = [self.frame_counts[pos[k]] for k in out.keys]
        return out

    def window_start(self, index: int, generator: torch.Generator) -> int:
        """The first frame of a random window of num_frames frames of clip `index`."""
        return int(torch.randint(0, self.frame_counts[index] - self.num_frames + 1, (1,), generator=generator))

    def __getitem__(self, item: int | SampleRef) -> dict:
        index, seed = (item, item) if isinstance(item, int) else (item.index, item.seed)
        # A clip that fails to decode is replaced by the next clip in key order (same window seed):
        # a function of (index, seed) and the files only, so the sample order stays resumable.
        for step in range(len(self.keys)):
            i = (index + step) % len(self.keys)
            try:
                return self._load(i, seed)
            except BadClipError as e:
                if self.bad_clips == "error":
                    raise BadClipError(f"{e}\n(set data.bad_clips = \"skip\" to skip such clips; "
                                       f"`cosmos-train data check --decode {self.root}` lists them all)") from None
                if self.keys[i] not in self._warned:
                    self._warned.add(self.keys[i])
                    warnings.warn(f"{e}; skipping clip {self.keys[i]} (data.bad_clips = \"skip\")", stacklevel=2)
        raise CosmosTrainError(f"{self.root}: no clip can be decoded (run `cosmos-train data check --decode "
                               f"{self.root}`)")

    def _load(self, index: int, seed: int) -> dict:
        key = self.keys[index]
        start = self.window_start(index, torch.Generator().manual_seed(seed))
        frames = read_frames(self.root / VIDEOS_DIR / f"{key}.mp4", start=start, num_frames=self.num_frames)
        video = torch.from_numpy(frames).permute(3, 0, 1, 2)  # (T, H, W, C) -> (C, T, H, W)
        emb, mask = self.store.get(key)
        return {
            "video": resize_video(video, self.video_size),
            "t5_text_embeddings": emb,
            "t5_text_mask": mask,
            "caption": (self.root / METAS_DIR / f"{key}.txt").read_text().strip(),
            "key": key,
        }

