"""Sampler: Karras sigma schedule, Euler first step, then second-order Adams–Bashforth in
x0 form (exponential integrator in log-sigma, as the Cosmos "2ab" solver), classifier-free
guidance x0 = x0_pos + g * (x0_pos - x0_neg) (g = 0: none, default 7), condition frames kept
clean, initial noise NumPy `RandomState(seed).standard_normal` -- all as upstream's
`Video2WorldPipeline.__call__` / `get_x0_fn_from_batch` and `imaginaire.utils.misc.arch_invariant_rand`,
so the same weights, inputs and seed give upstream's sample.

The ODE is dx/dsigma = (x - x0(x, sigma)) / sigma. Stepping from sigma_s to sigma_t with
h = ln(sigma_s / sigma_t) and x0 linear in lambda = -ln(sigma) (through the previous
prediction) integrates exactly to

    x_t = (sigma_t / sigma_s) x_s + h * (b1 * x0_s + b2 * x0_prev),
    b1 = phi1(-h) - phi2(-h) / c,  b2 = phi2(-h) / c,  c = (lambda_prev - lambda_s) / h,

phi1(z) = (e^z - 1) / z, phi2(z) = (phi1(z) - 1) / z. Without a previous prediction
(b2 = 0) this is exactly the Euler step. After the last step the sampler returns the x0
prediction at sigma_min.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from cosmos_train.models.diffusion import denoise


def karras_sigmas(steps: int, *, sigma_max: float = 80.0, sigma_min: float = 0.002,
                  rho: float = 7.0) -> torch.Tensor:
    """steps + 1 sigmas (float64) from sigma_max down to sigma_min (Karras et al. 2022, eq. 5)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    ramp = torch.arange(steps + 1, dtype=torch.float64) / steps
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def euler_step(x_s: torch.Tensor, x0_s: torch.Tensor, sigma_s: float, sigma_t: float) -> torch.Tensor:
    """One Euler step of dx/dsigma = (x - x0) / sigma."""
    return x_s + (sigma_t - sigma_s) * (x_s - x0_s) / sigma_s


def _phi1(z: torch.Tensor) -> torch.Tensor:
    return torch.expm1(z) / z


def _phi2(z: torch.Tensor) -> torch.Tensor:
    return (_phi1(z) - 1) / z


def ab2_step(x_s: torch.Tensor, x0_s: torch.Tensor, x0_prev: torch.Tensor, sigma_prev: float,
             sigma_s: float, sigma_t: float) -> torch.Tensor:
    """Second-order Adams–Bashforth step in x0 form (exponential integrator in -ln sigma)."""
    lam_prev, lam_s, lam_t = (-torch.tensor(v, dtype=torch.float64).log() for v in (sigma_prev, sigma_s, sigma_t))
    h = lam_t - lam_s
    c = (lam_prev - lam_s) / h
    phi1, phi2 = _phi1(-h), _phi2(-h)
    b1, b2 = (phi1 - phi2 / c).item(), (phi2 / c).item()
    return (sigma_t / sigma_s) * x_s + h.item() * (b1 * x0_s + b2 * x0_prev)


def guided_x0(x0_pos: torch.Tensor, x0_neg: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance in x0, upstream's convention: x0_pos + g * (x0_pos - x0_neg) (g = 0: none)."""
    return x0_pos + guidance * (x0_pos - x0_neg)


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Unit Gaussian noise (float32, CPU) as upstream draws it: NumPy RandomState(seed).standard_normal.

    Device- and architecture-independent, and the same numbers upstream starts from.
    """
    return torch.from_numpy(np.random.RandomState(seed).standard_normal(shape).astype(np.float32))


def make_x0_fn(net, *, clean_latent: torch.Tensor | None, num_condition_frames: int, text_emb: torch.Tensor,
               text_mask: torch.Tensor | None, neg_emb: torch.Tensor | None, neg_mask: torch.Tensor | None,
               guidance: float) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The sampler's denoiser `x0_fn(x, sigma)`: (guided) x0 prediction of x at noise level sigma.

    Upstream's `get_x0_fn_from_batch`: both branches see the clean condition frames.
    """
    B = text_emb.shape[0]
    kw = dict(clean_latent=clean_latent, num_condition_frames=num_condition_frames)

    def x0_fn(x: torch.Tensor, sigma: float) -> torch.Tensor:
        sigma_B = torch.full((B,), sigma, dtype=torch.float64, device=x.device)
        x0_pos = denoise(net, x, sigma_B, text_emb, text_mask, **kw)
        if neg_emb is None or guidance == 0:
            return x0_pos
        return guided_x0(x0_pos, denoise(net, x, sigma_B, neg_emb, neg_mask, **kw), guidance)

    return x0_fn


@torch.no_grad()
def sample(net, *, condition_latent: torch.Tensor | None, num_condition_frames: int,
           shape: tuple[int, int, int, int, int], text_emb: torch.Tensor, text_mask: torch.Tensor | None,
           neg_emb: torch.Tensor | None, neg_mask: torch.Tensor | None, steps: int = 35,
           guidance: float = 7.0, sigma_max: float = 80.0, sigma_min: float = 0.002, rho: float = 7.0,
           seed: int = 0) -> torch.Tensor:
    """Sample a clean latent (B, C, T, H, W), float32, on text_emb's device.

    `condition_latent` holds at least the first `num_condition_frames` latent frames; they
    stay clean throughout. `neg_emb=None` samples without guidance (one net call per step);
    so does `guidance=0` (x0_pos + 0 * (...) is x0_pos).
    """
    device = text_emb.device
    if num_condition_frames and (condition_latent is None or condition_latent.shape[2] < num_condition_frames):
        raise ValueError(f"num_condition_frames={num_condition_frames} needs a condition_latent with that many "
                         "latent frames")
    clean = None
    if num_condition_frames:
        clean = torch.zeros(shape, device=device)
        clean[:, :, :num_condition_frames] = condition_latent[:, :, :num_condition_frames].to(device).float()
    x0_fn = make_x0_fn(net, clean_latent=clean, num_condition_frames=num_condition_frames, text_emb=text_emb,
                       text_mask=text_mask, neg_emb=neg_emb, neg_mask=neg_mask, guidance=guidance)

    sigmas = karras_sigmas(steps, sigma_max=sigma_max, sigma_min=sigma_min, rho=rho).tolist()
    x = initial_noise(shape, seed).to(device) * sigmas[0]
    if clean is not None:
        x[:, :, :num_condition_frames] = clean[:, :, :num_condition_frames]
    prev: tuple[torch.Tensor, float] | None = None
    for sigma_s, sigma_t in zip(sigmas[:-1], sigmas[1:]):
        x0_s = x0_fn(x, sigma_s)
        if prev is None:
            x = euler_step(x, x0_s, sigma_s, sigma_t)
        else:
            x = ab2_step(x, x0_s, prev[0], prev[1], sigma_s, sigma_t)
        prev = (x0_s, sigma_s)
    return x0_fn(x, sigmas[-1])
