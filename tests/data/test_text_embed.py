"""`data embed`: captions -> the zarr store the loader reads, resumable, bad captions named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cosmos_train.data.embeddings import STORE_NAME, EmbeddingStore
from cosmos_train.models.text_encoder import T5TextEncoder
from tests.data.test_check_cli import _app
from tests.tiny_assets import save_tiny_t5

runner = CliRunner()


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return save_tiny_t5(tmp_path_factory.mktemp("t5"), split=True)


def _captions(root, captions):
    (root / "metas").mkdir(parents=True, exist_ok=True)
    for key, text in captions.items():
        (root / "metas" / f"{key}.txt").write_text(text)
    return root


def test_embed_resumes_and_matches_the_encoder(tmp_path, t5_dir):
    root = _captions(tmp_path / "ds", {"a": "A video of sks teal robot.\n", "b": "red cube", "c": "up down"})
    args = ["data", "embed", str(root), "--model", str(t5_dir), "--batch-size", "2", "--device", "cpu"]
    result = runner.invoke(_app(), args)
    assert result.exit_code == 0, result.output
    assert "3 embedded, 0 already present" in result.output
    store = EmbeddingStore(root / STORE_NAME)
    assert store.keys() == ["a", "b", "c"]
    ref, lengths = T5TextEncoder.load(t5_dir).encode(["A video of sks teal robot.", "red cube", "up down"])
    for key, row, n in zip("abc", ref, lengths):
        emb, mask = store.get(key)
        assert store.length(key) == int(n) and mask.sum() == n
        assert torch.equal(emb, row.half().float())  # float16 in the store, zero rows after the tokens
    # resumable: only the new caption is embedded
    _captions(root, {"d": "left right"})
    result = runner.invoke(_app(), args)
    assert result.exit_code == 0 and "1 embedded, 3 already present" in result.output, result.output


def test_bad_captions_are_named_before_any_work(tmp_path, t5_dir):
    root = _captions(tmp_path / "ds", {"a": "red cube", "empty": "  \n"})
    result = runner.invoke(_app(), ["data", "embed", str(root), "--model", str(t5_dir)])
    assert result.exit_code == 2
    assert "empty.txt: caption is empty" in result.output.replace("\n", "")
    assert not (root / STORE_NAME / "a").exists()
    (root / "metas" / "empty.txt").write_bytes(b"\xff\xfe\xfa")
    result = runner.invoke(_app(), ["data", "embed", str(root), "--model", str(t5_dir)])
    assert result.exit_code == 2 and "cannot read the caption" in result.output.replace("\n", "")
    result = runner.invoke(_app(), ["data", "embed", str(tmp_path / "nope"), "--model", str(t5_dir)])
    assert result.exit_code == 2 and "no caption files" in result.output.replace("\n", "")


def test_cli_default_encoder_is_the_spec_default():
    from cosmos_train.cli.data import DEFAULT_T5
    from cosmos_train.spec import TextEncoderSpec

    assert DEFAULT_T5 == TextEncoderSpec().path
