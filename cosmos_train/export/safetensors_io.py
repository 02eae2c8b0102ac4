"""Stream tensors into (and out of) `.safetensors` files, single or sharded, one tensor at a time.

The format: 8-byte little-endian header length N, N bytes of JSON
(`{"name": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
"__metadata__": {...}}`, padded with spaces to a multiple of 8), then the raw
little-endian tensor bytes, back to back in offset order. Every dtype and shape
is known before any data is read, so the header is written first and the bytes
follow as tensors arrive.

Sharding follows Hugging Face: `model-00001-of-00003.safetensors`, ... and
`model.safetensors.index.json` = `{"metadata": {"total_size": N}, "weight_map":
{name: shard file name}}`.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import torch

from cosmos_train.errors import CheckpointError
from cosmos_train.export.tensor_source import TensorEntry, read_range
from cosmos_train.write_behind import WriteBehind

_DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" (10^9), "500MiB" (2^20), "1000000"."""
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", size)
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"size must be > 0 (got {size!r})")
    return n


def _st_dtype(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_TO_ST[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors equivalent; write a .pt instead") from None


def _header_bytes(entries: list[TensorEntry], metadata: dict[str, str] | None) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": _st_dtype(e.dtype), "shape": list(e.shape),
                         "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Write one `.safetensors` file: header first, then each tensor's bytes in `entries` order."""

    def __init__(self, path: str | Path, entries: list[TensorEntry], *, metadata: dict[str, str] | None = None):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors stores little-endian data; big-endian hosts are not supported")
        self.path = Path(path)
        self._entries = list(entries)
        self._next = 0
        self._f = open(self.path, "wb")
        self._f.write(_header_bytes(self._entries, metadata))
        self._behind = WriteBehind(self._f.fileno())

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must match the next entry's name, dtype and shape."""
        e = self._entries[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (e.name, e.dtype, e.shape):
            raise ValueError(f"SafetensorsWriter: expected {e.name} {e.dtype} {list(e.shape)}, "
                             f"got {name} {tensor.dtype} {list(tensor.shape)}")
        t = tensor.detach().cpu().contiguous().reshape(-1)
        if t.numel():
            pos = self._f.tell()
            self._f.write(t.view(torch.uint8).numpy().data)  # zero-copy byte view
            self._behind.written(pos, t.nbytes)
        self._next += 1

    def close(self) -> None:
        """Flush and close; every entry must have been written."""
        self._f.close()
        if self._next != len(self._entries):
            raise ValueError(f"SafetensorsWriter: {len(self._entries) - self._next} tensors not written")


def plan_shards(entries: list[TensorEntry], max_shard_size: int) -> list[list[TensorEntry]]:
    """Split `entries` in order into shards of at most `max_shard_size` bytes (a larger tensor alone)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_file_names(out: Path, n: int) -> list[str]:
    """`model.safetensors` -> `model-00001-of-0000n.safetensors`, ... (Hugging Face naming)."""
    stem = out.name[: -len(".safetensors")]
    return [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def index_file_name(out: Path) -> str:
    """`model.safetensors` -> `model.safetensors.index.json`."""
    return out.name + ".index.json"


def write_index(path: Path, shards: list[list[TensorEntry]], names: list[str]) -> None:
    """The Hugging Face index of a sharded safetensors checkpoint."""
    weight_map = {e.name: name for shard, name in zip(shards, names, strict=True) for e in shard}
    total = sum(e.nbytes for shard in shards for e in shard)
    path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's limit


def read_header(path: Path) -> tuple[dict, int]:
    """`(header dict, byte offset where data starts)` of a `.safetensors` file, its framing validated."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes; the file has "
                                      f"{size - 8} after the length field, the format allows {MAX_HEADER_BYTES})")
            header_raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: safetensors file missing") from None
    if len(header_raw) < n:
        raise CheckpointError(f"{path}: truncated safetensors file (header cut short)")
    try:
        header = json.loads(header_raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    return header, 8 + n


def _entry(path: Path, key: str, v, data_size: int) -> tuple[TensorEntry, int, int]:
    """Validate one header entry: `(entry, begin, end)` or CheckpointError naming the tensor."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {key!r}: {why}")

    if not isinstance(v, dict):
        raise bad("header entry is not an object")
    dtype, shape, offsets = v.get("dtype"), v.get("shape"), v.get("data_offsets")
    if dtype not in _ST_TO_DTYPE:
        raise bad(f"unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative integers (got {shape!r})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise bad(f"data_offsets must be two non-negative integers (got {offsets!r})")
    begin, end = offsets
    if begin > end:
        raise bad(f"data_offsets begin {begin} > end {end}")
    numel = 1
    for d in shape:
        numel *= d
    torch_dtype = _ST_TO_DTYPE[dtype]
    if numel * torch_dtype.itemsize != end - begin:
        raise bad(f"shape {shape} x {torch_dtype.itemsize} bytes ({dtype}) = {numel * torch_dtype.itemsize} "
                  f"bytes, but data_offsets span {end - begin}")
    if end > data_size:
        raise CheckpointError(f"{path}: truncated (tensor {key!r} ends at data byte {end}, the file holds "
                              f"{data_size})")
    return TensorEntry(key, torch_dtype, tuple(shape)), begin, end


class SafetensorsSource:
    """The `TensorSource` of a `.safetensors` file or a sharded set (via its `.index.json`).

    Every header is validated first (framing, dtype, shape x itemsize = byte span, bounds),
    so a lying or damaged file is a CheckpointError naming the file and tensor.
    """

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        if path.name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path}: not a safetensors index ({type(e).__name__}: {e})") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(n, str) and n and Path(n).name == n and n not in (".", "..")
                    for n in weight_map.values()):
                raise CheckpointError(f"{path}: weight_map must map tensor names to file names in the same "
                                      f"directory")
            files = list(dict.fromkeys(path.parent / name for name in weight_map.values()))
        else:
            files = [path]
        self.files = files
        self.non_tensor_keys: list[str] = []  # the format stores tensors only
        self.entries: dict[str, TensorEntry] = {}
        self._where: dict[str, tuple[Path, int, int]] = {}
        for f in files:
            header, start = read_header(f)
            data_size = f.stat().st_size - start
            checked = [(k, *_entry(f, k, v, data_size)) for k, v in header.items() if k != "__metadata__"]
            for k, entry, begin, end in sorted(checked, key=lambda c: c[2]):  # stored order: reads go forward
                self.entries[k] = entry
                self._where[k] = (f, start + begin, end - begin)

    def metadata(self) -> dict[str, str]:
        """The `__metadata__` of the (first) file: free-form strings such as the model's architecture."""
        return dict(read_header(self.files[0])[0].get("__metadata__") or {})

    def locate(self, name: str) -> tuple[Path, int, int]:
        """`(file, offset, nbytes)` of the tensor's raw (little-endian, row-major) bytes."""
        return self._where[name]

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors `names`, each read from disk into a new CPU tensor."""
        out = {}
        for name in names:
            f, offset, nbytes = self._where[name]
            e = self.entries[name]
            out[name] = read_range(f, offset, nbytes, what=name).view(e.dtype).reshape(e.shape)
        return out
