"""Attention backends behind one call: `(q, k, v, *, mask=None) -> out`, layout (B, S, H, D).

Backends are picked by name (`build_attention("sdpa" | "te" | "auto", device_type=...)`):

- `sdpa`: torch `scaled_dot_product_attention` (any device, any dtype).
- `te`: Transformer Engine `DotProductAttention` (fused kernels on CUDA), imported lazily from the
  optional `[te]` extra. Asking for it where it cannot load fails at build time with the install hint.
- `auto`: `te` when it imports and the device is CUDA, else `sdpa`.

Shapes: q (B, S_q, H, D), k/v (B, S_k, H, D), mask (B, S_k) bool, True = attend (key padding mask,
used by cross-attention to the text embedding). Attention modules own no parameters and add no
state_dict entries, so checkpoints do not depend on the backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cosmos_train.errors import CosmosTrainError

ATTENTION_BACKENDS = ("sdpa", "te", "auto")

_TE_INSTALL_HINT = 'pip install -e ".[te]"'


class SDPAAttention(nn.Module):
    """torch scaled_dot_product_attention; mask is a (B, S_k) bool key mask, True = attend."""

    backend = "sdpa"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None):
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_mask)
        return out.transpose(1, 2)


def _import_te():
    """Import `transformer_engine.pytorch` or raise CosmosTrainError with the install hint."""
    try:
        import transformer_engine.pytorch as te  # noqa: PLC0415  (optional extra, imported lazily)
    except (ImportError, OSError, RuntimeError) as exc:
        # OSError/RuntimeError: TE is installed but its CUDA libraries do not load on this machine.
        raise CosmosTrainError(
            f"parallel.attention = 'te' needs Transformer Engine, which cannot be imported ({exc}). "
            f"Install it with `{_TE_INSTALL_HINT}` on a CUDA machine, or set parallel.attention = 'sdpa'."
        ) from exc
    return te


def te_available() -> bool:
    """True when Transformer Engine's PyTorch API imports on this machine."""
    try:
        _import_te()
    except CosmosTrainError:
        return False
    return True


class TEAttention(nn.Module):
    """Transformer Engine `DotProductAttention` in "bshd" layout, same call as SDPAAttention.

    TE's module needs the head count and head dim at construction, so one instance per
    (heads, head_dim) is built on first use. The instances live in a plain dict, not as
    submodules: TE modules carry an `_extra_state` entry, and attention must add nothing to the
    state_dict (released Cosmos checkpoints drop those entries too).
    """

    backend = "te"

    def __init__(self):
        super().__init__()
        self._te = _import_te()
        self._impls: dict[tuple[int, int], nn.Module] = {}  # (heads, head_dim) -> DotProductAttention

    def _impl(self, heads: int, head_dim: int) -> nn.Module:
        key = (heads, head_dim)
        if key not in self._impls:
            self._impls[key] = self._te.DotProductAttention(
                num_attention_heads=heads, kv_channels=head_dim, attention_dropout=0.0,
                qkv_format="bshd", attn_mask_type="no_mask")
        return self._impls[key]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None):
        b, s_q, h, d = q.shape
        impl = self._impl(h, d)
        if mask is None:
            out = impl(q, k, v)
        else:
            # TE's padding masks are True = masked out, shaped (B, 1, 1, S), one for q and one for kv.
            q_pad = torch.zeros(b, 1, 1, s_q, dtype=torch.bool, device=q.device)
            kv_pad = ~mask[:, None, None, :].to(torch.bool)
            out = impl(q, k, v, attention_mask=(q_pad, kv_pad), attn_mask_type="padding")
        return out.view(b, s_q, h, d)  # TE returns (B, S, H*D) for "bshd"


def resolve_attention_backend(name: str, *, device_type: str) -> str:
    """The concrete backend ("sdpa" or "te") that `name` selects on `device_type`; for the run log.

    Raises ValueError for an unknown name and CosmosTrainError when `te` is asked for but cannot load.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(ATTENTION_BACKENDS)}")
    if name == "auto":
        return "te" if device_type == "cuda" and te_available() else "sdpa"
    if name == "te":
        _import_te()
    return name


def build_attention(name: str, *, device_type: str) -> nn.Module:
    """Build the attention module named `name` ("sdpa" | "te" | "auto") for `device_type`."""
    backend = resolve_attention_backend(name, device_type=device_type)
    return TEAttention() if backend == "te" else SDPAAttention()
