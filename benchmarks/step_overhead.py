"""Training-step overhead: `cosmos_train.train.train` vs a minimal hand-written FSDP2 loop (2 gloo ranks, CPU).

    python benchmarks/step_overhead.py [--chunks 6] [--chunk 20] [--warmup 5] [--ranks 2] [--raw FILE]

Both sides train the same tiny DiT (`examples/tiny.toml`: preset tiny, EMA on, batch 2 per
rank, 13 frames at 32x32, dp_shard = ranks) from the same initial weights on the same
synthetic clips with the same noise generator, so their per-step losses agree
(`max_loss_diff_toolkit_vs_hand_inline`: the check that both do the same work). Sides:

- ``toolkit``:        `train(spec)`; step times from `TrainResult.step_seconds`. Each chunk is
                      one `train` call up to the next step count, resuming from the previous
                      chunk's checkpoint (setup, resume and the final save are not step time).
- ``hand_inline``:    the baseline: DiT, `fully_shard` on blocks + root, AdamW, LambdaLR, the
                      same loss, `torch.nn.utils.clip_grad_norm_`, an EMA `_foreach_lerp_`, the
                      loss all-reduced for logging, batches from the same in-line loader
                      (`build_dataloader`) -- the toolkit loads data in-line too, so this is
                      the like-for-like comparison and the ratio's denominator.
- ``hand_preloaded``: the same loop on batches decoded and tokenized before the loop: shows
                      what data loading costs per step (not a fair baseline for the ratio).

Timing: the three sides run in the same rank processes in alternating chunks (A B C, C B A,
...): on a shared machine the load drifts over seconds, and adjacent chunks see the same
load. Chunk 0 is warm-up, and `--warmup` steps are dropped at the start of every chunk.
Step time = wall time from fetching the batch to the end of the EMA update and the loss
all-reduce, per rank; figures are the median (and the 20th percentile, which contention
inflates less) over the kept steps, the max over ranks. `paired_chunk_ratios` compare
adjacent chunks. The toolkit's full iteration (also the preemption all-reduce, the save
check and the log write, which `step_seconds` leaves out) comes from metrics.jsonl times.

Memory: peak RSS (`ru_maxrss`) of each rank, measured on each side alone in fresh
processes (it cannot be reset); it includes the Python + torch runtime, so the RSS at
worker start, after the same imports, is printed too. tracemalloc is not used: it does
not see torch's C++ allocations. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The toolkit side and the hand loop import the same modules (this one), so RSS at start is comparable.
from cosmos_train.checkpoint.trainer_state import derived_seed  # noqa: E402
from cosmos_train.data.loader import build_dataloader, dataset_dirs  # noqa: E402
from cosmos_train.models.diffusion import training_loss  # noqa: E402
from cosmos_train.models.dit import DiT  # noqa: E402
from cosmos_train.models.tokenizer import build_tokenizer  # noqa: E402
from cosmos_train.runtime.memory import peak_rss_bytes  # noqa: E402
from cosmos_train.spec import ExperimentSpec  # noqa: E402
from cosmos_train.spec_loading import load_spec  # noqa: E402
from cosmos_train.train import train  # noqa: E402
from tests.dist import run_ranks  # noqa: E402

SPEC = REPO / "examples" / "tiny.toml"
EMA_GAMMA = 6.94  # power EMA with s = 0.1 (the toolkit solves for it; a hand loop hard-codes it)
NUM_CONDITION_FRAMES = 1


def _rss_kib() -> int:
    """Current resident set of this process in KiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() // 1024


def _maxrss_kib() -> int:
    return peak_rss_bytes() // 1024


def _spec(output_root: Path, name: str, steps: int) -> ExperimentSpec:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return load_spec(SPEC, [
        f"job.output_root={output_root}", f"job.name={name}", f"parallel.dp_shard={world}",
        f"trainer.max_iter={steps}", "trainer.validation_iter=0", "checkpoint.save_iter=100000",
        "trainer.device=cpu", "job.wandb_mode=disabled",
    ])


# ------------------------------------------------------------------------- the toolkit
def _toolkit_chunk(output_root: Path, name: str, end_step: int) -> dict:
    """`train` up to `end_step`, resuming from the previous chunk's checkpoint (if any)."""
    spec = _spec(output_root, name, end_step)
    result = train(spec, show_progress=False)
    records = [json.loads(line) for line in (result.run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    log_times = {r["step"]: r["time"] for r in records if r.get("kind") == "train"}
    return {"step_s": [result.step_seconds[s] for s in sorted(result.step_seconds)],
            "losses": [result.losses[s] for s in sorted(result.losses)],
            "iteration_s": _logged_iteration_s(log_times, result.start_step, end_step, spec.trainer.logging_iter)}


def _logged_iteration_s(log_times: dict, start: int, end: int, every: int) -> tuple[float, int] | None:
    """(mean full-iteration time, offset of its first step in the chunk) between the first and last
    log record of a chunk (rank 0 writes them); None with fewer than two records."""
    steps = sorted(s for s in log_times if start < s <= end and s % every == 0)
    if len(steps) < 2:
        return None
    return (log_times[steps[-1]] - log_times[steps[0]]) / (steps[-1] - steps[0]), steps[0] - start


# ----------------------------------------------------------------------- the hand loop
def _lambda_linear(spec: ExperimentSpec):
    s = spec.scheduler  # one cycle: warm-up f_start -> f_max, then linear down to f_min

    def f(n: int) -> float:
        w, length = s.warm_up_steps[0], s.cycle_lengths[0]
        if n < w:
            return s.f_start[0] + (s.f_max[0] - s.f_start[0]) * n / w
        return s.f_min[0] + (s.f_max[0] - s.f_min[0]) * (length - n) / (length - w)
    return f


class HandLoop:
    """What a person writes by hand: DiT + fully_shard + AdamW + LambdaLR + clip + EMA, batches in-line."""

    def __init__(self, output_root: Path, *, preload: int = 0):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.spec = spec = _spec(output_root, "hand", 1)
        rank, world, seed = dist.get_rank(), dist.get_world_size(), spec.job.seed
        model = DiT(spec.model.dit_config())
        model.init_weights(seed)  # the same values the toolkit materialises shard by shard
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        self.model = fully_shard(model, mesh=mesh)
        self.params = list(model.parameters())
        o = spec.optimizer
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lambda_linear(spec))
        self.ema = [p.detach().clone() for p in self.params]
        self.tokenizer = build_tokenizer(spec.model.tokenizer)
        loader = build_dataloader(spec.data, dp_rank=rank, dp_size=world, seed=seed,
                                  cache_dir=output_root / ".cache", split="train")
        self.batches = loader.batches()
        if preload:  # decoded and tokenized before the loop: the step then has no data cost
            self.batches = iter([self._tokenized(next(self.batches)) for _ in range(preload)])
        self.preload = bool(preload)
        self.gen = torch.Generator().manual_seed(derived_seed(seed, 0, rank))
        self.step = 0

    def _tokenized(self, batch):
        with torch.no_grad():
            return self.tokenizer.encode(batch["video"]), batch["t5_text_embeddings"]

    def run(self, steps: int) -> dict:
        spec, params, world = self.spec, self.params, dist.get_world_size()
        step_s, losses, ends = [], [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            latent, emb = next(self.batches) if self.preload else self._tokenized(next(self.batches))
            loss, _ = training_loss(self.model, latent, emb, None, generator=self.gen,
                                    num_condition_frames=NUM_CONDITION_FRAMES,
                                    text_dropout=spec.data.text_dropout, loss_scale=spec.trainer.loss_scale)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, spec.trainer.grad_clip)
            if torch.isfinite(norm):
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()
            self.step += 1
            beta = (1.0 - 1.0 / (self.step + 1)) ** (EMA_GAMMA + 1)
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in params], 1.0 - beta)
            logged = loss.detach().double().reshape(1)
            dist.all_reduce(logged)  # the dp-mean loss, as the toolkit logs it
            losses.append(logged.item() / world)
            now = time.perf_counter()
            step_s.append(now - t0)
            ends.append(now)
        return {"step_s": step_s, "losses": losses, "ends": ends}


# ------------------------------------------------------------------------ the workers
def _timing_worker(rank: int, world: int, output_root: str, chunks: int, chunk: int) -> list[dict]:
    """Alternate chunks of toolkit / hand_inline / hand_preloaded steps in these processes.

    Shared, contended CPUs drift over seconds; adjacent chunks see the same load, so
    the paired per-chunk ratios are fair even when the absolute times are not stable.
    """
    root = Path(output_root)
    hand = HandLoop(root)
    pre = HandLoop(root, preload=chunks * chunk)
    sides = {"toolkit": lambda c: _toolkit_chunk(root, "toolkit", (c + 1) * chunk),
             "hand_inline": lambda c: hand.run(chunk), "hand_preloaded": lambda c: pre.run(chunk)}
    out = []
    for c in range(chunks):
        order = list(sides) if c % 2 == 0 else list(reversed(sides))
        out.append({"order": order, **{name: sides[name](c) for name in order}})
    return out


def _memory_worker(rank: int, world: int, output_root: str, side: str, steps: int) -> dict:
    """Peak RSS of one side alone in fresh processes (ru_maxrss cannot be reset)."""
    rss_start = _rss_kib()
    if side == "toolkit":
        _toolkit_chunk(Path(output_root), "memory", steps)
    else:
        HandLoop(Path(output_root)).run(steps)
    return {"rss_start_mib": rss_start / 1024, "maxrss_mib": _maxrss_kib() / 1024}


# --------------------------------------------------------------------------- summary
def _quantile_ms(per_rank_chunks: list[list[float]], q: float = 0.5) -> float:
    """Quantile `q` (median by default) of each rank's kept step times; the slowest rank's value (ms)."""
    def quantile(xs: list[float]) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if q != 0.5 else statistics.median(xs)
    return 1000 * max(quantile([t for chunk in rank for t in chunk]) for rank in per_rank_chunks)


def _timing_summary(per_rank: list[list[dict]], warmup: int) -> dict:
    sides = ("toolkit", "hand_inline", "hand_preloaded")
    chunks = len(per_rank[0])
    kept = {s: [[per_rank[r][c][s]["step_s"][warmup:] for c in range(1, chunks)] for r in range(len(per_rank))]
            for s in sides}  # chunk 0 is whole-run warm-up (first optimizer step, lazy inits)
    med = {s: _quantile_ms(kept[s]) for s in sides}
    # The low quantile is what the step costs when the shared CPUs are free: contention only adds time.
    p20 = {s: _quantile_ms(kept[s], 0.2) for s in sides}
    paired = [_quantile_ms([[per_rank[r][c]["toolkit"]["step_s"][warmup:]] for r in range(len(per_rank))])
              / _quantile_ms([[per_rank[r][c]["hand_inline"]["step_s"][warmup:]] for r in range(len(per_rank))])
              for c in range(1, chunks)]
    # Full iterations (rank 0) over the toolkit's last log window of each chunk (steps 11..20 of 20), and
    # the part of them outside `step_seconds` (preemption all-reduce, save check, log write).
    windows = [(c, per_rank[0][c]["toolkit"]["iteration_s"]) for c in range(1, chunks)]
    windows = [(c, w[0], w[1]) for c, w in windows if w is not None]
    tk_iter = [it for _, it, _ in windows]
    tk_outside = [it - statistics.mean(per_rank[0][c]["toolkit"]["step_s"][off:]) for c, it, off in windows]
    hand_iter = [(lambda e: (e[-1] - e[off - 1]) / (len(e) - off))(per_rank[0][c]["hand_inline"]["ends"])
                 for c, _, off in windows]
    tk_losses = [x for c in per_rank[0] for x in c["toolkit"]["losses"]]
    hand_losses = [x for c in per_rank[0] for x in c["hand_inline"]["losses"]]
    return {
        "median_step_ms": {s: round(v, 2) for s, v in med.items()},
        "ratio_step_toolkit_vs_hand_inline": med["toolkit"] / med["hand_inline"],
        "p20_step_ms": {s: round(v, 2) for s, v in p20.items()},
        "ratio_p20_toolkit_vs_hand_inline": p20["toolkit"] / p20["hand_inline"],
        "paired_chunk_ratios": [round(x, 3) for x in paired],
        "median_paired_ratio": statistics.median(paired),
        "ratio_step_toolkit_vs_hand_preloaded": med["toolkit"] / med["hand_preloaded"],
        "data_loading_ms_per_step": med["hand_inline"] - med["hand_preloaded"],
        "full_iteration_ms_median_of_chunks": None if not windows else {
            "toolkit": round(1000 * statistics.median(tk_iter), 2),
            "hand_inline": round(1000 * statistics.median(hand_iter), 2)},
        "toolkit_ms_per_iteration_outside_step_seconds": None if not windows else
            round(1000 * statistics.median(tk_outside), 3),
        "max_loss_diff_toolkit_vs_hand_inline": max(abs(a - b) for a, b in zip(tk_losses, hand_losses)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=6, help="alternating chunks per side (the first is warm-up)")
    ap.add_argument("--chunk", type=int, default=20, help="steps per chunk (logging_iter 10 divides it)")
    ap.add_argument("--warmup", type=int, default=5, help="steps discarded at the start of every chunk")
    ap.add_argument("--memory-steps", type=int, default=10)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--raw", help="also write every rank's per-chunk step times to this JSON file")
    args = ap.parse_args()
    if args.chunks < 2 or not 0 < args.warmup < args.chunk:
        raise SystemExit("need --chunks >= 2 and 0 < --warmup < --chunk")

    t_start = time.perf_counter()
    out: dict = {"ranks": args.ranks, "chunks": args.chunks, "chunk_steps": args.chunk, "warmup": args.warmup,
                 "cpu_count": len(os.sched_getaffinity(0)), "threads_per_rank": 1,
                 "loadavg_1min_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="step_overhead_") as tmp:
        root = Path(tmp)
        dataset_dirs(_spec(root, "prepare", 1).data, cache_dir=root / ".cache")  # generate the clips once
        timing = run_ranks(_timing_worker, args.ranks, str(root), args.chunks, args.chunk, timeout=600)
        out.update(_timing_summary(timing, args.warmup))
        if args.raw:
            Path(args.raw).write_text(json.dumps(timing))
        memory = {side: run_ranks(_memory_worker, args.ranks, str(root), side, args.memory_steps)
                  for side in ("toolkit", "hand_inline")}
    out["peak_rss_mib"] = {s: [round(r["maxrss_mib"], 1) for r in m] for s, m in memory.items()}
    out["rss_at_start_mib"] = {s: [round(r["rss_start_mib"], 1) for r in m] for s, m in memory.items()}
    out["ratio_peak_rss_toolkit_vs_hand_inline"] = (max(out["peak_rss_mib"]["toolkit"])
                                                    / max(out["peak_rss_mib"]["hand_inline"]))
    out["training_footprint_mib"] = {s: [round(r["maxrss_mib"] - r["rss_start_mib"], 1) for r in m]
                                     for s, m in memory.items()}
    out["loadavg_1min_end"] = os.getloadavg()[0]
    out["aim"] = "ratio_step_toolkit_vs_hand_inline <= 1.05"
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out, indent=2))
    if not out["max_loss_diff_toolkit_vs_hand_inline"] < 1e-3:
        raise SystemExit("the toolkit and the hand loop diverged: they no longer do the same work")


if __name__ == "__main__":
    main()
