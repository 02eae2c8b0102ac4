"""The video DiT, state-dict compatible with released Cosmos-Predict2 checkpoints.

The network maps a noisy latent video, per-frame timesteps and a text embedding to the
raw network output (the diffusion module applies the EDM preconditioning around it).
It knows nothing about parallelism: the attention kernel is a module built by a
factory (`attention=`), and context parallelism plugs in through `sequence_sharding`
(split every per-latent-frame tensor after patch embedding, gather after the final
layer). FSDP2 shards `model.blocks[i]` and the root from outside; the forward only
calls submodules, never reads a block's parameters directly.

Legend: B batch, C latent channels, T/H/W latent frames/height/width (after the
patch embedding: patches per axis), D model channels, N text tokens, hd head_dim.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cosmos_train.models.dit_blocks import Block, FinalLayer, PatchEmbed, TimestepEmbedding, Timesteps
from cosmos_train.presets import DiTConfig
from cosmos_train.models.rope import VideoRopePosition3DEmb


class NoSequenceSharding:
    """Default context-parallel seam: the whole sequence lives on this rank."""

    def split(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t

    def gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t


def _default_attention() -> nn.Module:
    from cosmos_train.runtime.attention import SDPAAttention

    return SDPAAttention()


def canonical_param_name(name: str) -> str:
    """The FQN without PEFT's `.base_layer`, so a LoRA-wrapped weight inits like the plain one."""
    return name.replace(".base_layer.", ".")


def init_generator(seed: int, name: str) -> torch.Generator:
    """CPU generator for one parameter, seeded from the run seed and its (canonical) FQN.

    Independent of world size and of the order parameters are visited in.
    """
    digest = hashlib.sha256(f"{seed}:{canonical_param_name(name)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _trunc_normal(shape, std: float, generator: torch.Generator) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.float32)
    return nn.init.trunc_normal_(out, std=std, a=-3 * std, b=3 * std, generator=generator)


def _uniform(shape, bound: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


class DiT(nn.Module):
    """Cosmos-Predict2 video DiT (MiniTrainDIT layout) with AdaLN-LoRA and 3D RoPE."""

    def __init__(self, cfg: DiTConfig, *, attention: Callable[[], nn.Module] | None = None):
        super().__init__()
        if cfg.model_channels % cfg.num_heads:
            raise ValueError(f"model_channels {cfg.model_channels} not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        self.sequence_sharding = NoSequenceSharding()
        attention = attention or _default_attention
        D, ps, pt = cfg.model_channels, cfg.patch_spatial, cfg.patch_temporal
        # Inputs: latent + condition-mask channel + padding-mask channel.
        self.x_embedder = PatchEmbed(cfg.latent_channels + 2, D, temporal=pt, spatial=ps)
        self.pos_embedder = VideoRopePosition3DEmb(
            head_dim=cfg.head_dim, len_h=cfg.max_img_h // ps, len_w=cfg.max_img_w // ps,
            len_t=cfg.max_frames // pt, h_extrapolation_ratio=cfg.rope_h_extrapolation_ratio,
            w_extrapolation_ratio=cfg.rope_w_extrapolation_ratio,
            t_extrapolation_ratio=cfg.rope_t_extrapolation_ratio)
        self.t_embedder = nn.Sequential(Timesteps(D), TimestepEmbedding(D))
        self.t_embedding_norm = nn.RMSNorm(D, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(D, cfg.context_dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                  adaln_lora_dim=cfg.adaln_lora_dim, attention=attention)
            for _ in range(cfg.num_blocks))
        self.final_layer = FinalLayer(D, ps * ps * pt * cfg.latent_channels, adaln_lora_dim=cfg.adaln_lora_dim)
        # Bookkeeping buffers present in released checkpoints.
        self.register_buffer("accum_video_sample_counter", torch.zeros((), dtype=torch.int64))
        self.register_buffer("accum_image_sample_counter", torch.zeros((), dtype=torch.int64))
        self.register_buffer("accum_iteration", torch.zeros((), dtype=torch.int64))
        self.register_buffer("accum_train_in_hours", torch.zeros((), dtype=torch.float32))

    # ------------------------------------------------------------------ forward
    def forward(self, x_B_C_T_H_W: torch.Tensor, timesteps_B_T: torch.Tensor, crossattn_emb_B_N_D: torch.Tensor,
                *, crossattn_mask_B_N: torch.Tensor | None = None,
                condition_mask_B_1_T_H_W: torch.Tensor | None = None,
                padding_mask_B_1_H_W: torch.Tensor | None = None) -> torch.Tensor:
        """Raw network output (B, C, T, H, W); crossattn_mask True = valid text token."""
        cfg = self.cfg
        B, C, T, H, W = x_B_C_T_H_W.shape
        if C != cfg.latent_channels or T % cfg.patch_temporal or H % cfg.patch_spatial or W % cfg.patch_spatial:
            raise ValueError(f"latent {tuple(x_B_C_T_H_W.shape)} does not fit the DiT: needs {cfg.latent_channels} "
                             f"channels, T divisible by {cfg.patch_temporal}, H and W by {cfg.patch_spatial}")
        x = x_B_C_T_H_W
        cond = (torch.zeros_like(x[:, :1]) if condition_mask_B_1_T_H_W is None
                else condition_mask_B_1_T_H_W.to(x.dtype).expand(B, 1, T, H, W))
        if padding_mask_B_1_H_W is None:
            pad = torch.zeros_like(x[:, :1, 0])
        else:
            pad = padding_mask_B_1_H_W.to(x.dtype)
            if pad.shape[-2:] != (H, W):  # pixel-resolution mask -> latent resolution
                pad = F.interpolate(pad, size=(H, W), mode="nearest")
        x = torch.cat([x, cond, pad[:, :, None].expand(B, 1, T, H, W)], dim=1)
        x_B_T_H_W_D = self.x_embedder(x)
        Tp, Hp, Wp = x_B_T_H_W_D.shape[1:4]

        t = timesteps_B_T if timesteps_B_T.ndim == 2 else timesteps_B_T.reshape(B, 1)
        if t.shape[1] == 1:
            t = t.expand(B, Tp)
        elif t.shape[1] != Tp:
            raise ValueError(f"timesteps {tuple(timesteps_B_T.shape)}: need one per latent frame ({Tp}) or one")
        dtype = x_B_T_H_W_D.dtype
        t_emb_B_T_D = self.t_embedder[0](t).to(dtype)
        adaln_lora_B_T_3D = self.t_embedder[1](t_emb_B_T_D)
        t_emb_B_T_D = self.t_embedding_norm(t_emb_B_T_D)
        rope_T_H_W_hd = self.pos_embedder.angles(Tp, Hp, Wp)

        # Context parallelism: everything per latent frame is split along T.
        ss = self.sequence_sharding
        x_B_T_H_W_D = ss.split(x_B_T_H_W_D, 1)
        rope_T_H_W_hd = ss.split(rope_T_H_W_hd, 0)
        t_emb_B_T_D = ss.split(t_emb_B_T_D, 1)
        adaln_lora_B_T_3D = ss.split(adaln_lora_B_T_3D, 1)
        rope_S_hd = rope_T_H_W_hd.reshape(-1, rope_T_H_W_hd.shape[-1])
        context = crossattn_emb_B_N_D.to(dtype)
        for block in self.blocks:
            x_B_T_H_W_D = block(x_B_T_H_W_D, t_emb_B_T_D, context, crossattn_mask_B_N, rope_S_hd, adaln_lora_B_T_3D)
        out_B_T_H_W_M = self.final_layer(x_B_T_H_W_D, t_emb_B_T_D, adaln_lora_B_T_3D)
        out_B_T_H_W_M = ss.gather(out_B_T_H_W_M, 1)
        return self.unpatchify(out_B_T_H_W_M)

    def unpatchify(self, x_B_T_H_W_M: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, p1*p2*t*C) -> (B, C, T*t, H*p1, W*p2); features ordered (p1, p2, t, C)."""
        B, T, H, W, _ = x_B_T_H_W_M.shape
        p, pt, C = self.cfg.patch_spatial, self.cfg.patch_temporal, self.cfg.latent_channels
        x = x_B_T_H_W_M.reshape(B, T, H, W, p, p, pt, C).permute(0, 7, 1, 6, 2, 4, 3, 5)
        return x.reshape(B, C, T * pt, H * p, W * p)

    def self_attention_modules(self) -> list[nn.Module]:
        """The attention modules over the video tokens (each calls its `attn_op`); context
        parallelism swaps theirs. Cross-attention to the text is not among them."""
        return [block.self_attn for block in self.blocks]

    # --------------------------------------------------------------------- init
    def init_parameter(self, name: str, shape: tuple[int, ...] | torch.Size,
                       generator: torch.Generator) -> torch.Tensor:
        """Full fp32 CPU init value of the parameter `name` (FQN, PEFT names accepted)."""
        name = canonical_param_name(name)
        shape = tuple(shape)
        if ".lora_A." in name:
            if self._lora_init() == "gaussian":  # PEFT: normal(0, 1/r)
                return torch.empty(shape).normal_(0.0, 1.0 / shape[0], generator=generator)
            return _uniform(shape, 1.0 / math.sqrt(shape[1]), generator)  # kaiming_uniform(a=sqrt(5))
        if ".lora_B." in name:
            if self._lora_init() is False:  # PEFT leaves nn.Linear's default (random) init
                return _uniform(shape, 1.0 / math.sqrt(shape[1]), generator)
            return torch.zeros(shape)
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if len(shape) != 2:
            raise ValueError(f"no init rule for parameter {name} {shape}")
        if "adaln_modulation" in name and name.endswith(".2.weight"):
            # Modulation starts from the shared AdaLN-LoRA term of t_embedder (as upstream).
            return torch.zeros(shape)
        return _trunc_normal(shape, 1.0 / math.sqrt(shape[1]), generator)

    def _lora_init(self) -> bool | str:
        peft_config = getattr(self, "peft_config", None)
        return peft_config["default"].init_lora_weights if peft_config else True

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute every buffer in place: RoPE tables and zeroed counters."""
        self.pos_embedder.reset_buffers()
        for name in ("accum_video_sample_counter", "accum_image_sample_counter",
                     "accum_iteration", "accum_train_in_hours"):
            getattr(self, name).zero_()

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise an unsharded, materialised model: every parameter, then the buffers."""
        for name, p in self.named_parameters():
            if p.is_meta:
                raise ValueError(f"{name} is on the meta device; call model.to_empty(device=...) first")
            p.copy_(self.init_parameter(name, p.shape, init_generator(seed, name)))
        self.init_buffers()


def count_parameters(cfg: DiTConfig) -> tuple[int, int]:
    """(number of parameters, number of parameter tensors), built on the meta device.

    Buffers are not counted (2b: 1,956,413,440 in 567 tensors).
    """
    with torch.device("meta"):
        model = DiT(cfg, attention=nn.Identity)
    params = list(model.parameters())
    return sum(p.numel() for p in params), len(params)
