"""Strict state-dict loading: prefixes, _extra_state, grouped errors, ignore lists, LoRA base loading."""

import pytest
import torch

from cosmos_train.errors import CosmosTrainError
from cosmos_train.models.dit import DiT
from cosmos_train.models.lora import apply_lora
from cosmos_train.presets import PRESETS
from cosmos_train.models.weights import check_keys, group_keys, load_weights
from cosmos_train.spec import LoraSpec

CFG = PRESETS["tiny"]


def _model(seed):
    model = DiT(CFG)
    model.init_weights(seed)
    return model


def _checkpoint(model, prefix="net."):
    sd = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    sd[prefix + "blocks.0.self_attn.q_norm._extra_state"] = torch.zeros(3)  # as Transformer Engine writes
    return sd


def test_net_and_net_ema_prefixes_load_exactly():
    src_reg, src_ema = _model(1), _model(2)
    ckpt = {**_checkpoint(src_reg, "net."), **_checkpoint(src_ema, "net_ema.")}
    dst = _model(3)
    report = load_weights(dst, ckpt, prefix="net.")
    assert report.extra_state_dropped == 1 and report.loaded == len(src_reg.state_dict())
    for k, v in src_reg.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    load_weights(dst, ckpt, prefix="net_ema.")
    for k, v in src_ema.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_wrong_key_fails_and_names_it():
    ckpt = _checkpoint(_model(1))
    ckpt["net.blocks.1.mlp.layer3.weight"] = ckpt.pop("net.blocks.1.mlp.layer2.weight")
    dst = _model(3)
    before = dst.blocks[0].mlp.layer1.weight.clone()
    with pytest.raises(CosmosTrainError) as err:
        load_weights(dst, ckpt)
    msg = str(err.value)
    assert "missing 1 keys" in msg and "blocks.*.mlp.layer2.weight  (blocks 1)" in msg
    assert "unexpected 1 keys" in msg and "blocks.*.mlp.layer3.weight" in msg
    assert torch.equal(dst.blocks[0].mlp.layer1.weight, before)  # nothing half-loaded
    # allowed when listed as ignored
    report = load_weights(dst, ckpt, ignore=("blocks.1.mlp.",))
    assert report.ignored == 1


def test_missing_everywhere_is_grouped_and_shape_mismatch_fails():
    ckpt = {k: v for k, v in _checkpoint(_model(1)).items() if "adaln_modulation_mlp" not in k}
    with pytest.raises(CosmosTrainError, match=r"blocks\.\*\.adaln_modulation_mlp\.1\.weight  \(blocks 0-1\)"):
        load_weights(_model(3), ckpt)
    bad = _checkpoint(_model(1))
    bad["net.final_layer.linear.weight"] = torch.zeros(3, 3)
    with pytest.raises(CosmosTrainError, match="final_layer.linear.weight: checkpoint"):
        load_weights(_model(3), bad)
    with pytest.raises(CosmosTrainError, match="no weights under prefix 'net_ema.'"):
        load_weights(_model(3), _checkpoint(_model(1)), prefix="net_ema.")


def test_check_keys_and_grouping():
    missing, unexpected = check_keys({"a.x", "b.y", "c"}, {"a.x", "d", "e.z"}, ignore=("e.",))
    assert missing == ["b.y", "c"] and unexpected == ["d"]
    text = group_keys([f"blocks.{i}.mlp.layer1.weight" for i in (0, 1, 2, 5)] + ["x_embedder.proj.1.weight"])
    assert "blocks.*.mlp.layer1.weight  (blocks 0-2,5)" in text and "x_embedder.proj.1.weight" in text


def test_base_checkpoint_into_lora_model():
    src = _model(1)
    dst = apply_lora(_model(3), LoraSpec(rank=4, alpha=8), seed=0)
    report = load_weights(dst, _checkpoint(src))
    assert report.lora_kept_at_init > 0
    torch.testing.assert_close(dst.blocks[1].self_attn.q_proj.base_layer.weight, src.blocks[1].self_attn.q_proj.weight)
    # a base checkpoint missing a weight still fails: LoRA must never train on random base weights
    ckpt = _checkpoint(src)
    del ckpt["net.blocks.0.self_attn.k_proj.weight"]
    with pytest.raises(CosmosTrainError, match="k_proj.base_layer.weight"):
        load_weights(apply_lora(_model(3), LoraSpec(rank=4, alpha=8)), ckpt)
