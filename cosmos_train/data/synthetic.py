"""A generated dataset in the upstream layout: the embedded default of `examples/tiny.toml`.

`ensure_synthetic_dataset(root, ...)` writes, once, `root/synthetic-<hash of the parameters>/` with
real mp4 files of coloured shapes moving over a gradient (lossless H.264 RGB), a caption per clip
and a deterministic text embedding per clip in `t5_xxl.zarr` (one fixed vector per caption word,
so captions and embeddings agree). Clip i has `num_frames + 4 * (i % 3)` frames, so random
windows are exercised. Changing any parameter gives another directory; the same parameters reuse
the existing one (marked complete by a `DONE` file).

Concurrent callers (several ranks) are safe: each generates into its own temporary directory and
renames it into place; the loser of the rename discards its copy and uses the winner's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from cosmos_train.data.embeddings import EMBED_DIM, STORE_NAME, EmbeddingStore
from cosmos_train.data.video import METAS_DIR, VIDEOS_DIR, write_mp4
from cosmos_train.errors import CosmosTrainError

_VERSION = 1  # bump when the generated content changes
_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 70), "blue": (50, 80, 230), "yellow": (235, 210, 40),
            "purple": (150, 60, 200), "white": (240, 240, 240)}
_SHAPES = ("square", "disc")
_DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}


def synthetic_params(*, num_clips: int, num_frames: int, video_size: tuple[int, int], seed: int) -> dict:
    """The parameters that determine the generated content (hashed into the directory name)."""
    return {"version": _VERSION, "num_clips": int(num_clips), "num_frames": int(num_frames),
            "video_size": [int(video_size[0]), int(video_size[1])], "seed": int(seed)}


def synthetic_dir_name(params: dict) -> str:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return f"synthetic-{digest}"


def _word_vector(word: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
    return (np.random.default_rng(seed).standard_normal(EMBED_DIM) * 0.2).astype(np.float16)


def caption_embedding(caption: str) -> np.ndarray:
    """Deterministic float16 [n_words, 1024] stand-in for a T5 embedding of `caption`."""
    words = caption.lower().rstrip(".").split()
    return np.stack([_word_vector(w) for w in words])


def _clip(rng: np.random.Generator, *, frames: int, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """uint8 (T, H, W, 3) frames of one shape moving over a gradient, and its caption."""
    h, w = size
    colour = list(_COLOURS)[rng.integers(len(_COLOURS))]
    shape = _SHAPES[rng.integers(len(_SHAPES))]
    direction = list(_DIRECTIONS)[rng.integers(len(_DIRECTIONS))]
    bg_a, bg_b = rng.integers(0, 120, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, w)[None, :, None]
    background = (bg_a * (1 - ramp) + bg_b * ramp).astype(np.uint8)  # (1, W, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    radius = max(2, min(h, w) // 5)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    dy, dx = _DIRECTIONS[direction]
    speed = max(1.0, min(h, w) / 16)
    out = np.empty((frames, h, w, 3), dtype=np.uint8)
    for t in range(frames):
        y, x = (cy + dy * speed * t) % h, (cx + dx * speed * t) % w
        if shape == "square":
            inside = (np.abs(yy - y) <= radius) & (np.abs(xx - x) <= radius)
        else:
            inside = (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
        out[t] = background
        out[t][inside] = _COLOURS[colour]
    return out, f"A {colour} {shape} moving {direction} over a dark gradient."


def _generate(dest: Path, params: dict) -> None:
    (dest / METAS_DIR).mkdir(parents=True)
    (dest / VIDEOS_DIR).mkdir()
    store = EmbeddingStore(dest / STORE_NAME, mode="a")
    size = tuple(params["video_size"])
    for i in range(params["num_clips"]):
        key = f"clip_{i:04d}"
        rng = np.random.default_rng([params["seed"], i])
        frames, caption = _clip(rng, frames=params["num_frames"] + 4 * (i % 3), size=size)
        write_mp4(dest / VIDEOS_DIR / f"{key}.mp4", frames)
        (dest / METAS_DIR / f"{key}.txt").write_text(caption + "\n")
        store.put(key, caption_embedding(caption))
    (dest / "manifest.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    (dest / "DONE").write_text("")


def ensure_synthetic_dataset(root: str | Path, *, num_clips: int, num_frames: int,
                             video_size: tuple[int, int], seed: int = 0) -> Path:
    """Return `root/synthetic-<hash>/`, generating it first if it is not there yet."""
    params = synthetic_params(num_clips=num_clips, num_frames=num_frames, video_size=video_size, seed=seed)
    root = Path(root)
    final = root / synthetic_dir_name(params)
    if (final / "DONE").is_file():
        return final
    if final.exists():
        raise CosmosTrainError(f"{final}: exists but is not a complete synthetic dataset (no DONE file); "
                               f"delete it to regenerate")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _generate(tmp, params)
        try:
            os.rename(tmp, final)  # atomic; fails if another process renamed its copy first
        except OSError:
            if not (final / "DONE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
