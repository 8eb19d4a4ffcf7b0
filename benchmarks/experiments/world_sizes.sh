#!/usr/bin/env bash
# The same config at several world sizes (README "Same model at any world size"): trains
# configs/synthetic.yaml (or $CONFIG) at its full schedule with 1, 2 and 4 ranks (or the sizes given),
# then prints one row per run: mAP, R1, cross-camera R1, images/s per rank, wall time.
#   bash benchmarks/experiments/world_sizes.sh            # 1 2 4
#   bash benchmarks/experiments/world_sizes.sh 1 8 train.epochs=4   # sizes, key=value overrides in any order
#   bash benchmarks/experiments/world_sizes.sh --json     # also write every run's metrics to
#                                                         # benchmarks/results/world_sizes.json (replacing it)
#   --json PATH writes PATH instead (must end in .json); without --json no JSON is written.
# Runs go to $OUT (runs/world_sizes)/r<R>, their logs to $OUT.r<R>.log; $PYTHON defaults to .venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-configs/synthetic.yaml}
OUT=${OUT:-runs/world_sizes}
sizes=() overrides=() json=""
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0 ;;
    --json=*) json=${1#--json=} ;;
    --json)  # the next argument is the path unless it is a world size, an override or another flag
      if [ $# -gt 1 ] && [[ ! $2 =~ ^[0-9]+$ && $2 != *=* && $2 != -* ]]; then json=$2; shift
      else json=benchmarks/results/world_sizes.json; fi ;;
    -*) echo "unknown option $1 (expected --json [PATH] or --help)" >&2; exit 2 ;;
    *) if [[ $1 =~ ^[0-9]+$ ]]; then sizes+=("$1"); else overrides+=("$1"); fi ;;
  esac
  shift
done
if [ -n "$json" ] && [[ $json != *.json ]]; then
  echo "--json: expected a path ending in .json, got '$json'" >&2; exit 2
fi
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
# `python -` puts the working directory (the repository root) on sys.path: benchmarks.common imports.
JSON=$json CONFIG=$CONFIG OVERRIDES="${overrides[*]}" "$PY" - "$OUT" "${sizes[@]}" <<'PYEOF'
import json, os, sys
from benchmarks.common import write_json
out, sizes = sys.argv[1], sys.argv[2:]
print(f"{'ranks':>5} | {'mAP':>5} | {'R1':>5} | {'cross-cam R1':>12} | {'warm-up mAP':>11} | {'img/s/rank':>10} | wall s")
runs = {}
for r in sizes:
    m = json.load(open(f"{out}/r{r}/metrics.json"))
    speed = [e["images_per_s_per_rank"] for e in m["epochs"]]
    wall = open(f"{out}/r{r}/wall_s").read().strip()
    f, w = m["final"], m.get("warmup", {})
    print(f"{r:>5} | {100 * f['mAP']:5.1f} | {100 * f['rank1']:5.1f} | {100 * f.get('cross_camera_rank1', float('nan')):12.1f} | "
          f"{100 * w.get('mAP', float('nan')):11.1f} | {sum(speed) / len(speed):10.0f} | {wall}")
    command = (f"torchrun --standalone --nproc_per_node={r} -m reid train --config {os.environ['CONFIG']} eval.every=0 "
               f"{os.environ['OVERRIDES']} output_dir={out}/r{r}").replace("  ", " ")
    runs[f"{r} rank" + ("s" if r != "1" else "")] = {"command": command, "wall_s": int(wall), **m}
write_json(os.environ["JSON"] or None, runs)
PYEOF
