"""A diffusers `transformer/` folder (config.json + safetensors) as a weight source and output.

Reading: `DiffusersSource` is the `TensorSource` of a folder written by diffusers'
`CosmosTransformer3DModel.save_pretrained` (or by `cosmos-train consolidate --format
diffusers`), a pipeline folder holding one under `transformer/`, or the same fetched
from the Hub. It lists the weights under our keys (`net.<fqn>`, the released-checkpoint
names) and adds the buffers diffusers does not store, recomputed from config.json
(`pos_embedder.*`) or zero (the `accum_*` counters), so the key planner sees a complete
DiT. Writing: `transformer_files` names the files `consolidate` writes there.

The key and config mapping itself lives in `export.diffusers` (pure functions).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cosmos_train.errors import CheckpointError
from cosmos_train.export import diffusers as mapping
from cosmos_train.export.keys import REG
from cosmos_train.export.tensor_source import TensorEntry
from cosmos_train.presets import DiTConfig


def find_transformer_dir(path: str | Path) -> Path | None:
    """The `CosmosTransformer3DModel` folder at `path` or at `path/transformer`; None if neither."""
    path = Path(path)
    for cand in (path, path / mapping.TRANSFORMER_SUBFOLDER):
        cfg = cand / mapping.CONFIG_NAME
        if cfg.is_file():
            try:
                cls = json.loads(cfg.read_text()).get("_class_name")
            except (OSError, ValueError):
                return None
            if cls == mapping.DIFFUSERS_CLASS:
                return cand
    return None


def read_dit_config(transformer_dir: Path) -> DiTConfig:
    """Our architecture from the folder's config.json; CheckpointError naming the file if it is not one."""
    cfg_path = transformer_dir / mapping.CONFIG_NAME
    try:
        config = json.loads(cfg_path.read_text())
        return mapping.from_diffusers_config(config, source=str(cfg_path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: {e}" if str(cfg_path) not in str(e) else str(e)) from None


def check_architecture(folder: DiTConfig, model: DiTConfig, *, source: str) -> None:
    """CheckpointError naming every field where the folder's config.json and the model's spec differ.

    Shapes would catch most of them when loading, but not the RoPE ratios or table sizes.
    """
    from dataclasses import fields

    diff = [f"{f.name}: folder {getattr(folder, f.name)!r}, spec {getattr(model, f.name)!r}"
            for f in fields(DiTConfig) if getattr(folder, f.name) != getattr(model, f.name)]
    if diff:
        raise CheckpointError(f"{source}: config.json describes another architecture than the spec "
                              f"(model.architecture.*): " + "; ".join(diff))


def _weights_file(transformer_dir: Path) -> Path:
    for name in (mapping.INDEX_NAME, mapping.WEIGHTS_NAME):
        if (transformer_dir / name).is_file():
            return transformer_dir / name
    raise CheckpointError(f"{transformer_dir}: no {mapping.INDEX_NAME} or {mapping.WEIGHTS_NAME} "
                          "(only safetensors diffusers folders are read)")


def computed_buffers(cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """The DiT's buffers for `cfg` as a fresh model has them (RoPE tables; zero counters)."""
    from cosmos_train.models.dit import DiT

    with torch.device("meta"):
        model = DiT(cfg, attention=nn.Identity)  # no memory: only the buffer shapes and the RoPE module
    model.pos_embedder.to_empty(device="cpu")
    model.pos_embedder.reset_buffers()
    out = {}
    for name, buf in model.named_buffers():
        out[name] = buf.detach().clone() if not buf.is_meta else torch.zeros(buf.shape, dtype=buf.dtype)
    return out


class DiffusersSource:
    """`TensorSource` of a diffusers CosmosTransformer3DModel folder, in our `net.` key space."""

    def __init__(self, path: str | Path):
        from cosmos_train.export.safetensors_io import SafetensorsSource

        found = find_transformer_dir(path)
        if found is None:
            raise CheckpointError(f"{path}: not a diffusers CosmosTransformer3DModel folder "
                                  f"(no config.json with _class_name {mapping.DIFFUSERS_CLASS!r} here or in "
                                  f"{mapping.TRANSFORMER_SUBFOLDER}/)")
        self.path = found
        self.dit_config = read_dit_config(found)
        self._inner = SafetensorsSource(_weights_file(found))
        self.files = [found / mapping.CONFIG_NAME, *self._inner.files]
        self.non_tensor_keys: list[str] = []
        self.entries: dict[str, TensorEntry] = {}
        self._stored: dict[str, str] = {}  # our key -> diffusers key
        for key, e in self._inner.entries.items():
            try:
                ours = REG + mapping.from_diffusers_key(key)
            except ValueError as err:
                raise CheckpointError(f"{self._inner.path}: {err}") from None
            self.entries[ours] = TensorEntry(ours, e.dtype, e.shape)
            self._stored[ours] = key
        self._computed = {REG + k: v for k, v in computed_buffers(self.dit_config).items()}
        for key, t in self._computed.items():
            self.entries[key] = TensorEntry(key, t.dtype, tuple(t.shape))

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata (a folder written by consolidate records the run's spec)."""
        return self._inner.metadata()

    def locate(self, name: str) -> tuple[Path, int, int] | None:
        """Where a stored weight's raw bytes lie (`SafetensorsSource.locate`); None for a computed buffer."""
        return self._inner.locate(self._stored[name]) if name in self._stored else None

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors by our keys: stored weights read from disk, buffers recomputed."""
        stored = [self._stored[n] for n in names if n in self._stored]
        loaded = self._inner.load(stored) if stored else {}
        out = {}
        for n in names:
            out[n] = loaded[self._stored[n]] if n in self._stored else self._computed[n].clone()
        return out


def diffusers_config_json(cfg: DiTConfig) -> str:
    """config.json of a CosmosTransformer3DModel with our architecture (diffusers reads it as is)."""
    from importlib.metadata import PackageNotFoundError, version

    config = {"_class_name": mapping.DIFFUSERS_CLASS}
    try:  # diffusers records the version that wrote a config; it is informational only
        config["_diffusers_version"] = version("diffusers")
    except PackageNotFoundError:
        pass
    config.update(mapping.to_diffusers_config(cfg))
    return json.dumps(config, indent=2) + "\n"


# ---------------------------------------------------------------- pipeline folders
PIPELINE_INDEX = "model_index.json"


def _fetch_pipeline(spec: str, *, cache_dir: str | Path | None, offline: bool) -> Path:
    """hf://org/repo[@rev]: every file of the pipeline repo except its transformer, from the Hub cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HTTPError

    repo, _, revision = spec[len("hf://"):].rstrip("/").partition("@")
    if repo.count("/") != 1:
        raise CheckpointError(f"{spec}: a base pipeline on the Hub is hf://org/repo[@revision]")
    try:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=cache_dir,
                                      ignore_patterns=[f"{mapping.TRANSFORMER_SUBFOLDER}/*"],
                                      local_files_only=offline))
    except (OSError, ValueError, HTTPError) as e:
        hint = " (offline: only the local cache is used)" if offline else ""
        raise CheckpointError(f"{spec}: cannot fetch the base pipeline: {type(e).__name__}: {e}{hint}") from e


def resolve_base_pipeline(base: str | Path, *, cache_dir: str | Path | None = None,
                          offline: bool = False) -> Path:
    """The folder of a base pipeline (local, or hf://org/repo fetched without its transformer), checked:
    its model_index.json names a CosmosTransformer3DModel transformer."""
    root = _fetch_pipeline(str(base), cache_dir=cache_dir, offline=offline) if str(base).startswith("hf://") \
        else Path(base).expanduser()
    index = root / PIPELINE_INDEX
    try:
        components = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{index}: not a diffusers pipeline folder ({type(e).__name__}: {e})") from None
    theirs = components.get(mapping.TRANSFORMER_SUBFOLDER)
    if not (isinstance(theirs, list) and len(theirs) == 2 and theirs[1] == mapping.DIFFUSERS_CLASS):
        raise CheckpointError(f"{index}: its transformer is {theirs!r}, not a {mapping.DIFFUSERS_CLASS}")
    return root


def link_pipeline(root: Path, out_dir: Path) -> list[Path]:
    """Make `out_dir` a full pipeline around its `transformer/`: the base's model_index.json copied,
    every other component referenced by a symlink (nothing large is copied). Returns the paths made."""
    created = []
    for entry in sorted(root.iterdir()):
        if entry.name in (mapping.TRANSFORMER_SUBFOLDER, PIPELINE_INDEX) or entry.name.startswith("."):
            continue
        link = out_dir / entry.name
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            raise CheckpointError(f"{link}: exists; choose an empty output folder for a full pipeline")
        link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        created.append(link)
    (out_dir / PIPELINE_INDEX).write_text((root / PIPELINE_INDEX).read_text())
    created.append(out_dir / PIPELINE_INDEX)
    return created
