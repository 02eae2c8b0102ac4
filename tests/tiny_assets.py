"""Tiny random-weight stand-ins for the released Wan2.1 VAE and T5 encoder, built locally (no network).

The VAE keeps Wan2.1's structure (4 levels, 2 residual blocks, time downsampling at levels 2 and 3,
16 latent channels, upstream's latent statistics) with base_dim 8 instead of 96, so the same
loading, key conversion and chunking code runs as for the real weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cosmos_train.models.wan_vae import UPSTREAM_FILE, diffusers_to_original_key

TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True])


def tiny_vae(seed: int = 0):
    """A random `AutoencoderKLWan` with non-trivial norm scales and biases (fp32, eval)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**TINY_VAE)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma") or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return vae.eval()


def original_state_dict(vae) -> dict[str, torch.Tensor]:
    """The VAE's weights under Wan2.1's original key names (what upstream's tokenizer.pth holds)."""
    levels, res = len(vae.config.dim_mult), vae.config.num_res_blocks
    return {diffusers_to_original_key(k, num_levels=levels, num_res_blocks=res): v.clone()
            for k, v in vae.state_dict().items()}


def save_vae_both_layouts(vae, root: Path) -> tuple[Path, Path]:
    """(diffusers dir root/vae, upstream file root/model/tokenizer/tokenizer.pth)."""
    vae.save_pretrained(root / "vae")
    pth = root / "model" / "tokenizer" / UPSTREAM_FILE
    pth.parent.mkdir(parents=True)
    torch.save(original_state_dict(vae), pth)
    return root / "vae", pth
