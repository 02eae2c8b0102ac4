"""AdamW and the LambdaLinear / constant learning-rate multiplier schedules."""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate

import torch
from torch.optim.lr_scheduler import LambdaLR

from cosmos_train.spec import OptimizerSpec, SchedulerSpec


def build_optimizer(opt: OptimizerSpec, params) -> torch.optim.AdamW:
    """AdamW over the trainable params; torch's fused kernel (CPU and CUDA) unless `fused = "off"`."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check model.train_architecture and LoRA targets")
    return torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, eps=opt.eps,
                             weight_decay=opt.weight_decay, fused=opt.fused != "off" or None)


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
    """`optimizer.step()`, skipped when `grad_norm` (the global norm, same on every rank) is not finite.

    Fused AdamW takes the decision on the device (`found_inf`, the hook torch's GradScaler uses):
    no host sync, and the skipped step leaves parameters, moments and step count untouched. An
    unfused optimizer has no such hook, so the check there costs one host sync.
    """
    found_inf = (~torch.isfinite(grad_norm)).float()
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = found_inf.to(grad_norm.device)
        optimizer.step()
    elif not found_inf.item():
        optimizer.step()


class LambdaLinear:
    """Upstream LambdaLinear: per cycle, linear warm-up f_start -> f_max, then linear f_max -> f_min.

    Cycles follow each other by cumulative `cycle_lengths`; past the last cycle the last
    cycle's f_min holds.
    """

    def __init__(self, sch: SchedulerSpec):
        self.sch = sch
        self.cycle_ends = list(accumulate(sch.cycle_lengths))

    def __call__(self, step: int) -> float:
        i = bisect_right(self.cycle_ends, step)
        if i == len(self.cycle_ends):
            return self.sch.f_min[-1]
        n = step - (self.cycle_ends[i - 1] if i else 0)
        warm, length = self.sch.warm_up_steps[i], self.sch.cycle_lengths[i]
        f_start, f_max, f_min = self.sch.f_start[i], self.sch.f_max[i], self.sch.f_min[i]
        if n < warm:
            return f_start + (f_max - f_start) * n / warm
        return f_min + (f_max - f_min) * (length - n) / (length - warm)


def _constant(step: int) -> float:
    return 1.0


class SpecLambdaLR(LambdaLR):
    """LambdaLR whose state is only counters: the multiplier function comes from the spec.

    (LambdaLR would pickle a callable object's __dict__ into its state; a checkpoint must hold
    plain values, and a resumed run should follow the schedule of its current spec.)
    """

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd.pop("lr_lambdas", None)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas)})


def apply_optimizer_spec(opt: OptimizerSpec, optimizer: torch.optim.Optimizer, scheduler: LambdaLR) -> list[str]:
    """After a resume: make the spec's AdamW hyperparameters the ones that train; returns what changed.

    The restored optimizer/scheduler state carries the lr (as the scheduler's base), betas, eps
    and weight decay of the run that saved; without this a `resume ... optimizer.lr=...` override
    would be written into spec.toml yet ignored. Unchanged values are left alone (bit-exact resume).
    """
    changed = []
    want = {"betas": tuple(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay}
    for name, value in want.items():
        old = {tuple(g[name]) if name == "betas" else g[name] for g in optimizer.param_groups}
        if old != {value}:
            changed.append(f"optimizer.{name}: {sorted(old)[0]} -> {value}")
            for g in optimizer.param_groups:
                g[name] = value
    if any(b != opt.lr for b in scheduler.base_lrs):
        changed.append(f"optimizer.lr: {scheduler.base_lrs[0]} -> {opt.lr}")
        scheduler.base_lrs = [opt.lr] * len(scheduler.base_lrs)
        for g, fn in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            g["initial_lr"] = opt.lr
            g["lr"] = opt.lr * fn(scheduler.last_epoch)  # what LambdaLR.get_lr computes
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return changed


def build_scheduler(sch: SchedulerSpec, optimizer: torch.optim.Optimizer) -> LambdaLR:
    """A LambdaLR whose multiplier follows the spec; its state_dict holds only counters."""
    fn = LambdaLinear(sch) if sch.kind == "lambdalinear" else _constant
    return SpecLambdaLR(optimizer, lr_lambda=fn)
