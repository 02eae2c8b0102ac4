"""Power EMA: gamma from s, beta formula, update rule, state round trip, LoRA mirroring."""

import math

import pytest
import torch

from cosmos_train.models.dit import DiT
from cosmos_train.models.ema import PowerEMA, ema_beta, gamma_from_s
from cosmos_train.models.lora import apply_lora
from cosmos_train.presets import PRESETS
from cosmos_train.spec import LoraSpec


def test_gamma_and_beta_hand_values():
    g = gamma_from_s(0.1)
    assert abs(g - 6.94) < 0.005
    assert math.isclose((g + 2) ** 2 * (g + 3) / (g + 1), 100.0, rel_tol=1e-9)  # s^-2
    assert ema_beta(0, g) == 0.0
    assert math.isclose(ema_beta(1, g), 0.5 ** (g + 1))
    assert math.isclose(ema_beta(9, 6.94), 0.9 ** 7.94)
    with pytest.raises(ValueError):
        gamma_from_s(0.5)


def test_update_follows_formula():
    model = torch.nn.Linear(3, 2, bias=False)
    ema = PowerEMA(model, s=0.1)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert ema.update(model, 0) == 0.0  # beta 0: the EMA becomes the weights
    torch.testing.assert_close(ema.shadow["weight"], w0 + 1)
    with torch.no_grad():
        model.weight.add_(1.0)
    beta = ema.update(model, 3)
    assert math.isclose(beta, 0.75 ** (ema.gamma + 1))
    torch.testing.assert_close(ema.shadow["weight"], beta * (w0 + 1) + (1 - beta) * (w0 + 2))


def test_state_round_trip_and_load_into_a_model():
    model = DiT(PRESETS["tiny"])
    model.init_weights(0)
    ema = PowerEMA(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    ema.update(model, 5)
    sd = {k: v.clone() for k, v in ema.state_dict().items()}
    assert list(sd) == list(model.state_dict())  # net_ema. mirrors net.
    fresh = PowerEMA(model)
    fresh.load_state_dict(sd)
    for k, v in ema.shadow.items():
        assert torch.equal(fresh.shadow[k], v)
    other = DiT(PRESETS["tiny"])
    other.init_weights(9)
    other.load_state_dict(fresh.state_dict())  # how EMA weights reach a model
    for name, p in other.named_parameters():
        assert torch.equal(p, ema.shadow[name])
    with pytest.raises(KeyError):
        fresh.load_state_dict({k: v for k, v in sd.items() if k != "t_embedding_norm.weight"})


def test_lora_ema_tracks_adapters_and_mirrors_base_by_reference():
    model = apply_lora(DiT(PRESETS["tiny"]), LoraSpec(rank=2, alpha=2), seed=0)
    ema = PowerEMA(model)
    assert all(".lora_" in k for k in ema.shadow)
    sd = ema.state_dict()
    base = model.blocks[0].self_attn.q_proj.base_layer.weight
    assert sd["blocks.0.self_attn.q_proj.base_layer.weight"].data_ptr() == base.data_ptr()
    key = "blocks.0.self_attn.q_proj.lora_A.default.weight"
    assert sd[key] is ema.shadow[key]
