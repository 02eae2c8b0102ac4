"""Training step time with the VAE latent cache vs encoding every clip at every step (upstream's way).

    python benchmarks/latent_cache.py [--steps 8] [--chunks 4] [--frames 17] [--size 64] [--base-dim 32]

One CPU process trains the tiny DiT (32 channels, 2 blocks) with `model.tokenizer.kind = "wan2.1"` on a
random-weight VAE of Wan2.1's structure with base width `--base-dim` (the released VAE has 96), on 4
clips of `--frames` frames at `--size`^2. Sides, each a `train()` call resumed chunk after chunk from the
same run, alternating (A B, B A, ...) so both see the same machine load:

- ``video`` (baseline): `data.latents = "video"`: the loader decodes the mp4 window and the VAE encodes it;
- ``cached``: `data.latents = "cached"`: the loader reads the latent written once by `data encode`.

Step time: `TrainResult.step_seconds` (fetching the batch to the end of the optimizer step), the first
step of each chunk dropped; the median per side and the ratio cached / video. The one-off encode time of
`data encode` is reported too. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cosmos_train.data.latents import encode_dataset  # noqa: E402
from cosmos_train.models.tokenizer import build_tokenizer  # noqa: E402
from cosmos_train.train import train  # noqa: E402
from tests.data.media import make_dataset  # noqa: E402
from tests.train_fixtures import small_spec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="steps per chunk")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--base-dim", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from diffusers import AutoencoderKLWan

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_dataset(tmp / "data", {f"clip_{i}": (args.frames, args.size, args.size) for i in range(4)})
        torch.manual_seed(0)
        AutoencoderKLWan(base_dim=args.base_dim, z_dim=16).save_pretrained(tmp / "vae")

        def spec(latents: str, max_iter: int):
            return small_spec(tmp / "runs", name=latents,
                              model={"tokenizer": {"kind": "wan2.1", "path": str(tmp / "vae")},
                                     "architecture": {"latent_channels": 16, "model_channels": 32, "num_heads": 2,
                                                      "num_blocks": 2, "adaln_lora_dim": 16}},
                              data={"kind": "video_folder", "dataset_dir": str(data), "num_frames": args.frames,
                                    "video_size": [args.size, args.size], "latents": latents},
                              trainer={"max_iter": max_iter, "logging_iter": args.steps},
                              checkpoint={"save_iter": 10_000})

        t0 = time.perf_counter()
        tok = build_tokenizer(spec("cached", 1).model.tokenizer)
        encode_dataset(data, tok, num_frames=args.frames, video_size=(args.size, args.size), show_progress=False)
        encode_s = time.perf_counter() - t0

        times: dict[str, list[float]] = {"video": [], "cached": []}
        losses: dict[str, dict[int, float]] = {"video": {}, "cached": {}}
        for chunk in range(args.chunks):
            order = ("video", "cached") if chunk % 2 == 0 else ("cached", "video")
            for side in order:
                result = train(spec(side, (chunk + 1) * args.steps), show_progress=False)
                steps = sorted(result.step_seconds)[1:]
                times[side] += [result.step_seconds[s] for s in steps]
                losses[side].update(result.losses)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({
            "frames": args.frames, "size": args.size, "vae_base_dim": args.base_dim,
            "steps_timed_per_side": len(times["video"]),
            "median_step_s_video": round(med["video"], 4), "median_step_s_cached": round(med["cached"], 4),
            "ratio_cached_over_video": round(med["cached"] / med["video"], 3),
            "encode_once_s": round(encode_s, 2),
            "max_loss_diff": max(abs(losses["video"][s] - losses["cached"][s]) for s in losses["video"]),
        }, indent=1))


if __name__ == "__main__":
    main()
