"""LoRA via PEFT: trainable set, meta-device init, PEFT export/reload, merge, FSDP2 on 2 gloo ranks."""

import copy
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from cosmos_train.errors import CosmosTrainError
from cosmos_train.models.dit import DiT
from cosmos_train.models.ema import PowerEMA
from cosmos_train.models.lora import (PEFT_KEY_PREFIX, WEIGHTS_FILE, apply_lora, format_lora_summary,
                                      load_adapter, lora_config, lora_summary, merge_lora_state_dict,
                                      read_adapter_config)
from cosmos_train.presets import PRESETS
from cosmos_train.spec import LoraSpec
from tests.dist import run_ranks

CFG = PRESETS["tiny"]
# Random B (init_lora_weights = false) so the adapters change the output.
SPEC = LoraSpec(rank=4, alpha=8, target_modules="q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2",
                init_lora_weights=False)


def _base(seed=0):
    model = DiT(CFG)
    model.init_weights(seed)
    return model


def _write_peft_dir(model, out_dir, lora):
    """An adapter dir written by PEFT's own state-dict function (gathers FSDP shards; rank 0 writes).

    Production writes adapters from DCP checkpoints (export.lora_export); this is the reference."""
    sd = get_peft_model_state_dict(model, adapter_name="default")
    sd = {PEFT_KEY_PREFIX + k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in sd.items()}
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_config(lora).save_pretrained(str(out_dir))
    save_file({k: v.detach().float().contiguous() for k, v in sd.items()}, str(out_dir / WEIGHTS_FILE))


def _inputs(seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 48, 2, 4, 4, generator=g), torch.rand(batch, 2, generator=g),
            torch.randn(batch, 3, 1024, generator=g))


def test_only_lora_trainable_fp32_and_summary():
    model = apply_lora(_base(), SPEC, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    assert "blocks.0.mlp.layer2.lora_B.default.weight" in trainable
    total, n_lora, ratio = lora_summary(model)
    # per block with r = 4, D = 128: self q,k,v,o 4*r*256 + cross q,o 2*r*256 + cross k,v 2*r*1152 + mlp 2*r*640
    assert n_lora == 2 * (4 * 4 * 256 + 2 * 4 * 256 + 2 * 4 * 1152 + 2 * 4 * 640) == 40960
    assert total == 1_320_320 + n_lora and ratio == n_lora / total
    text = format_lora_summary(total, n_lora, ratio)
    assert "Total parameters: 1,361,280" in text and "Trainable LoRA parameters: 40,960" in text
    assert "LoRA parameter ratio: 3.01%" in text
    with pytest.raises(CosmosTrainError, match="match no module"):
        apply_lora(_base(), LoraSpec(target_modules=["q_proj", "qkv"]))


def test_meta_device_lora_init_matches_materialised():
    eager = apply_lora(_base(0), SPEC, seed=0)
    with torch.device("meta"):
        meta = DiT(CFG)
    apply_lora(meta, SPEC)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.init_weights(0)
    for (k, v), w in zip(eager.state_dict().items(), meta.state_dict().values()):
        assert torch.equal(v, w), k
    b = meta.blocks[0].self_attn.q_proj.lora_B.default.weight
    assert b.abs().sum() > 0  # init_lora_weights=False: random B
    zero_b = apply_lora(_base(0), LoraSpec(rank=4, alpha=8), seed=0)
    assert zero_b.blocks[0].self_attn.q_proj.lora_B.default.weight.eq(0).all()  # default: B = 0


def test_peft_export_reload_identical(tmp_path):
    model = apply_lora(_base(0), SPEC, seed=1).eval()
    x, t, ctx = _inputs()
    with torch.no_grad():
        want = model(x, t, ctx)
    assert not torch.allclose(want, _base(0)(x, t, ctx))
    _write_peft_dir(model, tmp_path / "adapter", SPEC)
    files = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.blocks.0.self_attn.q_proj.lora_A.weight" in files
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (4, 8, "LORA")
    assert asdict(read_adapter_config(tmp_path / "adapter")) == SPEC.model_dump() | {
        "target_modules": tuple(sorted(SPEC.target_modules))}
    # PEFT itself loads the adapter onto a plain base model
    peft_model = PeftModel.from_pretrained(_base(0), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x, t, ctx), want, rtol=0, atol=0)
    # and so does load_adapter
    reloaded = load_adapter(_base(0), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t, ctx), want, rtol=0, atol=0)


def test_merged_equals_unmerged():
    model = apply_lora(_base(0), SPEC, seed=2).eval()
    x, t, ctx = _inputs()
    with torch.no_grad():
        want = model(x, t, ctx)
    sd = {"net." + k: v for k, v in model.state_dict().items()}
    merged = merge_lora_state_dict(sd, rank=SPEC.rank, alpha=SPEC.alpha)
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    plain = DiT(CFG)
    plain.load_state_dict({k.removeprefix("net."): v for k, v in merged.items()}, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x, t, ctx), want, rtol=1e-5, atol=1e-5)
    q = "net.blocks.0.self_attn.q_proj."
    torch.testing.assert_close(merged[q + "weight"], sd[q + "base_layer.weight"]
                               + 2.0 * sd[q + "lora_B.default.weight"] @ sd[q + "lora_A.default.weight"])
    with pytest.raises(CosmosTrainError, match="already merged"):
        merge_lora_state_dict(merged, rank=4, alpha=8)
    broken = dict(sd)
    del broken[q + "lora_B.default.weight"]
    with pytest.raises(CosmosTrainError, match="q_proj"):
        merge_lora_state_dict(broken, rank=4, alpha=8)


def _fsdp_lora_body(rank, world_size, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = apply_lora(_base(0), SPEC, seed=3)
    reference = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ema = PowerEMA(model)

    # each rank its own sample; FSDP averages gradients over ranks
    x, t, ctx = _inputs(seed=10 + rank)
    (model(x, t, ctx) ** 2).mean().backward()
    ref_loss = sum((reference(*_inputs(seed=10 + r)) ** 2).mean() for r in range(world_size)) / world_size
    ref_loss.backward()
    ref_params = dict(reference.named_parameters())
    max_err, n_grads = 0.0, 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            continue
        n_grads += 1
        assert ref_params[name].grad.abs().sum() > 0, name  # the comparison is not vacuous
        max_err = max(max_err, (p.grad.full_tensor() - ref_params[name].grad).abs().max().item())

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    base_before = model.blocks[0].self_attn.q_proj.base_layer.weight.full_tensor().clone()
    shadow = ema.shadow["blocks.0.self_attn.q_proj.lora_A.default.weight"]
    param = model.blocks[0].self_attn.q_proj.lora_A.default.weight
    shadow_before = shadow.full_tensor().clone()
    opt.step()
    beta = ema.update(model, 1)
    ema_ok = type(shadow).__name__ == "DTensor" and shadow.placements == param.placements
    ema_ok &= torch.allclose(shadow.full_tensor(), beta * shadow_before + (1 - beta) * param.full_tensor())
    assert list(ema.state_dict()) == list(model.state_dict())
    base_same = torch.equal(model.blocks[0].self_attn.q_proj.base_layer.weight.full_tensor(), base_before)

    _write_peft_dir(model, Path(out_dir), SPEC)  # collective; rank 0 writes
    return dict(max_err=max_err, n_grads=n_grads, ema_ok=ema_ok, base_same=base_same, beta=beta,
                lora_after={n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad})


def test_lora_under_fsdp2_two_ranks(tmp_path):
    results = run_ranks(_fsdp_lora_body, 2, str(tmp_path / "adapter"), timeout=300)
    for r in results:
        assert r["n_grads"] == 2 * 10 * 2 and r["max_err"] < 1e-5
        assert r["ema_ok"] and r["base_same"] and r["beta"] == pytest.approx(0.5 ** (PowerEMA(_base()).gamma + 1))
    # the adapter written under FSDP equals the trained shards, and loads onto a plain base model
    reloaded = load_adapter(_base(0), tmp_path / "adapter")
    for name, p in reloaded.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, results[0]["lora_after"][name], rtol=0, atol=0)
