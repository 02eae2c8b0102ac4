"""VAE latent cache: `data encode` writes `DATASET/latents.zarr`, training reads it (`data.latents`).

Upstream encodes every clip with the VAE at every step; for LoRA post-training on a fixed dataset
that is repeated work. The cache holds one float32 latent per clip, encoded from the clip's
first `num_frames` frames (the window is fixed: on clips longer than num_frames, training on the
cache sees that window only, where on-the-fly encoding draws a random one).

Store layout (zarr v3 group):

    latents.zarr/
      zarr.json      attrs {"format": "cosmos_train.latents", "version": 1, "tokenizer": {...identity},
                            "num_frames": T, "video_size": [H, W], "latent_shape": [C, T', H', W']}
      <key>/         float32 (C, T', H', W'), one chunk, zstd; attrs {"complete": true} written last

A cache made with another VAE (weights digest), tokenizer kind, resolution or frame count is
refused with the difference named; the source path of the VAE is recorded but not compared (the
same weights in the diffusers and upstream layouts give the same latents).
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cosmos_train.data.video import METAS_DIR, VIDEOS_DIR, VideoFolderDataset, read_frames, resize_video
from cosmos_train.errors import CosmosTrainError

CACHE_NAME = "latents.zarr"
_FORMAT = "cosmos_train.latents"
_NOT_COMPARED = ("source",)


def cache_attrs(tokenizer, *, num_frames: int, video_size: tuple[int, int]) -> dict:
    """The group attributes a cache made by `tokenizer` at these settings carries."""
    H, W = video_size
    return {"format": _FORMAT, "version": 1, "tokenizer": tokenizer.identity(), "num_frames": num_frames,
            "video_size": [H, W], "latent_shape": list(tokenizer.latent_shape(num_frames, H, W))}


def differences(saved: dict, wanted: dict) -> list[str]:
    """Human-readable differences between a cache's attributes and the ones the spec asks for."""
    out = []
    for name in ("num_frames", "video_size", "latent_shape"):
        if saved.get(name) != wanted[name]:
            out.append(f"{name}: cache {saved.get(name)}, spec {wanted[name]}")
    a, b = saved.get("tokenizer") or {}, wanted["tokenizer"]
    for name in sorted(set(a) | set(b)):
        if name in _NOT_COMPARED or a.get(name) == b.get(name):
            continue
        if name == "weights":  # a digest alone says little: name where each VAE came from
            out.append(f"VAE weights: cache {a.get(name)} from {a.get('source', '?')}, "
                       f"spec {b.get(name)} from {b.get('source', '?')}")
        else:
            out.append(f"tokenizer {name}: cache {a.get(name)}, spec {b.get(name)}")
    return out


class LatentStore:
    """Read (`mode="r"`) or write (`mode="a"`, with the attrs to create it with) a latent cache."""

    def __init__(self, path: str | Path, *, mode: str = "r", attrs: dict | None = None):
        self.path, self.mode = Path(path), mode
        if mode == "r":
            if not (self.path / "zarr.json").is_file():
                raise CosmosTrainError(f"{self.path}: no latent cache here; make it with "
                                       f"`cosmos-train data encode DATASET_DIR --spec SPEC`")
            self._group = zarr.open_group(self.path, mode="r")
            if self._group.attrs.get("format") != _FORMAT:
                raise CosmosTrainError(f"{self.path}: not a cosmos_train latent cache")
        elif mode == "a":
            if attrs is None:
                raise ValueError("mode 'a' needs the attrs of the cache")
            self._group = zarr.open_group(self.path, mode="a")
            if self._group.attrs.get("format") != _FORMAT:
                self._group.attrs.update(attrs)
        else:
            raise ValueError(f"mode must be 'r' or 'a' (got {mode!r})")

    def __getstate__(self):  # DataLoader workers reopen the store
        return {"path": self.path, "mode": "r"}

    def __setstate__(self, state):
        self.__init__(state["path"], mode="r")

    @property
    def attrs(self) -> dict:
        return dict(self._group.attrs)

    def keys(self) -> list[str]:
        """Sorted keys of the completely written latents."""
        return sorted(name for name, arr in self._group.arrays() if arr.attrs.get("complete"))

    def get(self, key: str) -> torch.Tensor:
        """float32 (C, T', H', W')."""
        try:
            arr = self._group[key]
        except KeyError:
            raise CosmosTrainError(f"{self.path}: no latent for clip '{key}'; rerun `cosmos-train data encode`") \
                from None
        return torch.from_numpy(np.asarray(arr[...], dtype=np.float32))

    def put(self, key: str, latent: torch.Tensor) -> None:
        data = latent.detach().float().cpu().numpy()
        arr = self._group.create_array(key, shape=data.shape, dtype="float32", chunks=data.shape, overwrite=True)
        arr[...] = data
        arr.attrs["complete"] = True  # last: an interrupted write is not listed and is redone


# ---------------------------------------------------------------- training
def open_cache(dataset_dir: Path, *, latents: str, attrs: dict) -> LatentStore | None:
    """The cache training should read for `dataset_dir` under `data.latents`, or None (encode on the fly)."""
    path = Path(dataset_dir) / CACHE_NAME
    if latents == "video" or (latents == "auto" and not (path / "zarr.json").is_file()):
        return None
    store = LatentStore(path)
    diff = differences(store.attrs, attrs)
    if diff:
        message = f"{path}: the latent cache does not match the spec: " + "; ".join(diff)
        if latents == "cached":
            raise CosmosTrainError(message + " (re-encode with `cosmos-train data encode --overwrite`)")
        warnings.warn(message + "; encoding on the fly (data.latents = \"auto\")", stacklevel=2)
        return None
    return store


class CachedLatentDataset(VideoFolderDataset):
    """`VideoFolderDataset` whose items carry `latent` (from the cache) instead of `video`."""

    def __init__(self, dataset_dir, *, store: LatentStore, **kwargs):
        super().__init__(dataset_dir, **kwargs)
        missing = sorted(set(self.keys) - set(store.keys()))
        if missing:
            raise CosmosTrainError(f"{store.path}: {len(missing)} clips have no cached latent, e.g. {missing[:3]}; "
                                   f"run `cosmos-train data encode {self.root} --spec SPEC`")
        self.latents = store

    def __getitem__(self, item) -> dict:
        index = item if isinstance(item, int) else item.index
        key = self.keys[index]
        emb, mask = self.store.get(key)
        return {"latent": self.latents.get(key), "t5_text_embeddings": emb, "t5_text_mask": mask,
                "caption": (self.root / METAS_DIR / f"{key}.txt").read_text().strip(), "key": key}


# ---------------------------------------------------------------- encoding
@dataclass
class EncodeReport:
    """What `encode_dataset` did."""

    store: Path
    encoded: list[str] = field(default_factory=list)
    skipped_existing: list[str] = field(default_factory=list)
    longer_than_window: list[str] = field(default_factory=list)


def encode_dataset(dataset_dir: str | Path, tokenizer, *, num_frames: int, video_size: tuple[int, int],
                   device: torch.device | str = "cpu", short_clips: str = "skip", out: str | Path | None = None,
                   overwrite: bool = False, show_progress: bool = True) -> EncodeReport:
    """Encode the first `num_frames` frames of every usable clip into the latent cache (resumable).

    Usable clips are those training would read (caption, video and text embedding present, long enough).
    """
    dataset = VideoFolderDataset(dataset_dir, num_frames=num_frames, video_size=video_size, short_clips=short_clips)
    path = Path(out) if out is not None else dataset.root / CACHE_NAME
    attrs = cache_attrs(tokenizer, num_frames=num_frames, video_size=tuple(video_size))
    if (path / "zarr.json").is_file():
        diff = differences(LatentStore(path).attrs, attrs)
        if diff and not overwrite:
            raise CosmosTrainError(f"{path}: a latent cache with other settings exists: " + "; ".join(diff) +
                                   " (pass --overwrite to replace it)")
        if diff:
            shutil.rmtree(path)
    store = LatentStore(path, mode="a", attrs=attrs)
    existing = set() if overwrite else set(store.keys())
    report = EncodeReport(store=path)
    device = torch.device(device)
    columns = (TextColumn("encoding latents"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress, transient=True) as progress:
        for key, frames in progress.track(list(zip(dataset.keys, dataset.frame_counts))):
            if frames > num_frames:
                report.longer_than_window.append(key)
            if key in existing:
                report.skipped_existing.append(key)
                continue
            video = torch.from_numpy(read_frames(dataset.root / VIDEOS_DIR / f"{key}.mp4", start=0,
                                                 num_frames=num_frames)).permute(3, 0, 1, 2)
            latent = tokenizer.encode(resize_video(video, tuple(video_size))[None].to(device))[0]
            store.put(key, latent)
            report.encoded.append(key)
    return report
