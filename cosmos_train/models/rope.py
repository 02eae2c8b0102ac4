"""3D rotary position embedding over (t, h, w) latent patches, as in Cosmos-Predict2.

The head dimension is split into a height, a width and a time part:
dim_h = dim_w = head_dim // 6 * 2 and dim_t = head_dim - 2 * dim_h (42 / 42 / 44 for
head_dim 128; always even). The angle table has layout [t, h, w, t, h, w] along the
head dimension (each part's half-size frequencies, repeated twice) and is applied with
the non-interleaved "rotate half" convention, like Transformer Engine's
`apply_rotary_pos_emb(..., tensor_format="bshd")` that the released weights were
trained with.

Legend: T, H, W latent patches per axis; hd head_dim.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """(dim_h, dim_w, dim_t) for one head; (42, 42, 44) for head_dim 128."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"RoPE needs an even head_dim >= 6 (got {head_dim})")
    dim_h = head_dim // 6 * 2
    return dim_h, dim_h, head_dim - 2 * dim_h


class VideoRopePosition3DEmb(nn.Module):
    """Holds the persistent RoPE buffers (`seq`, `dim_spatial_range`, `dim_temporal_range`)."""

    def __init__(self, *, head_dim: int, len_h: int, len_w: int, len_t: int,
                 h_extrapolation_ratio: float = 1.0, w_extrapolation_ratio: float = 1.0,
                 t_extrapolation_ratio: float = 1.0):
        super().__init__()
        self.head_dim = head_dim
        self.max_len = max(len_h, len_w, len_t)
        self.dim_h, self.dim_w, self.dim_t = rope_split(head_dim)
        self.register_buffer("seq", torch.empty(self.max_len, dtype=torch.float32))
        self.register_buffer("dim_spatial_range", torch.empty(self.dim_h // 2, dtype=torch.float32))
        self.register_buffer("dim_temporal_range", torch.empty(self.dim_t // 2, dtype=torch.float32))
        # NTK-aware scaling of the base per axis (1.0 = none).
        self.h_ntk_factor = h_extrapolation_ratio ** (self.dim_h / (self.dim_h - 2))
        self.w_ntk_factor = w_extrapolation_ratio ** (self.dim_w / (self.dim_w - 2))
        self.t_ntk_factor = t_extrapolation_ratio ** (self.dim_t / (self.dim_t - 2))
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute the buffers in place (after `to_empty` from the meta device)."""
        if self.seq.is_meta:
            return
        self.seq.copy_(torch.arange(self.max_len, dtype=torch.float32))
        self.dim_spatial_range.copy_(torch.arange(0, self.dim_h, 2)[: self.dim_h // 2].float() / self.dim_h)
        self.dim_temporal_range.copy_(torch.arange(0, self.dim_t, 2)[: self.dim_t // 2].float() / self.dim_t)

    def angles(self, T: int, H: int, W: int) -> torch.Tensor:
        """RoPE angles (T, H, W, hd), fp32."""
        if max(T, H, W) > self.max_len:
            raise ValueError(f"latent grid {T}x{H}x{W} exceeds the RoPE table ({self.max_len}); "
                             "raise model.architecture.max_frames / max_img_h / max_img_w")
        seq = self.seq.float()
        freqs_h = 1.0 / (10000.0 * self.h_ntk_factor) ** self.dim_spatial_range.float()
        freqs_w = 1.0 / (10000.0 * self.w_ntk_factor) ** self.dim_spatial_range.float()
        freqs_t = 1.0 / (10000.0 * self.t_ntk_factor) ** self.dim_temporal_range.float()
        half_t = torch.outer(seq[:T], freqs_t)  # (T, dim_t/2)
        half_h = torch.outer(seq[:H], freqs_h)  # (H, dim_h/2)
        half_w = torch.outer(seq[:W], freqs_w)  # (W, dim_w/2)
        parts = [half_t[:, None, None, :].expand(T, H, W, -1),
                 half_h[None, :, None, :].expand(T, H, W, -1),
                 half_w[None, None, :, :].expand(T, H, W, -1)]
        return torch.cat(parts * 2, dim=-1)


def apply_rope(x_B_S_N_hd: torch.Tensor, angles_S_hd: torch.Tensor) -> torch.Tensor:
    """Rotate q or k (B, S, heads, hd) by angles (S, hd); computed in fp32, returns x's dtype."""
    x = x_B_S_N_hd.float()
    cos = angles_S_hd.cos()[None, :, None, :]
    sin = angles_S_hd.sin()[None, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x_B_S_N_hd.dtype)
