#!/usr/bin/env bash
# GPU checks for the runtime (issue 4). Run from the repository root on a CUDA machine:
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]        # default: $OUT, else ./gpu_check_out
#   GPU_CHECK_SKIP_INSTALL=1 bash benchmarks/gpu_check.sh   # do not try `pip install -e ".[te]"`
#
# Checks, each independent (a failure is recorded and the next check still runs):
#   install_te        pip install -e ".[te]" when Transformer Engine does not import yet
#   nccl_init         torchrun on every GPU: NCCL process group + all_reduce
#   fsdp2_bf16_step   torchrun on every GPU: fully_shard per block + root, bf16 params / fp32 reduce, 2 AdamW steps
#   te_vs_sdpa        build_attention("te") vs SDPA, bf16, with and without a key mask, + timings
#   block_kernels     ring block kernels (flash bf16, efficient fp32/bf16, math) merged over 2 key blocks vs SDPA,
#                     forward and backward, on one GPU
#   ring_nccl         >= 2 GPUs: ring (flash/efficient/math) and a2a attention on NCCL vs full attention,
#                     outputs and q/k/v grads, K/V exchange counts
#   ckpt_io           torchrun on every GPU: FSDP2 model (~2 GB fp32) saved twice with async_pinned, resumed and
#                     loaded through load_path (.safetensors) bitwise equal; blocking, resume and load times
#   wan_2b_step       2 LoRA steps of examples/2b_lora.toml at 704x1280x93 with the released DiT and Wan2.1 VAE
#                     (skipped unless both are in the Hugging Face cache)
# Writes OUTPUT_DIR/gpu_check.json (summary) and OUTPUT_DIR/<check>.log. Not part of the CPU test suite.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-./gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
echo "gpu_check: python=$PY gpus=$NGPU out=$OUT_DIR"

# record NAME STATUS DETAIL_FILE: one JSON fragment per check, merged at the end.
record() {
  "$PY" - "$1" "$2" "$3" "$OUT_DIR/$1.json" <<'EOF'
import json, sys
name, status, detail_path, out = sys.argv[1:5]
detail = {}
try:
    text = open(detail_path).read()
    if status == "ok":  # the last line that is a JSON object (launchers may log after it)
        detail = next(json.loads(l) for l in reversed(text.splitlines()) if l.startswith("{"))
    else:
        detail = {"log_tail": text[-3000:]}
except Exception as exc:  # a check that printed no JSON still gets a row
    detail = {"note": f"no JSON detail ({exc})"}
json.dump({"check": name, "status": status, **detail}, open(out, "w"), indent=1)
EOF
}

# run_check NAME TIMEOUT CMD...: runs CMD, keeps its log, records ok/failed.
run_check() {
  local name="$1" limit="$2"; shift 2
  echo "== $name"
  if timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1; then
    record "$name" ok "$OUT_DIR/$name.log"; echo "   ok"
  else
    record "$name" failed "$OUT_DIR/$name.log"; echo "   FAILED (see $OUT_DIR/$name.log)"
  fi
}

skip() {  # skip NAME REASON
  echo "== $1: skipped ($2)"
  printf '{"check": "%s", "status": "skipped", "reason": "%s"}\n' "$1" "$2" >"$OUT_DIR/$1.json"
}

# ------------------------------------------------------------------------------------------------ TE
if [ "$NGPU" -lt 1 ]; then
  skip install_te "no CUDA device"
elif "$PY" -c 'import transformer_engine.pytorch' >/dev/null 2>&1; then
  echo '{"installed": "already importable"}' >"$WORK/te.log"; record install_te ok "$WORK/te.log"
elif [ -n "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
  skip install_te "GPU_CHECK_SKIP_INSTALL set"
else
  run_check install_te 1800 bash -c "'$PY' -m pip install -e '.[te]' && '$PY' -c 'import transformer_engine.pytorch as te, json; print(json.dumps({\"installed\": te.__name__}))'"
fi

if [ "$NGPU" -lt 1 ]; then
  for c in nccl_init fsdp2_bf16_step te_vs_sdpa block_kernels ring_nccl ckpt_io; do skip "$c" "no CUDA device"; done
  NO_GPU=1
fi

# ---------------------------------------------------------------------------------------------- NCCL
cat >"$WORK/nccl_init.py" <<'EOF'
import json, os, time, torch, torch.distributed as dist
t0 = time.perf_counter()
local = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(local)
dist.init_process_group("nccl", device_id=torch.device("cuda", local))
x = torch.full((1024,), float(dist.get_rank() + 1), device="cuda")
dist.all_reduce(x)
n = dist.get_world_size()
assert torch.allclose(x, torch.full_like(x, n * (n + 1) / 2)), x[:4]
if dist.get_rank() == 0:
    print(json.dumps({"world": n, "nccl_version": str(torch.cuda.nccl.version()),
                      "init_and_allreduce_s": round(time.perf_counter() - t0, 3)}))
dist.destroy_process_group()
EOF

# --------------------------------------------------------------------------------------------- FSDP2
cat >"$WORK/fsdp2_step.py" <<'EOF'
import json, os, torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
local = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(local)
dist.init_process_group("nccl", device_id=torch.device("cuda", local))
torch.manual_seed(0)
dim = 1024
blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim, bias=False), nn.GELU(),
                                     nn.Linear(4 * dim, dim, bias=False)) for _ in range(4))
model = nn.Module(); model.blocks = blocks; model.head = nn.Linear(dim, 1, bias=False)
model.cuda()
mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
for i, b in enumerate(blocks):
    fully_shard(b, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
fully_shard(model, mp_policy=mp)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
x = torch.randn(8, 256, dim, device="cuda")
losses = []
for _ in range(2):
    h = x
    for b in model.blocks:
        h = h + b(h)
    loss = model.head(h).float().pow(2).mean()
    loss.backward(); opt.step(); opt.zero_grad()
    losses.append(loss.item())
assert all(map(lambda l: l == l and abs(l) < 1e30, losses)), losses
p = next(model.parameters())
if dist.get_rank() == 0:
    print(json.dumps({"world": dist.get_world_size(), "losses": losses, "param_dtype_in_compute": "bfloat16",
                      "sharded_param_type": type(p).__name__, "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}))
dist.destroy_process_group()
EOF

# ------------------------------------------------------------------------------------ TE vs SDPA
cat >"$WORK/te_vs_sdpa.py" <<'EOF'
import json, torch
from cosmos_train.runtime.attention import SDPAAttention, build_attention, resolve_attention_backend
te_attn, sdpa = build_attention("te", device_type="cuda"), SDPAAttention()
res = {"auto_resolves_to": resolve_attention_backend("auto", device_type="cuda")}
g = torch.Generator(device="cuda").manual_seed(0)
for name, (b, s_q, s_k, h, d) in {"self_2b_like": (1, 4096, 4096, 16, 128), "cross": (2, 1024, 512, 16, 128)}.items():
    q = torch.randn(b, s_q, h, d, generator=g, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, s_k, h, d, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(b, s_k, dtype=torch.bool, device="cuda"); mask[-1, s_k // 2:] = False
    row = {}
    for label, m in (("no_mask", None), ("key_mask", mask)):
        a, r = te_attn(q, k, v, mask=m).float(), sdpa(q, k, v, mask=m).float()
        row[label + "_max_abs_err"] = (a - r).abs().max().item()
    for label, fn in (("te", te_attn), ("sdpa", sdpa)):
        for _ in range(3): fn(q, k, v)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10): fn(q, k, v)
        end.record(); torch.cuda.synchronize()
        row[label + "_fwd_ms"] = round(start.elapsed_time(end) / 10, 3)
    res[name] = row
assert te_attn.state_dict() == {}
bad = [k for r in res.values() if isinstance(r, dict) for k, v in r.items() if k.endswith("err") and v > 3e-2]
assert not bad, (bad, res)
print(json.dumps(res))
EOF

# --------------------------------------------------------------------------------- block kernels
cat >"$WORK/block_kernels.py" <<'EOF'
import json, math, torch
from cosmos_train.runtime.ring_attention import build_block_kernel, merge_partials
res = {}
g = torch.Generator(device="cuda").manual_seed(0)
for kernel, dtype, tol in (("flash", torch.bfloat16, 3e-2), ("efficient", torch.float32, 1e-4),
                           ("efficient", torch.bfloat16, 3e-2), ("math", torch.float64, 1e-10), ("auto", torch.bfloat16, 3e-2)):
    key = f"{kernel}/{str(dtype).split('.')[-1]}"
    try:
        q, k, v = (torch.randn(2, 8, 1000, 64, generator=g, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        acc = torch.promote_types(dtype, torch.float32)  # reference precision
        ref = torch.nn.functional.scaled_dot_product_attention(q.to(acc), k.to(acc), v.to(acc))
        dout = torch.randn(ref.shape, generator=g, device="cuda", dtype=acc).to(dtype)
        gq, gk, gv = torch.autograd.grad(ref, (q, k, v), dout.to(acc))
        kern, scale, parts = build_block_kernel(kernel), 1 / math.sqrt(64), [slice(0, 400), slice(400, 1000)]
        out = lse = None
        for sl in parts:
            bo, bl = kern.forward(q.detach(), k.detach()[:, :, sl].contiguous(), v.detach()[:, :, sl].contiguous(), scale=scale)
            out, lse = (bo.to(acc), bl) if out is None else merge_partials(out, lse, bo, bl)
        grads = [kern.backward(dout, q.detach(), k.detach()[:, :, sl].contiguous(), v.detach()[:, :, sl].contiguous(),
                               out.to(dtype), lse, scale=scale) for sl in parts]
        errs = {"out": (out - ref).abs().max().item(),
                "dq": (sum(x[0].to(acc) for x in grads) - gq).abs().max().item(),
                "dk": (torch.cat([x[1].to(acc) for x in grads], 2) - gk).abs().max().item(),
                "dv": (torch.cat([x[2].to(acc) for x in grads], 2) - gv).abs().max().item()}
        res[key] = {"ok": max(errs.values()) <= tol, "tol": tol, **errs}
    except Exception as exc:
        res[key] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
print(json.dumps(res))
assert all(r["ok"] for r in res.values()), res
EOF

# ------------------------------------------------------------------------------------ ring on NCCL
cat >"$WORK/ring_nccl.py" <<'EOF'
import json, os, time, torch, torch.distributed as dist
from cosmos_train.runtime.attention import SDPAAttention
from cosmos_train.runtime.context_parallel import UlyssesAttention
from cosmos_train.runtime.ring_attention import RingAttention
local = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(local)
dist.init_process_group("nccl", device_id=torch.device("cuda", local))
rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
res = {"world": world}
for label, make, dtype, tol in (("ring/flash/bf16", lambda: RingAttention(group, kernel="flash"), torch.bfloat16, 3e-2),
                                ("ring/efficient/fp32", lambda: RingAttention(group, kernel="efficient"), torch.float32, 1e-4),
                                ("ring/math/fp64", lambda: RingAttention(group, kernel="math"), torch.float64, 1e-10),
                                ("a2a/sdpa/bf16", lambda: UlyssesAttention(group), torch.bfloat16, 3e-2)):
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        s_local, heads = 1024, 16
        q, k, v, dout = (torch.randn(1, s_local * world, heads, 64, generator=g, device="cuda", dtype=dtype) for _ in range(4))
        acc = torch.promote_types(dtype, torch.float32)  # reference precision
        leaves = [t.to(acc).requires_grad_() for t in (q, k, v)]
        ref = SDPAAttention()(*leaves); ref_grads = torch.autograd.grad(ref, leaves, dout.to(acc))
        sl = slice(rank * s_local, (rank + 1) * s_local)
        mod = make()
        local_in = [t[:, sl].clone().requires_grad_() for t in (q, k, v)]
        out = mod(*local_in); grads = torch.autograd.grad(out, local_in, dout[:, sl])
        counts = ([mod.stats.forward_kv_exchanges, mod.stats.backward_kv_exchanges, mod.stats.backward_dkv_exchanges]
                  if hasattr(mod, "stats") else None)  # one forward + backward
        err = max([(out.to(acc) - ref[:, sl]).abs().max().item()] +
                  [(a.to(acc) - b[:, sl]).abs().max().item() for a, b in zip(grads, ref_grads)])
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(5):
            o = mod(*local_in); torch.autograd.grad(o, local_in, dout[:, sl])
        torch.cuda.synchronize()
        row = {"ok": err <= tol, "max_abs_err": err, "tol": tol, "fwd_bwd_ms": round((time.perf_counter() - t0) / 5 * 1e3, 2)}
        if counts is not None:
            row["kv_exchanges_fwd_bwd_dkv"] = counts
    except Exception as exc:
        row = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    res[label] = row
oks = [None] * world
dist.all_gather_object(oks, all(r["ok"] for r in res.values() if isinstance(r, dict)))
if rank == 0:
    print(json.dumps(res))
dist.destroy_process_group()
assert all(oks), res
EOF

TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node="${NGPU}")
if [ -z "${NO_GPU:-}" ]; then
  run_check nccl_init 300 "${TORCHRUN[@]}" "$WORK/nccl_init.py"
  run_check fsdp2_bf16_step 600 "${TORCHRUN[@]}" "$WORK/fsdp2_step.py"
  if "$PY" -c 'import transformer_engine.pytorch' >/dev/null 2>&1; then
    run_check te_vs_sdpa 600 "$PY" "$WORK/te_vs_sdpa.py"
  else
    skip te_vs_sdpa "Transformer Engine not importable"
  fi
  run_check block_kernels 600 "$PY" "$WORK/block_kernels.py"
  if [ "$NGPU" -ge 2 ]; then
    run_check ring_nccl 600 "${TORCHRUN[@]}" "$WORK/ring_nccl.py"
  else
    skip ring_nccl "needs >= 2 GPUs (found $NGPU)"
  fi
  run_check ckpt_io 600 "${TORCHRUN[@]}" benchmarks/ckpt_io_check.py "$WORK/ckpt_io" --gb 2
fi

# ------------------------------------------------------------------- 2B step with the released VAE
# wan_2b_step: examples/2b_lora.toml at 704x1280x93 (synthetic clips, embeddings generated), the released
# DiT and Wan2.1 VAE from the Hugging Face cache (never downloaded here: HF_HUB_OFFLINE lookup), 2 steps.
cat >"$WORK/find_2b.py" <<'EOF'
from cosmos_train.hub import resolve_local
for path in ("hf://nvidia/Cosmos-Predict2-2B-Video2World/model-720p-16fps.pt",
             "hf://nvidia/Cosmos-Predict2-2B-Video2World/tokenizer/tokenizer.pth"):
    resolve_local(path, offline=True)
EOF
cat >"$WORK/last_metrics.py" <<'EOF'
import glob, json, sys
rows = [json.loads(l) for p in glob.glob(sys.argv[1] + "/**/metrics.jsonl", recursive=True) for l in open(p)]
print(json.dumps({"metrics": rows[-1] if rows else None}))
EOF
if [ "$NGPU" -lt 1 ]; then
  skip wan_2b_step "no CUDA device"
elif ! "$PY" -c 'import diffusers, transformers' >/dev/null 2>&1; then
  skip wan_2b_step "diffusers/transformers missing: pip install -e '.[wan]'"
elif ! "$PY" "$WORK/find_2b.py" >"$OUT_DIR/wan_2b_step.find.log" 2>&1; then
  skip wan_2b_step "released 2B weights not in the Hugging Face cache (see wan_2b_step.find.log)"
else
  CP=$([ "$NGPU" -ge 2 ] && echo 2 || echo 1)
  cat >"$WORK/wan_2b_step.sh" <<EOF
set -e
${TORCHRUN[*]} -m cosmos_train run examples/2b_lora.toml job.output_root=$WORK/runs \\
  data.kind=synthetic data.dataset_dir=$WORK/wan_data data.num_synthetic_clips=$NGPU data.batch_size=1 \\
  data.num_workers=2 parallel.cp=$CP trainer.max_iter=2 trainer.logging_iter=1 checkpoint.save_iter=1000
$PY $WORK/last_metrics.py $WORK/runs
EOF
  run_check wan_2b_step 900 bash "$WORK/wan_2b_step.sh"
fi

# ------------------------------------------------------------------------------------------ summary
"$PY" - "$OUT_DIR" <<'EOF'
import glob, json, os, platform, subprocess, sys
out = sys.argv[1]
checks = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "*.json"))) if not p.endswith("gpu_check.json")]
env = {"python": platform.python_version()}
try:
    import torch
    env.update(torch=torch.__version__, cuda=torch.version.cuda, gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
except Exception as exc:
    env["torch_error"] = str(exc)
summary = {"env": env, "checks": checks,
           "ok": all(c["status"] in ("ok", "skipped") for c in checks)}
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
print(json.dumps({c["check"]: c["status"] for c in checks}))
EOF
