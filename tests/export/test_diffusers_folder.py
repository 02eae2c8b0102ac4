"""`consolidate --format diffusers` and diffusers folders as load_path / infer --checkpoint.

A tiny run is trained for real (DCP, FSDP-free single process), exported as a diffusers
`transformer/` folder, loaded by diffusers' own `CosmosTransformer3DModel.from_pretrained`,
and loaded back here bitwise. Hub paths are exercised through a local Hugging Face cache
in offline mode (no network).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
from diffusers import CosmosTransformer3DModel  # noqa: E402
from diffusers.models.transformers import transformer_cosmos  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cosmos_train.layout import checkpoints_dir, read_latest  # noqa: E402
from cosmos_train.cli import app  # noqa: E402
from cosmos_train.errors import CheckpointError, CosmosTrainError  # noqa: E402
from cosmos_train.export import diffusers as dmap  # noqa: E402
from cosmos_train.export.consolidate import consolidate  # noqa: E402
from cosmos_train.export.load import load_weights, resolve_load_path  # noqa: E402
from cosmos_train.infer import InferenceRequest, infer  # noqa: E402
from cosmos_train.models.dit import DiT  # noqa: E402
from cosmos_train.train import train  # noqa: E402
from tests.train_fixtures import read_dcp, small_spec  # noqa: E402


@pytest.fixture(autouse=True)
def _torchvision_resize(monkeypatch):
    """diffusers resizes the padding mask with torchvision, which cannot load on this CPU build
    (see test_diffusers_parity): the same nearest resize through torch."""
    import types

    shim = types.SimpleNamespace(
        functional=types.SimpleNamespace(resize=lambda t, size, interpolation=None: F.interpolate(
            t, size=list(size), mode="nearest")),
        InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))
    monkeypatch.setattr(transformer_cosmos, "transforms", shim, raising=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    result = train(small_spec(tmp, name="full", trainer={"max_iter": 2}), show_progress=False)
    spec = small_spec(tmp, name="full", trainer={"max_iter": 2})
    dcp = read_dcp(read_latest(checkpoints_dir(result.run_dir)) / "model", tmp / "dcp")
    return result.run_dir, spec, dcp


def _dit(spec):
    model = DiT(spec.model.dit_config())
    model.init_weights(123)  # different from the run: loading must overwrite everything
    return model


def test_export_loads_in_diffusers_and_back_bitwise(run, tmp_path):
    run_dir, spec, dcp = run
    out = tmp_path / "exported"
    report = consolidate(run_dir, out, format="diffusers", max_shard_size="100KB", progress=False, verify=True)
    tdir = out / "transformer"
    index = json.loads((tdir / dmap.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tdir / s).is_file() for s in shards)
    assert report.outputs[-1].name == dmap.INDEX_NAME
    # diffusers' own loader, strict: every weight present, none left over
    theirs = CosmosTransformer3DModel.from_pretrained(out, subfolder="transformer")
    assert list(theirs.config.rope_scale) == [1.0, 1.0, 1.0] and theirs.config.in_channels == 49
    sd = theirs.state_dict()
    assert len(sd) == len([k for k in dcp if k.startswith("net.") and not dmap.is_dropped_on_export(k[4:])])
    for key, value in sd.items():
        assert torch.equal(value, dcp["net." + dmap.from_diffusers_key(key)]), key
    # same output as our DiT with the run's weights
    ours = _dit(spec)
    load_weights(resolve_load_path(run_dir), ours)
    cfg = spec.model.dit_config()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.latent_channels, 2, 4, 4, generator=g)
    t = torch.rand(1, 2, generator=g)
    emb = torch.randn(1, 5, cfg.context_dim, generator=g)
    cond = torch.zeros(1, 1, 2, 4, 4)
    cond[:, :, 0] = 1
    with torch.no_grad():
        a = ours.eval()(x, t, emb, condition_mask_B_1_T_H_W=cond)
        b = theirs.eval()(hidden_states=x, timestep=t[:, None, :, None, None], encoder_hidden_states=emb,
                          condition_mask=cond, padding_mask=torch.zeros(1, 1, 4, 4), return_dict=False)[0]
    assert ((a - b).norm() / b.norm()).item() <= 1e-5
    # back into our DiT from the folder (and from the pipeline-style parent dir): bitwise, buffers included
    for path in (tdir, out):
        back = _dit(spec)
        load_weights(resolve_load_path(path), back)
        for key, value in back.state_dict().items():
            assert torch.equal(value, dcp["net." + key]), key


def test_ema_and_bf16_export(run, tmp_path):
    run_dir, _, dcp = run
    out = tmp_path / "ema"
    consolidate(run_dir, out, format="diffusers", ema=True, dtype="bf16", progress=False)
    theirs = CosmosTransformer3DModel.from_pretrained(out / "transformer")
    key = "transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(theirs.state_dict()[key], dcp["net_ema.blocks.0.self_attn.q_proj.weight"].bfloat16())
    assert not torch.equal(dcp["net_ema.blocks.0.self_attn.q_proj.weight"], dcp["net.blocks.0.self_attn.q_proj.weight"])


def test_cli_and_load_path_and_infer_from_diffusers_folder(run, tmp_path):
    run_dir, spec, dcp = run
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["consolidate", str(run_dir), "--format", "diffusers", "-o", str(out),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (out / "transformer" / dmap.CONFIG_NAME).is_file()
    # checkpoint.load_path: a run started from the folder takes the same first step as one started
    # from the DCP checkpoint it was exported from (same seed, data and noise: same weights)
    losses = []
    for name, path in (("from_diffusers", out / "transformer"), ("from_dcp", run_dir), ("from_init", None)):
        start = small_spec(tmp_path, name=name, trainer={"max_iter": 1},
                           checkpoint={"load_path": str(path) if path else None})
        losses.append(train(start, show_progress=False).losses[1])
    assert losses[0] == losses[1] != losses[2]
    # infer --checkpoint: the folder records the run's spec; same video as from the DCP run dir
    data_dir = next((run_dir.parents[2] / "data").glob("synthetic-*"))
    kw = dict(input=data_dir / "videos" / "clip_0001.mp4", prompt_embedding=f"{data_dir / 't5_xxl.zarr'}:clip_0001",
              steps=2, seed=3, lossless=True)
    a = infer(InferenceRequest(checkpoint=str(out), output=tmp_path / "a.mp4", **kw))
    b = infer(InferenceRequest(checkpoint=str(run_dir), output=tmp_path / "b.mp4", **kw))
    assert a.read_bytes() == b.read_bytes()


def test_hub_repo_resolves_to_its_transformer_offline(run, tmp_path):
    run_dir, spec, dcp = run
    out = tmp_path / "hub"
    consolidate(run_dir, out, format="diffusers", progress=False)
    # a Hugging Face cache holding one snapshot of org/repo (what a previous download leaves)
    cache = tmp_path / "hf"
    rev = "0" * 40
    snap = cache / "models--org--repo" / "snapshots" / rev
    shutil.copytree(out, snap)
    (cache / "models--org--repo" / "refs").mkdir(parents=True)
    (cache / "models--org--repo" / "refs" / "main").write_text(rev)
    source = resolve_load_path("hf://org/repo", cache_dir=cache, offline=True)
    assert source.kind == "diffusers" and source.path == snap / "transformer"
    back = _dit(spec)
    load_weights(source, back)
    assert torch.equal(back.state_dict()["blocks.1.mlp.layer2.weight"], dcp["net.blocks.1.mlp.layer2.weight"])


def test_bad_inputs_are_one_line_errors(run, tmp_path):
    run_dir, spec, _ = run
    out = tmp_path / "x"
    consolidate(run_dir, out, format="diffusers", progress=False)
    with pytest.raises(CosmosTrainError, match="--both"):
        consolidate(run_dir, tmp_path / "y", format="diffusers", both=True, progress=False)
    with pytest.raises(CosmosTrainError, match="directory"):
        consolidate(run_dir, tmp_path / "y.safetensors", format="diffusers", progress=False)
    # the spec's architecture must be the folder's (RoPE ratios would otherwise load silently)
    other = DiT(spec.model.dit_config().with_overrides(rope_h_extrapolation_ratio=3.0))
    with pytest.raises(CheckpointError, match="rope_h_extrapolation_ratio"):
        load_weights(resolve_load_path(out), other)
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    cfg["extra_pos_embed_type"] = "learnable"
    (out / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="extra_pos_embed_type"):
        load_weights(resolve_load_path(out), _dit(spec))


def test_lora_run_needs_merge_and_merges(tmp_path):
    spec = small_spec(tmp_path, name="lora", trainer={"max_iter": 1},
                      model={"train_architecture": "lora", "lora": {"rank": 2, "alpha": 4, "init_lora_weights": False}})
    result = train(spec, show_progress=False)
    with pytest.raises(CosmosTrainError, match="--merge-lora"):
        consolidate(result.run_dir, tmp_path / "plain", format="diffusers", progress=False)
    consolidate(result.run_dir, tmp_path / "merged_pt.pt", merge_lora=True, prefix="", progress=False)
    consolidate(result.run_dir, tmp_path / "merged", format="diffusers", merge_lora=True, progress=False)
    merged = torch.load(tmp_path / "merged_pt.pt", weights_only=True)
    theirs = CosmosTransformer3DModel.from_pretrained(tmp_path / "merged" / "transformer").state_dict()
    for key, value in theirs.items():
        assert torch.equal(value, merged[dmap.from_diffusers_key(key)]), key


class _NoGuardrail:
    def to(self, *args, **kwargs):
        return self


def _base_pipeline(root):
    """A diffusers pipeline folder as `save_pretrained` lays it out: tiny Wan VAE, the released scheduler
    settings, no text encoder/tokenizer (prompt embeddings are passed), a transformer to be replaced."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

    root.mkdir()
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True]).save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True).save_pretrained(root / "scheduler")
    (root / "transformer").mkdir()  # the base's transformer: must be ignored
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "Cosmos2VideoToWorldPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "safety_checker": [None, None],
        "text_encoder": [None, None], "tokenizer": [None, None],
        "transformer": ["diffusers", "CosmosTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}))
    return root


def test_full_pipeline_folder_around_the_export(run, tmp_path):
    from diffusers import Cosmos2VideoToWorldPipeline

    run_dir, _, dcp = run
    base = _base_pipeline(tmp_path / "base")
    out = tmp_path / "pipe"
    consolidate(run_dir, out, format="diffusers", base_pipeline=base, progress=False)
    assert (out / "vae").is_symlink() and (out / "vae").resolve() == (base / "vae").resolve()
    assert not (out / "transformer").is_symlink()
    pipe = Cosmos2VideoToWorldPipeline.from_pretrained(out, safety_checker=_NoGuardrail(), text_encoder=None,
                                                       tokenizer=None)
    got = pipe.transformer.state_dict()["transformer_blocks.0.ff.net.2.weight"]
    assert torch.equal(got, dcp["net.blocks.0.mlp.layer2.weight"])
    # a folder that is not a Cosmos pipeline fails before anything is written
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "WanTransformer3DModel"]}))
    with pytest.raises(CheckpointError, match="WanTransformer3DModel"):
        consolidate(run_dir, tmp_path / "pipe2", format="diffusers", base_pipeline=bad, progress=False)
    assert not (tmp_path / "pipe2").exists()
