"""checkpoint.save_adapters_only: the model part holds only LoRA keys; resume needs load_path for the base;
consolidate exports the adapters (and refuses to merge without base weights)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cosmos_train import layout
from cosmos_train.checkpoint.integrity import read_manifest
from cosmos_train.checkpoint.manager import Checkpointer
from cosmos_train.errors import CheckpointError
from cosmos_train.export.consolidate import consolidate
from cosmos_train.export.dcp_source import DcpSource
from cosmos_train.models.ema import PowerEMA
from cosmos_train.models.lora_keys import is_lora_key
from tests.checkpoint.toy import spec
from tests.export.consolidate_fixtures import SPEC_TOML, build


def _lora_model(fill: float | None = None):
    """The LoRA test net with its base frozen; every tensor set to `fill` when given."""
    model = build(lora=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad_(is_lora_key(name))
            if fill is not None:
                p.fill_(fill)
    return model


def test_save_resume_and_consolidate_adapters_only(tmp_path):
    base = build(lora=False)
    torch.save({f"net.{k}": v for k, v in base.state_dict().items()}, tmp_path / "base.pt")
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.toml").write_text(SPEC_TOML)
    ck_spec = spec(load_path=str(tmp_path / "base.pt"))

    model = _lora_model(fill=0.0)  # the base must come from load_path, the adapters from their init
    ema = PowerEMA(model)
    ck = Checkpointer(ck_spec, run, model=model, ema=ema, lora_only=True)
    assert ck.resume_or_initialize() == 0
    for k, v in base.state_dict().items():
        key = k.replace(".weight", ".base_layer.weight") if k not in model.state_dict() else k
        assert torch.equal(model.state_dict()[key], v), k
    with torch.no_grad():  # "training": the adapters move, the frozen base does not
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    ema.update(model, 3)
    assert ck.save(3)
    ck.close()

    it_dir = layout.read_latest(layout.checkpoints_dir(run))
    stored = DcpSource(it_dir / "model").entries
    assert stored and all(is_lora_key(k) for k in stored)
    assert {k.split(".", 1)[0] for k in stored} == {"net", "net_ema"}
    assert read_manifest(it_dir)["lora_only"] is True

    # Resume into a model whose every tensor is wrong: base from load_path, adapters + EMA from the checkpoint.
    model2 = _lora_model(fill=7.0)
    ema2 = PowerEMA(model2)
    ck2 = Checkpointer(ck_spec, run, model=model2, ema=ema2, lora_only=True)
    assert ck2.resume_or_initialize() == 3
    ck2.close()
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    for k, v in ema.shadow.items():
        assert torch.equal(ema2.shadow[k], v), k

    # Consolidate: the PEFT adapter dir holds exactly the trained adapters (rank/alpha from spec.toml) ...
    report = consolidate(run, tmp_path / "adapter", adapter_only=True, progress=False)
    files = load_file(str(report.outputs[0] / "adapter_model.safetensors"))
    trained = {k: v for k, v in model.state_dict().items() if is_lora_key(k)}
    assert len(files) == len(trained)
    for k, v in trained.items():
        peft_key = "base_model.model." + k.replace(".default.", ".")
        assert torch.equal(files[peft_key], v), k
    # ... and a merge, which needs the base weights the checkpoint does not hold, fails naming them.
    with pytest.raises(CheckpointError, match=r"no matching '.*base_layer\.weight'"):
        consolidate(run, tmp_path / "merged.pt", merge_lora=True, progress=False)
    assert not (tmp_path / "merged.pt").exists()
