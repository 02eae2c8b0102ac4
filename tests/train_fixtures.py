"""A very small training spec for end-to-end tests, and helpers to read run outputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from cosmos_train.spec import ExperimentSpec

from cosmos_train.spec_loading import load_spec_text

ROOT = Path(__file__).parents[1]


def small_spec(out: Path, *, name: str = "run", **sections: dict) -> ExperimentSpec:
    """The tiny example shrunk further: 32 channels, 16x16 clips of 13 frames, 4 clips."""
    text = f"""
[job]
project = "t"
group = "g"
name = "{name}"
output_root = "{out}"
seed = 3
[model]
preset = "tiny"
[model.architecture]
model_channels = 32
num_heads = 2
adaln_lora_dim = 16
[data]
kind = "synthetic"
dataset_dir = "{out / 'data'}"
num_frames = 13
video_size = [16, 16]
batch_size = 1
num_synthetic_clips = 4
[optimizer]
lr = 1e-3
[scheduler]
warm_up_steps = [2]
cycle_lengths = [100]
f_start = [0.1]
f_max = [1.0]
f_min = [0.5]
[trainer]
max_iter = 6
logging_iter = 2
[checkpoint]
save_iter = 3
"""
    spec = load_spec_text(text)
    data = spec.model_dump()
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return ExperimentSpec.model_validate(data)


def read_dcp(part_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP part, through torch's own converter."""
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / f"{part_dir.parent.name}-{part_dir.name}.pt"
    dcp_to_torch_save(str(part_dir), str(out))
    return torch.load(out, weights_only=False)


def dcp_keys(part_dir: Path) -> set[str]:
    return set(FileSystemReader(str(part_dir)).read_metadata().state_dict_metadata)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
