"""A consolidated file describes itself: the resolved spec it was trained with travels with it.

`.safetensors` (single or every shard) carry it in the header metadata under
`cosmos_train.spec`; a `.pt` gets a sidecar `<stem>.spec.toml` beside it. After a
LoRA merge the recorded spec says `train_architecture = "full"` (the file holds a
plain DiT). `infer` reads this instead of guessing from the folder the file sits in.
"""

from __future__ import annotations

from pathlib import Path

from cosmos_train.errors import CheckpointError

SPEC_METADATA_KEY = "cosmos_train.spec"
SIDECAR_SUFFIX = ".spec.toml"


def sidecar_path(weights: str | Path) -> Path:
    """`model.pt` -> `model.spec.toml`."""
    weights = Path(weights)
    return weights.with_name(weights.stem + SIDECAR_SUFFIX)


def exported_spec_text(run_spec: Path, *, merged: bool) -> str:
    """The run's spec as TOML, rewritten to describe a merged (plain DiT) file when `merged`."""
    from cosmos_train.spec import ExperimentSpec
    from cosmos_train.spec_loading import load_spec

    spec = load_spec(run_spec)
    if merged:
        data = spec.model_dump()
        data["model"].update(train_architecture="full", lora={})
        data["checkpoint"].update(save_adapters_only=False)
        spec = ExperimentSpec.model_validate(data)
    return spec.to_toml()


def read_described_spec(weights: str | Path) -> str | None:
    """The spec TOML recorded with a consolidated file (metadata or sidecar), or None."""
    weights = Path(weights)
    if weights.is_dir():  # a diffusers folder written by consolidate records it in its shards
        from cosmos_train.export.diffusers_folder import DiffusersSource, find_transformer_dir

        if find_transformer_dir(weights) is None:
            return None
        return DiffusersSource(weights).metadata().get(SPEC_METADATA_KEY)
    if weights.name.endswith((".safetensors", ".safetensors.index.json")):
        from cosmos_train.export.safetensors_io import SafetensorsSource

        return SafetensorsSource(weights).metadata().get(SPEC_METADATA_KEY)
    side = sidecar_path(weights)
    try:
        return side.read_text() if side.is_file() else None
    except OSError as e:
        raise CheckpointError(f"{side}: cannot read ({e})") from None
