"""A small model with `blocks` for checkpoint tests, plus its optimizer, scheduler, EMA and trainer state."""

from __future__ import annotations

import torch
from torch import nn

from cosmos_train.checkpoint.trainer_state import TrainerState
from cosmos_train.spec import CheckpointSpec


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d, bias=False)
        self.fc2 = nn.Linear(2 * d, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Toy(nn.Module):
    def __init__(self, d: int = 8, n_blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d, bias=False)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))
        self.head = nn.Linear(d, 3, bias=False)
        self.register_buffer("counter", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class Sampler:
    """Stand-in for the global stream sampler: `{"epoch", "position"}` state."""

    def __init__(self) -> None:
        self.epoch, self.position = 0, 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, sd):
        self.epoch, self.position = int(sd["epoch"]), int(sd["position"])


class Ema:
    """Keys equal the model state_dict keys; values are detached copies (DTensors when sharded)."""

    def __init__(self, model: nn.Module, beta: float = 0.5) -> None:
        self.model, self.beta = model, beta
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, v in self.model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(self.beta).add_(v.detach(), alpha=1 - self.beta)

    def state_dict(self):
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, sd):
        for k, v in sd.items():
            if v is not self.shadow[k]:
                self.shadow[k].copy_(v)


def build(seed: int = 0, *, shard: bool = False, d: int = 8):
    """(model, optimizer, scheduler, ema, trainer_state) — FSDP2-sharded over all ranks when `shard`."""
    torch.manual_seed(seed)
    model = Toy(d)
    if shard:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0 / (1 + 0.1 * n))
    ema = Ema(model)
    state = TrainerState(seed=seed, generator=torch.Generator().manual_seed(seed + 1), sampler=Sampler())
    return model, opt, sched, ema, state


def train_steps(parts, n: int, *, batch: int = 4) -> list[float]:
    """n deterministic steps; data depend on the global step only, noise on the trainer generator."""
    model, opt, sched, ema, state = parts
    losses = []
    for _ in range(n):
        g = torch.Generator().manual_seed(1000 + state.step)
        x = torch.randn(batch, 5, 3, generator=g)
        noise = torch.randn(x.shape, generator=state.generator)
        loss = ((model(x + 0.1 * noise) - x) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        ema.update()
        state.step += 1
        state.sampler.position += batch
        losses.append(loss.item())
    return losses


def full_state(parts) -> dict:
    """Unsharded copies of model, EMA, optimizer (by FQN), scheduler and trainer values, on CPU."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)
    from torch.distributed.tensor import DTensor

    model, opt, sched, ema, state = parts
    opts = StateDictOptions(full_state_dict=True)
    full = lambda v: v.full_tensor() if isinstance(v, DTensor) else v  # noqa: E731
    out = {"model": {k: v.clone() for k, v in get_model_state_dict(model, options=opts).items()},
           "ema": {k: full(v).clone() for k, v in ema.state_dict().items()},
           "optim": _clone(get_optimizer_state_dict(model, opt, options=opts)["state"]),
           "sched": sched.state_dict(), "step": state.step, "sampler": state.sampler.state_dict()}
    return out


def _clone(x):
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x.clone() if isinstance(x, torch.Tensor) else x


def assert_same(a, b, path="") -> None:
    """Recursive bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys differ: {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{path}: tensors differ"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def spec(**kw) -> CheckpointSpec:
    return CheckpointSpec(**{"save_iter": 1, **kw})


def pack(obj) -> bytes:
    """Serialise a rank's result: tensors sent through the result queue by fd vanish when the rank exits."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(blob: bytes):
    import io

    return torch.load(io.BytesIO(blob), weights_only=False)
