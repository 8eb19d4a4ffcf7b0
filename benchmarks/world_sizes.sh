#!/usr/bin/env bash
# The same config at several world sizes (README "Same model at any world size"): trains
# configs/synthetic.yaml (or $CONFIG) at its full schedule with 1, 2 and 4 ranks (or the sizes given),
# then prints one row per run: mAP, R1, cross-camera R1, images/s per rank, wall time.
#   bash benchmarks/world_sizes.sh            # 1 2 4
#   bash benchmarks/world_sizes.sh 1 8 train.epochs=4   # sizes first, then key=value overrides
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-configs/synthetic.yaml}
OUT=${OUT:-runs/world_sizes}
sizes=() overrides=()
for a in "$@"; do if [[ $a =~ ^[0-9]+$ ]]; then sizes+=("$a"); else overrides+=("$a"); fi; done
[ ${#sizes[@]} -eq 0 ] && sizes=(1 2 4)
cores=$(nproc)
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE
for r in "${sizes[@]}"; do
  start=$(date +%s)
  OMP_NUM_THREADS=$(( cores / r > 0 ? cores / r : 1 )) "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node="$r" -m reid train --config "$CONFIG" eval.every=0 "${overrides[@]}" \
    output_dir="$OUT/r$r" > "$OUT.r$r.log" 2>&1 || { echo "world size $r failed: see $OUT.r$r.log"; exit 1; }
  echo $(( $(date +%s) - start )) > "$OUT/r$r/wall_s"
done
"$PY" - "$OUT" "${sizes[@]}" <<'PYEOF'
import json, sys
out, sizes = sys.argv[1], sys.argv[2:]
print(f"{'ranks':>5} | {'mAP':>5} | {'R1':>5} | {'cross-cam R1':>12} | {'warm-up mAP':>11} | {'img/s/rank':>10} | wall s")
for r in sizes:
    m = json.load(open(f"{out}/r{r}/metrics.json"))
    speed = [e["images_per_s_per_rank"] for e in m["epochs"]]
    wall = open(f"{out}/r{r}/wall_s").read().strip()
    f, w = m["final"], m.get("warmup", {})
    print(f"{r:>5} | {100 * f['mAP']:5.1f} | {100 * f['rank1']:5.1f} | {100 * f.get('cross_camera_rank1', float('nan')):12.1f} | "
          f"{100 * w.get('mAP', float('nan')):11.1f} | {sum(speed) / len(speed):10.0f} | {wall}")
PYEOF
