"""What a run's memory bank says about the camera gap (labelled data only; identities never reach the loss).

For a run folder (its checkpoint's memory) on a labelled dataset, prints:
- the norm of each camera's mean memory row (0 = no camera offset, 1 = every row of the camera is the same);
- for the other-camera rows ranked by similarity to an anchor's own row, the precision and recall of the true
  matches (same identity, other camera) at depths K, among them the grey-zone sizes ⌊ρ·|O_i|⌋ for several ρ:
  how many true matches a grey zone of that size keeps out of the negatives.
It ranks all N×N pairs at once, so it is meant for synthetic-sized sets (N of a few thousand), not VeRi-Wild.

    python benchmarks/experiments/memory_diagnostics.py runs/ablation10/ablation/_warmup --root data/synthetic \
        --json benchmarks/results/memory_diagnostics_warmup.json
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.common
from benchmarks.common import add_json_flag, write_json  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder with checkpoint.pt and its memory_e* folder")
    p.add_argument("--format", default="veri776")
    p.add_argument("--root", default="data/synthetic")
    add_json_flag(p, "memory_diagnostics")
    args = p.parse_args()
    from reid.data.readers import load_dataset
    from reid.memory import MemoryBank

    train = load_dataset(args.format, args.root).train
    ckpt = torch.load(os.path.join(args.run, "checkpoint.pt"), map_location="cpu", weights_only=False)
    n = len(train)
    bank = MemoryBank(torch.arange(n), torch.as_tensor(train.cams), torch.as_tensor(train.tracklets),
                      dim=ckpt["model"]["neck.weight"].numel(), num_cameras=int(train.cams.max()) + 1)
    bank.load(os.path.join(args.run, ckpt["memory_dir"]))
    rows = bank.rows.float()
    cams, pids = torch.as_tensor(train.cams), torch.as_tensor(train.pids)

    centroid_norms = {int(c): float(rows[cams == c].mean(0).norm()) for c in cams.unique()}
    other = cams[:, None] != cams[None, :]
    true = (pids[:, None] == pids[None, :]) & other
    order = (rows @ rows.T).masked_fill(~other, -2.0).argsort(1, descending=True)
    hits = true.gather(1, order).float()
    n_true = true.sum(1).clamp(min=1).float()
    n_other = float(other.sum(1).float().mean())
    depths = {f"top {k}": k for k in (1, 5)}
    depths.update({f"grey zone ρ={rho}": int(rho * n_other) for rho in (0.01, 0.05, 0.1, 0.2, 0.3)})
    result = {"run": args.run, "epoch": ckpt["epoch"], "camera_mean_row_norm": centroid_norms,
              "true_matches_per_anchor": float(true.sum(1).float().mean()), "other_camera_rows": n_other,
              "depths": {}}
    norms = list(centroid_norms.values())
    print(f"{args.run} (epoch {ckpt['epoch']}): camera mean-row norm {min(norms):.2f}–{max(norms):.2f}; "
          f"{result['true_matches_per_anchor']:.1f} true other-camera matches among {n_other:.0f} other-camera rows")
    print("| other-camera rows ranked by similarity | depth | precision | recall of true matches |")
    print("|---|---|---|---|")
    for name, k in depths.items():
        k = max(k, 1)
        precision, recall = float(hits[:, :k].mean()), float((hits[:, :k].sum(1) / n_true).mean())
        result["depths"][name] = {"depth": k, "precision": precision, "recall": recall}
        print(f"| {name} | {k} | {100 * precision:.1f} % | {100 * recall:.1f} % |")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
