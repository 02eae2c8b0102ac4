"""Plan output: a rich table for people, a JSON document for scripts."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from cosmos_train.plan.planner import GiB, Plan


def gib(n: int | float) -> str:
    return f"{n / GiB:,.2f} GiB"


def to_json(p: Plan) -> dict[str, Any]:
    """Every figure of the plan (bytes unless named otherwise)."""
    d, s, t, c = p.dims, p.states, p.trace, p.checkpoint
    ac = p.spec.parallel.activation_checkpointing
    return {
        "spec": {"preset": p.spec.model.preset, "train_architecture": p.spec.model.train_architecture,
                 "num_frames": p.spec.data.num_frames, "video_size": list(p.spec.data.video_size),
                 "batch_size": p.spec.data.batch_size, "activation_checkpointing": ac,
                 "cp_mode": p.spec.parallel.cp_mode, "compute_dtype": str(p.param_dtype).removeprefix("torch.")},
        "hardware": {"world": p.hw.world, "nodes": p.hw.nodes, "gpus_per_node": p.hw.gpus_per_node,
                     "gpu_mem": p.hw.gpu_mem, "disk_gbps": p.hw.disk_gbps, "device_type": p.hw.device_type},
        "mesh": {"dp_replicate": d.dp_replicate, "dp_shard": d.dp_shard, "cp": d.cp, "fsdp_shard": d.fsdp_size},
        "parameters": {"total": p.inv.num_params, "trainable": p.inv.num_trainable, "tensors": len(p.inv.params)},
        "per_rank": {
            "model_states": {"params": s.params, "grads": s.grads, "optimizer": s.optimizer, "ema": s.ema,
                             "buffers": s.buffers, "total": s.total},
            "activations": {"saved": t.saved - t.batch, "saved_with_ac" if not ac else "saved_without_ac":
                            p.saved_other_ac - t.batch, "batch": t.batch, "forward_peak": t.forward_peak,
                            "backward_peak": t.backward_peak, "attention_workspace": t.attention_workspace,
                            "encode_peak": t.encode_peak},
            "fsdp_buffers": {"forward": p.fsdp_forward, "backward": p.fsdp_backward},
            "optimizer_transient": p.optimizer_transient,
            "phases": p.phases, "peak": p.peak, "peak_phase": p.peak_phase,
            "load_path_transient": p.load_transient, "async_staging_host": p.staging_host,
        },
        "checkpoint": {"model": c.model, "ema": c.ema, "optim": c.optim, "trainer": c.trainer, "total": c.total,
                       "per_rank": c.per_rank, "save_seconds": round(c.save_seconds, 2)},
        "consolidated": p.consolidated,
        "verdict": {"verdict": p.verdict, "fits": p.fits, "headroom": p.headroom, "fixes": p.fixes},
        "notes": p.notes,
        "summary": p.summary(),
    }


def tables(p: Plan) -> list[Table]:
    """Memory per rank, checkpoint, consolidated sizes, verdict."""
    d, s, t, c = p.dims, p.states, p.trace, p.checkpoint
    ac = p.spec.parallel.activation_checkpointing
    title = (f"{p.spec.model.preset} {p.spec.model.train_architecture}, {p.spec.data.num_frames} frames "
             f"{p.spec.data.video_size[0]}x{p.spec.data.video_size[1]}, batch {p.spec.data.batch_size} — "
             f"world {p.hw.world} ({p.hw.nodes} node(s) x {p.hw.gpus_per_node}), mesh dp_replicate={d.dp_replicate} "
             f"dp_shard={d.dp_shard} cp={d.cp} ({p.spec.parallel.cp_mode}), "
             f"{str(p.param_dtype).removeprefix('torch.')} compute")
    mem = Table(title=title, title_justify="left")
    mem.add_column("per rank")
    mem.add_column("bytes", justify="right")
    mem.add_column("how", style="dim")
    mem.add_row("parameters (fp32 shards)", gib(s.params),
                f"{p.inv.num_params:,} params / {d.fsdp_size} shards, dim 0 padded")
    mem.add_row("gradients (fp32 shards)", gib(s.grads), f"{p.inv.num_trainable:,} trainable")
    mem.add_row("AdamW states", gib(s.optimizer), "exp_avg + exp_avg_sq fp32 + step")
    mem.add_row("EMA", gib(s.ema), "fp32 shards of the trainable params")
    mem.add_row("buffers", gib(s.buffers), "RoPE tables, counters (not sharded)")
    mem.add_row("[bold]model states[/bold]", f"[bold]{gib(s.total)}[/bold]", "")
    mem.add_row(f"saved activations (AC {'on' if ac else 'off'})", gib(t.saved - t.batch),
                f"one micro-batch, {p.spec.data.latent_frames // d.cp} latent frames per cp rank")
    mem.add_row(f"saved activations (AC {'off' if ac else 'on'})", gib(p.saved_other_ac - t.batch), "for comparison")
    mem.add_row("attention workspace", gib(t.attention_workspace),
                "ring: K/V in flight + fp32 accumulators" if d.cp > 1 else "flash kernel")
    mem.add_row("FSDP2 all-gather (fwd / bwd)", f"{gib(p.fsdp_forward)} / {gib(p.fsdp_backward)}",
                "root + gathered block(s), prefetch")
    mem.add_row("optimizer step temporaries", gib(p.optimizer_transient), "")
    for phase, v in p.phases.items():
        mark = " [bold](peak)[/bold]" if phase == p.peak_phase else ""
        mem.add_row(f"phase: {phase}{mark}", gib(v), "")
    if p.load_transient:
        mem.add_row("load_path (before training)", gib(p.load_transient), "one full tensor at a time")
    if p.staging_host:
        mem.add_row("async checkpoint staging (host)", gib(p.staging_host), p.spec.checkpoint.async_mode)

    ck = Table(title="checkpoint (one iteration, DCP)", title_justify="left")
    for col in ("model", "EMA", "optim", "trainer", "total", "per rank", "save time"):
        ck.add_column(col, justify="right")
    ck.add_row(*(f"{x / 1e9:.2f} GB" for x in (c.model, c.ema, c.optim, c.trainer, c.total, c.per_rank)),
               f"{c.save_seconds:.1f} s at {p.hw.disk_gbps:g} GB/s per node")

    cons = Table(title="consolidated file (.pt / .safetensors payload)", title_justify="left")
    kinds = list(next(iter(p.consolidated.values())))
    cons.add_column("dtype")
    for k in kinds:
        cons.add_column(k, justify="right")
    for dtype, row in p.consolidated.items():
        cons.add_row(dtype, *(f"{row[k] / 1e9:.2f} GB" for k in kinds))

    verdict = Table(title="verdict", title_justify="left", show_header=False)
    verdict.add_column()
    verdict.add_column()
    color = {"fits": "green", "tight": "yellow"}.get(p.verdict, "red")
    verdict.add_row("verdict", f"[{color}]{p.verdict}[/{color}]: peak {gib(p.peak)} ({p.peak_phase}) of "
                    f"{gib(p.hw.gpu_mem)}, headroom {gib(p.headroom)}")
    for f in p.fixes:
        verdict.add_row("fix", f["text"])
    if not p.fits and not p.fixes:
        verdict.add_row("fix", "no single change or pair of changes fits; more ranks or a larger device")
    for n in p.notes:
        verdict.add_row("note", n)
    return [mem, ck, cons, verdict]
