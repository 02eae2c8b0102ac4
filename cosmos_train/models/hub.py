"""Local paths for model assets (VAE, text encoder) given as a path or `hf://org/repo/path`.

`hf://` goes through the same fetcher as `checkpoint.load_path` (huggingface_hub into its cache;
`$HF_HOME` / `$HF_HUB_OFFLINE` are read by huggingface_hub itself).
"""

from __future__ import annotations

from pathlib import Path

from cosmos_train.errors import CosmosTrainError

HF_SCHEME = "hf://"


def resolve_local(path: str | Path, *, cache_dir: str | Path | None = None, offline: bool = False) -> Path:
    """A local file or directory for `path`; `hf://org/repo[@rev]/inner` is downloaded first."""
    text = str(path)
    if text.startswith(HF_SCHEME):
        from cosmos_train.export.load import _hf_fetch

        return _hf_fetch(text, cache_dir=cache_dir, offline=offline)
    local = Path(text).expanduser()
    if not local.exists():
        raise CosmosTrainError(f"{local}: not found")
    return local


def sibling(path: str | Path, name: str) -> str:
    """`name` beside `path` (same hf:// repo or local parent): text_encoder/ -> tokenizer/."""
    text = str(path).rstrip("/")
    return text.rsplit("/", 1)[0] + "/" + name if "/" in text else name
