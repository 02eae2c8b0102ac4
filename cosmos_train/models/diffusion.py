"""Training objective: rectified flow written in EDM sigma form (as Cosmos-Predict2).

With t = sigma / (1 + sigma) the EDM noisy latent x_sigma = x0 + sigma * eps scaled by
c_in = 1 - t is exactly the rectified-flow interpolant (1 - t) * x0 + t * eps, which is
what the network sees. The x0 prediction is

    x0_pred = c_skip * x_sigma + c_out * net(c_in * x_sigma, c_noise)
            = x_t - t * net(x_t, t)       (the net predicts the velocity eps - x0)

with c_skip = 1 - t, c_out = -t, c_in = 1 - t, c_noise = t. The loss is the x0 MSE weighted
by (1 + sigma)^2 / sigma^2 (= the velocity MSE), times loss_scale, averaged over all T
latent frames. The first k latent frames of a sample are its clean condition: the clean
latent is placed in the net input, their timestep is c_noise(sigma_cond = 1e-4), the
condition-mask channel is 1 there, and their x0 prediction is the clean latent (zero loss).

Upstream (`cosmos_predict2/models/video2world_model.py`, `pipelines/video2world.py`) and
this module agree on each of these, in particular:
- video batches (T > 1) scale the sampled sigma by sqrt(T) (`adjust_video_noise`,
  `draw_training_sigma_and_epsilon`); the high-sigma draw (video only) replaces the scaled value;
- k is drawn per sample uniformly from {min, max} (`VideoCondition.set_video_condition`,
  min/max_num_conditional_frames = 1/2); images (T = 1) have no condition frame;
- the loss is `mean()` over B, C, T, H, W, condition frames included (they are zero).

All randomness (sigma, noise, text dropout, k) comes from the `generator` passed in.
Legend: B batch, C latent channels, T latent frames, H/W latent size, N text tokens.
"""

from __future__ import annotations

import math

import torch

SIGMA_CONDITION = 1e-4


# ------------------------------------------------------------ formula pieces
def sample_sigma(batch: int, *, generator: torch.Generator, p_mean: float = 0.0, p_std: float = 1.0,
                 multiplier: float = 1.0, high_sigma_ratio: float = 0.05, high_sigma_min: float = 200.0,
                 high_sigma_max: float = 1e5) -> torch.Tensor:
    """(B,) float64 sigmas on the generator's device: multiplier * exp(N(p_mean, p_std)); with
    probability high_sigma_ratio, log-uniform in [high_sigma_min, high_sigma_max] instead
    (not multiplied, as upstream replaces the scaled sigma)."""
    dev = generator.device
    log_sigma = p_mean + p_std * torch.randn(batch, generator=generator, device=dev, dtype=torch.float64)
    u = torch.rand(batch, generator=generator, device=dev, dtype=torch.float64)
    log_high = math.log(high_sigma_min) + (math.log(high_sigma_max) - math.log(high_sigma_min)) * u
    use_high = torch.rand(batch, generator=generator, device=dev, dtype=torch.float64) < high_sigma_ratio
    return torch.where(use_high, log_high.exp(), log_sigma.exp() * multiplier)


def video_noise_multiplier(latent_frames: int) -> float:
    """sqrt(T) for a video (T > 1), 1 for an image: upstream's `adjust_video_noise`."""
    return math.sqrt(latent_frames) if latent_frames > 1 else 1.0


def rf_scaling(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) of rectified flow in EDM form, t = sigma / (1 + sigma)."""
    t = sigma / (1 + sigma)
    return 1 - t, -t, 1 - t, t


# c_noise of the condition frames, computed once in float32 as the tensors are (no per-step host read).
_C_NOISE_CONDITION = rf_scaling(torch.tensor(SIGMA_CONDITION))[3].item()


def loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """Per-sigma weight (1 + sigma)^2 / sigma^2 of the x0 MSE."""
    return (1 + sigma) ** 2 / sigma ** 2


def condition_frames_B(num_condition_frames: int | torch.Tensor, batch: int, frames: int,
                       *, device=None) -> torch.Tensor:
    """(B,) int64 condition-frame counts from an int (same for every sample) or a (B,) tensor."""
    if isinstance(num_condition_frames, int):
        if not 0 <= num_condition_frames <= frames:
            raise ValueError(f"num_condition_frames {num_condition_frames} not in [0, {frames}]")
        return torch.full((batch,), num_condition_frames, dtype=torch.int64, device=device)
    # A tensor is not range-checked: that would sync the host in every training step.
    k = num_condition_frames.to(device=device, dtype=torch.int64)
    if k.shape != (batch,):
        raise ValueError(f"num_condition_frames: need an int or one count per sample ({batch}), got {tuple(k.shape)}")
    return k


def frame_is_condition(num_condition_frames: int | torch.Tensor, batch: int, frames: int,
                       *, device=None) -> torch.Tensor:
    """(B, T) bool: True on each sample's first k latent frames."""
    k = condition_frames_B(num_condition_frames, batch, frames, device=device)
    return torch.arange(frames, device=k.device)[None, :] < k[:, None]


def condition_mask(shape_B_C_T_H_W: tuple[int, ...] | torch.Size, num_condition_frames: int | torch.Tensor,
                   *, device=None) -> torch.Tensor:
    """(B, 1, T, H, W) float mask, 1 on each sample's first `num_condition_frames` latent frames."""
    B, _, T, H, W = shape_B_C_T_H_W
    is_cond = frame_is_condition(num_condition_frames, B, T, device=device)
    return is_cond.float()[:, None, :, None, None].expand(B, 1, T, H, W).contiguous()


def denoise(net, x_sigma_B_C_T_H_W: torch.Tensor, sigma_B: torch.Tensor, text_emb_B_N_D: torch.Tensor,
            text_mask_B_N: torch.Tensor | None, *, clean_latent: torch.Tensor | None = None,
            num_condition_frames: int | torch.Tensor = 0) -> torch.Tensor:
    """x0 prediction (float32) of the noisy latent at per-sample sigma (B,).

    Condition frames (each sample's first `num_condition_frames`: an int or a (B,) tensor)
    take the clean latent as net input, timestep c_noise(1e-4) and mask channel 1; their
    x0 prediction is the clean latent (upstream `Video2WorldPipeline.denoise`, FRAME_REPLACE).
    """
    x = x_sigma_B_C_T_H_W.float()
    B, _, T, _, _ = x.shape
    sigma = sigma_B.to(x.device, torch.float64)
    c_skip, c_out, c_in, c_noise = (c.float()[:, None, None, None, None] for c in rf_scaling(sigma))
    net_in = c_in * x
    timesteps_B_T = c_noise.reshape(B, 1).expand(B, T)
    is_cond_B_T = frame_is_condition(num_condition_frames, B, T, device=x.device)
    mask = is_cond_B_T.float()[:, None, :, None, None].expand(B, 1, T, *x.shape[3:])
    has_condition = isinstance(num_condition_frames, torch.Tensor) or num_condition_frames > 0
    if has_condition:
        if clean_latent is None:
            raise ValueError("num_condition_frames > 0 needs clean_latent")
        clean = clean_latent.float().to(x.device)
        is_cond = is_cond_B_T[:, None, :, None, None]
        net_in = torch.where(is_cond, clean, net_in)
        timesteps_B_T = torch.where(is_cond_B_T, _C_NOISE_CONDITION, timesteps_B_T)
    out = net(net_in, timesteps_B_T.contiguous(), text_emb_B_N_D, crossattn_mask_B_N=text_mask_B_N,
              condition_mask_B_1_T_H_W=mask).float()
    x0 = c_skip * x + c_out * out
    if has_condition:
        x0 = torch.where(is_cond, clean, x0)
    return x0


# ------------------------------------------------------------------ the loss
def training_loss(net, x0_B_C_T_H_W: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor | None, *,
                  generator: torch.Generator, num_condition_frames: int | tuple[int, int] = 1,
                  text_dropout: float = 0.2, loss_scale: float = 10.0, high_sigma_ratio: float = 0.05,
                  adjust_video_noise: bool = True,
                  sigma_override: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Diffusion loss of one batch and detached stats (`loss`, `mse`, `sigma_mean`).

    `num_condition_frames`: an int fixes k for every sample; a (min, max) pair draws k per
    sample uniformly from {min, ..., max} (upstream and the spec: (1, 2)). Video batches (T > 1) scale the
    sampled sigma by sqrt(T) when `adjust_video_noise`. `sigma_override` fixes sigma (scalar
    or (B,)) for the validation loss; pass `text_dropout=0` there too for a deterministic figure.
    """
    x0 = x0_B_C_T_H_W.float()
    B, _, T, _, _ = x0.shape
    lo, hi = ((num_condition_frames, num_condition_frames) if isinstance(num_condition_frames, int)
              else num_condition_frames)
    if T == 1:
        lo = hi = 0  # an image batch has no condition frame (upstream set_video_condition)
    if not 0 <= lo <= hi or hi >= T:
        raise ValueError(f"condition frames {lo}..{hi} must leave a frame to denoise (T = {T})")
    dev = generator.device
    if sigma_override is None:
        multiplier = video_noise_multiplier(T) if adjust_video_noise else 1.0
        # upstream draws high sigmas for video batches only
        sigma = sample_sigma(B, generator=generator, multiplier=multiplier,
                             high_sigma_ratio=high_sigma_ratio if T > 1 else 0.0)
    else:
        sigma = torch.as_tensor(sigma_override, dtype=torch.float64).to(dev).expand(B).clone()
    eps = torch.randn(x0.shape, generator=generator, device=dev).to(x0.device)
    keep_text = torch.rand(B, generator=generator, device=dev) >= text_dropout
    # Drawn even when lo == hi so the generator advances the same way for every setting.
    k_B = torch.randint(lo, hi + 1, (B,), generator=generator, device=dev).to(x0.device)
    sigma = sigma.to(x0.device)
    text = text_emb * keep_text.to(text_emb.device, text_emb.dtype)[:, None, None]

    x_sigma = x0 + sigma.float()[:, None, None, None, None] * eps
    x0_pred = denoise(net, x_sigma, sigma, text, text_mask, clean_latent=x0, num_condition_frames=k_B)
    err = (x0_pred - x0) ** 2  # (B, C, T, H, W); exactly 0 on the condition frames
    weighted = loss_weight(sigma).float()[:, None, None, None, None] * err
    loss = weighted.mean() * loss_scale  # over all T frames, as upstream's kendall_loss.mean()
    stats = {"loss": loss.detach(), "mse": err.mean().detach(), "sigma_mean": sigma.mean().detach()}
    return loss, stats
