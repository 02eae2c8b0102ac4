"""Text-embedding store (zarr v3) and the converter from upstream `t5_xxl/*.pickle` files.

Store layout (`DATASET/t5_xxl.zarr`, a zarr v3 group):

    t5_xxl.zarr/
      zarr.json                 group attrs {"format": "cosmos_train.t5_embeddings", "version": 1,
                                             "max_tokens": 512, "dim": 1024}
      <key>/                    one array per clip key (the file stem of metas/<key>.txt)
        zarr.json               float16, shape (512, 1024), one chunk, zstd; attrs {"length": n_tokens}
        c/0/0                   the chunk: rows >= length are zero (they compress to almost nothing)

Reading one clip costs one small JSON read and one chunk read (~1 ms). The `length` attribute is
written *after* the data, so an array without it (an interrupted write) is not listed by `keys()`
and is rewritten by the converter.

Upstream files are pickles of a list holding one float16 numpy array [n_tokens, 1024]. They are
read with `RestrictedUnpickler`, which only lets numpy rebuild arrays: any other global (os.system,
builtins.eval, torch, ...) is refused before it is called, so a malicious file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cosmos_train.errors import CosmosTrainError

MAX_TOKENS = 512
EMBED_DIM = 1024
STORE_NAME = "t5_xxl.zarr"
PICKLE_DIR = "t5_xxl"
_FORMAT = "cosmos_train.t5_embeddings"


class UnsafePickleError(CosmosTrainError):
    """A pickle file asked for a global outside the numpy allow-list."""


def _safe_dtype(*args):
    # Object dtypes would let a pickle smuggle arbitrary Python objects into the array.
    dt = np.dtype(*args)
    if dt.hasobject:
        raise pickle.UnpicklingError(f"object dtype {dt} is not allowed")
    return dt


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    # Protocol <= 2 pickles spell bytes as _codecs.encode(str, "latin1"); allow only that codec.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed")
    return text.encode("latin1")


def _numpy_allowlist() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric

    allowed: dict[tuple[str, str], object] = {}
    # numpy 1.x pickles name `numpy.core`, numpy 2.x pickles name `numpy._core`: accept both and
    # resolve them ourselves (importing `numpy.core` on numpy 2 only emits a deprecation warning).
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = _safe_dtype
    allowed[("_codecs", "encode")] = _latin1_bytes
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays (and plain lists/tuples/numbers)."""

    _allowed = _numpy_allowlist()

    def __init__(self, file, *, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"{self._source}: refused to load global '{module}.{name}': only numpy arrays are "
                f"allowed in embedding pickles (the file is not an upstream T5 embedding, or is malicious)")
        return obj


def load_embedding_pickle(path: str | Path) -> np.ndarray:
    """Read an upstream embedding pickle safely; returns the [n_tokens, 1024] array.

    Accepts a list/tuple of one array (the upstream format) or a bare array.
    """
    path = Path(path)
    try:
        obj = RestrictedUnpickler(io.BytesIO(path.read_bytes()), source=str(path)).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated file, wrong format, refused dtype, ...
        raise CosmosTrainError(f"{path}: cannot read embedding pickle: {e}") from None
    if isinstance(obj, (list, tuple)) and len(obj) == 1:
        obj = obj[0]
    if not isinstance(obj, np.ndarray):
        raise CosmosTrainError(f"{path}: expected a list of one numpy array [n_tokens, {EMBED_DIM}], "
                               f"got {type(obj).__name__}")
    return obj


def _validate(array: np.ndarray, *, where: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] == 1:  # [1, n, 1024] as some scripts save it
        array = array[0]
    if array.ndim != 2 or array.shape[1] != EMBED_DIM:
        raise CosmosTrainError(f"{where}: embedding must have shape [n_tokens, {EMBED_DIM}] (got {list(array.shape)})")
    n = array.shape[0]
    if not 0 < n <= MAX_TOKENS:
        raise CosmosTrainError(f"{where}: embedding has {n} tokens; must be 1..{MAX_TOKENS}")
    if not np.issubdtype(array.dtype, np.floating):
        raise CosmosTrainError(f"{where}: embedding dtype must be floating point (got {array.dtype})")
    with np.errstate(over="ignore"):  # overflow is reported below, with the clip's name
        out = array.astype(np.float16)
    if not np.isfinite(out).all():
        raise CosmosTrainError(f"{where}: embedding has non-finite values (after the cast to float16)")
    return out


class EmbeddingStore:
    """One padded float16 [512, 1024] text embedding and its length per clip key, in zarr v3.

    `EmbeddingStore(path)` opens for reading; `mode="a"` creates the store if missing and allows
    `put`. Safe to hand to DataLoader workers (the zarr handle is reopened per process).
    """

    def __init__(self, path: str | Path, *, mode: str = "r"):
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a' (got {mode!r})")
        self.path = Path(path)
        self.mode = mode
        if mode == "r" and not (self.path / "zarr.json").is_file():
            raise CosmosTrainError(f"{self.path}: no embedding store here; create it with "
                                   f"`cosmos-train data convert-embeddings DATASET_DIR`")
        self._group = None
        self._open()

    def _open(self) -> zarr.Group:
        if self._group is None:
            if self.mode == "a":
                group = zarr.open_group(self.path, mode="a")
                if group.attrs.get("format") != _FORMAT:
                    group.attrs.update({"format": _FORMAT, "version": 1,
                                        "max_tokens": MAX_TOKENS, "dim": EMBED_DIM})
            else:
                group = zarr.open_group(self.path, mode="r")
                if group.attrs.get("format") != _FORMAT:
                    raise CosmosTrainError(f"{self.path}: not a cosmos_train embedding store "
                                           f"(group attribute format = {group.attrs.get('format')!r})")
            self._group = group
        return self._group

    def __getstate__(self):
        return {"path": self.path, "mode": self.mode, "_group": None}

    def keys(self) -> list[str]:
        """Sorted keys of the completely written entries."""
        return sorted(name for name, arr in self._open().arrays() if "length" in arr.attrs)

    def __contains__(self, key: str) -> bool:
        try:
            return "length" in self._open()[key].attrs
        except KeyError:
            return False

    def __len__(self) -> int:
        return len(self.keys())

    def length(self, key: str) -> int:
        """Number of real (unpadded) tokens of `key`."""
        return int(self._array(key).attrs["length"])

    def _array(self, key: str) -> zarr.Array:
        try:
            arr = self._open()[key]
        except KeyError:
            raise CosmosTrainError(f"{self.path}: no embedding for clip '{key}'") from None
        if "length" not in arr.attrs:
            raise CosmosTrainError(f"{self.path}: embedding for clip '{key}' is incomplete; "
                                   f"rerun convert-embeddings")
        return arr

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding float32 [512, 1024], mask bool [512]; True for the real tokens)."""
        arr = self._array(key)
        n = int(arr.attrs["length"])
        emb = torch.from_numpy(np.asarray(arr[...], dtype=np.float32))
        mask = torch.zeros(MAX_TOKENS, dtype=torch.bool)
        mask[:n] = True
        return emb, mask

    def put(self, key: str, array: np.ndarray | torch.Tensor) -> None:
        """Write one clip's embedding [n_tokens <= 512, 1024] (cast to float16, zero padded)."""
        if self.mode != "a":
            raise ValueError("store opened read-only; use EmbeddingStore(path, mode='a') to write")
        if not key or "/" in key or key.startswith("__") or key in (".", ".."):
            raise CosmosTrainError(f"clip key {key!r} cannot be stored in zarr: rename the clip "
                                   f"(no '/', not starting with '__')")
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().float().numpy()
        data = _validate(array, where=f"clip '{key}'")
        padded = np.zeros((MAX_TOKENS, EMBED_DIM), dtype=np.float16)
        padded[: data.shape[0]] = data
        arr = self._open().create_array(key, shape=(MAX_TOKENS, EMBED_DIM), dtype="float16",
                                        chunks=(MAX_TOKENS, EMBED_DIM), overwrite=True)
        arr[...] = padded
        arr.attrs["length"] = int(data.shape[0])  # last: marks the entry complete


@dataclass
class ConversionReport:
    """What `convert_embeddings` did."""

    store: Path
    converted: list[str] = field(default_factory=list)
    skipped_existing: list[str] = field(default_factory=list)


def convert_embeddings(dataset_dir: str | Path, *, out: str | Path | None = None, overwrite: bool = False,
                       show_progress: bool = True) -> ConversionReport:
    """Convert `DATASET/t5_xxl/*.pickle` into the zarr store `DATASET/t5_xxl.zarr` (or `out`).

    Keys already in the store are skipped unless `overwrite`, so an interrupted conversion resumes.
    Pickles are read with `RestrictedUnpickler` (no code in them runs).
    """
    dataset_dir = Path(dataset_dir)
    src = dataset_dir / PICKLE_DIR
    files = sorted(src.glob("*.pickle")) if src.is_dir() else []
    if not files:
        raise CosmosTrainError(f"{src}: no *.pickle files to convert (expected the upstream layout "
                               f"DATASET/t5_xxl/<key>.pickle)")
    store = EmbeddingStore(Path(out) if out is not None else dataset_dir / STORE_NAME, mode="a")
    existing = set(store.keys())
    report = ConversionReport(store=store.path)
    columns = (TextColumn("converting embeddings"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress, transient=True) as progress:
        for path in progress.track(files):
            key = path.stem
            if key in existing and not overwrite:
                report.skipped_existing.append(key)
                continue
            array = load_embedding_pickle(path)
            store.put(key, _validate(array, where=str(path)))
            report.converted.append(key)
    return report
