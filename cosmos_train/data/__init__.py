"""Video data: the folder dataset, the text-embedding store, synthetic data, samplers and the loader.

The names below are imported on first use (PEP 562), so `import cosmos_train.data...` from the
CLI does not pull in torch, PyAV and zarr before a command needs them.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DatasetReport": "check", "check_dataset": "check",
    "EmbeddingStore": "embeddings", "UnsafePickleError": "embeddings", "convert_embeddings": "embeddings",
    "VideoLoader": "loader", "build_dataloader": "loader",
    "ConcatDatasets": "sampler", "GlobalStreamSampler": "sampler", "SampleRef": "sampler",
    "WeightedStreamSampler": "sampler",
    "ensure_synthetic_dataset": "synthetic",
    "VideoFolderDataset": "video", "probe_video": "video", "read_frames": "video", "write_mp4": "video",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
