"""Architecture presets for the DiT (values from released Cosmos-Predict2 configs).

Pure data, no torch, no package imports: the spec validates against these before anything is
built, and the model takes a `DiTConfig`. Living beside both (not in `models/`) keeps the spec
free of model code and the model free of the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DiTConfig:
    """Everything that fixes the DiT's parameter shapes."""

    model_channels: int
    num_blocks: int
    num_heads: int
    latent_channels: int = 16
    patch_spatial: int = 2
    patch_temporal: int = 1
    context_dim: int = 1024
    adaln_lora_dim: int = 256
    mlp_ratio: float = 4.0
    # RoPE tables cover this many patches per axis (pos_embedder.seq has max of them).
    max_img_h: int = 240
    max_img_w: int = 240
    max_frames: int = 128
    rope_h_extrapolation_ratio: float = 1.0
    rope_w_extrapolation_ratio: float = 1.0
    rope_t_extrapolation_ratio: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    def with_overrides(self, **overrides) -> "DiTConfig":
        """Copy with the non-None overrides applied."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


PRESETS: dict[str, DiTConfig] = {
    # tiny: CPU work; latent channels follow the built-in space-to-depth tokenizer
    # (3 colour channels x 4 frames x 2 x 2 pixels = 48).
    "tiny": DiTConfig(model_channels=128, num_blocks=2, num_heads=4, latent_channels=48, adaln_lora_dim=64),
    "2b": DiTConfig(model_channels=2048, num_blocks=28, num_heads=16),
    "14b": DiTConfig(model_channels=5120, num_blocks=36, num_heads=40),
}
