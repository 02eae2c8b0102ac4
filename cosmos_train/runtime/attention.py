"""Attention backends behind one call: `(q, k, v, *, mask=None) -> out`, layout (B, S, H, D)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SDPAAttention(nn.Module):
    """torch scaled_dot_product_attention; mask is a (B, S_k) bool key mask, True = attend."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None):
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_mask)
        return out.transpose(1, 2)
