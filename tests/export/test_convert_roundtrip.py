"""`.pt`/`.safetensors` -> DCP -> `.pt`: bitwise round trip, and the DCP loads the usual way."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from cosmos_train.errors import CosmosTrainError
from cosmos_train.export.consolidate import consolidate
from cosmos_train.export.convert import convert
from tests.export.consolidate_fixtures import bitwise_equal


def _state():
    g = torch.Generator().manual_seed(1)
    sd = {f"net.blocks.{i}.mlp.layer1.weight": torch.randn(6, 4, generator=g) for i in range(3)}
    sd["net.blocks.0.self_attn.q_norm.weight"] = torch.randn(4, generator=g).bfloat16()
    sd["net.accum_iteration"] = torch.tensor(123, dtype=torch.int64)
    sd["net_ema.blocks.0.mlp.layer1.weight"] = torch.randn(6, 4, generator=g)
    return sd


def test_pt_to_dcp_to_pt_is_bitwise(tmp_path):
    sd = _state()
    torch.save(sd, tmp_path / "model.pt")
    it = tmp_path / "iter_000000000"
    report = convert(tmp_path / "model.pt", it, progress=False)
    assert report.tensors == len(sd) and (it / "model" / ".metadata").is_file()
    assert sorted(os.listdir(it)) == ["model"]
    # Loads with plain DCP into preallocated tensors, as sharded init does.
    got = {k: torch.empty_like(v) for k, v in sd.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(got, checkpoint_id=str(it / "model"), no_dist=True)
    for k in sd:
        assert bitwise_equal(got[k], sd[k]), k
    # And back: the regular and EMA sets.
    consolidate(it, tmp_path / "back.pt", both=True, progress=False)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert list(back) == list(sd)
    for k in sd:
        assert bitwise_equal(back[k], sd[k]), k


def test_safetensors_to_dcp_replaces_existing(tmp_path):
    sd = _state()
    save_file(sd, tmp_path / "model.safetensors")
    it = tmp_path / "iter_000000000"
    convert(tmp_path / "model.safetensors", it, progress=False)
    sd2 = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd2, tmp_path / "model2.safetensors")
    convert(tmp_path / "model2.safetensors", it, progress=False, force=True)  # re-run over an existing model/
    assert sorted(os.listdir(it)) == ["model"]
    consolidate(it, tmp_path / "back.safetensors", both=True, progress=False)
    from safetensors.torch import load_file

    back = load_file(tmp_path / "back.safetensors")
    for k in sd2:
        assert bitwise_equal(back[k], sd2[k]), k
    with pytest.raises(CosmosTrainError, match="unknown format 'hf'"):
        convert(tmp_path / "model.safetensors", it, to="hf", progress=False)
