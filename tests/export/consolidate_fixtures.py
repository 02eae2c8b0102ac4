"""Checkpoints for the consolidation tests: a small blocks model sharded by FSDP2 on 2 gloo ranks.

`make_runs(root)` writes, in one 2-rank job, two run dirs in the project layout:

    root/full/{spec.toml, checkpoints/{iter_000000010/{model/, MANIFEST.json, COMMITTED}, latest_checkpoint.txt}}
    root/lora/...   (same, with PEFT LoRA adapters injected, random B so merging matters)

Each model part holds `net.<fqn>` and `net_ema.<fqn>` (EMA = a different set of
values) plus one `_extra_state` entry, as training writes them.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

ITER = "iter_000000010"
LORA_RANK, LORA_ALPHA = 2, 6
LORA_TARGETS = ["q_proj", "v_proj", "mlp.layer1"]
SPEC_TOML = f"""
[model]
train_architecture = "lora"
[model.lora]
rank = {LORA_RANK}
alpha = {LORA_ALPHA}
target_modules = {LORA_TARGETS!r}
""".replace("'", '"')


class Attn(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.q_norm = nn.RMSNorm(3)

    def forward(self, x):
        return self.q_proj(x) + self.k_proj(x) * self.v_proj(x).tanh()


class Mlp(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.layer1 = nn.Linear(d, 3 * d, bias=False)  # 3d rows: uneven FSDP shards on 2 ranks
        self.layer2 = nn.Linear(3 * d, d, bias=False)

    def forward(self, x):
        return self.layer2(torch.nn.functional.gelu(self.layer1(x)))


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.self_attn = Attn(d)
        self.mlp = Mlp(d)

    def forward(self, x):
        x = x + self.self_attn(x)
        return x + self.mlp(x)


class TinyNet(nn.Module):
    """Blocks of Linear layers without bias, like the DiT; an int64 and a float buffer."""

    def __init__(self, d: int = 5, n_blocks: int = 2):
        super().__init__()
        self.x_embedder = nn.Linear(7, d, bias=False)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))
        self.final = nn.Linear(d, 4, bias=True)
        self.register_buffer("accum_iteration", torch.tensor(10, dtype=torch.int64))
        self.register_buffer("accum_train_in_hours", torch.tensor(0.25))

    def forward(self, x):
        x = self.x_embedder(x)
        for b in self.blocks:
            x = b(x)
        return self.final(x)


def build(lora: bool) -> nn.Module:
    """The test model, deterministic; with PEFT LoRA injected (random A and B) when `lora`."""
    torch.manual_seed(0)
    model = TinyNet()
    if lora:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS,
                         init_lora_weights=False)
        model = inject_adapter_in_model(cfg, model)
    return model


def _save_body(rank: int, world_size: int, root: str) -> None:
    """Rank body: shard both models with FSDP2, save net./net_ema. with DCP, write the layout."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    for name, lora in (("full", False), ("lora", True)):
        model = build(lora)
        ema = build(lora)
        with torch.no_grad():
            for p in ema.parameters():
                p.mul_(0.5).add_(0.125)
        for m in (model, ema):
            for block in m.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(m, mesh=mesh)
        sd = {f"net.{k}": v for k, v in get_model_state_dict(model).items()}
        sd |= {f"net_ema.{k}": v for k, v in get_model_state_dict(ema).items()}
        # Transformer Engine modules add such entries; consolidation must drop them.
        sd["net.blocks.0.self_attn.q_norm._extra_state"] = io.BytesIO(b"te-extra-state")
        run = Path(root) / name
        it = run / "checkpoints" / ITER
        dcp.save(sd, checkpoint_id=str(it / "model"))
        dist.barrier()
        if rank == 0:  # as the Checkpointer commits: manifest first, then the marker
            from cosmos_train.checkpoint.integrity import data_files, file_entry, write_manifest

            write_manifest(it, {rel: file_entry(it, rel) for rel in data_files(it)})
            (it / "COMMITTED").write_text("committed\n")
            (run / "checkpoints" / "latest_checkpoint.txt").write_text(ITER + "\n")
            if lora:
                (run / "spec.toml").write_text(SPEC_TOML)
        dist.barrier()


def make_runs(root: Path) -> dict[str, Path]:
    """Write the `full` and `lora` run dirs under `root` (2 gloo ranks); returns their paths."""
    from tests.dist import run_ranks

    run_ranks(_save_body, 2, str(root), timeout=120)
    return {"full": root / "full", "lora": root / "lora"}


def reference(run: Path, out: Path) -> dict[str, torch.Tensor]:
    """What torch's own `dcp_to_torch_save` gives for the run's model part (tensors only)."""
    import warnings

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(run / "checkpoints" / ITER / "model", out)
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.numel() == 0 or torch.equal(a.reshape(-1).contiguous().view(torch.uint8),
                                         b.reshape(-1).contiguous().view(torch.uint8))
