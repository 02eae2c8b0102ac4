"""Inference: embeddings, condition frames, checkpoints of every kind, LoRA adapters, the mp4."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from cosmos_train.data.video import write_mp4
from cosmos_train.errors import CosmosTrainError
from cosmos_train.infer import InferenceRequest, infer, load_embedding, read_condition_frames
from cosmos_train.train import train
from tests.train_fixtures import small_spec


def _frames(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_load_embedding_pads_to_512_and_reports_bad_files(tmp_path):
    np.save(tmp_path / "e.npy", np.ones((7, 1024), dtype=np.float16))
    emb, mask = load_embedding(str(tmp_path / "e.npy"))
    assert emb.shape == (512, 1024) and emb.dtype == torch.float32
    assert mask.sum() == 7 and emb[7:].abs().sum() == 0
    np.save(tmp_path / "bad.npy", np.ones((3,), dtype=np.float32))
    with pytest.raises(CosmosTrainError, match="expected an array"):
        load_embedding(str(tmp_path / "bad.npy"))
    with pytest.raises(CosmosTrainError, match="not found"):
        load_embedding(str(tmp_path / "missing.npy"))
    (tmp_path / "s.zarr").mkdir()
    with pytest.raises(CosmosTrainError, match="STORE.zarr:KEY"):
        load_embedding(str(tmp_path / "s.zarr"))


def test_condition_frame_is_the_last_frame_of_a_clip_resized(tmp_path):
    clip = np.zeros((5, 10, 14, 3), dtype=np.uint8)
    clip[-1] = 200
    write_mp4(tmp_path / "c.mp4", clip)
    frame = read_condition_frames(tmp_path / "c.mp4", (16, 16), 1)
    assert frame.shape == (3, 1, 16, 16) and frame.dtype == torch.uint8
    assert (frame.int() - 200).abs().max() <= 2
    assert read_condition_frames(tmp_path / "c.mp4", (16, 16), 5).shape == (3, 5, 16, 16)
    with pytest.raises(CosmosTrainError, match="has 5 frames; 9 are needed"):
        read_condition_frames(tmp_path / "c.mp4", (16, 16), 9)
    with pytest.raises(CosmosTrainError, match="not found"):
        read_condition_frames(tmp_path / "nope.png", (16, 16), 1)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("infer")
    spec = small_spec(out, name="inf", trainer={"max_iter": 2}, checkpoint={"save_iter": 2})
    train(spec, show_progress=False)
    return spec


def test_infer_from_a_run_dir_writes_the_expected_clip(trained_run, tmp_path):
    data_dir = next((trained_run.run_dir().parents[2] / "data").glob("synthetic-*"))
    req = InferenceRequest(checkpoint=trained_run.run_dir(), input=data_dir / "videos" / "clip_0000.mp4",
                           prompt_embedding=f"{data_dir / 't5_xxl.zarr'}:clip_0000", output=tmp_path / "o.mp4",
                           steps=2, guidance=3.0, seed=1)
    infer(req)
    frames = _frames(tmp_path / "o.mp4")
    assert len(frames) == 13 and frames[0].shape == (16, 16, 3)
    # seeded: the same request gives the same clip; another seed another one
    infer(InferenceRequest(**{**req.__dict__, "output": tmp_path / "p.mp4"}))
    infer(InferenceRequest(**{**req.__dict__, "output": tmp_path / "q.mp4", "seed": 2, "ema": True}))
    assert all(np.array_equal(a, b) for a, b in zip(frames, _frames(tmp_path / "p.mp4")))
    assert not all(np.array_equal(a, b) for a, b in zip(frames, _frames(tmp_path / "q.mp4")))


def test_infer_needs_a_spec_for_a_bare_file(trained_run, tmp_path):
    torch.save({"net.x": torch.zeros(1)}, tmp_path / "m.pt")
    (tmp_path / "f.png").write_bytes(b"")  # the flags are fine; the spec is what is missing
    req = InferenceRequest(checkpoint=tmp_path / "m.pt", input=tmp_path / "f.png", prompt_embedding="e.npy",
                           output=tmp_path / "o.mp4")
    with pytest.raises(CosmosTrainError, match="--spec"):
        infer(req)


def test_embedding_width_must_match_the_model(trained_run, tmp_path):
    np.save(tmp_path / "narrow.npy", np.ones((7, 512), dtype=np.float32))
    data_dir = next((trained_run.run_dir().parents[2] / "data").glob("synthetic-*"))
    req = InferenceRequest(checkpoint=trained_run.run_dir(), input=data_dir / "videos" / "clip_0000.mp4",
                           prompt_embedding=str(tmp_path / "narrow.npy"), output=tmp_path / "o.mp4", steps=1)
    with pytest.raises(CosmosTrainError, match="width 512 does not match the model's context_dim 1024"):
        infer(req)


def _infer_on_ranks(rank, world_size, req):
    infer(req)


def test_infer_under_two_processes_uses_context_parallelism(trained_run, tmp_path):
    from tests.dist import run_ranks

    data_dir = next((trained_run.run_dir().parents[2] / "data").glob("synthetic-*"))
    req = InferenceRequest(checkpoint=trained_run.run_dir(), input=data_dir / "videos" / "clip_0002.mp4",
                           prompt_embedding=f"{data_dir / 't5_xxl.zarr'}:clip_0002", output=tmp_path / "one.mp4",
                           steps=2, seed=5, lossless=True)
    infer(req)
    run_ranks(_infer_on_ranks, 2, InferenceRequest(**{**req.__dict__, "output": tmp_path / "two.mp4"}))
    one, two = _frames(tmp_path / "one.mp4"), _frames(tmp_path / "two.mp4")
    assert len(one) == len(two) == 13
    # same sample up to fp32 reassociation in the ring (lossless video: at most one 8-bit rounding step)
    assert max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(one, two)) <= 1
