#!/usr/bin/env bash
# The prepared GPU check (issue 11): what only a GPU shows, in one run of at most ~8 minutes on one GPU.
#
#   bash benchmarks/gpu.sh            # from the repository root; PyTorch already installed, no network needed
#
# Runs, each under its own time limit, writing everything under ${OUT:-benchmarks/results/gpu}:
#   1. `reid selftest` under torchrun with NCCL at world size 1 (sharded loss = single-process loss, on the GPU);
#   2. a short synthetic training with the fast path (bf16 autocast, channels_last, cudnn.benchmark, fused SGD,
#      all-camera BatchNorm) and again with data.decode=gpu; their metrics.json;
#   3. `reid bench` at full size (step, loss, input, eval; scaling at the GPUs present) → bench.json;
#   4. summary.json: device, versions, each part's exit status and wall time.
# faiss and submitit are not needed (their imports are lazy). Nothing here is a test: tests never need a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=PASSIVE
PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
WORLDS=1; [ "$GPUS" -ge 2 ] && WORLDS=1,2; [ "$GPUS" -ge 4 ] && WORLDS=1,2,4
STATUS="$OUT/status.txt"; : > "$STATUS"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, keep its log, record exit status and seconds
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - start))" >> "$STATUS"
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start)) s"
}

part selftest 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m reid selftest \
  --rows 200000 --dim 2048 --batch 128 --cameras 100
SHORT=(--config configs/synthetic.yaml train.epochs=3 train.warmup_epochs=1 eval.every=0 data.workers=8
       device=cuda train.amp=true model.batchnorm=all_cameras)
part train 150 "$PY" -m reid train "${SHORT[@]}" output_dir="$OUT/run_fast"
part train_gpu_decode 100 "$PY" -m reid train "${SHORT[@]}" data.decode=gpu data.workers=4 \
  output_dir="$OUT/run_gpu_decode"
part bench 200 "$PY" -m reid bench --device cuda --json "$OUT/bench.json" scaling.worlds="$WORLDS"

"$PY" - "$OUT" <<'EOF'
import json, os, sys, platform
import torch, torchvision
out = sys.argv[1]
parts = {}
for line in open(os.path.join(out, "status.txt")):
    name, rc, seconds = line.split()
    parts[name] = {"exit": int(rc), "seconds": int(seconds)}
runs = {}
for name in ("run_fast", "run_gpu_decode"):
    path = os.path.join(out, name, "metrics.json")
    if os.path.exists(path):
        m = json.load(open(path))
        runs[name] = {"final": {k: m["final"].get(k) for k in ("mAP", "rank1")},
                      "epochs": [{k: e.get(k) for k in ("epoch", "loss", "images_per_s_per_rank")}
                                 for e in m.get("epochs", [])]}
summary = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
           "gpus": torch.cuda.device_count(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "parts": parts, "runs": runs}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
EOF
