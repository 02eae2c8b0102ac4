"""Building blocks of the DiT: attention, MLP, AdaLN-LoRA modulated block, final layer.

Module and parameter names follow released Cosmos-Predict2 checkpoints exactly
(`self_attn.q_proj`, `adaln_modulation_mlp.1`, `final_layer.linear`, ...). No Linear
has a bias; LayerNorms have no affine parameters.

Legend: B batch, T/H/W latent patches per axis (T local to this rank under context
parallelism), S = T*H*W tokens, N text tokens, D model channels, nh heads, hd head_dim.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from cosmos_train.models.rope import apply_rope

AttentionFactory = Callable[[], nn.Module]


def _adaln_modulation(dim: int, lora_dim: int, chunks: int) -> nn.Sequential:
    # SiLU -> down (.1) -> up (.2); keys `.1.weight` [lora_dim, D] and `.2.weight` [chunks*D, lora_dim].
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, lora_dim, bias=False),
                         nn.Linear(lora_dim, chunks * dim, bias=False))


class Attention(nn.Module):
    """Multi-head attention with q/k RMSNorm over head_dim; self-attention applies RoPE."""

    def __init__(self, query_dim: int, context_dim: int | None, num_heads: int, *,
                 attention: AttentionFactory):
        super().__init__()
        self.is_selfattn = context_dim is None
        context_dim = query_dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.head_dim = query_dim // num_heads
        self.q_proj = nn.Linear(query_dim, query_dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_proj = nn.Linear(context_dim, query_dim, bias=False)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.v_proj = nn.Linear(context_dim, query_dim, bias=False)
        self.v_norm = nn.Identity()
        self.output_proj = nn.Linear(query_dim, query_dim, bias=False)
        # The attention kernel (sdpa / te / ring / a2a) is swapped from outside; it has no state.
        self.attn_op = attention()

    def forward(self, x_B_S_D: torch.Tensor, context_B_N_C: torch.Tensor | None = None, *,
                rope_angles_S_hd: torch.Tensor | None = None,
                mask_B_N: torch.Tensor | None = None) -> torch.Tensor:
        B, S, _ = x_B_S_D.shape
        context = x_B_S_D if context_B_N_C is None else context_B_N_C
        q = self.q_proj(x_B_S_D).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(context).unflatten(-1, (self.num_heads, self.head_dim))
        v = self.v_norm(self.v_proj(context).unflatten(-1, (self.num_heads, self.head_dim)))
        q, k = self.q_norm(q), self.k_norm(k)  # (B, S|N, nh, hd)
        if self.is_selfattn:
            if rope_angles_S_hd is not None:
                q, k = apply_rope(q, rope_angles_S_hd), apply_rope(k, rope_angles_S_hd)
            out = self.attn_op(q, k, v)
        else:
            out = self.attn_op(q, k, v, mask=mask_B_N)
        return self.output_proj(out.reshape(B, S, -1))


class GPT2FeedForward(nn.Module):
    """layer1 -> exact-erf GELU -> layer2, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.activation = nn.GELU()
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.activation(self.layer1(x)))


def _modulate(x_B_T_H_W_D, norm, shift_B_T_D, scale_B_T_D):
    return norm(x_B_T_H_W_D) * (1 + scale_B_T_D[:, :, None, None]) + shift_B_T_D[:, :, None, None]


class Block(nn.Module):
    """Self-attention, cross-attention and MLP, each AdaLN-LoRA modulated and gated."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, *, mlp_ratio: float,
                 adaln_lora_dim: int, attention: AttentionFactory):
        super().__init__()
        self.layer_norm_self_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(dim, None, num_heads, attention=attention)
        self.layer_norm_cross_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(dim, context_dim, num_heads, attention=attention)
        self.layer_norm_mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = GPT2FeedForward(dim, int(dim * mlp_ratio))
        self.adaln_modulation_self_attn = _adaln_modulation(dim, adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = _adaln_modulation(dim, adaln_lora_dim, 3)
        self.adaln_modulation_mlp = _adaln_modulation(dim, adaln_lora_dim, 3)

    def forward(self, x_B_T_H_W_D: torch.Tensor, t_emb_B_T_D: torch.Tensor, context_B_N_C: torch.Tensor,
                context_mask_B_N: torch.Tensor | None, rope_angles_S_hd: torch.Tensor,
                adaln_lora_B_T_3D: torch.Tensor) -> torch.Tensor:
        B, T, H, W, D = x_B_T_H_W_D.shape
        x = x_B_T_H_W_D
        shift, scale, gate = (self.adaln_modulation_self_attn(t_emb_B_T_D) + adaln_lora_B_T_3D).chunk(3, dim=-1)
        h = _modulate(x, self.layer_norm_self_attn, shift, scale).reshape(B, T * H * W, D)
        h = self.self_attn(h, rope_angles_S_hd=rope_angles_S_hd).reshape(B, T, H, W, D)
        x = x + gate[:, :, None, None] * h

        shift, scale, gate = (self.adaln_modulation_cross_attn(t_emb_B_T_D) + adaln_lora_B_T_3D).chunk(3, dim=-1)
        h = _modulate(x, self.layer_norm_cross_attn, shift, scale).reshape(B, T * H * W, D)
        h = self.cross_attn(h, context_B_N_C, mask_B_N=context_mask_B_N).reshape(B, T, H, W, D)
        x = x + gate[:, :, None, None] * h

        shift, scale, gate = (self.adaln_modulation_mlp(t_emb_B_T_D) + adaln_lora_B_T_3D).chunk(3, dim=-1)
        h = self.mlp(_modulate(x, self.layer_norm_mlp, shift, scale))
        return x + gate[:, :, None, None] * h


class FinalLayer(nn.Module):
    """LayerNorm modulated by (shift, scale), then a linear to p*p*pt*C outputs per token."""

    def __init__(self, dim: int, out_features: int, *, adaln_lora_dim: int):
        super().__init__()
        self.dim = dim
        self.layer_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_features, bias=False)
        self.adaln_modulation = _adaln_modulation(dim, adaln_lora_dim, 2)

    def forward(self, x_B_T_H_W_D: torch.Tensor, t_emb_B_T_D: torch.Tensor,
                adaln_lora_B_T_3D: torch.Tensor) -> torch.Tensor:
        mod = self.adaln_modulation(t_emb_B_T_D) + adaln_lora_B_T_3D[..., : 2 * self.dim]
        shift, scale = mod.chunk(2, dim=-1)
        return self.linear(_modulate(x_B_T_H_W_D, self.layer_norm, shift, scale))


class PatchRearrange(nn.Module):
    """(B, C, T*r, H*m, W*n) -> (B, T, H, W, C*r*m*n), features ordered (c, r, m, n)."""

    def __init__(self, temporal: int, spatial: int):
        super().__init__()
        self.r, self.m = temporal, spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        r, m = self.r, self.m
        x = x.view(B, C, T // r, r, H // m, m, W // m, m).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(B, T // r, H // m, W // m, C * r * m * m)


class PatchEmbed(nn.Module):
    """`x_embedder`: `proj` = Sequential(rearrange, Linear) so the weight key is `proj.1.weight`."""

    def __init__(self, in_channels: int, dim: int, *, temporal: int, spatial: int):
        super().__init__()
        self.proj = nn.Sequential(PatchRearrange(temporal, spatial),
                                  nn.Linear(in_channels * temporal * spatial * spatial, dim, bias=False))

    def forward(self, x_B_C_T_H_W: torch.Tensor) -> torch.Tensor:
        return self.proj(x_B_C_T_H_W)


class TimestepEmbedding(nn.Module):
    """`t_embedder.1`: SiLU MLP whose output is only the AdaLN-LoRA term (B, T, 3D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.activation = nn.SiLU()
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, emb_B_T_D: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.activation(self.linear_1(emb_B_T_D)))


class Timesteps(nn.Module):
    """Sinusoidal embedding [cos, sin] of per-frame timesteps (B, T) -> (B, T, D), fp32."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t_B_T: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t_B_T.device) / half
        emb = t_B_T.float()[..., None] * exponent.exp()
        return torch.cat([emb.cos(), emb.sin()], dim=-1)
