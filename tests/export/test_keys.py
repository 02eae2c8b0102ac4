"""The key planner through the real loader: prefixes, _extra_state, grouped errors, skips, LoRA base loading.

Each case writes a real `.pt` / `.safetensors` and loads it with `export.load.load_weights`,
the path that `checkpoint.load_path`, resume and infer use.
"""

import pytest
import torch
from safetensors.torch import save_file

from cosmos_train.errors import CheckpointError
from cosmos_train.export.keys import group_keys, plan_keys
from cosmos_train.export.load import load_weights, resolve_load_path
from cosmos_train.models.dit import DiT
from cosmos_train.models.lora import apply_lora
from cosmos_train.presets import PRESETS
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


def _write(sd, path):
    if path.suffix == ".pt":
        torch.save(sd, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return resolve_load_path(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_net_and_net_ema_prefixes_load_exactly(tmp_path, suffix):
    src_reg, src_ema = _model(1), _model(2)
    source = _write({**_checkpoint(src_reg, "net."), **_checkpoint(src_ema, "net_ema.")}, tmp_path / f"m{suffix}")
    dst = _model(3)
    load_weights(source, dst)
    for k, v in src_reg.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    load_weights(source, dst, ema_to_reg=True)
    for k, v in src_ema.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_wrong_key_fails_and_names_it(tmp_path):
    ckpt = _checkpoint(_model(1))
    ckpt["net.blocks.1.mlp.layer3.weight"] = ckpt.pop("net.blocks.1.mlp.layer2.weight")
    source = _write(ckpt, tmp_path / "m.pt")
    dst = _model(3)
    before = dst.blocks[0].mlp.layer1.weight.clone()
    with pytest.raises(CheckpointError) as err:
        load_weights(source, dst)
    msg = str(err.value)
    assert "1 missing, 1 unexpected" in msg and "blocks.*.mlp.layer2.weight  (blocks 1)" in msg
    assert "blocks.*.mlp.layer3.weight" in msg
    assert torch.equal(dst.blocks[0].mlp.layer1.weight, before)  # nothing half-loaded
    # allowed when listed as skipped (keys_not_to_resume)
    load_weights(source, dst, skip=("blocks.1.mlp.",))
    assert torch.equal(dst.blocks[0].mlp.layer1.weight, ckpt["net.blocks.0.mlp.layer1.weight"])


def test_missing_everywhere_is_grouped_and_shape_mismatch_fails(tmp_path):
    ckpt = {k: v for k, v in _checkpoint(_model(1)).items() if "adaln_modulation_mlp" not in k}
    with pytest.raises(CheckpointError, match=r"blocks\.\*\.adaln_modulation_mlp\.1\.weight  \(blocks 0-1\)"):
        load_weights(_write(ckpt, tmp_path / "a.pt"), _model(3))
    bad = _checkpoint(_model(1))
    bad["net.final_layer.linear.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="final_layer.linear.weight has shape"):
        load_weights(_write(bad, tmp_path / "b.pt"), _model(3))


def test_plan_and_grouping():
    plan = plan_keys(["net.a.x", "net.d", "net.e.z", "net.q._extra_state"], ["a.x", "b.y", "c"], skip=("e.",))
    assert plan.reg == {"a.x": "net.a.x"} and plan.missing == ["net.b.y", "net.c"] and plan.unexpected == ["net.d"]
    assert plan.ema is None
    text = group_keys([f"blocks.{i}.mlp.layer1.weight" for i in (0, 1, 2, 5)] + ["x_embedder.proj.1.weight"])
    assert "blocks.*.mlp.layer1.weight  (blocks 0-2,5)" in text and "x_embedder.proj.1.weight" in text


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_base_checkpoint_into_lora_model(tmp_path, suffix):
    src = _model(1)
    dst = apply_lora(_model(3), LoraSpec(rank=4, alpha=8, init_lora_weights=False), seed=0)
    lora_before = dst.blocks[1].self_attn.q_proj.lora_A.default.weight.clone()
    load_weights(_write(_checkpoint(src), tmp_path / f"base{suffix}"), dst)
    torch.testing.assert_close(dst.blocks[1].self_attn.q_proj.base_layer.weight, src.blocks[1].self_attn.q_proj.weight,
                               rtol=0, atol=0)
    assert torch.equal(dst.blocks[1].self_attn.q_proj.lora_A.default.weight, lora_before)  # adapters keep init
    # a base checkpoint missing a weight still fails: LoRA must never train on random base weights
    ckpt = _checkpoint(src)
    del ckpt["net.blocks.0.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError, match=r"k_proj\.base_layer\.weight"):
        load_weights(_write(ckpt, tmp_path / f"short{suffix}"), apply_lora(_model(3), LoraSpec(rank=4, alpha=8)))
