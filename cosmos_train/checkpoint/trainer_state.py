"""The `trainer` checkpoint part: step, per-rank RNG states, data sampler position, grad scaler.

DCP keys written (flattened by DCP):
    step                    int, same on every rank (deduplicated)
    seed                    int
    world_size              int, of the run that saved
    sampler.<k>             the sampler's state_dict (global: equal on every dp rank)
    grad_scaler.<k>         GradScaler state, if any
    rng.rank<R>             one blob per rank: torch CPU, CUDA, Python, numpy, training generator

RNG states are keyed by rank because DCP deduplicates identical keys across ranks;
one key per rank keeps every rank's stream. On another world size the ranks without
a saved entry warn once and reseed deterministically from (seed, step, rank); the
sampler position is global, so the data order continues unchanged.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

from cosmos_train.runtime.distributed import rank, world_size

log = logging.getLogger(__name__)


def _rank_and_world() -> tuple[int, int]:
    return rank(), world_size()


def derived_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed from (seed, step, rank): stable across Python versions and platforms."""
    h = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class TrainerState(Stateful):
    """Everything outside model/optimizer/scheduler that exact resume needs.

    `generator` is the explicit training generator (noise, sigma, dropout);
    `sampler` any object with `state_dict()`/`load_state_dict()` (the global stream
    sampler); `grad_scaler` an optional `torch.amp.GradScaler`. The trainer updates
    `step` (the number of optimizer steps done).
    """

    def __init__(self, *, seed: int, generator: torch.Generator | None = None, sampler: Any = None,
                 grad_scaler: Any = None) -> None:
        self.seed = seed
        self.step = 0
        self.generator = generator
        self.sampler = sampler
        self.grad_scaler = grad_scaler
        self.reseeded = False  # True after a load that found no RNG entry for this rank

    # ------------------------------------------------------------------ RNG bundle
    def _rng_blob(self) -> bytes:
        """This rank's RNG states as one torch.save blob (loadable with weights_only=True)."""
        np_state = np.random.get_state()
        bundle = {
            "torch_cpu": torch.get_rng_state(),
            "python": random.getstate(),
            # numpy's state holds an ndarray; store plain ints so weights_only loading works
            "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            bundle["torch_cuda"] = torch.cuda.get_rng_state()
        if self.generator is not None:
            bundle["generator"] = self.generator.get_state()
        buf = io.BytesIO()
        torch.save(bundle, buf)
        return buf.getvalue()

    def _restore_rng(self, blob: bytes) -> None:
        bundle = torch.load(io.BytesIO(blob), weights_only=True)
        torch.set_rng_state(bundle["torch_cpu"])
        random.setstate(_to_tuples(bundle["python"]))
        name, keys, pos, has_gauss, gauss = bundle["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        if "torch_cuda" in bundle and torch.cuda.is_available():
            torch.cuda.set_rng_state(bundle["torch_cuda"])
        if self.generator is not None:
            if "generator" not in bundle:
                raise ValueError("checkpoint has no training-generator state but a generator was given")
            self.generator.set_state(bundle["generator"])

    def _reseed(self, rank: int) -> None:
        s = derived_seed(self.seed, self.step, rank)
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % (1 << 32))
        if self.generator is not None:
            self.generator.manual_seed(s)
        self.reseeded = True

    # ------------------------------------------------------------------- Stateful
    def state_dict(self) -> dict[str, Any]:
        """The DCP state of this rank (see the module docstring for the keys)."""
        rank, world = _rank_and_world()
        sd: dict[str, Any] = {"step": self.step, "seed": self.seed, "world_size": world,
                              "rng": {f"rank{rank}": self._rng_blob()}}
        if self.sampler is not None:
            sd["sampler"] = self.sampler.state_dict()
        if self.grad_scaler is not None:
            sd["grad_scaler"] = self.grad_scaler.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from a (possibly partial) state dict loaded by DCP.

        A missing `rng.rank<R>` entry (the checkpoint was saved by fewer ranks) warns
        and reseeds this rank from (seed, step, rank).
        """
        rank, world = _rank_and_world()
        self.step = int(state_dict["step"])
        self.seed = int(state_dict.get("seed", self.seed))
        blob = state_dict.get("rng", {}).get(f"rank{rank}")
        if blob is None:
            saved_world = state_dict.get("world_size", "?")
            log.warning("rank %d: checkpoint (saved by %s ranks, now %d) has no RNG state for this rank; "
                        "reseeding deterministically from (seed=%d, step=%d, rank=%d)",
                        rank, saved_world, world, self.seed, self.step, rank)
            self._reseed(rank)
        else:
            self._restore_rng(blob)
            self.reseeded = False
        if self.sampler is not None:
            if "sampler" not in state_dict:
                raise ValueError("checkpoint has no data sampler state but the trainer has a sampler")
            self.sampler.load_state_dict(dict(state_dict["sampler"]))
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(dict(state_dict["grad_scaler"]))


def _to_tuples(x):
    """random.setstate needs tuples where torch.save/load may hand back lists."""
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
