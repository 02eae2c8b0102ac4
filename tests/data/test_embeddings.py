"""EmbeddingStore and the restricted converter from upstream pickles."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from cosmos_train.data.embeddings import (
    EmbeddingStore, UnsafePickleError, convert_embeddings, load_embedding_pickle,
)
from cosmos_train.errors import CosmosTrainError


def test_put_get_roundtrip_pads_and_masks(tmp_path):
    store = EmbeddingStore(tmp_path / "s.zarr", mode="a")
    a = np.random.default_rng(0).standard_normal((7, 1024)).astype(np.float16)
    store.put("b", a)
    store.put("a", torch.ones(512, 1024))
    reader = EmbeddingStore(tmp_path / "s.zarr")
    assert reader.keys() == ["a", "b"] and "b" in reader and "zzz" not in reader and len(reader) == 2
    emb, mask = reader.get("b")
    assert emb.dtype == torch.float32 and emb.shape == (512, 1024)
    assert torch.equal(emb[:7], torch.from_numpy(a).float()) and not emb[7:].any()
    assert mask.tolist() == [True] * 7 + [False] * 505
    assert reader.length("a") == 512 and bool(reader.get("a")[1].all())
    with pytest.raises(ValueError, match="read-only"):
        reader.put("c", a)
    with pytest.raises(CosmosTrainError, match="no embedding for clip 'zzz'"):
        reader.get("zzz")


def test_put_rejects_bad_shapes(tmp_path):
    store = EmbeddingStore(tmp_path / "s.zarr", mode="a")
    with pytest.raises(CosmosTrainError, match="513 tokens"):
        store.put("x", np.zeros((513, 1024), np.float16))
    with pytest.raises(CosmosTrainError, match=r"\[n_tokens, 1024\]"):
        store.put("x", np.zeros((3, 512), np.float16))
    with pytest.raises(CosmosTrainError, match="non-finite"):
        store.put("x", np.full((3, 1024), 1e6, np.float32))
    assert store.keys() == []


def test_incomplete_entry_is_not_listed(tmp_path):
    store = EmbeddingStore(tmp_path / "s.zarr", mode="a")
    store.put("ok", np.ones((2, 1024), np.float16))
    # an interrupted put: the array exists but its length attribute was never written
    store._open().create_array("broken", shape=(512, 1024), dtype="float16", chunks=(512, 1024))
    assert store.keys() == ["ok"] and "broken" not in store


def test_store_pickles_for_dataloader_workers(tmp_path):
    store = EmbeddingStore(tmp_path / "s.zarr", mode="a")
    store.put("k", np.ones((3, 1024), np.float16))
    clone = pickle.loads(pickle.dumps(EmbeddingStore(tmp_path / "s.zarr")))
    assert clone.length("k") == 3


def _upstream_dataset(root, arrays: dict[str, np.ndarray], protocol=None):
    (root / "t5_xxl").mkdir(parents=True)
    for key, arr in arrays.items():
        with open(root / "t5_xxl" / f"{key}.pickle", "wb") as f:
            pickle.dump([arr], f, protocol=protocol)  # the upstream format: a list of one array


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_convert_real_pickles(tmp_path, protocol):
    rng = np.random.default_rng(protocol)
    arrays = {"clip_a": rng.standard_normal((11, 1024)).astype(np.float16),
              "clip_b": rng.standard_normal((512, 1024)).astype(np.float16)}
    _upstream_dataset(tmp_path, arrays, protocol)
    report = convert_embeddings(tmp_path, show_progress=False)
    assert sorted(report.converted) == ["clip_a", "clip_b"] and report.store == tmp_path / "t5_xxl.zarr"
    store = EmbeddingStore(tmp_path / "t5_xxl.zarr")
    for key, arr in arrays.items():
        emb, mask = store.get(key)
        assert torch.equal(emb[: len(arr)], torch.from_numpy(arr).float()) and int(mask.sum()) == len(arr)
    again = convert_embeddings(tmp_path, show_progress=False)
    assert again.converted == [] and sorted(again.skipped_existing) == ["clip_a", "clip_b"]
    assert sorted(convert_embeddings(tmp_path, overwrite=True, show_progress=False).converted) == ["clip_a", "clip_b"]


class _RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "PWNED"
    _upstream_dataset(tmp_path, {"good": np.ones((2, 1024), np.float16)})
    with open(tmp_path / "t5_xxl" / "evil.pickle", "wb") as f:
        pickle.dump([_RunsShell(f"touch {marker}")], f)
    with pytest.raises(UnsafePickleError) as exc:
        convert_embeddings(tmp_path, show_progress=False)
    message = str(exc.value)
    assert "evil.pickle" in message and "system" in message and "refused" in message
    assert not marker.exists()
    assert "evil" not in EmbeddingStore(tmp_path / "t5_xxl.zarr").keys()


def test_other_globals_and_object_arrays_are_refused(tmp_path):
    path = tmp_path / "x.pickle"
    path.write_bytes(pickle.dumps([_Evals()]))
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_embedding_pickle(path)
    path.write_bytes(pickle.dumps([np.array([1, "a"], dtype=object)]))
    with pytest.raises(CosmosTrainError, match="object dtype"):
        load_embedding_pickle(path)
    path.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(CosmosTrainError, match="expected a list of one numpy array"):
        load_embedding_pickle(path)


def test_no_pickles_is_an_error(tmp_path):
    with pytest.raises(CosmosTrainError, match="no \\*.pickle files"):
        convert_embeddings(tmp_path, show_progress=False)
