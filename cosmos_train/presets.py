"""Architecture presets for the DiT (values from released Cosmos-Predict2 configs).

Pure data, no torch, no package imports: the spec validates against these before anything is
built, and the model takes a `DiTConfig`. Living beside both (not in `models/`) keeps the spec
free of model code and the model free of the spec.

RoPE extrapolation ratios (h, w, t) are those of upstream's Video2World nets
(`cosmos_predict2/configs/base/config_video2world.py`, `_PREDICT2_VIDEO2WORLD_NET_2B` /
`_NET_14B`): 2B (3, 3, 1), 14B (2, 2, 0.8333...). Upstream's 480p and 10 fps variants
(`_PIPELINE_{2B,14B}_{480P,720P}_{10,16}FPS`) are deep copies of the 720p/16 fps pipeline
that change only `resolution` and `state_t` (16 latent frames = 61 video frames at 10 fps),
never the net, so one preset per model size covers every released resolution and fps:
set `data.video_size` ([704, 1280] at 720p, [480, 832] at 480p) and `data.num_frames`
(93 at 16 fps, 61 at 10 fps) to match the checkpoint.
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
    "2b": DiTConfig(model_channels=2048, num_blocks=28, num_heads=16, rope_h_extrapolation_ratio=3.0,
                    rope_w_extrapolation_ratio=3.0, rope_t_extrapolation_ratio=1.0),
    "14b": DiTConfig(model_channels=5120, num_blocks=36, num_heads=40, rope_h_extrapolation_ratio=2.0,
                     rope_w_extrapolation_ratio=2.0, rope_t_extrapolation_ratio=0.8333333333333334),
}
