"""Key and config mapping between this DiT and diffusers' `CosmosTransformer3DModel`.

Pure functions, no I/O: the readers and writers of the export layer use them to present a
diffusers `transformer/` folder as a state dict in this project's (= released Cosmos-Predict2)
key space, and to write one. Both networks compute the same function (same weights, same
math); the names differ:

    ours (released .pt, without `net.`)            diffusers
    x_embedder.proj.1.weight                        patch_embed.proj.weight
    t_embedder.1.linear_{1,2}.weight                time_embed.t_embedder.linear_{1,2}.weight
    t_embedding_norm.weight                         time_embed.norm.weight
    blocks.N.self_attn.{q,k,v,output}_proj.weight   transformer_blocks.N.attn1.to_{q,k,v,out.0}.weight
    blocks.N.self_attn.{q,k}_norm.weight            transformer_blocks.N.attn1.norm_{q,k}.weight
    blocks.N.cross_attn.*                           transformer_blocks.N.attn2.* (same rule)
    blocks.N.mlp.layer1 / layer2                    transformer_blocks.N.ff.net.0.proj / ff.net.2
    blocks.N.adaln_modulation_{self_attn,cross_attn,mlp}.{1,2}
                                                    transformer_blocks.N.norm{1,2,3}.linear_{1,2}
    final_layer.adaln_modulation.{1,2}.weight       norm_out.linear_{1,2}.weight
    final_layer.linear.weight                       proj_out.weight

diffusers holds no buffers: `pos_embedder.*` (recomputed from the config) and the
`accum_*` bookkeeping counters (zero on import) are left out on export, as are
Transformer Engine `_extra_state` entries (as diffusers' own conversion script does).

Config: diffusers' `in_channels` counts the condition-mask channel (latent + 1) and
`concat_padding_mask` adds the padding channel; `rope_scale` is ordered (t, h, w) and
`max_size` is (frames, height, width) in latent pixels like our `max_frames`/`max_img_*`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from cosmos_train.presets import DiTConfig

DIFFUSERS_CLASS = "CosmosTransformer3DModel"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
TRANSFORMER_SUBFOLDER = "transformer"

# Buffers of our DiT that diffusers computes instead of storing (or does not have).
DROPPED_BUFFERS = ("pos_embedder.seq", "pos_embedder.dim_spatial_range", "pos_embedder.dim_temporal_range",
                   "accum_video_sample_counter", "accum_image_sample_counter", "accum_iteration",
                   "accum_train_in_hours")

_TOP = {
    "x_embedder.proj.1.weight": "patch_embed.proj.weight",
    "t_embedder.1.linear_1.weight": "time_embed.t_embedder.linear_1.weight",
    "t_embedder.1.linear_2.weight": "time_embed.t_embedder.linear_2.weight",
    "t_embedding_norm.weight": "time_embed.norm.weight",
    "final_layer.adaln_modulation.1.weight": "norm_out.linear_1.weight",
    "final_layer.adaln_modulation.2.weight": "norm_out.linear_2.weight",
    "final_layer.linear.weight": "proj_out.weight",
}


def _block_map() -> dict[str, str]:
    out = {}
    for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2")):
        for a, b in (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("output_proj", "to_out.0"),
                     ("q_norm", "norm_q"), ("k_norm", "norm_k")):
            out[f"{ours}.{a}.weight"] = f"{theirs}.{b}.weight"
    out["mlp.layer1.weight"] = "ff.net.0.proj.weight"
    out["mlp.layer2.weight"] = "ff.net.2.weight"
    for ours, norm in (("self_attn", "norm1"), ("cross_attn", "norm2"), ("mlp", "norm3")):
        for i in (1, 2):
            out[f"adaln_modulation_{ours}.{i}.weight"] = f"{norm}.linear_{i}.weight"
    return out


_BLOCK = _block_map()
_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_OURS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_THEIRS_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def is_dropped_on_export(key: str) -> bool:
    """True for our keys diffusers has no place for: computed buffers, counters, TE extra state."""
    return key in DROPPED_BUFFERS or key.endswith("_extra_state")


def to_diffusers_key(key: str) -> str | None:
    """diffusers' name of our (prefix-free) key; None when the key is dropped on export.

    Raises ValueError for a key outside the plain DiT (e.g. unmerged LoRA adapters).
    """
    if is_dropped_on_export(key):
        return None
    if key in _TOP:
        return _TOP[key]
    m = _OURS_BLOCK.match(key)
    if m and m.group(2) in _BLOCK:
        return f"transformer_blocks.{m.group(1)}.{_BLOCK[m.group(2)]}"
    hint = " (LoRA adapters: export with --merge-lora)" if ".lora_" in key or ".base_layer." in key else ""
    raise ValueError(f"{key}: no diffusers CosmosTransformer3DModel weight corresponds to it{hint}")


def from_diffusers_key(key: str) -> str:
    """Our (prefix-free) name of a diffusers CosmosTransformer3DModel key; ValueError if unknown."""
    if key in _TOP_INV:
        return _TOP_INV[key]
    m = _THEIRS_BLOCK.match(key)
    if m and m.group(2) in _BLOCK_INV:
        return f"blocks.{m.group(1)}.{_BLOCK_INV[m.group(2)]}"
    raise ValueError(f"{key}: not a weight of a Cosmos-Predict2 CosmosTransformer3DModel "
                     "(learnable positional embeddings, cross-attention projections and image "
                     "context belong to other Cosmos versions)")


def to_diffusers_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Our prefix-free state dict renamed for diffusers, buffers and extra state left out."""
    out = {}
    for key, value in state_dict.items():
        new = to_diffusers_key(key)
        if new is not None:
            out[new] = value
    return out


def from_diffusers_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers CosmosTransformer3DModel state dict renamed to our keys (no buffers)."""
    return {from_diffusers_key(k): v for k, v in state_dict.items()}


# -------------------------------------------------------------------------- config
def to_diffusers_config(cfg: DiTConfig) -> dict[str, Any]:
    """`CosmosTransformer3DModel` init arguments (what its config.json holds) for our architecture."""
    return {
        "in_channels": cfg.latent_channels + 1,  # + condition mask; the padding mask is concat_padding_mask
        "out_channels": cfg.latent_channels,
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "num_layers": cfg.num_blocks,
        "mlp_ratio": cfg.mlp_ratio,
        "text_embed_dim": cfg.context_dim,
        "adaln_lora_dim": cfg.adaln_lora_dim,
        "max_size": [cfg.max_frames, cfg.max_img_h, cfg.max_img_w],
        "patch_size": [cfg.patch_temporal, cfg.patch_spatial, cfg.patch_spatial],
        "rope_scale": [cfg.rope_t_extrapolation_ratio, cfg.rope_h_extrapolation_ratio, cfg.rope_w_extrapolation_ratio],
        "concat_padding_mask": True,
        "extra_pos_embed_type": None,
    }


# Config entries of other Cosmos versions that this DiT does not have, with the value that means "absent".
_ABSENT = {"extra_pos_embed_type": None, "use_crossattn_projection": False, "controlnet_block_every_n": None,
           "img_context_dim_in": None}


def from_diffusers_config(config: Mapping[str, Any], *, source: str = "config.json") -> DiTConfig:
    """Our architecture from a diffusers CosmosTransformer3DModel config; ValueError naming the field."""
    cls = config.get("_class_name", DIFFUSERS_CLASS)
    if cls != DIFFUSERS_CLASS:
        raise ValueError(f"{source}: _class_name is {cls!r}, expected {DIFFUSERS_CLASS!r}")
    for field, absent in _ABSENT.items():
        if config.get(field, absent) not in (absent, 0):
            raise ValueError(f"{source}: {field} = {config[field]!r} is not a Cosmos-Predict2 network "
                             f"(expected {absent!r})")
    if not config.get("concat_padding_mask", True):
        raise ValueError(f"{source}: concat_padding_mask = false is not a Cosmos-Predict2 network")
    try:
        pt, ph, pw = config.get("patch_size", (1, 2, 2))
        mt, mh, mw = config.get("max_size", (128, 240, 240))
        rt, rh, rw = config.get("rope_scale", (2.0, 1.0, 1.0))  # diffusers' default when absent
        out_channels = int(config.get("out_channels", 16))
        in_channels = int(config.get("in_channels", 16))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: patch_size, max_size and rope_scale need three entries ({e})") from None
    if ph != pw:
        raise ValueError(f"{source}: patch_size {[pt, ph, pw]} has unequal height and width patches")
    if in_channels != out_channels + 1:
        raise ValueError(f"{source}: in_channels {in_channels} must be out_channels + 1 = {out_channels + 1} "
                         "(latent + condition mask: a Video2World network)")
    heads, head_dim = int(config.get("num_attention_heads", 32)), int(config.get("attention_head_dim", 128))
    return DiTConfig(
        model_channels=heads * head_dim, num_blocks=int(config.get("num_layers", 28)), num_heads=heads,
        latent_channels=out_channels, patch_spatial=int(ph), patch_temporal=int(pt),
        context_dim=int(config.get("text_embed_dim", 1024)), adaln_lora_dim=int(config.get("adaln_lora_dim", 256)),
        mlp_ratio=float(config.get("mlp_ratio", 4.0)), max_img_h=int(mh), max_img_w=int(mw), max_frames=int(mt),
        rope_h_extrapolation_ratio=float(rh), rope_w_extrapolation_ratio=float(rw),
        rope_t_extrapolation_ratio=float(rt))
