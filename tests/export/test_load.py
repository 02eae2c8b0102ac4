"""load_path sources: .pt / .safetensors (flat, net./net_ema.), DCP dir, run dir, hf:// from a local cache.

The .pt broadcast onto FSDP shards on 2 ranks is tested in test_manager (one spawn for both).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cosmos_train.checkpoint.manager import Checkpointer
from cosmos_train.errors import CheckpointError
from cosmos_train.export.load import resolve_load_path
from tests.checkpoint.toy import build, full_state, spec, train_steps


def _flat(parts, *, ema_scale=2.0) -> dict:
    sd = {f"net.{k}": v.clone() for k, v in parts[0].state_dict().items()}
    sd.update({f"net_ema.{k}": (v * ema_scale if v.is_floating_point() else v).clone()
               for k, v in parts[0].state_dict().items()})
    sd["net.blocks.0.norm._extra_state"] = torch.zeros(1)  # TE extra state is dropped, not an error
    return sd


def _init(path, seed=5, **kw):
    parts = build(seed)
    ck = Checkpointer(spec(load_path=str(path), **kw), path.parent / "newrun", model=parts[0], ema=parts[3])
    assert ck.initialize()
    ck.close()
    return parts


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_full_file_loads_regular_and_ema(tmp_path, fmt):
    src = build(0)
    sd = _flat(src)
    path = tmp_path / f"model.{fmt}"
    torch.save(sd, path) if fmt == "pt" else save_file({k: v.contiguous() for k, v in sd.items()}, path)
    parts = _init(path)
    for k, v in src[0].state_dict().items():
        assert torch.equal(parts[0].state_dict()[k], v), k
        assert torch.equal(parts[3].state_dict()[k], sd[f"net_ema.{k}"]), k
    reg = _init(path, load_ema_to_reg=True)
    assert torch.equal(reg[0].state_dict()["head.weight"], sd["net_ema.head.weight"])


def test_sharded_safetensors_index_is_a_source(tmp_path):
    import json

    src = build(0)
    sd = {k: v.contiguous() for k, v in _flat(src).items()}
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: sd[k] for k in part}, tmp_path / name)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: n for n, ks in halves.items() for k in ks}}))
    assert resolve_load_path(index).kind == "safetensors"
    parts = _init(index)
    for k, v in src[0].state_dict().items():
        assert torch.equal(parts[0].state_dict()[k], v), k


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = _flat(build(0))
    del sd["net.blocks.1.fc1.weight"]
    sd["net.blocks.9.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"1 missing, 1 unexpected[\s\S]*net\.blocks\.1\.fc1\.weight"
                                              r"[\s\S]*net\.blocks\.9\.extra\.weight"):
        _init(tmp_path / "bad.pt")
    parts = _init(tmp_path / "bad.pt", strict_resume=False)  # warns, loads what matches
    assert torch.equal(parts[0].state_dict()["head.weight"], sd["net.head.weight"])
    parts = _init(tmp_path / "bad.pt", keys_not_to_resume=["blocks.1.fc1", "net.blocks.9"])
    assert torch.equal(parts[0].state_dict()["embed.weight"], sd["net.embed.weight"])


def test_dcp_dir_run_dir_and_training_state(tmp_path):
    src = build(0)
    train_steps(src, 2)
    ck = Checkpointer(spec(), tmp_path / "run", model=src[0], optimizer=src[1], scheduler=src[2],
                      trainer_state=src[4], ema=src[3])
    ck.save(2)
    ck.close()
    ref = full_state(src)
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "iter_000000002"):
        assert resolve_load_path(path).kind == "dcp"
        parts = build(8)
        ck = Checkpointer(spec(load_path=str(path), load_training_state=True), tmp_path / "new", model=parts[0],
                          optimizer=parts[1], scheduler=parts[2], trainer_state=parts[4], ema=parts[3])
        assert ck.initialize()
        ck.close()
        got = full_state(parts)
        assert got["step"] == 2 and torch.equal(got["model"]["head.weight"], ref["model"]["head.weight"])
        assert torch.equal(got["optim"]["head.weight"]["exp_avg"], ref["optim"]["head.weight"]["exp_avg"])


def _fill_hf_cache(cache, repo_id: str, files: dict[str, bytes]) -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    for rel, data in files.items():
        p = repo / "snapshots" / sha / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_hf_source_from_prefilled_cache_offline(tmp_path):
    src = build(0)
    torch.save(_flat(src), tmp_path / "m.pt")
    cache = tmp_path / "hfcache"
    _fill_hf_cache(cache, "nvidia/Cosmos-Test", {"ckpt/model.pt": (tmp_path / "m.pt").read_bytes()})
    source = resolve_load_path("hf://nvidia/Cosmos-Test/ckpt/model.pt", cache_dir=cache, offline=True)
    assert source.kind == "pt" and source.path.read_bytes() == (tmp_path / "m.pt").read_bytes()
    with pytest.raises(CheckpointError, match="offline"):
        resolve_load_path("hf://nvidia/Cosmos-Test/ckpt/other.pt", cache_dir=cache, offline=True)
    with pytest.raises(CheckpointError, match="expected hf://org/repo/path"):
        resolve_load_path("hf://nvidia", cache_dir=cache, offline=True)
    # hf://org/repo is a diffusers repo (its transformer/): not in this cache
    with pytest.raises(CheckpointError, match="offline"):
        resolve_load_path("hf://nvidia/only", cache_dir=cache, offline=True)


def test_hf_path_cannot_leave_the_snapshot(tmp_path):
    from cosmos_train.hub import inside_snapshot

    # a DCP dir outside the cache that `..` would reach
    src = build(0)
    ck = Checkpointer(spec(), tmp_path / "victim", model=src[0], ema=src[3])
    ck.save(1, force=True)
    ck.close()
    cache = tmp_path / "hfcache"
    _fill_hf_cache(cache, "org/repo", {"README.md": b"x"})
    depth = len((cache / "models--org--repo" / "snapshots" / "x").relative_to(tmp_path).parts)
    escape = "/".join([".."] * depth) + "/victim/checkpoints/iter_000000001"
    for bad in (f"hf://org/repo/{escape}", "hf://org/repo/a/../../x.pt", "hf://org/repo/./model.pt",
                "hf://org/repo/a//b"):
        with pytest.raises(CheckpointError, match="may not leave the repository"):
            resolve_load_path(bad, cache_dir=cache, offline=True)
    root = cache / "snap"
    with pytest.raises(CheckpointError, match="outside the downloaded snapshot"):
        inside_snapshot(root, "../other", "hf://o/r/../other")
    assert inside_snapshot(root, "ckpt/iter_000000001", "s") == root / "ckpt" / "iter_000000001"


def test_a_bug_keeps_its_traceback_instead_of_a_damaged_checkpoint_message(tmp_path, monkeypatch):
    import cosmos_train.export.load as load_module

    parts = build(0)
    ck = Checkpointer(spec(), tmp_path / "run", model=parts[0])
    ck.save(1)
    ck.close()

    def buggy_planner(*args, **kwargs):
        raise ZeroDivisionError("a bug in the planner")

    monkeypatch.setattr(load_module, "plan_keys", buggy_planner)
    ck = Checkpointer(spec(), tmp_path / "run", model=build(1)[0])
    with pytest.raises(ZeroDivisionError, match="a bug in the planner"):  # not CheckpointError / exit 2
        ck.load()
    ck.close()
