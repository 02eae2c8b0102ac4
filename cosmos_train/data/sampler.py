"""Samplers defined over one global sample stream, so data order survives resume and resizing.

The stream of epoch e is a list of `num_samples` positions. Global step s consumes the
`dp_size * batch_size` positions starting at `position`; data-parallel rank r takes the r-th
`batch_size` slice of them, so dp ranks see disjoint samples and context-parallel ranks (which
share a dp_rank) see the same ones. The state is `{"epoch", "position"}` (samples of the global
stream consumed in that epoch); it does not depend on dp_size, so a run resumed with another
dp_size continues the same global order from the same position.

Each position also carries a window seed (from seed, epoch, position), handed to the dataset in a
`SampleRef`, so the random crop of a sample does not depend on which rank or worker loads it.

- `GlobalStreamSampler`: epoch e is a permutation of range(num_samples) seeded from (seed, e).
- `WeightedStreamSampler` (over `ConcatDatasets`): each position draws its dataset from the
  weights with a generator seeded per block of positions; within a dataset, clips are taken from
  per-dataset permutations (without replacement until that dataset is exhausted, then the next
  permutation). Any position can be recomputed from the seed, so it resumes by position too.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

_BLOCK = 1024  # positions whose dataset draws share one generator (weighted sampler)


class SampleRef(NamedTuple):
    """What a sampler hands to a dataset: which item, and the seed of its random window."""

    index: int
    seed: int


def _mix(*words: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence: stable across platforms and versions)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0] >> 1)


class _StreamSampler(Sampler[SampleRef]):
    """Rank slicing, state and epochs over a global stream; subclasses map positions to indices."""

    def __init__(self, num_samples: int, *, seed: int, dp_rank: int, dp_size: int, batch_size: int,
                 drop_last: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size) (got {dp_rank}, dp_size {dp_size})")
        if num_samples <= 0 or batch_size <= 0:
            raise ValueError(f"need num_samples > 0 and batch_size > 0 (got {num_samples}, {batch_size})")
        self.num_samples = num_samples
        self.seed, self.dp_rank, self.dp_size, self.batch_size = seed, dp_rank, dp_size, batch_size
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0

    @property
    def global_batch(self) -> int:
        """Samples of the stream consumed by one step of all dp ranks."""
        return self.dp_size * self.batch_size

    @abstractmethod
    def _indices(self, epoch: int, positions: Sequence[int]) -> list[int]:
        """Dataset indices at these positions of the epoch's stream."""

    def steps_left(self) -> int:
        """Steps until the end of the current epoch."""
        left = self.num_samples - self.position
        return left // self.global_batch if self.drop_last else -(-left // self.global_batch)

    def __len__(self) -> int:
        return self.steps_left() * self.batch_size

    def __iter__(self) -> Iterator[SampleRef]:
        # Reads the state but does not change it: the loader calls `advance` per batch it hands
        # out, because DataLoader workers pull indices ahead of what training consumed.
        epoch, start = self.epoch, self.position
        for step in range(self.steps_left()):
            lo = start + step * self.global_batch + self.dp_rank * self.batch_size
            positions = [p % self.num_samples for p in range(lo, lo + self.batch_size)]  # wraps: drop_last=False
            for pos, index in zip(positions, self._indices(epoch, positions)):
                yield SampleRef(index, _mix(self.seed, 1, epoch, pos))

    def advance(self, steps: int = 1) -> None:
        """Mark `steps` global steps as consumed; moves to the next epoch when this one is done."""
        self.position += steps * self.global_batch
        if self.steps_left() <= 0:
            self.epoch, self.position = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning; a no-op if already in it (keeps a resumed position).

        Calling it is optional: the stream moves to the next epoch by itself.
        """
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"sampler position {position} outside [0, {self.num_samples}]: "
                             f"the dataset changed size since the checkpoint")
        self.epoch, self.position = epoch, position
        if self.steps_left() <= 0:
            self.epoch, self.position = epoch + 1, 0


class GlobalStreamSampler(_StreamSampler):
    """Per-epoch seeded permutation of range(num_samples), sliced by dp rank (see module doc).

    `shuffle=False` keeps the natural order (validation); `drop_last=False` completes the last
    step by wrapping to the start of the epoch, so every sample is seen at least once.
    """

    def __init__(self, num_samples: int, *, seed: int, dp_rank: int, dp_size: int, batch_size: int,
                 shuffle: bool = True, drop_last: bool = True):
        super().__init__(num_samples, seed=seed, dp_rank=dp_rank, dp_size=dp_size, batch_size=batch_size,
                         drop_last=drop_last)
        self.shuffle = shuffle
        self._perm: tuple[int, torch.Tensor] | None = None

    def _indices(self, epoch: int, positions: Sequence[int]) -> list[int]:
        if not self.shuffle:
            return list(positions)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, 0, epoch))
            self._perm = (epoch, torch.randperm(self.num_samples, generator=g))
        perm = self._perm[1]
        return [int(perm[p]) for p in positions]


class ConcatDatasets(Dataset):
    """Datasets side by side; accepts `SampleRef`s (the torch ConcatDataset only takes ints)."""

    def __init__(self, datasets: Sequence[Dataset]):
        if not datasets:
            raise ValueError("ConcatDatasets needs at least one dataset")
        self.datasets = list(datasets)
        self.sizes = [len(d) for d in self.datasets]
        self.offsets = np.cumsum([0, *self.sizes]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset number, index inside it) of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        d = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return d, index - self.offsets[d]

    def __getitem__(self, item: int | SampleRef):
        index, seed = (item, item) if isinstance(item, int) else item
        d, local = self.locate(index)
        return self.datasets[d][SampleRef(local, seed)]


class WeightedStreamSampler(_StreamSampler):
    """Draws the dataset of each position from `weights`; see the module docstring.

    An epoch is `sum(sizes)` positions (the stream itself runs on across epochs).
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], *, seed: int, dp_rank: int,
                 dp_size: int, batch_size: int):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"need one weight per dataset (got {len(sizes)} sizes, {len(weights)} weights)")
        if min(sizes) <= 0 or min(weights) <= 0:
            raise ValueError(f"sizes and weights must be > 0 (got {list(sizes)}, {list(weights)})")
        super().__init__(sum(sizes), seed=seed, dp_rank=dp_rank, dp_size=dp_size, batch_size=batch_size)
        self.sizes = list(sizes)
        self.offsets = np.cumsum([0, *self.sizes]).tolist()
        w = np.asarray(weights, dtype=np.float64)
        self.probs = w / w.sum()
        self._cum_counts: list[np.ndarray] = [np.zeros(len(sizes), dtype=np.int64)]  # before block b
        self._choices: dict[int, np.ndarray] = {}
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def _block_choices(self, block: int) -> np.ndarray:
        if block not in self._choices:
            if len(self._choices) > 4:
                self._choices.clear()
            rng = np.random.Generator(np.random.PCG64(_mix(self.seed, 2, block)))
            self._choices[block] = rng.choice(len(self.sizes), size=_BLOCK, p=self.probs)
        return self._choices[block]

    def _counts_before(self, block: int) -> np.ndarray:
        # Draws of each dataset in all earlier blocks; grows incrementally (O(blocks) once).
        while len(self._cum_counts) <= block:
            b = len(self._cum_counts) - 1
            counts = np.bincount(self._block_choices(b), minlength=len(self.sizes))
            self._cum_counts.append(self._cum_counts[-1] + counts)
        return self._cum_counts[block]

    def _perm(self, d: int, cycle: int) -> torch.Tensor:
        if (d, cycle) not in self._perms:
            if len(self._perms) > 4 * len(self.sizes):
                self._perms.clear()
            g = torch.Generator().manual_seed(_mix(self.seed, 3, d, cycle))
            self._perms[(d, cycle)] = torch.randperm(self.sizes[d], generator=g)
        return self._perms[(d, cycle)]

    def dataset_of(self, epoch: int, position: int) -> tuple[int, int]:
        """(dataset, how many earlier positions of the stream drew that dataset)."""
        q = epoch * self.num_samples + position
        block, offset = divmod(q, _BLOCK)
        choices = self._block_choices(block)
        d = int(choices[offset])
        return d, int(self._counts_before(block)[d] + np.count_nonzero(choices[:offset] == d))

    def _indices(self, epoch: int, positions: Sequence[int]) -> list[int]:
        out = []
        for pos in positions:
            d, k = self.dataset_of(epoch, pos)
            cycle, i = divmod(k, self.sizes[d])
            out.append(self.offsets[d] + int(self._perm(d, cycle)[i]))
        return out
