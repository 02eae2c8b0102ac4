"""FSDP2 on gloo: sharded training equals one process; materialise; clip; accumulate; AC keys.

The stand-in model has the DiT's runtime contract (`blocks`, `init_parameter`,
`init_buffers`, `init_weights`) with shapes chosen so that some dim-0 sizes do not
divide the shard count (FSDP2 pads those shards).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cosmos_train.models.dit import init_generator
from cosmos_train.runtime.fsdp import (
    apply_activation_checkpointing, apply_fsdp, clip_grad_norm, materialize, mixed_precision_dtypes,
    set_gradient_sync,
)
from tests.dist import run_ranks

SEED = 3
STEPS = 5
N, T, D_IN, D_OUT = 8, 5, 4, 3  # global batch, tokens, in/out features


def _init_value(model, seed):
    """The DiT's rule: every parameter seeded from the run seed and its FQN."""
    return lambda name, shape: model.init_parameter(name, shape, init_generator(seed, name))


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim + 1)  # 17 rows: uneven shards on 2 and 4 ranks
        self.fc2 = nn.Linear(2 * dim + 1, dim, bias=False)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class StandIn(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(D_IN, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, D_OUT)  # 3 rows: one rank's shard is empty on 4 ranks
        self.register_buffer("scale", torch.empty(dim))

    def forward(self, x):
        h = self.embed(x) * self.scale
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def init_parameter(self, name, shape, generator):
        if name.endswith("norm.weight"):
            return 1 + 0.1 * torch.randn(shape, generator=generator)
        scale = 0.1 if name.endswith("bias") else 1 / math.sqrt(shape[-1])
        return scale * torch.randn(shape, generator=generator)

    def init_buffers(self):
        self.scale.copy_(torch.linspace(0.5, 1.5, self.scale.numel()))

    @torch.no_grad()
    def init_weights(self, seed):
        for name, p in self.named_parameters():
            p.copy_(self.init_parameter(name, tuple(p.shape), init_generator(seed, name)))
        self.init_buffers()


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(STEPS, N, T, D_IN, generator=g), torch.randn(STEPS, N, T, D_OUT, generator=g)


def _reference(accum: int, max_norm: float):
    """The same steps in one process, unsharded, with torch's own clip."""
    torch.manual_seed(0)
    model = StandIn()
    model.init_weights(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    xs, ys = _data()
    losses, norms = [], []
    for step in range(STEPS):
        loss = F.mse_loss(model(xs[step]), ys[step])
        loss.backward()
        if max_norm:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _full(model) -> dict:
    """Unsharded state dict as numpy arrays: they pickle by value, whereas tensors would
    travel through shared-memory fds that vanish when the worker process exits."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().numpy().copy() for k, v in sd.items()}


def _train_one(world_size, parallel_kw, accum, max_norm, ac):
    import torch.distributed as dist

    from cosmos_train.runtime.mesh import build_parallel_dims
    from cosmos_train.spec import ParallelSpec

    dims = build_parallel_dims(ParallelSpec(**parallel_kw), world_size)
    dims.build_mesh("cpu")
    with torch.device("meta"):
        model = StandIn()
    if ac:
        apply_activation_checkpointing(model)
    apply_fsdp(model, dims.fsdp_mesh, reshard_after_forward=True)
    materialize(model, "cpu", init_value=_init_value(model, SEED))
    init = _full(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    xs, ys = _data()
    per_rank = N // dims.dp_size
    micro = per_rank // accum
    losses, norms, no_reduce_before_last_micro = [], [], []
    for step in range(STEPS):
        lo = dims.dp_rank * per_rank
        total = torch.zeros(())
        for m in range(accum):
            set_gradient_sync(model, m == accum - 1)
            sl = slice(lo + m * micro, lo + (m + 1) * micro)
            loss = F.mse_loss(model(xs[step, sl]), ys[step, sl]) / accum
            loss.backward()
            total += loss.detach()
            if m < accum - 1:  # nothing was reduced into the sharded grads yet
                no_reduce_before_last_micro.append(all(p.grad is None for p in model.parameters()))
        if max_norm:
            norms.append(clip_grad_norm(model.parameters(), max_norm))
        opt.step()
        opt.zero_grad()
        dist.all_reduce(total, group=dims.dp_mesh.get_group())
        losses.append(total.item() / dims.dp_size)
    return dict(losses=losses, norms=norms, init=init, final=_full(model),
                no_reduce=no_reduce_before_last_micro, keys=sorted(model.state_dict()))


def _assert_matches(out, accum, max_norm):
    ref_losses, ref_norms, ref_final = _reference(accum, max_norm)
    plain = StandIn()
    plain.init_weights(SEED)
    for r in out:
        assert r["keys"] == sorted(plain.state_dict())  # FSDP2 (and AC) keep the FQNs
        for k, v in plain.state_dict().items():  # materialize == unsharded init, bit for bit
            torch.testing.assert_close(torch.from_numpy(r["init"][k]), v, rtol=0, atol=0, msg=k)
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor(ref_norms), rtol=1e-5, atol=1e-6)
        for k, v in ref_final.items():
            torch.testing.assert_close(torch.from_numpy(r["final"][k]), v, rtol=1e-5, atol=1e-6, msg=k)
        assert r["no_reduce"] == [True] * (STEPS * (accum - 1))
    if max_norm:
        assert min(ref_norms) > max_norm  # clipping was active in every step


# (parallel spec, micro-steps, max_norm, activation checkpointing); all on 2 ranks.
SCENARIOS = {
    "fsdp": ({"dp_shard": 2}, 1, 0.0, False),
    "fsdp-accum2-clip-ac": ({"dp_shard": 2}, 2, 0.05, True),
    # HSDP: 2-D mesh (replicate 2, shard 1); grads all-reduced, the norm not double counted.
    "hsdp-accum2-clip": ({"dp_replicate": 2}, 2, 0.05, False),
    # cp=2: FSDP shards over the cp pair, which reads the same samples (the stand-in has no
    # sequence split, so each cp rank computes the whole loss).
    "cp2-clip": ({"cp": 2}, 1, 0.05, False),
}
DIT_SEED = 5


def _dit_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 48, 2, 4, 4, generator=g), torch.rand(1, 2, generator=g),
            torch.randn(1, 3, 1024, generator=g))


def _tiny_dit_sharded(world_size):
    """The real tiny DiT: meta -> AC -> FSDP2 (dp_shard 2) -> materialise -> forward/backward."""
    from cosmos_train.models.dit import DiT
    from cosmos_train.presets import PRESETS
    from cosmos_train.runtime.mesh import build_parallel_dims
    from cosmos_train.spec import ParallelSpec

    dims = build_parallel_dims(ParallelSpec(dp_shard=2), world_size)
    dims.build_mesh("cpu")
    with torch.device("meta"):
        model = DiT(PRESETS["tiny"])
    apply_activation_checkpointing(model)
    apply_fsdp(model, dims.fsdp_mesh)
    materialize(model, "cpu", init_value=_init_value(model, DIT_SEED))
    init = _full(model)
    out = model(*_dit_inputs())
    out.square().mean().backward()
    norm = clip_grad_norm(model.parameters(), 0.0)
    return dict(init=init, out=out.detach().numpy().copy(), norm=norm)


def _all_two_rank_checks(rank, world_size):
    # One spawn for everything on 2 ranks: process start-up dominates the run time.
    return dict(scenarios=[_train_one(world_size, *sc) for sc in SCENARIOS.values()],
                dit=_tiny_dit_sharded(world_size))


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_all_two_rank_checks, 2, timeout=120)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sharded_training_matches_single_process(two_ranks, name):
    i = list(SCENARIOS).index(name)
    _, accum, max_norm, _ = SCENARIOS[name]
    _assert_matches([per_rank["scenarios"][i] for per_rank in two_ranks], accum, max_norm)


def _hsdp_four_ranks(rank, world_size):
    return _train_one(world_size, {"dp_replicate": 2, "dp_shard": 2}, 1, 0.05, False)


def test_hsdp_2x2_clipped_training_matches_single_process():
    # torch's get_total_norm on DTensor grads sharded over dp_shard and replicated over dp_replicate:
    # summed over the shards, not counted twice over the replicas (the 2-rank HSDP case has shard 1).
    _assert_matches(run_ranks(_hsdp_four_ranks, 4, timeout=180), 1, 0.05)


def test_tiny_dit_sharded_equals_unsharded(two_ranks):
    from cosmos_train.models.dit import DiT
    from cosmos_train.presets import PRESETS

    plain = DiT(PRESETS["tiny"])
    plain.init_weights(DIT_SEED)
    out = plain(*_dit_inputs())
    out.square().mean().backward()
    norm = math.sqrt(sum(float(p.grad.square().sum()) for p in plain.parameters()))
    for r in two_ranks:
        d = r["dit"]
        assert d["init"].keys() == plain.state_dict().keys()  # FQNs unchanged by AC and FSDP2
        for k, v in plain.state_dict().items():
            assert torch.equal(torch.from_numpy(d["init"][k]), v), k
        torch.testing.assert_close(torch.from_numpy(d["out"]), out.detach(), rtol=1e-5, atol=1e-6)
        assert d["norm"] == pytest.approx(norm, rel=1e-5)


def test_materialize_single_process_equals_unsharded_init():
    # The real one-process path: a 1-rank group from init_distributed, a (1, 1, 1) mesh, FSDP2.
    from cosmos_train.runtime.distributed import distributed
    from cosmos_train.runtime.mesh import build_parallel_dims
    from cosmos_train.spec import ParallelSpec

    with distributed(ParallelSpec(), device="cpu", env={}) as info:
        dims = build_parallel_dims(ParallelSpec(), info.world_size)
        dims.build_mesh("cpu")
        with torch.device("meta"):
            model = StandIn()
        apply_fsdp(model, dims.fsdp_mesh)
        materialize(model, info.device, init_value=_init_value(model, SEED))
        full = _full(model)
    plain = StandIn()
    plain.init_weights(SEED)
    assert full.keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(torch.from_numpy(full[k]), v), k


# ------------------------------------------------------------------- in process
def test_activation_checkpointing_keeps_keys_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, T, D_IN)
    grads = []
    for ac in (False, True):
        model = StandIn()
        model.init_weights(SEED)
        keys = list(model.state_dict())
        if ac:
            apply_activation_checkpointing(model)
            assert list(model.state_dict()) == keys
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_clip_on_plain_tensors_matches_torch():
    g = torch.Generator().manual_seed(1)
    ps = [nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(3)]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    ref = [p.grad.clone() for p in ps]
    total = math.sqrt(sum(float(r.square().sum()) for r in ref))
    got = clip_grad_norm(ps, 0.5)
    assert got == pytest.approx(total, rel=1e-6)
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.grad, r * 0.5 / (total + 1e-6))
    assert clip_grad_norm(ps, 0.0) == pytest.approx(0.5, rel=1e-5)  # measure only


def test_mixed_precision_dtypes():
    assert mixed_precision_dtypes("auto", "cuda") == (torch.bfloat16, torch.float32)
    assert mixed_precision_dtypes("auto", "cpu") == (torch.float32, torch.float32)
    assert mixed_precision_dtypes("bf16", "cpu") == (torch.bfloat16, torch.float32)
    assert mixed_precision_dtypes("fp32", "cuda") == (torch.float32, torch.float32)
    with pytest.raises(ValueError, match="precision"):
        mixed_precision_dtypes("fp16", "cuda")


def test_apply_fsdp_needs_blocks():
    with pytest.raises(ValueError, match="blocks"):
        apply_activation_checkpointing(nn.Linear(2, 2))
