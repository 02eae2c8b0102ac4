"""Training objective: rectified flow written in EDM sigma form (as Cosmos-Predict2).

With t = sigma / (1 + sigma) the EDM noisy latent x_sigma = x0 + sigma * eps scaled by
c_in = 1 - t is exactly the rectified-flow interpolant (1 - t) * x0 + t * eps, which is
what the network sees. The x0 prediction is

    x0_pred = c_skip * x_sigma + c_out * net(c_in * x_sigma, c_noise)
            = x_t - t * net(x_t, t)       (the net predicts the velocity eps - x0)

with c_skip = 1 - t, c_out = -t, c_in = 1 - t, c_noise = t. The loss is the x0 MSE weighted
by (1 + sigma)^2 / sigma^2 (= the velocity MSE), times loss_scale, over the non-condition
latent frames. The first `num_condition_frames` latent frames are the clean condition:
the clean latent is placed in the net input, their timestep is c_noise(sigma_cond = 1e-4),
the condition-mask channel is 1 there, and they carry no loss.

All randomness (sigma, noise, text dropout) comes from the `generator` passed in.
Legend: B batch, C latent channels, T latent frames, H/W latent size, N text tokens.
"""

from __future__ import annotations

import math

import torch

SIGMA_CONDITION = 1e-4


# ------------------------------------------------------------ formula pieces
def sample_sigma(batch: int, *, generator: torch.Generator, p_mean: float = 0.0, p_std: float = 1.0,
                 high_sigma_ratio: float = 0.05, high_sigma_min: float = 200.0,
                 high_sigma_max: float = 1e5) -> torch.Tensor:
    """(B,) float64 sigmas on the generator's device: ln sigma ~ N(p_mean, p_std); with
    probability high_sigma_ratio, log-uniform in [high_sigma_min, high_sigma_max] instead."""
    dev = generator.device
    log_sigma = p_mean + p_std * torch.randn(batch, generator=generator, device=dev, dtype=torch.float64)
    u = torch.rand(batch, generator=generator, device=dev, dtype=torch.float64)
    log_high = math.log(high_sigma_min) + (math.log(high_sigma_max) - math.log(high_sigma_min)) * u
    use_high = torch.rand(batch, generator=generator, device=dev, dtype=torch.float64) < high_sigma_ratio
    return torch.where(use_high, log_high, log_sigma).exp()


def rf_scaling(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) of rectified flow in EDM form, t = sigma / (1 + sigma)."""
    t = sigma / (1 + sigma)
    return 1 - t, -t, 1 - t, t


# c_noise of the condition frames, computed once in float32 as the tensors are (no per-step host read).
_C_NOISE_CONDITION = rf_scaling(torch.tensor(SIGMA_CONDITION))[3].item()


def loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """Per-sigma weight (1 + sigma)^2 / sigma^2 of the x0 MSE."""
    return (1 + sigma) ** 2 / sigma ** 2


def condition_mask(shape_B_C_T_H_W: tuple[int, ...] | torch.Size, num_condition_frames: int,
                   *, device=None) -> torch.Tensor:
    """(B, 1, T, H, W) float mask, 1 on the first `num_condition_frames` latent frames."""
    B, _, T, H, W = shape_B_C_T_H_W
    if not 0 <= num_condition_frames <= T:
        raise ValueError(f"num_condition_frames {num_condition_frames} not in [0, {T}]")
    mask = torch.zeros(B, 1, T, H, W, device=device)
    mask[:, :, :num_condition_frames] = 1.0
    return mask


def denoise(net, x_sigma_B_C_T_H_W: torch.Tensor, sigma_B: torch.Tensor, text_emb_B_N_D: torch.Tensor,
            text_mask_B_N: torch.Tensor | None, *, clean_latent: torch.Tensor | None = None,
            num_condition_frames: int = 0) -> torch.Tensor:
    """x0 prediction (float32) of the noisy latent at per-sample sigma (B,).

    Condition frames (the first `num_condition_frames`) take the clean latent as net input,
    timestep c_noise(1e-4) and mask channel 1; their x0 prediction is the clean latent.
    """
    x = x_sigma_B_C_T_H_W.float()
    B, _, T, _, _ = x.shape
    sigma = sigma_B.to(x.device, torch.float64)
    c_skip, c_out, c_in, c_noise = (c.float()[:, None, None, None, None] for c in rf_scaling(sigma))
    net_in = c_in * x
    timesteps_B_T = c_noise.reshape(B, 1).expand(B, T).clone()
    mask = condition_mask(x.shape, num_condition_frames, device=x.device)
    if num_condition_frames:
        if clean_latent is None:
            raise ValueError("num_condition_frames > 0 needs clean_latent")
        clean = clean_latent[:, :, :num_condition_frames].float()
        net_in[:, :, :num_condition_frames] = clean
        timesteps_B_T[:, :num_condition_frames] = _C_NOISE_CONDITION
    out = net(net_in, timesteps_B_T, text_emb_B_N_D, crossattn_mask_B_N=text_mask_B_N,
              condition_mask_B_1_T_H_W=mask).float()
    x0 = c_skip * x + c_out * out
    if num_condition_frames:
        x0[:, :, :num_condition_frames] = clean
    return x0


# ------------------------------------------------------------------ the loss
def training_loss(net, x0_B_C_T_H_W: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor | None, *,
                  generator: torch.Generator, num_condition_frames: int = 1, text_dropout: float = 0.2,
                  loss_scale: float = 10.0, high_sigma_ratio: float = 0.05,
                  sigma_override: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Diffusion loss of one batch and detached stats (`loss`, `mse`, `sigma_mean`).

    `sigma_override` fixes sigma (scalar or (B,)) for the validation loss; pass
    `text_dropout=0` there too for a deterministic figure.
    """
    x0 = x0_B_C_T_H_W.float()
    B, _, T, _, _ = x0.shape
    if num_condition_frames >= T:
        raise ValueError(f"num_condition_frames {num_condition_frames} leaves no frame to denoise (T = {T})")
    dev = generator.device
    if sigma_override is None:
        sigma = sample_sigma(B, generator=generator, high_sigma_ratio=high_sigma_ratio)
    else:
        sigma = torch.as_tensor(sigma_override, dtype=torch.float64).to(dev).expand(B).clone()
    eps = torch.randn(x0.shape, generator=generator, device=dev).to(x0.device)
    keep_text = torch.rand(B, generator=generator, device=dev) >= text_dropout
    sigma = sigma.to(x0.device)
    text = text_emb * keep_text.to(text_emb.device, text_emb.dtype)[:, None, None]

    x_sigma = x0 + sigma.float()[:, None, None, None, None] * eps
    x0_pred = denoise(net, x_sigma, sigma, text, text_mask, clean_latent=x0,
                      num_condition_frames=num_condition_frames)
    k = num_condition_frames
    err = (x0_pred[:, :, k:] - x0[:, :, k:]) ** 2  # (B, C, T - k, H, W)
    weighted = loss_weight(sigma).float()[:, None, None, None, None] * err
    loss = weighted.mean() * loss_scale
    stats = {"loss": loss.detach(), "mse": err.mean().detach(), "sigma_mean": sigma.mean().detach()}
    return loss, stats
