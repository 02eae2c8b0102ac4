"""Stopping a diverged run: N consecutive non-finite losses end it, without a host sync per step.

The streak is counted on the device (`update` every step: no `.item()`); `check` reads it
(folded into the trainer's sync-step all-reduce, or one all-reduce before a save) only there, so a run that went
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

    def take_flag(self) -> torch.Tensor:
        """(1,) float64 on the device: 1 if a streak reached the limit since the last take, else 0.

        For a caller that sums it across ranks in an all-reduce it already does (no extra collective);
        `raise_if(total, step)` then raises on every rank alike.
        """
        flag = (self._worst >= self.limit).to(torch.float64).reshape(1)
        self._worst.zero_()
        return flag

    def raise_if(self, total: float, step: int) -> None:
        """Raise NonFiniteLossError if `total` (a summed `take_flag`) is > 0."""
        if total > 0:
            self._raise(self.limit, step)

    def check(self, step: int) -> None:
        """On a logging/saving step: raise NonFiniteLossError if any rank saw a streak >= limit."""
        worst = self._worst.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        self._worst.zero_()
        n = int(worst.item())
        if n >= self.limit:
            self._raise(n, step)

    def _raise(self, n: int, step: int) -> None:
        raise NonFiniteLossError(
                f"training diverged: the loss was not finite (NaN/inf) for {n}+ consecutive steps, up to step "
                f"{step}; stopped without saving. The last committed checkpoint holds finite weights. Lower "
                f"optimizer.lr, check the data, or raise trainer.max_nonfinite_steps ({self.limit})")
