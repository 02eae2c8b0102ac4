"""Stopping a diverged run: N consecutive non-finite losses end it, without a host sync per step.

The streak is counted on the device (`update` every step: no `.item()`); `check` reads it
(one all-reduce + one host read) only on logging steps and before a save, so a run that went
NaN stops there with a clear error instead of writing NaN checkpoints that rotate the
finite ones out. The checkpointer refuses non-finite weights on its own as well.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cosmos_train.errors import CosmosTrainError


class NonFiniteLossError(CosmosTrainError):
    """The loss was NaN/inf for `trainer.max_nonfinite_steps` consecutive steps."""


class NonFiniteGuard:
    """Counts consecutive non-finite losses on `device`; `check` raises when a streak reached `limit`."""

    def __init__(self, limit: int, device: torch.device) -> None:
        self.limit = limit
        self._run = torch.zeros((), dtype=torch.int64, device=device)  # current streak
        self._worst = torch.zeros((), dtype=torch.int64, device=device)  # longest streak since the last check

    def update(self, loss: torch.Tensor) -> None:
        """Record one step's loss (a device scalar); no host synchronisation."""
        bad = (~torch.isfinite(loss)).to(torch.int64)
        self._run = (self._run + 1) * bad
        self._worst = torch.maximum(self._worst, self._run)

    def check(self, step: int) -> None:
        """On a logging/saving step: raise NonFiniteLossError if any rank saw a streak >= limit."""
        worst = self._worst.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        self._worst.zero_()
        n = int(worst.item())
        if n >= self.limit:
            raise NonFiniteLossError(
                f"training diverged: the loss was not finite (NaN/inf) for {n} consecutive steps, up to step "
                f"{step}; stopped without saving. The last committed checkpoint holds finite weights. Lower "
                f"optimizer.lr, check the data, or raise trainer.max_nonfinite_steps ({self.limit})")
