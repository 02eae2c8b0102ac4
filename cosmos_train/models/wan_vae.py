"""The Wan2.1 VAE of Cosmos-Predict2 (diffusers' `AutoencoderKLWan`) behind `VideoTokenizer`.

diffusers holds the network; this module adds what training and inference need around it:

- weights in both layouts users have: diffusers (`vae/config.json` + safetensors) and upstream
  Cosmos (`tokenizer/tokenizer.pth`, Wan2.1's original key names, converted at load time from a
  memory-mapped file, so the state dict is never held twice);
- upstream's latent normalisation, latent = (mu - mean) * (1 / std) per channel (16 channels,
  the constants of upstream `cosmos_predict2/tokenizers/tokenizer.py`, equal to diffusers'
  `latents_mean`/`latents_std`): these are the latents the released DiT was trained on;
- causal chunked encode/decode (first frame, then 4-frame chunks, decoding one latent frame at
  a time, all through the feature cache): pixels are converted to float one chunk at a time and
  decoded chunks go straight to uint8, so memory does not grow with the clip beyond the uint8
  video and the latent. Optional spatial tiling (diffusers' tiled path) for 720p on small GPUs.

Shapes: video uint8 (B, 3, T, H, W), T = 4k+1; latent float32 (B, 16, k+1, H/8, W/8).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Mapping

import torch

from cosmos_train.errors import CosmosTrainError
from cosmos_train.models.tokenizer import VideoTokenizer

UPSTREAM_FILE = "tokenizer.pth"  # upstream: <model dir>/tokenizer/tokenizer.pth
# Upstream's per-channel latent statistics (cosmos_predict2/tokenizers/tokenizer.py, class VAE).
WAN21_LATENT_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENT_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def _diffusers():
    try:
        from diffusers import AutoencoderKLWan
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    except ImportError as e:
        raise CosmosTrainError(f"model.tokenizer.kind = \"wan2.1\" needs diffusers>=0.33 "
                               f"(pip install 'cosmos-train[wan]'): {e}") from None
    return AutoencoderKLWan, WanCausalConv3d


# ------------------------------------------------------------------ key names
# Wan2.1 residual block: residual = [RMSNorm, SiLU, Conv, RMSNorm, SiLU, Dropout, Conv], shortcut.
_RESIDUAL = [("residual.0.gamma", "norm1.gamma"), ("residual.2.", "conv1."), ("residual.3.gamma", "norm2.gamma"),
             ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut.")]
_TOP = [("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")]
_PART = [("conv1.", "conv_in."), ("head.0.", "norm_out."), ("head.2.", "conv_out."),
         ("middle.1.", "mid_block.attentions.0.")]


def _swap(rest: str, table, *, reverse: bool) -> str:
    for a, b in table:
        src, dst = (b, a) if reverse else (a, b)
        if rest.startswith(src):
            return dst + rest[len(src):]
    return rest


def original_to_diffusers_key(key: str, *, num_levels: int, num_res_blocks: int) -> str:
    """Wan2.1 original name -> diffusers `AutoencoderKLWan` name (any depth, attn_scales = [])."""
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return _swap(key, _TOP, reverse=False)
    m = re.match(r"middle\.([02])\.(.*)", rest)
    if m:
        return f"{part}.mid_block.resnets.{int(m.group(1)) // 2}.{_swap(m.group(2), _RESIDUAL, reverse=False)}"
    m = re.match(r"(downsamples|upsamples)\.(\d+)\.(.*)", rest)
    if m is None:
        return f"{part}.{_swap(rest, _PART, reverse=False)}"
    n, inner = int(m.group(2)), _swap(m.group(3), _RESIDUAL, reverse=False)
    if part == "encoder":  # diffusers keeps the encoder's flat list
        return f"encoder.down_blocks.{n}.{inner}"
    per_level = num_res_blocks + 2  # R+1 residual blocks and one upsampler (none after the last level)
    level, pos = divmod(n, per_level)
    if level >= num_levels or (level == num_levels - 1 and pos > num_res_blocks):
        raise KeyError(f"{key}: index {n} is outside a decoder of {num_levels} levels x {num_res_blocks} blocks")
    if pos <= num_res_blocks:
        return f"decoder.up_blocks.{level}.resnets.{pos}.{inner}"
    return f"decoder.up_blocks.{level}.upsamplers.0.{m.group(3)}"


def diffusers_to_original_key(key: str, *, num_levels: int, num_res_blocks: int) -> str:
    """The inverse of `original_to_diffusers_key`."""
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return _swap(key, _TOP, reverse=True)
    m = re.match(r"mid_block\.resnets\.([01])\.(.*)", rest)
    if m:
        return f"{part}.middle.{int(m.group(1)) * 2}.{_swap(m.group(2), _RESIDUAL, reverse=True)}"
    m = re.match(r"down_blocks\.(\d+)\.(.*)", rest)
    if m:
        return f"encoder.downsamples.{m.group(1)}.{_swap(m.group(2), _RESIDUAL, reverse=True)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", rest)
    if m:
        level, per_level = int(m.group(1)), num_res_blocks + 2
        if m.group(3) is not None:
            inner = _swap(m.group(4), _RESIDUAL, reverse=True)
            return f"decoder.upsamples.{level * per_level + int(m.group(3))}.{inner}"
        return f"decoder.upsamples.{level * per_level + num_res_blocks + 1}.{m.group(4)}"
    return f"{part}.{_swap(rest, _PART, reverse=True)}"


def config_from_original(shapes: Mapping[str, torch.Size]) -> dict:
    """`AutoencoderKLWan` config of an original-layout state dict, read from its key names and shapes."""
    try:
        base_dim = shapes["encoder.conv1.weight"][0]
        z_dim = shapes["conv2.weight"][0]
        decoder_dim = shapes["decoder.head.2.weight"][1]
    except KeyError as e:
        raise CosmosTrainError(f"not a Wan2.1 VAE state dict (no {e.args[0]!r})") from None
    if any(".to_qkv." in k for k in shapes if ".middle." not in k):
        raise CosmosTrainError("Wan2.1 VAE with attention outside the middle blocks (attn_scales) is not supported")
    entries = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.downsamples.")})
    resample = [n for n in entries if f"encoder.downsamples.{n}.resample.1.weight" in shapes]
    levels = len(resample) + 1
    if (len(entries) - len(resample)) % levels:
        raise CosmosTrainError(f"Wan2.1 VAE: {len(entries)} encoder blocks do not split into {levels} levels")
    res_blocks = (len(entries) - len(resample)) // levels
    per_level = res_blocks + 1
    dim_mult = [shapes[f"encoder.downsamples.{i * per_level}.residual.2.weight"][0] // base_dim for i in range(levels)]
    temporal = [f"encoder.downsamples.{n}.time_conv.weight" in shapes for n in resample]
    config = dict(base_dim=base_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=res_blocks,
                  attn_scales=[], temperal_downsample=temporal)
    if decoder_dim != base_dim:
        config["decoder_base_dim"] = decoder_dim
    if z_dim == len(WAN21_LATENT_MEAN):
        config.update(latents_mean=list(WAN21_LATENT_MEAN), latents_std=list(WAN21_LATENT_STD))
    else:  # only tiny test models: no statistics exist, normalisation is the identity
        config.update(latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    return config


def convert_original_state_dict(sd: Mapping[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename an original-layout state dict to diffusers names (tensors are not copied)."""
    levels, res = len(config["dim_mult"]), config["num_res_blocks"]
    return {original_to_diffusers_key(k, num_levels=levels, num_res_blocks=res): v for k, v in sd.items()}


# -------------------------------------------------------------------- loading
def find_vae_weights(path: Path) -> tuple[str, Path]:
    """("diffusers", dir with config.json) or ("original", tokenizer.pth file) for a local path."""
    if path.is_file():
        if path.suffix in (".pth", ".pt", ".safetensors"):
            return "original", path
        raise CosmosTrainError(f"{path}: not a VAE weight file (.pth, .pt or .safetensors)")
    for sub in ("", "vae"):
        if (path / sub / "config.json").is_file():
            return "diffusers", path / sub
    for sub in ("", "tokenizer"):
        if (path / sub / UPSTREAM_FILE).is_file():
            return "original", path / sub / UPSTREAM_FILE
    raise CosmosTrainError(f"{path}: no Wan2.1 VAE here (expected a diffusers vae/ folder with config.json, "
                           f"or upstream's tokenizer/{UPSTREAM_FILE})")


def _load_original_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))  # safetensors maps the file; tensors are views of it
    try:  # mmap: tensors stay backed by the file, so RSS holds at most one copy of the weights
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, not a torch file, refused pickle global
        raise CosmosTrainError(f"{path}: cannot read the VAE weights: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CosmosTrainError(f"{path}: expected a flat dict of tensors (Wan2.1 VAE state dict)")
    return sd


def load_wan_vae(path: str | Path):
    """diffusers `AutoencoderKLWan` (fp32, CPU, eval) from a local path in either layout, or hf://."""
    from cosmos_train.hub import resolve_local

    AutoencoderKLWan, _ = _diffusers()
    layout, local = find_vae_weights(resolve_local(path))
    if layout == "diffusers":
        try:
            vae = AutoencoderKLWan.from_pretrained(str(local), torch_dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise CosmosTrainError(f"{local}: cannot load the diffusers VAE: {e}") from None
        return vae.eval().requires_grad_(False)
    sd = _load_original_tensors(local)
    config = config_from_original({k: v.shape for k, v in sd.items()})
    with torch.device("meta"):
        vae = AutoencoderKLWan(**config)
    converted = convert_original_state_dict(sd, config)
    missing = sorted(set(vae.state_dict()) - set(converted))
    unexpected = sorted(set(converted) - set(vae.state_dict()))
    if missing or unexpected:
        raise CosmosTrainError(f"{local}: Wan2.1 VAE keys do not match ({len(missing)} missing, e.g. "
                               f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})")
    vae.load_state_dict({k: v.float() for k, v in converted.items()}, assign=True)
    return vae.eval().requires_grad_(False)


def _digest(vae) -> str:
    """Short hash of the config (latent statistics included) and every weight: tells two VAEs apart."""
    import hashlib
    import json

    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}  # not diffusers' bookkeeping
    h = hashlib.blake2b(json.dumps(config, sort_keys=True, default=str).encode(), digest_size=8)
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ tokenizer
class WanVAETokenizer(VideoTokenizer):
    """Wan2.1 VAE as a `VideoTokenizer`: normalised latents, chunked causal encode/decode.

    The weights follow the input: `encode`/`decode` move them to the input's device (bf16 on CUDA
    when `dtype` is "auto", fp32 elsewhere); `offload()` returns them to the CPU.
    """

    def __init__(self, vae, *, dtype: str = "auto", tiling: bool = False, source: str = ""):
        _, self._causal_conv = _diffusers()
        cfg = vae.config
        if cfg.is_residual or cfg.patch_size is not None:
            raise CosmosTrainError(f"{source}: a Wan2.2-style VAE (is_residual/patch_size); only Wan2.1 is supported")
        self.vae, self.dtype_name, self.tiling, self.source = vae, dtype, tiling, source
        self.latent_channels = cfg.z_dim
        self.temporal_compression = 2 ** sum(cfg.temperal_downsample)
        self.spatial_compression = 2 ** (len(cfg.dim_mult) - 1)
        if self.temporal_compression != 4:
            raise CosmosTrainError(f"{source}: VAE compresses time by {self.temporal_compression}; Wan2.1 uses 4")
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        if tiling:
            vae.enable_tiling()
        self._weights_digest = _digest(vae)  # now, while the weights are the loaded fp32 ones

    def identity(self) -> dict:
        return {"kind": "wan2.1", "weights": self._weights_digest, "source": self.source, "tiling": self.tiling}

    # ----------------------------------------------------------- placement
    def _dtype_for(self, device: torch.device) -> torch.dtype:
        if self.dtype_name == "bf16" or (self.dtype_name == "auto" and device.type == "cuda"):
            return torch.bfloat16
        return torch.float32

    def to(self, device: torch.device | str) -> "WanVAETokenizer":
        """Move the weights to `device` in the dtype chosen for it."""
        device = torch.device(device)
        self.vae.to(device=device, dtype=self._dtype_for(device))
        return self

    def offload(self) -> None:
        """Weights back to the CPU (frees GPU memory while the DiT runs)."""
        self.vae.to("cpu")

    def _place(self, device: torch.device) -> tuple[torch.dtype, torch.Tensor, torch.Tensor]:
        p = next(self.vae.parameters())
        dtype = self._dtype_for(device)
        if p.device != device or p.dtype != dtype:
            self.to(device)
        return dtype, self.mean.to(device, dtype), self.inv_std.to(device, dtype)

    def _new_cache(self, part: torch.nn.Module) -> list:
        return [None] * sum(isinstance(m, self._causal_conv) for m in part.modules())

    # -------------------------------------------------------------- encode
    @torch.no_grad()
    def encode(self, video_B_C_T_H_W: torch.Tensor) -> torch.Tensor:
        if video_B_C_T_H_W.dtype != torch.uint8 or video_B_C_T_H_W.ndim != 5 or video_B_C_T_H_W.shape[1] != 3:
            raise ValueError(f"encode expects uint8 (B, 3, T, H, W), got {video_B_C_T_H_W.dtype} "
                             f"{tuple(video_B_C_T_H_W.shape)}")
        B, _, T, H, W = video_B_C_T_H_W.shape
        C, Tl, Hl, Wl = self.latent_shape(T, H, W)
        device = video_B_C_T_H_W.device
        dtype, mean, inv_std = self._place(device)
        if self.tiling:
            x = (video_B_C_T_H_W.float() / 127.5 - 1.0).to(dtype)
            mu = self.vae.encode(x).latent_dist.mode()
            return ((mu - mean) * inv_std).float()
        out = torch.empty(B, C, Tl, Hl, Wl, dtype=torch.float32, device=device)
        for t0, mu in self.encode_chunks(video_B_C_T_H_W, dtype=dtype):
            out[:, :, t0:t0 + mu.shape[2]] = ((mu - mean) * inv_std).float()
        return out

    def encode_chunks(self, video_B_C_T_H_W: torch.Tensor, *, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
        """(first latent frame, unnormalised mu) per causal chunk: frame 0, then 4 frames at a time."""
        vae, tc = self.vae, self.temporal_compression
        cache = self._new_cache(vae.encoder)
        T = video_B_C_T_H_W.shape[2]
        for i, start in enumerate([0, *range(1, T, tc)]):
            stop = 1 if i == 0 else start + tc
            x = (video_B_C_T_H_W[:, :, start:stop].float() / 127.5 - 1.0).to(dtype)
            h = vae.quant_conv(vae.encoder(x, feat_cache=cache, feat_idx=[0]))  # kernel 1: per chunk is exact
            yield i, h[:, :self.latent_channels]

    # -------------------------------------------------------------- decode
    @torch.no_grad()
    def decode(self, latent_B_C_T_H_W: torch.Tensor) -> torch.Tensor:
        B, C, Tl, Hl, Wl = latent_B_C_T_H_W.shape
        if C != self.latent_channels:
            raise ValueError(f"decode expects {self.latent_channels} channels, got {C}")
        s = self.spatial_compression
        out = torch.empty(B, 3, self.video_frames(Tl), Hl * s, Wl * s, dtype=torch.uint8,
                          device=latent_B_C_T_H_W.device)
        for t0, x in self.decode_chunks(latent_B_C_T_H_W):
            out[:, :, t0:t0 + x.shape[2]] = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        return out

    def decode_chunks(self, latent_B_C_T_H_W: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(first pixel frame, pixels in [-1, 1]) per latent frame: 1 frame, then 4 at a time."""
        device = latent_B_C_T_H_W.device
        dtype, mean, inv_std = self._place(device)
        vae = self.vae
        z = latent_B_C_T_H_W.to(dtype) / inv_std + mean  # upstream: z / (1/std) + mean
        if self.tiling:
            yield 0, vae.decode(z).sample
            return
        x = vae.post_quant_conv(z)  # kernel 1: per frame is exact
        cache = self._new_cache(vae.decoder)
        t0 = 0
        for i in range(z.shape[2]):
            frames = vae.decoder(x[:, :, i:i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
            yield t0, frames.clamp(-1.0, 1.0)  # diffusers clamps the decoded video the same way
            t0 += frames.shape[2]


def build_wan_tokenizer(spec) -> WanVAETokenizer:
    """The Wan2.1 tokenizer of a `TokenizerSpec` (kind "wan2.1"): weights from `spec.path`."""
    if not spec.path:
        raise CosmosTrainError("model.tokenizer.path: needed for kind \"wan2.1\" (the VAE weights: a diffusers "
                               "vae/ folder, upstream tokenizer/tokenizer.pth, or hf://org/repo/path)")
    return WanVAETokenizer(load_wan_vae(spec.path), dtype=spec.dtype, tiling=spec.tiling, source=spec.path)
