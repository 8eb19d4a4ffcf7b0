"""The training path's loss step now against the losses of an earlier commit, in one process, alternating.

Issue 11 asked that training's loss (``sharded_ctacl_loss``, which ``ctacl_loss`` now is the one-rank case of) be at
least as fast as the single-process ``ctacl_loss`` of before (commit 88de3e9 by default), at B=128, D=2048, with
memories the size of VeRi-776 and VeRi-Wild (``reid.bench_common``). The old modules are read with ``git show`` into
a temporary package; each repetition times, in turn, the bare products (the floor: s and r from one (N, D)·(D, 2B)
product, then dL/ds·M), today's training path, the old ``ctacl_loss`` and the old ``sharded_ctacl_loss``.

    python benchmarks/loss_against_commit.py [--commit 88de3e9] [--sizes veri776,veriwild] [--reps 3] [--json]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_json_flag, write_json  # noqa: E402
from reid.bench_common import LOSS_KW, dataset_bank  # noqa: E402
from reid.losses import sharded_ctacl_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def old_losses(commit: str, where: Path):
    """Import the commit's reid.losses / reid.loss_terms / reid.sharded_loss as package ``old_reid``."""
    package = where / "old_reid"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("losses", "loss_terms", "sharded_loss"):
        text = subprocess.run(["git", "show", f"{commit}:reid/{name}.py"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        for module in ("losses", "loss_terms"):
            text = text.replace(f"from reid.{module} import", f"from old_reid.{module} import")
        (package / f"{name}.py").write_text(text)
    sys.path.insert(0, str(where))
    from old_reid.losses import ctacl_loss
    from old_reid.sharded_loss import sharded_ctacl_loss as old_sharded
    return ctacl_loss, old_sharded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--commit", default="88de3e9")
    p.add_argument("--sizes", default="veri776,veriwild")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--old-sharded-reps", type=int, default=1, help="the old sharded loss is slow: fewer repetitions")
    add_json_flag(p, "loss_against_commit")
    args = p.parse_args()
    batch, dim = 128, 2048
    with tempfile.TemporaryDirectory() as tmp:
        old_loss, old_sharded = old_losses(args.commit, Path(tmp))
        rows_out = []
        for name in args.sizes.split(","):
            bank = dataset_bank(name, 1, dim, 0, "cpu")
            memory, cams, tracklets = bank.rows, bank.cams, bank.tracklets
            g = torch.Generator().manual_seed(1)
            rows = torch.randperm(len(bank), generator=g)[:batch]
            feats = F.normalize(memory[rows] + 0.3 * torch.randn(batch, dim, generator=g), dim=1)
            grad_logits = torch.rand(batch, len(bank), generator=g)
            bank.shard()

            def floor():
                x = torch.cat([feats, memory[rows]])
                for start in range(0, len(bank), 8192):
                    (memory[start:start + 8192] @ x.T).T.contiguous()
                grad_logits @ memory

            def new():
                f = feats.clone().requires_grad_()
                out = sharded_ctacl_loss(f, cams[rows], tracklets[rows], rows, bank, check=False, **LOSS_KW)
                out["loss"].backward()
                return float(out["loss"].detach())

            def old():
                f = feats.clone().requires_grad_()
                loss = old_loss(f, cams[rows], tracklets[rows], memory, cams, tracklets, **LOSS_KW)
                loss.backward()
                return float(loss.detach())

            def old_sharded_step():
                f = feats.clone().requires_grad_()
                old_sharded(f, cams[rows], tracklets[rows], rows, bank, **LOSS_KW)["loss"].backward()

            values = (new(), old())
            times = {"floor": [], "training_path": [], "old_ctacl_loss": [], "old_sharded_ctacl_loss": []}
            for rep in range(args.reps):
                for key, fn in (("floor", floor), ("training_path", new), ("old_ctacl_loss", old),
                                ("old_sharded_ctacl_loss", old_sharded_step)):
                    if key == "old_sharded_ctacl_loss" and rep >= args.old_sharded_reps:
                        continue
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)
            best = {k: min(v) for k, v in times.items()}
            row = {"name": name, "N": len(bank), "B": batch, "D": dim, "best_s": best, "all_s": times,
                   "training_path_over_floor": best["training_path"] / best["floor"],
                   "training_path_over_old_ctacl_loss": best["training_path"] / best["old_ctacl_loss"],
                   "loss_values_new_old": values}
            rows_out.append(row)
            print(f"{name:9s} N={len(bank):7d}  floor {best['floor']:.3f} s  training path {best['training_path']:.3f} s"
                  f" ({row['training_path_over_floor']:.2f}× floor)  old ctacl_loss {best['old_ctacl_loss']:.3f} s  "
                  f"old sharded {best['old_sharded_ctacl_loss']:.3f} s  loss new/old {values[0]:.6f}/{values[1]:.6f}",
                  flush=True)
    write_json(args.json, {"benchmark": "loss_against_commit", "commit": args.commit, "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "loss": LOSS_KW, "results": rows_out})


if __name__ == "__main__":
    main()
