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


CAPTION_WORDS = "a video of sks teal robot the red cube moves left right up down on table".split()


def tiny_t5_tokenizer():
    """A T5TokenizerFast over a tiny Unigram vocabulary (no download): <pad>=0, </s>=1, <unk>=2."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in CAPTION_WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz.,"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def tiny_t5(seed: int = 0):
    """A random 2-layer T5EncoderModel with T5-XXL's output width 1024."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=64, d_model=1024, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(cfg).eval()


def save_tiny_t5(root: Path, *, split: bool = False) -> Path:
    """Save the tiny T5 + tokenizer; `split` uses the Hub's diffusers layout (text_encoder/ + tokenizer/)."""
    model_dir = root / ("text_encoder" if split else "t5")
    tiny_t5().save_pretrained(model_dir)
    tiny_t5_tokenizer().save_pretrained(root / "tokenizer" if split else model_dir)
    return model_dir
