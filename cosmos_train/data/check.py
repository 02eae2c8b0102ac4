"""`check_dataset`: what a dataset directory holds and what is wrong with it, before training.

Errors (the CLI exits 2): missing directories or embedding store, captions without a video,
videos without a caption, clips without an embedding, unreadable videos, no clip long enough.
Warnings: embeddings without a clip, empty captions, clips shorter than num_frames (skipped by
training unless data.short_clips = "error").
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cosmos_train.data.embeddings import STORE_NAME
from cosmos_train.data.video import (
    METAS_DIR, VIDEOS_DIR, BadClipError, VideoInfo, decode_all, frame_rule, probe_video, scan_layout)
from cosmos_train.errors import CosmosTrainError


@dataclass
class DatasetReport:
    """Counts, statistics and problems of one dataset directory."""

    root: Path
    captions: int = 0
    videos: int = 0
    embeddings: int | None = None  # None: no zarr store
    pickles: int = 0
    clips: int = 0  # keys with caption, video and embedding
    frames: tuple[int, float, int] | None = None  # min, median, max over readable videos
    resolutions: Counter = field(default_factory=Counter)  # (H, W) -> clips
    fps: Counter = field(default_factory=Counter)
    captions_without_video: list[str] = field(default_factory=list)
    videos_without_caption: list[str] = field(default_factory=list)
    missing_embedding: list[str] = field(default_factory=list)
    orphan_embeddings: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    undecodable: dict[str, str] = field(default_factory=dict)  # key -> error (with decode=True)
    decoded: bool = False
    empty_captions: list[str] = field(default_factory=list)
    num_frames: int | None = None
    too_short: dict[str, int] = field(default_factory=dict)  # key -> frames
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _listing(keys) -> str:
    keys = list(keys)
    return ", ".join(keys[:10]) + (f", ... and {len(keys) - 10} more" if len(keys) > 10 else "")


def check_dataset(dataset_dir: str | Path, *, num_frames: int | None = None, decode: bool = False) -> DatasetReport:
    """Inspect `dataset_dir` (upstream layout + t5_xxl.zarr) and return a `DatasetReport`.

    `decode` also decodes every frame of every readable clip (slow: what training will read),
    so clips with corrupt packets, which the container metadata does not reveal, are errors.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise CosmosTrainError(f"{root}: dataset directory not found")
    layout = scan_layout(root)
    r = DatasetReport(root=root, captions=len(layout.captions), videos=len(layout.videos),
                      embeddings=None if layout.embeddings is None else len(layout.embeddings),
                      pickles=len(layout.pickles), clips=len(layout.clips), num_frames=num_frames)
    for sub in (METAS_DIR, VIDEOS_DIR):
        if not (root / sub).is_dir():
            r.errors.append(f"{root / sub}: directory missing")
    if layout.embeddings is None:
        hint = (f"; convert the {len(layout.pickles)} t5_xxl/*.pickle files with "
                f"`cosmos-train data convert-embeddings {root}`" if layout.pickles else "")
        r.errors.append(f"{root / STORE_NAME}: text-embedding store missing{hint}")
    embeddings = layout.embeddings or set()
    r.captions_without_video = sorted(layout.captions - layout.videos)
    r.videos_without_caption = sorted(layout.videos - layout.captions)
    if layout.embeddings is not None:  # a missing store is already one error; don't list every clip
        r.missing_embedding = sorted((layout.captions & layout.videos) - embeddings)
    r.orphan_embeddings = sorted(embeddings - (layout.captions & layout.videos))
    for name, keys, bad in (("captions without a video", r.captions_without_video, True),
                            ("videos without a caption", r.videos_without_caption, True),
                            ("clips without a text embedding", r.missing_embedding, True),
                            ("embeddings without a clip", r.orphan_embeddings, False)):
        if keys:
            (r.errors if bad else r.warnings).append(f"{len(keys)} {name}: {_listing(keys)}")

    infos: dict[str, VideoInfo] = {}
    for key in sorted(layout.videos):
        try:
            infos[key] = probe_video(root / VIDEOS_DIR / f"{key}.mp4")
        except CosmosTrainError as e:
            r.unreadable[key] = str(e)
    if r.unreadable:
        r.errors.append(f"{len(r.unreadable)} unreadable videos: {_listing(r.unreadable)}")
    if decode:
        r.decoded = True
        for key in sorted(infos):
            try:
                decode_all(root / VIDEOS_DIR / f"{key}.mp4")
            except BadClipError as e:
                r.undecodable[key] = str(e)
        if r.undecodable:
            r.errors.append(f"{len(r.undecodable)} videos fail to decode (training skips them unless "
                            f"data.bad_clips = \"error\"): " + "; ".join(list(r.undecodable.values())[:10]))
    if infos:
        counts = [i.frames for i in infos.values()]
        r.frames = (min(counts), statistics.median(counts), max(counts))
        r.resolutions = Counter((i.height, i.width) for i in infos.values())
        r.fps = Counter(round(i.fps, 3) for i in infos.values())
    r.empty_captions = [k for k in sorted(layout.captions) if not (root / METAS_DIR / f"{k}.txt").read_text().strip()]
    if r.empty_captions:
        r.warnings.append(f"{len(r.empty_captions)} empty captions: {_listing(r.empty_captions)}")
    if num_frames is not None:
        usable = [k for k in layout.clips if k in infos]
        r.too_short = {k: infos[k].frames for k in usable if infos[k].frames < num_frames}
        if r.too_short:
            none_left = len(r.too_short) == len(usable)
            msg = (f"{len(r.too_short)} of {len(usable)} clips are shorter than {num_frames} frames: "
                   f"{_listing(f'{k} ({n})' for k, n in r.too_short.items())}"
                   f"{'' if none_left else ' (training skips them)'}; {frame_rule(num_frames)}")
            (r.errors if none_left else r.warnings).append(msg)
    if r.clips == 0 and not r.errors:
        r.errors.append(f"{root}: no complete clip (caption + video + embedding)")
    return r
