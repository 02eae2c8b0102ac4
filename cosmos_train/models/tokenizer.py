"""Video tokenizers: pixels (uint8) <-> latents (float32) behind one interface.

Every tokenizer compresses time by `temporal_compression` with the first frame alone
(frames = 4k+1 -> k+1 latent frames, like the Wan2.1 VAE of Cosmos-Predict2) and space
by `spatial_compression`. The rest of the package only sees `VideoTokenizer`, so a VAE
with weights (Wan2.1: x4 time, x8 space, 16 channels) plugs in through
`build_tokenizer` without changes elsewhere.

Built in: `SpaceToDepthTokenizer`, deterministic and exactly invertible, so the tiny
preset trains and samples with no downloaded weights. `kind = "wan2.1"` is the released VAE
(`wan_vae.py`, diffusers' `AutoencoderKLWan` with upstream's latent normalisation).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from cosmos_train.errors import CosmosTrainError


class VideoTokenizer(ABC):
    """Interface: `encode(uint8 B,C,T,H,W) -> float32 latent`, `decode(latent) -> uint8 video`."""

    latent_channels: int
    temporal_compression: int
    spatial_compression: int

    @abstractmethod
    def encode(self, video_B_C_T_H_W: torch.Tensor) -> torch.Tensor:
        """uint8 video (B, 3, T, H, W), T = 4k+1 -> float32 latent (B, C', k+1, H/s, W/s)."""

    @abstractmethod
    def decode(self, latent_B_C_T_H_W: torch.Tensor) -> torch.Tensor:
        """Latent -> uint8 video (B, 3, T, H, W)."""

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latent of a T x H x W video; raises on sizes that do not fit."""
        tc, s = self.temporal_compression, self.spatial_compression
        if T < 1 or (T - 1) % tc:
            raise CosmosTrainError(f"video has {T} frames; the tokenizer needs {tc}k+1 frames "
                                   f"(e.g. {max(1, T - (T - 1) % tc)} or {T - (T - 1) % tc + tc})")
        if H % s or W % s:
            raise CosmosTrainError(f"video size {H}x{W} is not divisible by the spatial compression {s}")
        return self.latent_channels, (T - 1) // tc + 1, H // s, W // s

    def video_frames(self, latent_T: int) -> int:
        """Pixel frames decoded from `latent_T` latent frames."""
        return (latent_T - 1) * self.temporal_compression + 1

    def identity(self) -> dict:
        """What makes this tokenizer's latents differ from another's (recorded by the latent cache)."""
        return {"kind": type(self).__name__}


class SpaceToDepthTokenizer(VideoTokenizer):
    """Exact tokenizer: pixels scaled to [-1, 1], 4 frames x s x s pixels folded into channels.

    The first frame is alone in its latent frame: it is replicated 4 times so every latent
    frame has 3*4*s*s channels (48 for s = 2); decode takes the first copy. Channel order
    is (colour, frame-in-group, row-in-patch, col-in-patch), colour slowest.
    """

    temporal_compression = 4

    def __init__(self, spatial_factor: int = 2):
        if spatial_factor < 1:
            raise ValueError(f"spatial_factor must be >= 1 (got {spatial_factor})")
        self.spatial_compression = spatial_factor
        self.latent_channels = 3 * self.temporal_compression * spatial_factor ** 2

    def identity(self) -> dict:
        return {"kind": "space_to_depth", "spatial_factor": self.spatial_compression}

    def encode(self, video_B_C_T_H_W: torch.Tensor) -> torch.Tensor:
        if video_B_C_T_H_W.dtype != torch.uint8 or video_B_C_T_H_W.ndim != 5 or video_B_C_T_H_W.shape[1] != 3:
            raise ValueError(f"encode expects uint8 (B, 3, T, H, W), got {video_B_C_T_H_W.dtype} "
                             f"{tuple(video_B_C_T_H_W.shape)}")
        B, _, T, H, W = video_B_C_T_H_W.shape
        _, Tl, Hl, Wl = self.latent_shape(T, H, W)
        x = video_B_C_T_H_W.float() / 127.5 - 1.0
        tc, s = self.temporal_compression, self.spatial_compression
        x = torch.cat([x[:, :, :1].expand(B, 3, tc, H, W), x[:, :, 1:]], dim=2)  # (B, 3, Tl*4, H, W)
        x = x.reshape(B, 3, Tl, tc, Hl, s, Wl, s).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(B, self.latent_channels, Tl, Hl, Wl).contiguous()

    def decode(self, latent_B_C_T_H_W: torch.Tensor) -> torch.Tensor:
        B, C, Tl, Hl, Wl = latent_B_C_T_H_W.shape
        if C != self.latent_channels:
            raise ValueError(f"decode expects {self.latent_channels} channels, got {C}")
        tc, s = self.temporal_compression, self.spatial_compression
        x = latent_B_C_T_H_W.float().reshape(B, 3, tc, s, s, Tl, Hl, Wl).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(B, 3, Tl * tc, Hl * s, Wl * s)
        x = torch.cat([x[:, :, :1], x[:, :, tc:]], dim=2)  # the first group holds 4 copies of frame 0
        return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def build_tokenizer(spec, *, latent_channels: int | None = None) -> VideoTokenizer:
    """The tokenizer described by a `TokenizerSpec` (model.tokenizer section).

    `latent_channels` (the DiT's) is checked against the tokenizer's when given.
    """
    if spec.kind == "space_to_depth":
        tokenizer = SpaceToDepthTokenizer(spec.spatial_factor)
    elif spec.kind == "wan2.1":
        from cosmos_train.models.wan_vae import build_wan_tokenizer  # imports diffusers only when used

        tokenizer = build_wan_tokenizer(spec)
    else:
        raise ValueError(f"unknown tokenizer kind {spec.kind!r}; valid: 'space_to_depth', 'wan2.1'")
    if latent_channels is not None and tokenizer.latent_channels != latent_channels:
        raise CosmosTrainError(f"model.architecture.latent_channels: the DiT takes {latent_channels} channels but "
                               f"the {spec.kind} tokenizer makes {tokenizer.latent_channels}")
    return tokenizer
