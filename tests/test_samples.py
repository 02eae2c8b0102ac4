"""Samples during training: files at the right steps, decodable, the sheet's size, bytes equal after a resume,
and the training stream untouched by sampling."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from PIL import Image

from cosmos_train.contact_sheet import BORDER, CONDITION_COLOUR, HEADER_H, LABEL_H, cell_size, sheet_size
from pydantic import ValidationError

from cosmos_train.errors import CosmosTrainError
from cosmos_train.train import train
from tests.dist import run_ranks
from tests.train_fixtures import metrics, small_spec

SAMPLES = {"sample_iter": 4, "samples": {"steps": 2, "num_clips": 2, "columns": 5}}


def _spec(tmp_path, name, **trainer):
    return small_spec(tmp_path, name=name, trainer={**SAMPLES, **trainer}, data={"validation_clips": 2})


def _files(run_dir):
    root = run_dir / "samples"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _decode(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_samples_at_the_right_steps_decodable_and_reproduced_after_resume(tmp_path):
    full = train(_spec(tmp_path, "full"), show_progress=False)
    files = _files(full.run_dir)
    # every sample_iter steps and at the last step (6 is not a multiple of 4)
    assert sorted({k.split("/")[0] for k in files}) == ["iter_000000004", "iter_000000006"]
    it = full.run_dir / "samples" / "iter_000000006"
    index = json.loads((it / "samples.json").read_text())
    names = [s["name"] for s in index["samples"]]
    assert names == ["clip_0002", "clip_0003"]  # the two held-out clips (the last keys)
    assert index["weights"] == "ema" and index["condition_frames"] == 1
    for name in names:
        frames = _decode(it / f"{name}.mp4")
        assert frames.shape == (13, 16, 16, 3)
    sheet = Image.open(it / "contact_sheet.png")
    assert sheet.size == sheet_size(2, 5, 16, 16) == (5 * (64 + 2 * BORDER), HEADER_H + 2 * (LABEL_H + 64 + 2 * BORDER))
    # the conditioning frame (column 0) is framed in orange, the generated ones are not
    px = np.asarray(sheet.convert("RGB"))
    top = HEADER_H + LABEL_H  # first row's cells start here
    assert tuple(px[top, 1]) == CONDITION_COLOUR
    assert tuple(px[top, cell_size(16, 16)[1] + 2 * BORDER + 1]) != CONDITION_COLOUR
    log = metrics(full.run_dir)
    assert [(r["step"], r["clips"]) for r in log if r["kind"] == "sample"] == [(4, 2), (6, 2)]
    assert all(r["seconds"] > 0 for r in log if r["kind"] == "sample")
    train_records = {r["step"]: r for r in log if r["kind"] == "train"}
    assert train_records[4]["sample_s"] > 0 and train_records[2]["sample_s"] == 0

    # stop at 5 (no sample there), resume to 6: the step-4 and step-6 files are byte-identical
    train(_spec(tmp_path, "split", max_iter=5), show_progress=False)
    resumed = train(_spec(tmp_path, "split"), show_progress=False)
    assert resumed.start_step == 5
    split_files = _files(resumed.run_dir)
    split_files.pop("iter_000000005/samples.json")  # the first part sampled at its own last step
    for k in [k for k in split_files if k.startswith("iter_000000005/")]:
        split_files.pop(k)
    assert split_files.keys() == files.keys()
    for k in files:
        if k.endswith("samples.json"):
            continue
        assert split_files[k] == files[k], k
    # sampling does not touch the training stream: same losses as a run without samples
    plain = train(small_spec(tmp_path, name="plain", data={"validation_clips": 2}), show_progress=False)
    assert plain.losses == full.losses


def _train_on_ranks(rank, world_size, spec_json):
    from cosmos_train.spec import ExperimentSpec

    return train(ExperimentSpec.model_validate_json(spec_json), show_progress=False).losses


def _two_ranks(tmp_path, name, **parallel):
    spec = _spec(tmp_path, name, max_iter=4, sample_iter=4).model_copy(deep=True)
    for k, v in parallel.items():
        setattr(spec.parallel, k, v)
    run_ranks(_train_on_ranks, 2, spec.model_dump_json())
    return spec.run_dir()


def test_samples_on_two_ranks(tmp_path):
    one = train(_spec(tmp_path, "one", max_iter=4, sample_iter=4), show_progress=False)
    a = _files(one.run_dir)
    # cp = 2: the cp group samples together; the same training gives the same clips up to float
    # reassociation in ring attention
    cp = _two_ranks(tmp_path, "cp2", cp=2, dp_shard=1)
    assert _files(cp).keys() == a.keys()
    for k in a:
        if k.endswith(".mp4"):
            diff = np.abs(_decode(one.run_dir / "samples" / k).astype(int) - _decode(cp / "samples" / k).astype(int))
            assert diff.mean() < 1.0, k
    # dp = 2: the two dp ranks share out the clips (each writes one); rank 0 draws the whole sheet
    dp = _two_ranks(tmp_path, "dp2", dp_shard=2)
    assert _files(dp).keys() == a.keys()
    sheet = Image.open(dp / "samples" / "iter_000000004" / "contact_sheet.png")
    assert sheet.size == sheet_size(2, 5, 16, 16)


def test_sample_inputs_from_files_and_clear_errors(tmp_path):
    from cosmos_train.data.loader import dataset_dirs
    from cosmos_train.samples import resolve_inputs

    spec = _spec(tmp_path, "files")
    (data_dir, _), = dataset_dirs(spec.data, cache_dir=tmp_path)
    given = [{"name": "robot", "input": str(data_dir / "videos" / "clip_0000.mp4"),
              "prompt_embedding": f"{data_dir / 't5_xxl.zarr'}:clip_0000"}]
    spec = small_spec(tmp_path, name="files", trainer={**SAMPLES, "samples": {**SAMPLES["samples"], "inputs": given}})
    inputs = resolve_inputs(spec, condition_frames=1, cache_dir=tmp_path)
    assert [i.name for i in inputs] == ["robot"] and tuple(inputs[0].condition.shape) == (3, 1, 16, 16)
    bad = small_spec(tmp_path, name="files", trainer={**SAMPLES, "samples": {
        "inputs": [{**given[0], "input": str(tmp_path / "missing.png")}]}})
    with pytest.raises(CosmosTrainError, match=r"trainer.samples.inputs\[0\] \(robot\): .*missing.png"):
        resolve_inputs(bad, condition_frames=1, cache_dir=tmp_path)
    with pytest.raises(ValidationError, match="plain file stem"):
        small_spec(tmp_path, trainer={"samples": {"inputs": [{**given[0], "name": "../x"}]}})
    with pytest.raises(ValidationError, match="needs model.ema.enabled"):
        small_spec(tmp_path, trainer={"samples": {"weights": "ema"}}, model={"ema": {"enabled": False}})


def test_a_training_sample_is_what_infer_makes_from_the_checkpoint(tmp_path):
    from cosmos_train.data.loader import dataset_dirs
    from cosmos_train.infer import InferenceRequest, infer

    base = _spec(tmp_path, "same", max_iter=2)
    (data_dir, _), = dataset_dirs(base.data, cache_dir=tmp_path)
    frame = _decode(data_dir / "videos" / "clip_0001.mp4")[0]
    Image.fromarray(frame).save(tmp_path / "first.png")
    emb = f"{data_dir / 't5_xxl.zarr'}:clip_0001"
    samples = {"steps": 3, "guidance": 3.0, "seed": 5, "weights": "regular",
               "inputs": [{"name": "given", "input": str(tmp_path / "first.png"), "prompt_embedding": emb}]}
    spec = _spec(tmp_path, "same", max_iter=2, sample_iter=2, samples=samples)
    run = train(spec, show_progress=False)
    out = infer(InferenceRequest(checkpoint=run.run_dir, input=tmp_path / "first.png", prompt_embedding=emb,
                                 output=tmp_path / "infer.mp4", steps=3, guidance=3.0, seed=5, device="cpu"))
    ours = run.run_dir / "samples" / "iter_000000002" / "given.mp4"
    assert np.array_equal(_decode(ours), _decode(out))
