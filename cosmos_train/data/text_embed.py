"""`data embed`: captions in `metas/*.txt` -> T5 embeddings in `DATASET/t5_xxl.zarr`.

The replacement for upstream's `scripts/get_t5_embeddings.py`: the same embeddings (see
`models/text_encoder.py`), written into the zarr store the loader reads instead of pickles.
Resumable: clips already in the store are skipped (each entry is marked complete only after its
data is written). Every caption is read and checked before the encoder runs, so an empty or
unreadable file is named before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cosmos_train.data.embeddings import STORE_NAME, EmbeddingStore
from cosmos_train.errors import CosmosTrainError

METAS_DIR = "metas"


@dataclass
class EmbedReport:
    """What `embed_captions` did."""

    store: Path
    embedded: list[str] = field(default_factory=list)
    skipped_existing: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)  # captions longer than 512 tokens


def read_caption(path: Path) -> str:
    """The stripped caption of `path`; an unreadable or empty file is a one-line error naming it."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CosmosTrainError(f"{path}: cannot read the caption: {e}") from None
    if not text:
        raise CosmosTrainError(f"{path}: caption is empty")
    return text


def embed_captions(dataset_dir: str | Path, encoder, *, batch_size: int = 8, device="cpu",
                   out: str | Path | None = None, overwrite: bool = False, show_progress: bool = True) -> EmbedReport:
    """Embed every caption of `DATASET/metas/*.txt` not yet in the store (all of them with `overwrite`)."""
    if batch_size < 1:
        raise CosmosTrainError(f"--batch-size must be >= 1 (got {batch_size})")
    dataset_dir = Path(dataset_dir)
    files = sorted((dataset_dir / METAS_DIR).glob("*.txt"))
    if not files:
        raise CosmosTrainError(f"{dataset_dir / METAS_DIR}: no caption files (*.txt)")
    store = EmbeddingStore(Path(out) if out is not None else dataset_dir / STORE_NAME, mode="a")
    report = EmbedReport(store=store.path)
    existing = set(store.keys())
    todo = []
    for path in files:
        if path.stem in existing and not overwrite:
            report.skipped_existing.append(path.stem)
        else:
            todo.append((path.stem, read_caption(path)))
    columns = (TextColumn("embedding captions"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress, transient=True) as progress:
        task = progress.add_task("embed", total=len(todo))
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            emb, lengths = encoder.encode([caption for _, caption in chunk], device=device)
            emb, lengths = emb.cpu(), lengths.cpu().tolist()
            for (key, _), row, n in zip(chunk, emb, lengths):
                store.put(key, row[:n])  # as upstream's pickles: the real tokens only; the store pads zeros
                report.embedded.append(key)
                if n >= encoder.max_length:
                    report.truncated.append(key)
            progress.advance(task, len(chunk))
    return report
