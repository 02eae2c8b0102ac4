"""Peak host memory of Wan2.1 VAE encoding vs clip length: ours (chunked, uint8 in) vs diffusers' encode.

    python benchmarks/vae_memory.py [--frames 17 33 65] [--size 128] [--base-dim 16]

Each measurement runs in a fresh process (`ru_maxrss` cannot be reset) on a random-weight VAE of
Wan2.1's structure (4 levels, 2 residual blocks, 16 latent channels) with a smaller base width.
The clip is uint8 (1, 3, T, size, size), made inside the process. Sides:

- ``ours``:      `WanVAETokenizer.encode` (pixels converted to float one causal chunk at a time);
- ``diffusers``: the baseline, `AutoencoderKLWan.encode(video.float() / 127.5 - 1)` on the whole clip
                 (also chunked inside, but the float clip exists in full).

Reported: peak RSS minus the RSS after the model is built, per frame count, and the slope in MB per
frame from a least-squares line (the uint8 clip alone is 3 x size^2 bytes per frame). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20


def _child(side: str, frames: int, size: int, base_dim: int) -> None:
    sys.path.insert(0, str(REPO))
    import torch
    from diffusers import AutoencoderKLWan

    from cosmos_train.models.wan_vae import WanVAETokenizer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    vae = AutoencoderKLWan(base_dim=base_dim, z_dim=16).eval()
    tok = WanVAETokenizer(vae)
    video = torch.randint(0, 256, (1, 3, frames, size, size), dtype=torch.uint8)
    base = _rss_mb()
    with torch.no_grad():
        if side == "ours":
            latent = tok.encode(video)
        else:
            latent = vae.encode(video.float() / 127.5 - 1).latent_dist.mode()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"side": side, "frames": frames, "peak_over_base_mb": round(peak - base, 1),
                      "latent_shape": list(latent.shape)}))


def _slope(xs, ys) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[17, 33, 65])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--base-dim", type=int, default=16)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args.child[0], int(args.child[1]), args.size, args.base_dim)
    rows = []
    for frames in args.frames:
        for side in ("ours", "diffusers"):  # alternate: the shared machine's load drifts
            out = subprocess.run([sys.executable, __file__, "--child", side, str(frames), "--size", str(args.size),
                                  "--base-dim", str(args.base_dim)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {"size": args.size, "base_dim": args.base_dim, "uint8_clip_mb_per_frame": round(3 * args.size ** 2 / 2**20, 3),
              "rows": rows}
    for side in ("ours", "diffusers"):
        pts = [(r["frames"], r["peak_over_base_mb"]) for r in rows if r["side"] == side]
        result[f"{side}_slope_mb_per_frame"] = round(_slope(*zip(*pts)), 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
