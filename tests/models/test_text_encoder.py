"""T5 encoder: upstream's embedding convention on a tiny random T5 saved locally."""

import pytest
import torch

from cosmos_train.errors import CosmosTrainError
from cosmos_train.models.text_encoder import MAX_TOKENS, T5TextEncoder
from tests.tiny_assets import save_tiny_t5


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return save_tiny_t5(tmp_path_factory.mktemp("t5"))


def _upstream_encode_prompts(tokenizer, model, prompts, max_length=512):
    """upstream CosmosT5TextEncoder.encode_prompts (imaginaire/auxiliary/text_encoder.py), line for line."""
    batch_encoding = tokenizer(prompts, return_tensors="pt", truncation=True, padding="max_length",
                               max_length=max_length, return_length=True, return_offsets_mapping=False)
    outputs = model(input_ids=batch_encoding.input_ids, attention_mask=batch_encoding.attention_mask)
    encoded_text = outputs.last_hidden_state
    lengths = batch_encoding.attention_mask.sum(dim=1).cpu()
    for batch_id in range(encoded_text.shape[0]):
        encoded_text[batch_id][lengths[batch_id]:] = 0
    return encoded_text, batch_encoding.attention_mask.bool()


def test_matches_upstream_convention(t5_dir):
    enc = T5TextEncoder.load(t5_dir)
    prompts = ["A video of sks teal robot.", "red cube moves left", "a " * 600]  # the last one is truncated
    emb, lengths = enc.encode(prompts)
    assert emb.shape == (3, MAX_TOKENS, 1024) and emb.dtype == torch.float32
    with torch.no_grad():
        ref, mask = _upstream_encode_prompts(enc.tokenizer, enc.model, prompts)
    assert torch.equal(lengths, mask.sum(1))
    assert lengths[2] == MAX_TOKENS and 3 < lengths[1] < lengths[0] < 20  # the EOS counts as a real token
    torch.testing.assert_close(emb, ref, rtol=0, atol=0)
    for row, n in zip(emb, lengths):
        assert (row[n:] == 0).all() and (row[:n].abs().sum(-1) > 0).all()


def test_diffusers_layout_and_errors(tmp_path):
    model_dir = save_tiny_t5(tmp_path / "hub", split=True)  # text_encoder/ + tokenizer/ beside it
    enc = T5TextEncoder.load(model_dir)
    assert enc.dim == 1024
    with pytest.raises(CosmosTrainError, match="not found"):
        T5TextEncoder.load(tmp_path / "nothing")
    with pytest.raises(CosmosTrainError, match="no T5 encoder here"):
        T5TextEncoder.load(tmp_path)
    with pytest.raises(ValueError, match="non-empty list"):
        enc.encode("a string")
