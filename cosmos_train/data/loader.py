"""Build the train / validation data loader of a run from its `DataSpec`.

The loader wraps a torch DataLoader and owns the sampler state: the position advances when a
batch is handed to the caller (not when workers prefetch indices), so `state_dict()` after N
batches, loaded into a new loader, continues with batch N+1 exactly, also at another dp_size.

Validation: the last `data.validation_clips` keys (sorted) of each dataset are held out from
"train" and form "val", read in order with fixed windows (every pass yields the same batches;
the last step wraps around so every clip is seen).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Literal

import torch
from torch.utils.data import DataLoader

from cosmos_train.data.sampler import ConcatDatasets, GlobalStreamSampler, WeightedStreamSampler
from cosmos_train.data.synthetic import ensure_synthetic_dataset
from cosmos_train.data.video import VideoFolderDataset
from cosmos_train.errors import CosmosTrainError
from cosmos_train.spec import DataSpec

SYNTHETIC_SEED = 0  # the generated clips do not change with job.seed, so runs can be compared


class VideoLoader:
    """Iterable of batches (dicts of stacked tensors; `caption`/`key` as lists) with sampler state."""

    def __init__(self, dataset, sampler, *, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                 rewind: bool = False):
        self.dataset, self.sampler = dataset, sampler
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.rewind = rewind  # validation: every pass starts from the beginning

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return self.sampler.steps_left()

    def __iter__(self) -> Iterator[dict]:
        """Batches from the current position to the end of the epoch (then the next epoch starts)."""
        if self.rewind:
            self.sampler.load_state_dict({"epoch": 0, "position": 0})
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                            num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=False)
        for batch in loader:
            self.sampler.advance()
            yield batch

    def batches(self) -> Iterator[dict]:
        """Batches forever, epoch after epoch."""
        while True:
            empty = True
            for batch in self:
                empty = False
                yield batch
            if empty:
                raise RuntimeError("the sampler produced an empty epoch")

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """`{"epoch", "position"}` of the global sample stream (independent of dp_size)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def dataset_dirs(data: DataSpec, *, cache_dir: Path) -> list[tuple[Path, float]]:
    """The (dataset directory, weight) pairs of a spec; generates the synthetic dataset if needed."""
    if data.kind == "synthetic":
        if data.datasets:
            raise CosmosTrainError("data.datasets: needs data.kind = \"video_folder\" (synthetic data is one dataset)")
        root = Path(data.dataset_dir) if data.dataset_dir else Path(cache_dir)
        path = ensure_synthetic_dataset(root, num_clips=data.num_synthetic_clips, num_frames=data.num_frames,
                                        video_size=tuple(data.video_size), seed=SYNTHETIC_SEED)
        return [(path, 1.0)]
    if data.datasets:
        return [(Path(e.dataset_dir), e.weight) for e in data.datasets]
    return [(Path(data.dataset_dir), 1.0)]


def _split(full: VideoFolderDataset, n_val: int, split: str) -> VideoFolderDataset:
    if n_val == 0:
        return full
    if n_val >= len(full):
        raise CosmosTrainError(f"data.validation_clips: {n_val} held-out clips leave nothing to train on in "
                               f"{full.root} ({len(full)} usable clips)")
    return full.subset(full.keys[-n_val:] if split == "val" else full.keys[:-n_val])


def _dataset(path: Path, data: DataSpec, tokenizer) -> VideoFolderDataset:
    """Videos, or cached latents when `data.latents` and the cache agree (see `data/latents.py`)."""
    kwargs = dict(num_frames=data.num_frames, video_size=tuple(data.video_size), short_clips=data.short_clips,
                  bad_clips=data.bad_clips)
    store = None
    if tokenizer is not None and data.kind == "video_folder":
        from cosmos_train.data.latents import CachedLatentDataset, cache_attrs, open_cache

        store = open_cache(path, latents=data.latents, attrs=cache_attrs(tokenizer, num_frames=data.num_frames,
                                                                         video_size=tuple(data.video_size)))
        if store is not None:
            return CachedLatentDataset(path, store=store, **kwargs)
    if data.latents == "cached" and store is None:
        raise CosmosTrainError("data.latents = \"cached\" needs data.kind = \"video_folder\" and a tokenizer")
    return VideoFolderDataset(path, **kwargs)


def build_dataloader(data: DataSpec, *, dp_rank: int, dp_size: int, seed: int, cache_dir: Path,
                     split: Literal["train", "val"] = "train", pin_memory: bool = False,
                     tokenizer=None) -> VideoLoader:
    """The loader of this dp rank for `split`; cp ranks of one dp group pass the same dp_rank.

    With `tokenizer`, `data.latents` decides whether batches carry `latent` (a matching cache)
    or `video` (encoded by the caller).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val' (got {split!r})")
    if split == "val" and data.validation_clips == 0:
        raise CosmosTrainError("data.validation_clips is 0: there is no validation split; set it > 0")
    dirs = dataset_dirs(data, cache_dir=cache_dir)
    parts = [_split(_dataset(d, data, tokenizer), data.validation_clips, split) for d, _ in dirs]
    dataset = parts[0] if len(parts) == 1 else ConcatDatasets(parts)
    common = dict(seed=seed, dp_rank=dp_rank, dp_size=dp_size, batch_size=data.batch_size)
    if split == "val":
        sampler = GlobalStreamSampler(len(dataset), shuffle=False, drop_last=False, **common)
    else:
        need = dp_size * data.batch_size
        if len(dataset) < need:
            raise CosmosTrainError(
                f"data: {len(dataset)} training clips, but one step needs dp_size x data.batch_size = "
                f"{dp_size} x {data.batch_size} = {need}; add clips (data.num_synthetic_clips for synthetic "
                f"data) or lower data.batch_size")
        if len(parts) == 1:
            sampler = GlobalStreamSampler(len(dataset), **common)
        else:
            sampler = WeightedStreamSampler([len(p) for p in parts], [w for _, w in dirs], **common)
    return VideoLoader(dataset, sampler, batch_size=data.batch_size, num_workers=data.num_workers,
                       pin_memory=pin_memory and torch.cuda.is_available(), rewind=split == "val")
