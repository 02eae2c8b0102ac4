"""Attention backend selection: names, errors, masks, no state."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from cosmos_train.errors import CosmosTrainError
from cosmos_train.runtime.attention import (
    SDPAAttention, build_attention, resolve_attention_backend, te_available)


def _math_attention(q, k, v, mask=None):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match="'flash3'.*sdpa, te, auto"):
        build_attention("flash3", device_type="cpu")


def test_te_missing_says_how_to_install(monkeypatch):
    # A None entry in sys.modules makes the import fail as on a machine without the extra.
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    assert not te_available()
    with pytest.raises(CosmosTrainError, match=r'pip install -e "\.\[te\]"'):
        build_attention("te", device_type="cuda")
    with pytest.raises(CosmosTrainError, match="parallel.attention"):
        resolve_attention_backend("te", device_type="cpu")


def test_auto_falls_back_to_sdpa_without_cuda_or_te():
    assert resolve_attention_backend("auto", device_type="cpu") == "sdpa"
    assert isinstance(build_attention("auto", device_type="cpu"), SDPAAttention)
    expected_cuda = "te" if te_available() else "sdpa"
    assert resolve_attention_backend("auto", device_type="cuda") == expected_cuda


def test_auto_on_cuda_without_te_is_sdpa(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    assert resolve_attention_backend("auto", device_type="cuda") == "sdpa"
    assert resolve_attention_backend("sdpa", device_type="cuda") == "sdpa"


def test_sdpa_matches_math_with_key_mask_and_has_no_state():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)  # (B, S_q, H, D)
    k = torch.randn(2, 7, 3, 4, generator=g, dtype=torch.float64)  # cross-attention: S_k != S_q
    v = torch.randn(2, 7, 3, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    attn = build_attention("sdpa", device_type="cpu")
    torch.testing.assert_close(attn(q, k, v, mask=mask), _math_attention(q, k, v, mask), rtol=0, atol=1e-12)
    torch.testing.assert_close(attn(q, k, v), _math_attention(q, k, v), rtol=0, atol=1e-12)
    # Masked keys must not matter at all.
    v2 = v.clone()
    v2[1, 4:] = 1e6
    torch.testing.assert_close(attn(q, k, v2, mask=mask)[1], attn(q, k, v, mask=mask)[1])
    assert attn.state_dict() == {}


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and te_available()), reason="needs CUDA and Transformer Engine")
def test_te_matches_sdpa_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 64, 4, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    mask[1, 40:] = False
    te_attn, sdpa = build_attention("te", device_type="cuda"), SDPAAttention()
    torch.testing.assert_close(te_attn(q, k, v).float(), sdpa(q, k, v).float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(te_attn(q, k, v, mask=mask).float(), sdpa(q, k, v, mask=mask).float(),
                               atol=2e-2, rtol=2e-2)
    assert te_attn.state_dict() == {}
