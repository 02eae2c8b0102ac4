"""Stream a flat `dict[str, Tensor]` into (and out of) a `.pt` file one tensor at a time.

`torch.save` needs every tensor in memory at once. The `.pt` format is a zip
archive: `data.pkl` (the pickled dict, whose tensors point at storages by key),
a few small records, then one record `data/<key>` per storage. The pickle only
needs each tensor's dtype and shape, so we write it first from stubs, then hand
torch's own zip writer (`torch._C.PyTorchFileWriter`, the one `torch.save`
uses: 64-byte alignment for `mmap=True`, CRC32, zip64) one storage at a time.
The result loads with `torch.load(path, weights_only=True)` and `mmap=True`,
and its `data.pkl` is byte-identical to what `torch.save` writes for the same
dict. `PtSource` reads such a file back one tensor at a time by byte offset.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import sys
from pathlib import Path

import torch

from cosmos_train.errors import CheckpointError
from cosmos_train.export.tensor_source import TensorEntry, read_range
from cosmos_train.write_behind import WriteBehind

# torch.save's pickle protocol (torch.serialization.DEFAULT_PROTOCOL).
_PICKLE_PROTOCOL = 2


class _StorageStub:
    """Stands in for a tensor's storage while pickling; `persistent_id` turns it into a reference."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int, nbytes: int):
        self.key, self.dtype, self.numel, self.nbytes = key, dtype, numel, nbytes


class _TensorStub:
    """Pickles exactly like a contiguous CPU tensor (see `Tensor._reduce_ex_internal`)."""

    def __init__(self, storage: _StorageStub, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, proto):
        stride = torch.empty(self.shape, device="meta").stride()
        args = (self.storage, 0, self.shape, stride, False, collections.OrderedDict())
        if self.storage.dtype in torch.storage._new_dtypes():
            return torch._utils._rebuild_tensor_v3, args + (self.storage.dtype,)
        return torch._utils._rebuild_tensor_v2, args


class _StubPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if not isinstance(obj, _StorageStub):
            return None
        if obj.dtype in torch.storage._new_dtypes():
            # Newer dtypes have no legacy TypedStorage class; torch saves an untyped (byte) storage.
            return ("storage", torch.UntypedStorage, obj.key, "cpu", obj.nbytes)
        storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
        return ("storage", storage_type, obj.key, "cpu", obj.numel)


def pickle_tensor_dict(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    """`data.pkl` of a `.pt` holding a dict of contiguous tensors; storage keys are "0", "1", ... in order."""
    obj = {}
    for i, (name, dtype, shape) in enumerate(entries):
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
        obj[name] = _TensorStub(_StorageStub(str(i), dtype, numel, numel * itemsize), tuple(shape))
    buf = io.BytesIO()
    _StubPickler(buf, protocol=_PICKLE_PROTOCOL).dump(obj)
    return buf.getvalue()


class _GuardedFile:
    """A binary file whose `write` never raises into torch's C++ zip writer.

    A failed write there (a full disk) throws again from the writer's destructor, which aborts
    the process (exit 134). The first OSError is kept instead, later writes are dropped, and
    PtWriter raises it from Python.
    """

    def __init__(self, path: str | Path) -> None:
        self._f = open(path, "wb")
        self.error: OSError | None = None
        self._behind = WriteBehind(self._f.fileno())

    def write(self, b) -> int:
        # Nothing may raise from here: an exception inside the C++ writer (also from its destructor,
        # which can run late, during garbage collection of a half-torn-down object) aborts the process.
        n = memoryview(b).nbytes
        try:
            if self.error is None:
                pos = self._f.tell()
                self._f.write(b)
                self._behind.written(pos, n)
        except OSError as e:
            self.error = e
        except Exception:  # noqa: BLE001 - closed or torn down: the bytes are dropped, nothing is raised
            pass
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        """torch's writer seeks over the holes of `write_record_metadata` records."""
        try:
            return self._f.seek(offset, whence)
        except OSError as e:
            self.error = self.error or e
        except Exception:  # noqa: BLE001 - as in write: never raise into the C++ writer
            pass
        return 0

    def tell(self) -> int:
        try:
            return self._f.tell()
        except Exception:  # noqa: BLE001 - as in write
            return 0

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as e:
            self.error = self.error or e


class PtWriter:
    """Write a `.pt` holding a flat dict of tensors, one tensor at a time, in a fixed order.

    Usage::

        with PtWriter(path, [(name, dtype, shape), ...]) as w:
            for name, ... in entries:
                w.write(name, tensor)       # same order, same dtype and shape

    Exiting the `with` block without an exception finalises the zip (central
    directory); the caller owns temp naming and renaming.
    """

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self._entries = [(n, d, tuple(s)) for n, d, s in entries]
        self._next = 0
        self._file = _GuardedFile(path)
        self._zip = torch._C.PyTorchFileWriter(
            self._file, torch.serialization.get_crc32_options(), torch.serialization._get_storage_alignment())
        # Same records, same order as torch.serialization._save.
        data = pickle_tensor_dict(self._entries)
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", len("1"))
        alignment = str(torch.serialization._get_storage_alignment())
        self._zip.write_record(".storage_alignment", alignment, len(alignment))
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must match the next entry's name, dtype and shape."""
        exp_name, exp_dtype, exp_shape = self._entries[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (exp_name, exp_dtype, exp_shape):
            raise ValueError(f"PtWriter: expected {exp_name} {exp_dtype} {list(exp_shape)}, "
                             f"got {name} {tensor.dtype} {list(tensor.shape)}")
        t = tensor.detach().cpu().contiguous()
        start = t.storage_offset() * t.element_size()
        # A storage slice shares memory: a view into a larger buffer is written without a copy.
        self._zip.write_record(f"data/{self._next}", t.untyped_storage()[start:start + t.nbytes], t.nbytes)
        self._file.raise_error()
        self._next += 1

    def reserve_rest(self) -> None:
        """Lay out every remaining record without its data, to be filled in by byte offset.

        torch's own `write_record_metadata` (what `torch.serialization.skip_data`
        uses) writes each record's headers and leaves its bytes as a hole; the
        record's CRC32 stays 0 until the caller patches it (see `copy_export`).
        """
        for i in range(self._next, len(self._entries)):
            _, dtype, shape = self._entries[i]
            numel = 1
            for s in shape:
                numel *= s
            self._zip.write_record_metadata(f"data/{i}", numel * dtype.itemsize)
        self._next = len(self._entries)

    def close(self) -> None:
        """Finish the archive; every entry must have been written."""
        missing = len(self._entries) - self._next
        self._zip.write_end_of_file()  # finalised either way, so its destructor has nothing left to write
        self._file.close()
        if missing:
            raise ValueError(f"PtWriter: {missing} tensors not written")
        self._file.raise_error()

    def __enter__(self) -> PtWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # Finalise anyway so the file handle is released; the caller deletes the partial file.
            try:
                self._zip.write_end_of_file()
            except Exception:  # noqa: BLE001 - the original exception matters more
                pass
            self._file.close()


def load_pt(path: str | Path, **kwargs):
    """`torch.load(path, weights_only=True, **kwargs)`, with a CheckpointError naming the file instead of
    torch's errors (whose advice to retry with `weights_only=False` would run the file's code)."""
    from cosmos_train.export.dcp_safe import weights_only_reason

    try:
        return torch.load(path, weights_only=True, **kwargs)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: holds objects that are not tensors or plain data "
                              f"({weights_only_reason(e)}); the file is corrupt or malicious") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError, TypeError) as e:
        # what torch's zip reader and unpickler raise for a damaged or non-torch file
        raise CheckpointError(f"{path}: not a readable torch .pt file ({type(e).__name__}: "
                              f"{weights_only_reason(e)})") from None


class PtSource:
    """The `TensorSource` of a `.pt` holding a flat dict, read one tensor at a time by byte offset.

    `torch.load(map_location="meta")` gives every tensor's storage offset in the
    file without reading data; `load(names)` then reads just those storages.
    Non-tensor values (old Transformer Engine `_extra_state` blobs) are listed in
    `non_tensor_keys` and never read.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = [self.path]
        meta = load_pt(self.path, map_location="meta")
        if not isinstance(meta, dict) or not any(isinstance(v, torch.Tensor) for v in meta.values()):
            raise CheckpointError(f"{self.path}: expected a flat dict of tensors (a consolidated checkpoint)")
        self._meta = {k: v for k, v in meta.items() if isinstance(v, torch.Tensor)}
        self.non_tensor_keys = [k for k in meta if k not in self._meta]
        self.entries = {k: TensorEntry(k, v.dtype, tuple(v.shape)) for k, v in self._meta.items()}
        size = self.path.stat().st_size
        for k, v in self._meta.items():
            st = v.untyped_storage()
            if st._checkpoint_offset + st.nbytes() > size:
                raise CheckpointError(f"{self.path}: truncated (tensor {k!r} ends past the end of the file)")

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors `names`, each read from disk into a new CPU tensor."""
        return {n: self._read(n) for n in names}

    def locate(self, name: str) -> tuple[Path, int, int] | None:
        """`(file, offset, nbytes)` of the tensor's raw bytes when they are contiguous in the file, else None."""
        m = self._meta[name]
        st, start, nbytes = m.untyped_storage(), m.storage_offset() * m.element_size(), m.numel() * m.element_size()
        if not m.is_contiguous() or start + nbytes > st.nbytes():  # a strided view, or one past its storage
            return None
        return self.path, st._checkpoint_offset + start, nbytes

    def _read(self, name: str) -> torch.Tensor:
        m = self._meta[name]
        st = m.untyped_storage()
        buf = read_range(self.path, st._checkpoint_offset, st.nbytes(), what=name)
        t = torch.empty(0, dtype=m.dtype).set_(buf.untyped_storage(), m.storage_offset(), m.shape, m.stride())
        return t if t.is_contiguous() and t.nbytes == st.nbytes() else t.contiguous().clone()
