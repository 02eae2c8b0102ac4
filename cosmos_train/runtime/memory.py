"""Peak memory figures for logs and benchmarks (one definition of each)."""

from __future__ import annotations

import resource

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports `ru_maxrss` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory on a GPU, the process's peak RSS on CPU, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_rss_bytes() / 1e9
