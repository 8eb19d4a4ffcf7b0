"""k-reciprocal re-ranking (`reid.rerank.rerank`) at VeRi-776 size: wall time, peak memory, and what it does to mAP.

VeRi-776's test protocol is 1,678 queries × 11,579 gallery images (13,257 samples: the dense re-ranking holds a
few N × N matrices). Features are synthetic but shaped like re-ID embeddings: identities of 8–12 images spread
over 20 cameras, each image its identity's centre plus noise plus a per-camera offset in a 24-dimensional space
embedded in D dimensions (so the ranking is far from perfect and the same-camera rule matters), L2-normalised.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/rerank_scale.py --json    # ~1-3 minutes on 2 CPU cores; writes
                                                                        # benchmarks/results/rerank_scale.json
    python benchmarks/rerank_scale.py --queries 300 --gallery 2000         # quick look
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for benchmarks.common
from benchmarks.common import add_json_flag, write_json  # noqa: E402
from reid.evaluation import evaluate, evaluate_distances  # noqa: E402
from reid.rerank import rerank  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def features(queries: int, gallery: int, dim: int, cameras: int, seed: int):
    """(Q, D), (G, D) unit features with pids and cams; every query's identity has gallery images."""
    rng = np.random.default_rng(seed)
    n = queries + gallery
    sizes = rng.integers(8, 13, size=n // 8 + 1)
    pids = np.repeat(np.arange(sizes.size), sizes)[:n]
    rng.shuffle(pids)
    cams = rng.integers(0, cameras, size=n)
    g = torch.Generator().manual_seed(seed)
    # A 24-dimensional identity space embedded in D dimensions: crowded enough that rankings are imperfect.
    basis = torch.linalg.qr(torch.randn(dim, 24, generator=g)).Q
    centres = F.normalize(torch.randn(int(pids.max()) + 1, 24, generator=g), dim=1)
    offsets = 0.2 * F.normalize(torch.randn(cameras, 24, generator=g), dim=1)
    x = F.normalize((centres[pids] + 0.2 * torch.randn(n, 24, generator=g) + offsets[cams]) @ basis.T, dim=1)
    order = np.argsort(pids, kind="stable")  # queries: one image of as many identities as possible
    first = order[np.r_[True, pids[order][1:] != pids[order][:-1]]]
    q_rows = rng.permutation(first)[:queries]
    g_rows = np.setdiff1d(np.arange(n), q_rows)[:gallery]
    return x[q_rows], x[g_rows], pids[q_rows], pids[g_rows], cams[q_rows], cams[g_rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=1678)
    p.add_argument("--gallery", type=int, default=11579)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--cameras", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    add_json_flag(p, "rerank_scale")
    args = p.parse_args()
    qf, gf, qp, gp, qc, gc = features(args.queries, args.gallery, args.dim, args.cameras, args.seed)
    before = evaluate(qf, gf, qp, gp, qc, gc)
    rss0 = peak_rss_mb()
    start = time.perf_counter()
    distances = rerank(qf, gf)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    after = evaluate_distances(distances, qp, gp, qc, gc)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "shape": {"queries": args.queries, "gallery": args.gallery, "dim": args.dim,
                  "samples": args.queries + args.gallery},
        "rerank_s": seconds, "peak_rss_mb": peak, "peak_rss_before_mb": rss0,
        "mAP_before": float(before["mAP"]), "mAP_after": float(after["mAP"]),
        "rank1_before": float(before["rank1"]), "rank1_after": float(after["rank1"]),
    }
    print(f"re-ranking {args.queries} × {args.gallery} (D={args.dim}, {args.queries + args.gallery} samples): "
          f"{seconds:.1f} s, peak RSS {peak:.0f} MB (before: {rss0:.0f} MB)")
    print(f"mAP {100 * result['mAP_before']:.1f} → {100 * result['mAP_after']:.1f}, "
          f"R1 {100 * result['rank1_before']:.1f} → {100 * result['rank1_after']:.1f}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
