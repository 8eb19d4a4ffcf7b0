"""Which BatchNorm under camera shards: plain per-rank BN (each rank normalises over its own cameras only) vs
BN over all cameras.

Trains the synthetic config with R torchrun ranks and per-rank BN, then the same images per step with BN statistics
over every camera: R ranks with `model.sync_bn=true` where CUDA is available (torch's SyncBatchNorm is GPU-only),
otherwise one process with an R× batch and the same number of steps. Prints final mAP / Rank-1, same- vs
cross-camera Rank-1 and images/s per rank; writes JSON.

    python benchmarks/batchnorm.py --ranks 2 train.epochs=6
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def run(name: str, ranks: int, sync_bn: bool, out: str, config: str, overrides: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // ranks)), OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "reid",
           "train", "--config", config, *overrides, f"model.sync_bn={str(sync_bn).lower()}", f"output_dir={out}"]
    start = time.time()
    subprocess.run(cmd, check=True, env=env)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    speed = [e["images_per_s_per_rank"] for e in metrics.get("epochs", [])]
    return {"name": name, "ranks": ranks, "sync_bn": sync_bn, "wall_s": time.time() - start, **metrics["final"],
            "warmup_mAP": metrics.get("warmup", {}).get("mAP"),
            "images_per_s_per_rank": sum(speed) / max(1, len(speed))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--config", default="configs/synthetic.yaml")
    p.add_argument("--out", default="runs/batchnorm")
    p.add_argument("--json", default="benchmarks/results/batchnorm.json")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    import torch

    from reid.config import load_config
    from reid.data.readers import load_dataset
    from reid.data.sampler import partition_cameras
    from reid.data.synthetic import ensure_synthetic

    cfg = load_config(args.config, args.overrides)
    ensure_synthetic(cfg.data.root, cfg.synth)
    cams = load_dataset("veri776", cfg.data.root).train.cams
    counts = torch.bincount(torch.as_tensor(cams)).numpy()
    steps = cfg.train.steps_per_epoch or max(int(counts[s].sum()) for s in partition_cameras(counts, args.ranks)) \
        // cfg.train.batch_size
    rows = [run(f"{args.ranks} ranks, per-rank BN (own cameras)", args.ranks, False,
                os.path.join(args.out, "per_rank_bn"), args.config, args.overrides + [f"train.steps_per_epoch={steps}"])]
    if torch.cuda.is_available():
        rows.append(run(f"{args.ranks} ranks, SyncBN", args.ranks, True, os.path.join(args.out, "sync_bn"),
                        args.config, args.overrides + [f"train.steps_per_epoch={steps}"]))
    else:
        rows.append(run("1 process, BN over all cameras", 1, False, os.path.join(args.out, "all_camera_bn"),
                        args.config, args.overrides + [f"train.steps_per_epoch={steps}",
                                                       f"train.batch_size={cfg.train.batch_size * args.ranks}"]))
    print(f"\n{'':<34} | mAP | R1 | same-cam R1 | cross-cam R1 | img/s/rank | wall s")
    for r in rows:
        name = r["name"]
        print(f"{name:<34} | {100 * r['mAP']:.1f} | {100 * r['rank1']:.1f} | "
              f"{100 * (r.get('same_camera_rank1') or 0):.1f} | {100 * (r.get('cross_camera_rank1') or 0):.1f} | "
              f"{r['images_per_s_per_rank']:.0f} | {r['wall_s']:.0f}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"ranks": args.ranks, "overrides": args.overrides, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
