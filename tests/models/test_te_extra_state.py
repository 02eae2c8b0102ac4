"""Transformer Engine `_extra_state`: the DiT's state dict is the same with TE attention on or off.

TE modules (DotProductAttention, RMSNorm) override `get_extra_state`/`set_extra_state`, so a
module tree holding one gains a `..._extra_state` key, and a strict load without it reports
it missing. TEAttention keeps its TE instances out of the module tree, so DCP checkpoints
written with TE resume without it and the reverse. TE itself needs CUDA; a stand-in module
with the same extra-state hooks drives the test on CPU.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

from cosmos_train.models.dit import DiT
from cosmos_train.presets import PRESETS
from cosmos_train.runtime.attention import SDPAAttention, TEAttention


class FakeDotProductAttention(nn.Module):
    """TE's call signature ("bshd" in, (B, S, H*D) out) and its extra-state hooks."""

    def __init__(self, num_attention_heads, kv_channels, **kwargs):
        super().__init__()

    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        pass

    def forward(self, q, k, v, attention_mask=None, attn_mask_type=None):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2)


def _fake_te(monkeypatch):
    te_pytorch = types.ModuleType("transformer_engine.pytorch")
    te_pytorch.DotProductAttention = FakeDotProductAttention
    te = types.ModuleType("transformer_engine")
    te.pytorch = te_pytorch
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te_pytorch)


def test_te_attention_adds_no_extra_state_and_loads_strictly_both_ways(monkeypatch):
    _fake_te(monkeypatch)
    cfg = PRESETS["tiny"].with_overrides(model_channels=32, num_heads=2, adaln_lora_dim=8, num_blocks=1)
    sdpa, te = DiT(cfg, attention=SDPAAttention), DiT(cfg, attention=TEAttention)
    sdpa.init_weights(0)
    te.load_state_dict(sdpa.state_dict(), strict=True)  # TE-off checkpoint -> TE on
    x = torch.randn(1, cfg.latent_channels, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 3, cfg.context_dim, generator=torch.Generator().manual_seed(1))
    t = torch.full((1, 2), 0.5)
    torch.testing.assert_close(te(x, t, emb), sdpa(x, t, emb), rtol=1e-5, atol=1e-6)
    # after a forward the TE instances exist, yet the state dict is unchanged
    assert not any(k.endswith("_extra_state") for k in te.state_dict())
    assert list(te.state_dict()) == list(sdpa.state_dict())
    sdpa.load_state_dict(te.state_dict(), strict=True)  # TE-on checkpoint -> TE off


def test_a_te_module_in_the_tree_would_demand_extra_state():
    # Why TEAttention keeps TE out of the tree: torch's strict load asks for the extra state.
    holder = nn.Module()
    holder.attn_op = FakeDotProductAttention(2, 16)
    assert list(holder.state_dict()) == ["attn_op._extra_state"]
    result = holder.load_state_dict({}, strict=False)
    assert result.missing_keys == ["attn_op._extra_state"]
