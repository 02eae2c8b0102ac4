"""The one Hugging Face Hub fetcher: `hf://org/repo[@rev]/path/in/repo` -> a local file or directory.

Used for `checkpoint.load_path` (export/load.py) and for model assets such as the VAE and the text
encoder (models/). A path ending in a weight-file suffix is one file (`hf_hub_download`); anything
else is a folder (`snapshot_download` of `path/**`). Files land in huggingface_hub's cache
(`$HF_HOME`, read by huggingface_hub itself); `offline` uses the cache only.
"""

from __future__ import annotations

import os
from pathlib import Path

from cosmos_train.errors import CheckpointError, CosmosTrainError

HF_SCHEME = "hf://"
FILE_SUFFIXES = (".pt", ".pth", ".safetensors")


def hf_fetch(spec: str, *, cache_dir: str | Path | None = None, offline: bool = False) -> Path:
    """Download (or find in the cache) what `spec` names; CheckpointError naming it if that fails."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HTTPError

    rest = spec[len(HF_SCHEME):].rstrip("/")
    parts = rest.split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise CheckpointError(f"{spec}: expected hf://org/repo/path/in/repo (optionally org/repo@revision; "
                              "checkpoint.load_path also takes hf://org/repo, a diffusers repo)")
    org, repo, inner = parts
    repo, _, revision = repo.partition("@")
    repo_id = f"{org}/{repo}"
    if any(c in ("", ".", "..") for c in inner.split("/")) or "\\" in inner or org in (".", "..") \
            or repo in (".", ".."):
        raise CheckpointError(f"{spec}: the path inside the repo must be plain names (no '.', '..', '//' or "
                              f"'\\'); it may not leave the repository")
    try:
        if inner.endswith(FILE_SUFFIXES):
            return Path(hf_hub_download(repo_id, inner, revision=revision or None, cache_dir=cache_dir,
                                        local_files_only=offline))
        root = snapshot_download(repo_id, revision=revision or None, cache_dir=cache_dir,
                                 allow_patterns=[f"{inner.rstrip('/')}/**"], local_files_only=offline)
    except (OSError, ValueError, EntryNotFoundError, HTTPError) as e:  # offline miss, 404, auth, bad repo id
        hint = " (offline: only the local cache is used; download it once online)" if offline else ""
        raise CheckpointError(f"{spec}: cannot fetch from the Hugging Face Hub: {type(e).__name__}: {e}{hint}") \
            from e
    return inside_snapshot(Path(root), inner, spec)


def inside_snapshot(root: Path, inner: str, spec: str) -> Path:
    """`root/inner`, normalised, and refused unless it stays strictly inside the snapshot `root`.

    (Snapshot files are symlinks into the cache's blobs/, so the lexical path is what is checked.)
    """
    root = Path(os.path.abspath(root))
    target = Path(os.path.normpath(root / inner))
    if target == root or root not in target.parents:
        raise CheckpointError(f"{spec}: resolves to {target}, outside the downloaded snapshot {root}")
    return target


def resolve_local(path: str | Path, *, cache_dir: str | Path | None = None, offline: bool = False) -> Path:
    """A local file or directory for `path`; `hf://...` is fetched first, a missing local path is an error."""
    text = str(path)
    if text.startswith(HF_SCHEME):
        return hf_fetch(text, cache_dir=cache_dir, offline=offline)
    local = Path(text).expanduser()
    if not local.exists():
        raise CosmosTrainError(f"{local}: not found")
    return local


def sibling(path: str | Path, name: str) -> str:
    """`name` beside `path` (same hf:// repo or local parent): text_encoder/ -> tokenizer/."""
    text = str(path).rstrip("/")
    return text.rsplit("/", 1)[0] + "/" + name if "/" in text else name
