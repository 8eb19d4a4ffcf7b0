"""How the synthetic recipe's grey zone and camera-loss weight were chosen: a sweep from one shared warm-up.

The warm-up (intra-camera loss only) is trained once; every setting then resumes from a copy of that
finished warm-up (`train.init_from`) and trains the full CTACL loss for the same epochs. Prints
mAP / Rank-1 / cross-camera Rank-1 / mined-positive precision per setting; with --json writes them.

Identities are read only by the evaluation and the diagnostics, never by the loss; the settings are
compared on the synthetic data's held-out query/gallery identities, which is why the README lists every
setting that was tried, not only the chosen one.

    python benchmarks/experiments/recipe_sweep.py train.epochs=7 --json   # benchmarks/results/recipe_sweep.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.common
from benchmarks.common import add_json_flag, write_json  # noqa: E402

SETTINGS = {
    "reference (ρ 0.01, λ 0.2)": ["loss.grey_zone=0.01", "loss.cam_weight=0.2"],
    "top-1 positives": ["loss.grey_zone=0.01", "loss.cam_weight=0.2", "loss.topk=1"],
    "λ 2": ["loss.grey_zone=0.01", "loss.cam_weight=2"],
    "ρ 0.05": ["loss.grey_zone=0.05", "loss.cam_weight=0.2"],
    "ρ 0.2": ["loss.grey_zone=0.2", "loss.cam_weight=0.2"],
    "ρ 0.2, λ 2": ["loss.grey_zone=0.2", "loss.cam_weight=2"],
    "ρ 0.3, λ 5": ["loss.grey_zone=0.3", "loss.cam_weight=5"],
    "ρ 0.3, λ 10 (chosen)": ["loss.grey_zone=0.3", "loss.cam_weight=10"],
    "intra-only": ["train.warmup_epochs={epochs}"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/synthetic.yaml")
    p.add_argument("--out", default="runs/recipe_sweep", help="folder for the warm-up and one run per setting")
    add_json_flag(p, "recipe_sweep")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every setting (e.g. train.epochs=7)")
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from reid.ablate import train_shared_warmup
    from reid.config import load_config
    from reid.train import main as train_main

    base = load_config(args.config, args.overrides)
    warmup_dir = os.path.join(args.out, "_warmup")
    train_shared_warmup(args.config, args.overrides, warmup_dir)
    rows = []
    for i, (name, overrides) in enumerate(SETTINGS.items()):
        out = os.path.join(args.out, f"s{i}")
        extra = [o.format(epochs=base.train.epochs) for o in overrides]
        cfg = load_config(args.config, args.overrides + extra + [f"output_dir={out}", f"train.init_from={warmup_dir}"])
        start = time.time()
        metrics = train_main(cfg)
        last = metrics["epochs"][-1]
        rows.append({"setting": name, "overrides": extra, "wall_s": round(time.time() - start, 1),
                     "warmup_mAP": metrics["warmup"]["mAP"], **{k: metrics["final"][k] for k in
                                                                ("mAP", "rank1", "cross_camera_rank1")},
                     "hard_positive_precision": last.get("hard_positive_precision"),
                     "easy_positive_precision": last.get("easy_positive_precision")})

    def pct(value):
        return "–" if value is None else f"{100 * value:.1f}"

    lines = [f"| setting ({base.train.warmup_epochs} warm-up + {base.train.epochs - base.train.warmup_epochs} "
             "epochs) | mAP | R1 | cross-camera R1 | hard-positive precision | easy-positive precision |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {pct(r['mAP'])} | {pct(r['rank1'])} | {pct(r['cross_camera_rank1'])} | "
                     f"{pct(r['hard_positive_precision'])} | {pct(r['easy_positive_precision'])} |")
    print("\n".join(lines))
    write_json(args.json, {"config": args.config, "overrides": args.overrides, "epochs": base.train.epochs,
                           "warmup_epochs": base.train.warmup_epochs, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
