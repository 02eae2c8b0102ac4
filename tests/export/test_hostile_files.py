"""Lying `.safetensors` headers and corrupt or hostile `.pt` files: a CheckpointError naming the file
(and the tensor), never a raw RuntimeError/KeyError/MemoryError, never torch's advice to disable safety."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from cosmos_train.checkpoint.manager import Checkpointer
from cosmos_train.export.safetensors_io import SafetensorsSource
from cosmos_train.errors import CheckpointError
from tests.checkpoint.hostile import hostile_pt
from tests.checkpoint.toy import build, spec


def _good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"net.a": torch.ones(2, 3), "net.b": torch.zeros(4)}, str(path))
    return path


def _rewrite(path, out, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    return out


def _set(key, field, value):
    return lambda h: h[key].__setitem__(field, value)


@pytest.mark.parametrize("edit, fragment", [
    (_set("net.a", "shape", [3, 3]),
     "tensor 'net.a': shape [3, 3] x 4 bytes (F32) = 36 bytes, but data_offsets span 24"),
    (_set("net.a", "data_offsets", [24, 0]), "tensor 'net.a': data_offsets begin 24 > end 0"),
    (_set("net.a", "data_offsets", [0, 2**40]), "tensor 'net.a'"),
    (_set("net.b", "dtype", 5), "tensor 'net.b': unsupported dtype 5"),
    (_set("net.b", "shape", ["4"]), "tensor 'net.b': shape must be a list of non-negative integers"),
    (_set("net.b", "shape", [-4]), "tensor 'net.b': shape must be a list of non-negative integers"),
    (lambda h: h.__setitem__("net.c", [1, 2]), "tensor 'net.c': header entry is not an object"),
    (lambda h: h.__setitem__("__metadata__", {"format": 1}), "__metadata__ must map strings to strings"),
])
def test_lying_safetensors_headers_name_the_tensor(tmp_path, edit, fragment):
    bad = _rewrite(_good(tmp_path), tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError, match="bad.safetensors") as e:
        SafetensorsSource(bad)
    assert fragment in str(e.value)
    parts = build(0)  # the same through load_path, as `run` uses it
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        Checkpointer(spec(load_path=str(bad)), tmp_path / "run", model=parts[0]).initialize()


def test_huge_or_garbage_safetensors_header_is_refused_before_allocating(tmp_path):
    raw = _good(tmp_path).read_bytes()
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    with pytest.raises(CheckpointError,
                       match="huge.safetensors: corrupt safetensors header .claims 4611686018427387904"):
        SafetensorsSource(huge)
    listy = tmp_path / "list.safetensors"
    listy.write_bytes(struct.pack("<Q", 8) + b"[1, 2]  ")
    with pytest.raises(CheckpointError, match="a JSON list, not an object"):
        SafetensorsSource(listy)
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"net.a": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="file names in the same directory"):
        SafetensorsSource(index)


@pytest.mark.parametrize("kind", ["hostile", "garbage", "truncated"])
def test_corrupt_or_hostile_pt_gets_our_message(tmp_path, kind):
    from cosmos_train.export.tensor_source import open_source

    path, marker = tmp_path / "model.pt", tmp_path / "PWNED"
    if kind == "hostile":
        hostile_pt(path, marker)
    elif kind == "garbage":
        path.write_bytes(b"\x80\x02 not a torch file" * 20)
    else:
        torch.save({"net.a": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:600])
    parts = build(0)
    for load in (lambda: Checkpointer(spec(load_path=str(path)), tmp_path / "run", model=parts[0]).initialize(),
                 lambda: open_source(path)):
        with pytest.raises(CheckpointError, match="model.pt") as e:
            load()
        assert "weights_only" not in str(e.value) and "arbitrary code" not in str(e.value)
    assert not marker.exists()
