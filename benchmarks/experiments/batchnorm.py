"""Which BatchNorm under camera shards: BN over all cameras (the default) vs per-rank BN (each rank normalises
its own cameras; running statistics merged over ranks before every fill, evaluation and save).

Trains the synthetic config twice with R torchrun ranks — the same global batches, augmentations and seed — with
`model.batchnorm=all_cameras` (the all-reduce BatchNorm) and
`model.batchnorm=per_rank`. Prints final mAP / Rank-1, same- vs cross-camera Rank-1 and images/s per rank; with
--json writes them (by default to benchmarks/results/batchnorm_modes.json: batchnorm.json holds the old comparison).

    python benchmarks/experiments/batchnorm.py --ranks 2 train.epochs=6 --json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.common
from benchmarks.common import add_json_flag, write_json  # noqa: E402


def run(name: str, ranks: int, batchnorm: str, out: str, config: str, overrides: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // ranks)), OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "reid",
           "train", "--config", config, *overrides, f"model.batchnorm={batchnorm}", f"output_dir={out}"]
    start = time.time()
    subprocess.run(cmd, check=True, env=env)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    speed = [e["images_per_s_per_rank"] for e in metrics.get("epochs", [])]
    return {"name": name, "ranks": ranks, "batchnorm": batchnorm, "wall_s": time.time() - start, **metrics["final"],
            "warmup_mAP": metrics.get("warmup", {}).get("mAP"),
            "images_per_s_per_rank": sum(speed) / max(1, len(speed))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--config", default="configs/synthetic.yaml")
    p.add_argument("--out", default="runs/batchnorm", help="folder for the two training runs")
    add_json_flag(p, "batchnorm_modes")
    p.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    args = p.parse_args()
    rows = [run(f"{args.ranks} ranks, {mode} BN", args.ranks, mode, os.path.join(args.out, mode), args.config,
                args.overrides) for mode in ("all_cameras", "per_rank")]
    print(f"\n{'':<34} | mAP | R1 | same-cam R1 | cross-cam R1 | img/s/rank | wall s")
    for r in rows:
        name = r["name"]
        print(f"{name:<34} | {100 * r['mAP']:.1f} | {100 * r['rank1']:.1f} | "
              f"{100 * (r.get('same_camera_rank1') or 0):.1f} | {100 * (r.get('cross_camera_rank1') or 0):.1f} | "
              f"{r['images_per_s_per_rank']:.0f} | {r['wall_s']:.0f}")
    write_json(args.json, {"ranks": args.ranks, "overrides": args.overrides, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
