"""Diffusion objective and sampler: each formula against hand-computed values, an overfit
check of the training loss, and sampler behaviour (shape, seeding, guidance, condition)."""

import math

import pytest
import torch

from cosmos_train.models.diffusion import (SIGMA_CONDITION, condition_mask, denoise, loss_weight, rf_scaling,
                                           sample_sigma, training_loss)
from cosmos_train.models.dit import DiT
from cosmos_train.presets import PRESETS
from cosmos_train.models.sampler import ab2_step, euler_step, guided_x0, karras_sigmas, sample
from cosmos_train.models.tokenizer import SpaceToDepthTokenizer


class Recorder(torch.nn.Module):
    """A stand-in network with a known output that records what the objective feeds it."""

    def __init__(self, value=0.0):
        super().__init__()
        self.value = value
        self.calls = []

    def forward(self, x, timesteps, emb, *, crossattn_mask_B_N=None, condition_mask_B_1_T_H_W=None):
        self.calls.append(dict(x=x.clone(), t=timesteps.clone(), emb=emb.clone(), mask=condition_mask_B_1_T_H_W))
        return torch.full_like(x, self.value)


def test_rf_scaling_and_weight_hand_values():
    c_skip, c_out, c_in, c_noise = rf_scaling(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(c_skip, torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(c_out, torch.tensor([-0.5, -0.75]))
    torch.testing.assert_close(c_in, torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(c_noise, torch.tensor([0.5, 0.75]))
    torch.testing.assert_close(loss_weight(torch.tensor([1.0, 3.0, 0.5])), torch.tensor([4.0, 16 / 9, 9.0]))


def test_sigma_distribution():
    g = torch.Generator().manual_seed(0)
    s = sample_sigma(40_000, generator=g)
    high = s > 150  # N(0,1) in log space essentially never exceeds e^5
    assert abs(high.float().mean().item() - 0.05) < 0.006
    assert s[high].min() >= 200 and s[high].max() <= 1e5
    log_low = s[~high].log()
    assert abs(log_low.mean().item()) < 0.03 and abs(log_low.std().item() - 1) < 0.03
    log_high = s[high].log()  # log-uniform: uniform in log space
    assert abs(log_high.mean().item() - (math.log(200) + math.log(1e5)) / 2) < 0.15
    assert (sample_sigma(100, generator=g, high_sigma_ratio=1.0) >= 200).all()


def test_denoise_hand_values_and_condition_frames():
    net = Recorder(value=1.0)
    x = torch.full((1, 2, 3, 2, 2), 2.0)
    clean = torch.full((1, 2, 3, 2, 2), -5.0)
    x0 = denoise(net, x, torch.tensor([1.0]), torch.zeros(1, 1, 4), None, clean_latent=clean, num_condition_frames=1)
    # noisy frames: c_skip*x + c_out*out = 0.5*2 - 0.5*1; condition frame: the clean latent
    torch.testing.assert_close(x0[:, :, 1:], torch.full((1, 2, 2, 2, 2), 0.5))
    torch.testing.assert_close(x0[:, :, :1], clean[:, :, :1])
    call = net.calls[0]
    torch.testing.assert_close(call["x"][:, :, 1:], torch.ones(1, 2, 2, 2, 2))  # c_in * x
    torch.testing.assert_close(call["x"][:, :, :1], clean[:, :, :1])
    torch.testing.assert_close(call["t"], torch.tensor([[SIGMA_CONDITION / (1 + SIGMA_CONDITION), 0.5, 0.5]]))
    torch.testing.assert_close(call["mask"], condition_mask(x.shape, 1))
    assert call["mask"][0, 0, 0].eq(1).all() and call["mask"][0, 0, 1:].eq(0).all()


def test_training_loss_hand_value():
    x0 = torch.randn(2, 3, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    emb = torch.ones(2, 4, 8)
    net = Recorder(value=0.0)
    loss, stats = training_loss(net, x0, emb, None, generator=torch.Generator().manual_seed(7),
                                num_condition_frames=1, text_dropout=0.0, sigma_override=1.0)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    # net out 0 -> x0_pred = (1-t)(x0 + sigma*eps) = 0.5 (x0 + eps); weight 4 -> (eps - x0)^2,
    # zero on the condition frame, averaged over all T = 3 frames (upstream's loss.mean())
    expected = 10.0 * ((eps - x0)[:, :, 1:] ** 2).sum() / x0.numel()
    torch.testing.assert_close(loss, expected)
    assert stats["loss"] == loss.detach() and stats["sigma_mean"] == 1.0
    # the net saw the rectified-flow interpolant (1 - t) x0 + t eps on the noisy frames
    torch.testing.assert_close(net.calls[0]["x"][:, :, 1:], (0.5 * x0 + 0.5 * eps)[:, :, 1:])
    torch.testing.assert_close(net.calls[0]["x"][:, :, :1], x0[:, :, :1])
    torch.testing.assert_close(net.calls[0]["emb"], emb)


def test_text_dropout_zeroes_whole_samples():
    x0 = torch.zeros(64, 1, 2, 1, 1)
    net = Recorder()
    training_loss(net, x0, torch.ones(64, 3, 2), None, generator=torch.Generator().manual_seed(0),
                  text_dropout=0.5, sigma_override=1.0)
    per_sample = net.calls[0]["emb"].sum(dim=(1, 2))
    assert set(per_sample.tolist()) == {0.0, 6.0}
    assert 16 < (per_sample == 0).sum() < 48
    net = Recorder()
    training_loss(net, x0, torch.ones(64, 3, 2), None, generator=torch.Generator().manual_seed(0), text_dropout=1.0)
    assert net.calls[0]["emb"].eq(0).all()


def _clip():
    """One synthetic 5-frame 16x16 clip: a square moving over a colour gradient."""
    frames = torch.zeros(1, 3, 5, 16, 16)
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    for t in range(5):
        frames[0, 0, t] = xs * 12
        frames[0, 1, t] = ys * 12
        frames[0, 2, t, 4:10, 2 + 2 * t: 8 + 2 * t] = 250
    return SpaceToDepthTokenizer(2).encode(frames.to(torch.uint8))


def test_overfit_one_clip_reduces_loss():
    torch.manual_seed(0)
    model = DiT(PRESETS["tiny"])
    model.init_weights(0)
    x0 = _clip()  # (1, 48, 2, 8, 8)
    emb = torch.randn(1, 4, 1024, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)

    def eval_loss():  # fixed sigma and noise: the same figure before and after
        with torch.no_grad():
            return training_loss(model, x0, emb, None, generator=torch.Generator().manual_seed(123),
                                 text_dropout=0.0, sigma_override=1.0)[0].item()

    before = eval_loss()
    for _ in range(150):  # fresh noise every step: the net must learn the clip, not one input
        loss, _ = training_loss(model, x0, emb, None, generator=g, text_dropout=0.0, sigma_override=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)


def test_karras_euler_ab2_guidance_hand_values():
    s = karras_sigmas(2)
    mid = ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    torch.testing.assert_close(s, torch.tensor([80.0, mid, 0.002], dtype=torch.float64))
    assert len(karras_sigmas(35)) == 36
    torch.testing.assert_close(euler_step(torch.tensor(3.0), torch.tensor(1.0), 2.0, 1.0), torch.tensor(2.0))
    # upstream: cond + g (cond - uncond)
    torch.testing.assert_close(guided_x0(torch.tensor(3.0), torch.tensor(1.0), 7.0), torch.tensor(17.0))
    torch.testing.assert_close(guided_x0(torch.tensor(3.0), torch.tensor(1.0), 0.0), torch.tensor(3.0))


def test_ab2_is_exact_for_x0_linear_in_log_sigma():
    # x0(lambda) = a + b * lambda with lambda = -ln sigma; compare one AB2 step with RK4 on a fine grid.
    a, b = 0.3, -0.7
    sig_prev, sig_s, sig_t = 5.0, 2.0, 0.5
    x0 = lambda sig: a + b * (-math.log(sig))  # noqa: E731
    f = lambda sig, x: (x - x0(sig)) / sig  # noqa: E731
    x, sig, n = 1.7, sig_s, 20000
    h = (sig_t - sig_s) / n
    for _ in range(n):
        k1 = f(sig, x)
        k2 = f(sig + h / 2, x + h / 2 * k1)
        k3 = f(sig + h / 2, x + h / 2 * k2)
        k4 = f(sig + h, x + h * k3)
        x, sig = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), sig + h
    got = ab2_step(torch.tensor(1.7, dtype=torch.float64), torch.tensor(x0(sig_s), dtype=torch.float64),
                   torch.tensor(x0(sig_prev), dtype=torch.float64), sig_prev, sig_s, sig_t)
    assert abs(got.item() - x) < 1e-8
    # constant x0: AB2 reduces to the (then exact) Euler step
    e = euler_step(torch.tensor(1.7, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64), sig_s, sig_t)
    c = ab2_step(torch.tensor(1.7, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64),
                 torch.tensor(0.4, dtype=torch.float64), sig_prev, sig_s, sig_t)
    torch.testing.assert_close(c, e)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = DiT(PRESETS["tiny"])
    model.init_weights(0)
    return model.eval()


def test_sampler_shape_seed_condition_and_guidance(tiny_model):
    shape = (1, 48, 2, 4, 4)
    cond = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    emb = torch.randn(1, 3, 1024, generator=torch.Generator().manual_seed(2))
    neg = torch.zeros(1, 3, 1024)
    kw = dict(condition_latent=cond, num_condition_frames=1, shape=shape, text_emb=emb, text_mask=None, steps=4)
    out = sample(tiny_model, neg_emb=neg, neg_mask=None, guidance=7.0, seed=3, **kw)
    assert out.shape == shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, :1], cond[:, :, :1], rtol=0, atol=0)  # condition stays clean
    assert torch.equal(out, sample(tiny_model, neg_emb=neg, neg_mask=None, guidance=7.0, seed=3, **kw))
    assert not torch.allclose(out, sample(tiny_model, neg_emb=neg, neg_mask=None, guidance=7.0, seed=4, **kw))
    # guidance 0 equals the unguided prediction (no negative branch at all)
    g0 = sample(tiny_model, neg_emb=neg, neg_mask=None, guidance=0.0, seed=3, **kw)
    unguided = sample(tiny_model, neg_emb=None, neg_mask=None, seed=3, **kw)
    torch.testing.assert_close(g0, unguided, rtol=0, atol=0)
    assert not torch.allclose(out, unguided)
