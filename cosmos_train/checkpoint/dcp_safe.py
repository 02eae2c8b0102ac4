"""Reading DCP checkpoints without running code from the files.

torch's `FileSystemReader.read_metadata` unpickles `.metadata` with a bare
`pickle.load`, and `DefaultLoadPlanner.load_bytes` reads every non-tensor item with
`torch.load(weights_only=False)`: a crafted checkpoint runs arbitrary code on
`inspect`, `consolidate`, `load_path` and `resume`. Every DCP read in this package
goes through `SafeReader` (metadata through an allow-list unpickler: the DCP
metadata classes, torch dtypes/sizes/layouts, paths and plain containers) and
`SafePlanner` (non-tensor items with `weights_only=True`). Both raise a
CheckpointError naming the file or key; neither suggests turning the safety off.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from cosmos_train.errors import CheckpointError

# Exactly the globals torch's own metadata pickles reference (tests/checkpoint/test_dcp_safe.py
# checks this list against the metadata of every part the Checkpointer writes).
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a name -> torch.layout lookup
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP `.metadata`; any global outside the allow-list raises UnpicklingError."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def read_metadata_file(path: str | Path) -> Metadata:
    """Parse a DCP `.metadata` file safely; CheckpointError naming the file if it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            md = MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing DCP metadata file") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: {e} (the file is not torch DCP metadata, or is malicious)") \
            from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, UnicodeDecodeError) as e:
        # what a truncated or garbage pickle stream raises
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: not DCP metadata (holds a {type(md).__name__})")
    return md


class SafeReader(FileSystemReader):
    """A FileSystemReader whose metadata goes through `MetadataUnpickler` (parsed once per reader)."""

    def __init__(self, path: str | Path, *args, **kwargs) -> None:
        super().__init__(path, *args, **kwargs)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            md = read_metadata_file(self._get_metadata_path(kwargs.get("rank")))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            self._metadata = md
        return self._metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner reading non-tensor items with `torch.load(weights_only=True)`.

    Those items are plain values (ints, floats, lists, dicts, bytes, tensors: the optimizer's
    param groups, the scheduler, the trainer state); a pickled object of any other class is refused.
    """

    def __init__(self, *args, source: str | Path = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._source = str(source)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{self._source}: item {fqn!r} refused: not plain data "
                                  f"({weights_only_reason(e)}); the checkpoint is corrupt or malicious") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def weights_only_reason(e: BaseException) -> str:
    """The cause inside torch's weights-only error, without its advice to disable the safety."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    elif "weights_only" in text:
        text = "unsupported content"
    return " ".join(text.split())[:200] or type(e).__name__


def read_metadata(part_dir: str | Path) -> Metadata:
    """The metadata of the DCP directory `part_dir` (safe parse)."""
    return read_metadata_file(Path(part_dir) / ".metadata")
