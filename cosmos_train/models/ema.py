"""Power-function EMA of the trainable weights (Karras et al. 2024, "EDM2"), as Cosmos.

beta(it) = (1 - 1/(it + 1))^(gamma + 1), with gamma from the relative width s:
s^-2 = (gamma + 2)^2 (gamma + 3) / (gamma + 1)  (s = 0.1 -> gamma ~ 6.94).

Shadow tensors are clones of the trainable parameters, so under FSDP2 they are DTensors
sharded exactly like the parameters (the EMA shard lives beside the parameter shard) and
the update is local. `state_dict()` has the model's own keys (parameters and buffers), so
a checkpoint stores it as `net_ema.<fqn>` mirroring `net.<fqn>`.

With LoRA only the adapters are trainable: the EMA tracks them, and mirrors the frozen
base weights and the buffers *by reference* (they never change, so their EMA is
themselves and no memory is spent on a copy). Loading such entries is a no-op.
"""

from __future__ import annotations

import torch
from torch import nn


def gamma_from_s(s: float) -> float:
    """The power gamma whose EMA profile has relative standard deviation s."""
    if not 0 < s < 1:
        raise ValueError(f"EMA s must be in (0, 1) (got {s})")
    # Largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0, by bisection:
    # f is negative at 0 (s^-2 > 12 for s < 0.29, and gamma > 0 is the solution of interest).
    target = s ** -2

    def f(g: float) -> float:
        return (g + 2) ** 2 * (g + 3) - target * (g + 1)

    lo, hi = 0.0, 1.0
    while f(hi) < 0:
        hi *= 2
    if f(lo) > 0:
        raise ValueError(f"EMA s = {s} is too wide (no gamma > 0); use s < 0.28")
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def ema_beta(iteration: int, gamma: float) -> float:
    """beta(it) = (1 - 1/(it + 1))^(gamma + 1); 0 at iteration 0 (the EMA starts at the weights)."""
    if iteration < 1:
        return 0.0
    return (1.0 - 1.0 / (iteration + 1)) ** (gamma + 1)


class PowerEMA:
    """EMA of a model's trainable parameters; see the module docstring."""

    def __init__(self, model: nn.Module, *, s: float = 0.1):
        self.s = s
        self.gamma = gamma_from_s(s)
        self._model = model
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        if not self.shadow:
            raise ValueError("PowerEMA: the model has no trainable parameters")
        self._pairs: tuple | None = None

    @torch.no_grad()
    def update(self, model: nn.Module, iteration: int) -> float:
        """ema <- beta * ema + (1 - beta) * param for every trainable parameter; returns beta."""
        beta = ema_beta(iteration, self.gamma)
        if self._pairs is None or self._pairs[0] is not model:  # (model, shadows, params) built once
            params = dict(model.named_parameters())
            names = list(self.shadow)
            self._pairs = (model, [self.shadow[n] for n in names], [params[n] for n in names])
        _, shadows, params = self._pairs
        torch._foreach_lerp_(shadows, [p.detach() for p in params], 1.0 - beta)
        return beta

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Model-keyed tensors: shadows for trainable params, the model's own tensors otherwise."""
        out = {}
        for key, value in self._model.state_dict(keep_vars=True).items():
            out[key] = self.shadow.get(key, value.detach())
        return out

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy the shadow entries in; every key of `state_dict()` must be present."""
        missing = [k for k in self.state_dict() if k not in state_dict]
        unexpected = [k for k in state_dict if k not in self.state_dict()]
        if missing or unexpected:
            raise KeyError(f"EMA state: missing {missing[:5]} unexpected {unexpected[:5]}")
        for name, shadow in self.shadow.items():
            if state_dict[name] is not shadow:
                shadow.copy_(state_dict[name])

    def __repr__(self) -> str:
        n = sum(t.numel() for t in self.shadow.values())
        return f"PowerEMA(s={self.s}, gamma={self.gamma:.4f}, tensors={len(self.shadow)}, numel={n})"

