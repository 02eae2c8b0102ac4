"""Tiny real datasets for the data tests: mp4 files written by PyAV, captions, embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cosmos_train.data.embeddings import STORE_NAME, EmbeddingStore
from cosmos_train.data.video import write_mp4


def ramp_frames(frames: int, h: int, w: int, *, seed: int = 0) -> np.ndarray:
    """uint8 (T, H, W, 3) whose frame t has the value 10 * t + seed in channel 0 (frame ids survive
    lossless coding), noise in the others."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, size=(frames, h, w, 3), dtype=np.uint8)
    out[..., 0] = (np.arange(frames)[:, None, None] * 10 + seed) % 256
    return out


def make_dataset(root: Path, clips: dict[str, tuple[int, int, int]], *, tokens: int = 5) -> Path:
    """`clips`: key -> (frames, H, W). Writes metas/, videos/ and t5_xxl.zarr; returns root."""
    (root / "metas").mkdir(parents=True, exist_ok=True)
    (root / "videos").mkdir(exist_ok=True)
    store = EmbeddingStore(root / STORE_NAME, mode="a")
    for i, (key, (frames, h, w)) in enumerate(sorted(clips.items())):
        write_mp4(root / "videos" / f"{key}.mp4", ramp_frames(frames, h, w, seed=i))
        (root / "metas" / f"{key}.txt").write_text(f"caption of {key}\n")
        store.put(key, np.full((tokens + i, 1024), i / 10, dtype=np.float16))
    return root
