"""Consolidation of FSDP2/DCP checkpoints (saved by 2 gloo ranks) into .pt / .safetensors / PEFT dirs."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cosmos_train.errors import CheckpointError, CosmosTrainError
from cosmos_train.export.consolidate import consolidate, default_output
from tests.export.consolidate_fixtures import ITER, bitwise_equal, build, make_runs, reference


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def ref(runs, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    return {name: reference(run, d / f"{name}.pt") for name, run in runs.items()}


def _assert_same(got: dict, want: dict):
    assert list(got) == list(want)
    for k in want:
        assert bitwise_equal(got[k], want[k]), k


def _subset(ref: dict, src: str, dst: str = "net.") -> dict:
    return {dst + k[len(src):]: v for k, v in ref.items() if k.startswith(src) and "_extra_state" not in k}


def test_pt_equals_dcp_to_torch_save(runs, ref, tmp_path):
    out = tmp_path / "model.pt"
    report = consolidate(runs["full"], out, progress=False)
    want = _subset(ref["full"], "net.")
    assert len(want) == 17 and "net.blocks.0.self_attn.q_norm._extra_state" not in want
    _assert_same(torch.load(out, weights_only=True), want)
    _assert_same(torch.load(out, weights_only=True, mmap=True), want)
    assert report.tensors == 17 and report.bytes == sum(v.nbytes for v in want.values())
    assert report.outputs == [out] and report.peak_rss_bytes > 0
    assert report.dropped_keys == ["net.blocks.0.self_attn.q_norm._extra_state"]
    assert "17 tensors" in report.summary()
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # no temp leftovers


def test_safetensors_equals_dcp_to_torch_save(runs, ref, tmp_path):
    out = tmp_path / "model.safetensors"
    consolidate(runs["full"] / "checkpoints", out, progress=False)
    got = load_file(out)
    want = _subset(ref["full"], "net.")
    assert sorted(got) == sorted(want)
    for k in want:
        assert bitwise_equal(got[k], want[k]), k


def test_ema_both_prefix(runs, ref, tmp_path):
    consolidate(runs["full"], tmp_path / "ema.pt", ema=True, progress=False)
    _assert_same(torch.load(tmp_path / "ema.pt", weights_only=True), _subset(ref["full"], "net_ema."))
    consolidate(runs["full"], tmp_path / "both.pt", both=True, progress=False)
    want = {k: v for k, v in ref["full"].items() if "_extra_state" not in k}
    _assert_same(torch.load(tmp_path / "both.pt", weights_only=True), want)
    consolidate(runs["full"], tmp_path / "plain.pt", prefix="", progress=False)
    got = torch.load(tmp_path / "plain.pt", weights_only=True)
    _assert_same(got, _subset(ref["full"], "net.", ""))
    build(lora=False).load_state_dict(got, strict=True)  # a plain state dict of the model
    with pytest.raises(CosmosTrainError, match="--prefix cannot be combined with --both"):
        consolidate(runs["full"], tmp_path / "x.pt", both=True, prefix="model.", progress=False)


def test_dtype_converts_floats_only(runs, ref, tmp_path):
    out = tmp_path / "bf16.safetensors"
    consolidate(runs["full"], out, dtype="bf16", progress=False)
    got = load_file(out)
    for k, v in _subset(ref["full"], "net.").items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert bitwise_equal(got[k], want), k
    assert got["net.accum_iteration"].dtype == torch.int64
    with pytest.raises(CosmosTrainError, match="unknown dtype 'fp8'"):
        consolidate(runs["full"], out, dtype="fp8", progress=False)


def test_sharded_safetensors_with_index(runs, ref, tmp_path):
    out = tmp_path / "model.safetensors"
    report = consolidate(runs["full"], out, max_shard_size=200, verify=True, progress=False)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not out.exists() and report.verified
    got = {}
    for s in shards:
        part = load_file(tmp_path / s)
        assert all(index["weight_map"][k] == s for k in part)
        got |= part
    want = _subset(ref["full"], "net.")
    assert sorted(got) == sorted(want) and index["metadata"]["total_size"] == report.bytes
    for k in want:
        assert bitwise_equal(got[k], want[k]), k
    with pytest.raises(CosmosTrainError, match="--max-shard-size applies to .safetensors"):
        consolidate(runs["full"], tmp_path / "m.pt", max_shard_size="1GB", progress=False)


def test_merge_lora_outputs_equal_lora_model(runs, ref, tmp_path):
    out = tmp_path / "merged.pt"
    consolidate(runs["lora"], out, prefix="", merge_lora=True, verify=True, progress=False)
    merged = torch.load(out, weights_only=True)
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    plain = build(lora=False)
    plain.load_state_dict(merged, strict=True)
    lora_model = build(lora=True)
    lora_model.load_state_dict(_subset(ref["lora"], "net.", ""), strict=True)
    x = torch.randn(3, 7)
    assert any(lora_model.blocks[0].self_attn.q_proj.lora_B.default.weight.abs().reshape(-1) > 0)
    torch.testing.assert_close(plain(x), lora_model(x), rtol=1e-5, atol=1e-6)


def test_merge_lora_refuses_non_lora_checkpoint(runs, tmp_path):
    with pytest.raises(CheckpointError, match="no LoRA adapters .* already merged"):
        consolidate(runs["full"], tmp_path / "m.pt", merge_lora=True, lora_alpha=4, progress=False)
    assert not list(tmp_path.iterdir())


def test_merge_lora_flags_without_spec(runs, tmp_path):
    src = runs["lora"] / "checkpoints" / ITER
    alone = tmp_path / "alone" / ITER  # no spec.toml above: rank/alpha must come from flags
    shutil.copytree(src, alone)
    with pytest.raises(CosmosTrainError, match="pass --lora-alpha"):
        consolidate(alone, tmp_path / "m.pt", merge_lora=True, progress=False)
    with pytest.raises(CheckpointError, match="does not match the stored lora_A shapes"):
        consolidate(alone, tmp_path / "m.pt", merge_lora=True, lora_rank=3, lora_alpha=6, progress=False)
    consolidate(alone, tmp_path / "m.pt", merge_lora=True, lora_alpha=6, progress=False)
    consolidate(src, tmp_path / "ref.pt", merge_lora=True, progress=False)
    _assert_same(torch.load(tmp_path / "m.pt", weights_only=True), torch.load(tmp_path / "ref.pt", weights_only=True))


def test_adapter_only_loads_with_peft(runs, ref, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    consolidate(runs["lora"], out, adapter_only=True, verify=True, progress=False)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (2, 6)
    base = build(lora=False)
    lora_sd = _subset(ref["lora"], "net.", "")
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in lora_sd.items() if "lora_" not in k})
    peft_model = PeftModel.from_pretrained(base, out)
    lora_model = build(lora=True)
    lora_model.load_state_dict(lora_sd, strict=True)
    x = torch.randn(3, 7)
    torch.testing.assert_close(peft_model(x), lora_model(x), rtol=0, atol=0)


def test_missing_or_truncated_shard_names_file_and_leaves_nothing(runs, tmp_path):
    it = tmp_path / ITER
    shutil.copytree(runs["full"] / "checkpoints" / ITER, it)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    shard = it / "model" / "__1_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: shard file truncated"):
        consolidate(it, out_dir / "model.pt", progress=False)
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: shard file missing"):
        consolidate(it, out_dir / "model.safetensors", progress=False)
    assert not list(out_dir.iterdir())


def test_corrupt_shard_during_read_leaves_nothing(runs, tmp_path):
    it = tmp_path / ITER
    shutil.copytree(runs["full"] / "checkpoints" / ITER, it)
    shard = it / "model" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[: len(data)] = b"\0" * len(data)  # same length, garbage content: only reading can tell
    shard.write_bytes(bytes(data))
    out = tmp_path / "out" / "model.pt"
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: tensor 'net\.[^']*' (refused|cannot be read)"):
        consolidate(it, out, progress=False)
    assert not list(out.parent.iterdir())


def test_default_output_and_rerun(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["full"], run)
    it = run / "checkpoints" / ITER
    assert default_output(it) == run / "consolidated" / f"{ITER}.pt"
    assert default_output(it, ema=True, dtype="bf16") == run / "consolidated" / f"{ITER}_ema_bf16.pt"
    assert default_output(it, adapter_only=True) == run / "consolidated" / f"{ITER}_adapter"
    r1 = consolidate(run, iteration=10, progress=False)
    first_bytes = r1.outputs[0].read_bytes()
    first = torch.load(r1.outputs[0], weights_only=True)
    r2 = consolidate(run, progress=False)
    assert r1.outputs == r2.outputs == [run / "consolidated" / f"{ITER}.pt"]
    # Re-runnable: the same file (up to the zip's random serialization id), replaced in place.
    assert len(first_bytes) == r2.outputs[0].stat().st_size
    _assert_same(torch.load(r2.outputs[0], weights_only=True), first)
    assert sorted(os.listdir(run / "consolidated")) == [f"{ITER}.pt"]
    with pytest.raises(CheckpointError, match="no iteration 20"):
        consolidate(run, iteration=20, progress=False)


def test_consolidated_files_describe_their_spec(runs, tmp_path):
    from cosmos_train.export.described import SPEC_METADATA_KEY, read_described_spec, sidecar_path
    from cosmos_train.export.load import resolve_load_path
    from cosmos_train.export.safetensors_io import SafetensorsSource
    from cosmos_train.infer import InferenceRequest, resolve_spec
    from cosmos_train.spec_loading import load_spec_text

    st = consolidate(runs["lora"], tmp_path / "lora.safetensors", progress=False).outputs[0]
    text = SafetensorsSource(st).metadata()[SPEC_METADATA_KEY]
    assert load_spec_text(text).model.train_architecture == "lora"
    merged = consolidate(runs["lora"], tmp_path / "merged.pt", merge_lora=True, progress=False).outputs
    assert merged == [tmp_path / "merged.pt"] and sidecar_path(merged[0]).is_file()
    spec = load_spec_text(read_described_spec(merged[0]))
    assert spec.model.train_architecture == "full" and spec.model.lora.rank == 16  # the defaults again
    # infer takes the architecture from the file itself, wherever it was moved to
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for f in (merged[0], sidecar_path(merged[0])):
        f.rename(moved / f.name)
    req = InferenceRequest(checkpoint=moved / "merged.pt", input=tmp_path, prompt_embedding="", output=tmp_path)
    assert resolve_spec(req, resolve_load_path(req.checkpoint)).model.train_architecture == "full"
    # a run without spec.toml gives a file without a description
    plain = consolidate(runs["full"], tmp_path / "full.pt", progress=False).outputs[0]
    assert read_described_spec(plain) is None and not sidecar_path(plain).exists()
