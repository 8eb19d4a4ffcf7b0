"""How long exact evaluation takes at VeRi-Wild large-protocol scale (10,000 queries × 138,517 gallery).

Random unit features (timing only), a gallery shaped like VeRi-Wild large (138,517 images of 10,000
identities, 174 cameras), and for each (queries, D):
  floor     the same chunks' matrix products alone (q_chunk @ gᵀ), the unavoidable part;
  evaluate  `reid.evaluation.evaluate` (matrix product + positive-bucket ranking);
  sort      a chunked full-sort reference (torch.sort of every chunk row, then AP from the hit
            positions), the usual way to do it, timed on the same chunks (optional: --no-sort);
and the time extrapolated to 10,000 queries (all three are linear in the number of queries).
Prints a table and writes JSON.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/evaluation_scale.py                    # defaults below
    python benchmarks/evaluation_scale.py --gallery 20000 --queries 256 --dims 128   # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

from reid.evaluation import auto_chunk_size, evaluate

FULL_QUERIES = 10_000


def make_split(num_queries: int, num_gallery: int, dim: int, identities: int, cams: int, seed: int, device):
    gen = torch.Generator().manual_seed(seed)
    g_pids = torch.randperm(num_gallery, generator=gen) % identities
    g_cams = torch.randint(0, cams, (num_gallery,), generator=gen)
    q_pids = g_pids[torch.randint(0, num_gallery, (num_queries,), generator=gen)]
    q_cams = torch.randint(0, cams, (num_queries,), generator=gen)
    q = F.normalize(torch.randn(num_queries, dim, generator=gen), dim=1)
    g = torch.randn(num_gallery, dim, generator=gen)
    g = g.div_(g.norm(dim=1, keepdim=True))
    return [t.to(device) for t in (q, g, q_pids, g_pids, q_cams, g_cams)]


def cell(value, width: int, decimals: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{decimals}f}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def matmul_floor(q, g, chunk):
    for lo in range(0, len(q), chunk):
        (q[lo:lo + chunk] @ g.T).sum()  # consume the product so nothing is skipped


def sort_reference(q, g, qp, gp, qc, gc, chunk):
    """Chunked full sort: per query the whole gallery ordered, junk dropped, AP from hit positions."""
    aps = []
    for lo in range(0, len(q), chunk):
        sims = q[lo:lo + chunk] @ g.T
        order = torch.sort(sims, dim=1, descending=True).indices
        match = gp[order] == qp[lo:lo + chunk, None]
        junk = match & (gc[order] == qc[lo:lo + chunk, None])
        hits = (match & ~junk).float()
        rank = torch.cumsum((~junk).float(), 1)          # rank among non-junk items
        prec = torch.cumsum(hits, 1) / rank
        num = hits.sum(1)
        ok = num > 0
        aps.append(((prec * hits).sum(1)[ok] / num[ok]).double())
    return torch.cat(aps).mean().item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gallery", type=int, default=138_517)
    p.add_argument("--identities", type=int, default=10_000)
    p.add_argument("--cams", type=int, default=174)
    p.add_argument("--queries", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--dims", type=int, nargs="+", default=[2048, 256])
    p.add_argument("--chunk-size", type=int, default=None, help="default: evaluate's automatic chunk")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-sort", action="store_true", help="skip the full-sort reference")
    p.add_argument("--json", default="benchmarks/results/evaluation_scale.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    chunk = args.chunk_size or auto_chunk_size(args.gallery)
    rows = []
    print(f"gallery {args.gallery:,} ({args.identities:,} identities, {args.cams} cameras), chunk {chunk} queries, "
          f"device {device}, {torch.get_num_threads()} threads")
    header = (f"{'queries':>8} {'D':>5} | {'floor s':>8} {'evaluate s':>10} {'sort s':>8} | {'eval/floor':>10} "
              f"{'sort/floor':>10} | {'evaluate @10k s':>15} {'sort @10k s':>11} | {'mAP eval':>9} {'mAP sort':>9}")
    print(header)
    print("-" * len(header))
    for dim in args.dims:
        for nq in args.queries:
            q, g, qp, gp, qc, gc = make_split(nq, args.gallery, dim, args.identities, args.cams, 0, device)
            floor, _ = timed(lambda: matmul_floor(q, g, chunk), device)
            t_eval, res = timed(lambda: evaluate(q, g, qp, gp, qc, gc, chunk_size=chunk), device)
            t_sort, map_sort = (None, None) if args.no_sort else timed(
                lambda: sort_reference(q, g, qp, gp, qc, gc, chunk), device)
            row = {"queries": nq, "gallery": args.gallery, "dim": dim, "chunk": chunk, "floor_s": floor,
                   "evaluate_s": t_eval, "sort_s": t_sort, "evaluate_at_10k_s": t_eval * FULL_QUERIES / nq,
                   "sort_at_10k_s": None if t_sort is None else t_sort * FULL_QUERIES / nq,
                   "floor_at_10k_s": floor * FULL_QUERIES / nq, "mAP_evaluate": res["mAP"], "mAP_sort": map_sort,
                   "valid_queries": res["valid_queries"]}
            rows.append(row)
            ratio = None if t_sort is None else t_sort / floor
            print(f"{nq:>8} {dim:>5} | {floor:>8.2f} {t_eval:>10.2f} {cell(t_sort, 8, 2)} | {t_eval / floor:>10.2f} "
                  f"{cell(ratio, 10, 2)} | {row['evaluate_at_10k_s']:>15.0f} {cell(row['sort_at_10k_s'], 11, 0)} | "
                  f"{res['mAP']:>9.5f} {cell(map_sort, 9, 5)}", flush=True)
            del q, g
    # evaluate has a one-off part (gallery copy in identity order, normalisation, checks): a line through
    # the two largest query counts separates it from the per-query cost, which is what 10,000 queries pay.
    fits = []
    for dim in args.dims:
        pts = sorted((r["queries"], r["evaluate_s"], r["floor_s"]) for r in rows if r["dim"] == dim)
        if len(pts) >= 2 and pts[-1][0] > pts[-2][0]:
            (q1, e1, f1), (q2, e2, f2) = pts[-2], pts[-1]
            per_q, floor_per_q = (e2 - e1) / (q2 - q1), (f2 - f1) / (q2 - q1)
            fit = {"dim": dim, "per_query_ms": 1e3 * per_q, "setup_s": e2 - per_q * q2,
                   "floor_per_query_ms": 1e3 * floor_per_q,
                   "evaluate_at_10k_s": (e2 - per_q * q2) + per_q * FULL_QUERIES}
            fits.append(fit)
            print(f"D={dim}: evaluate ≈ {fit['setup_s']:.1f} s once + {fit['per_query_ms']:.1f} ms/query "
                  f"(matrix products alone {fit['floor_per_query_ms']:.1f} ms/query) → 10,000 queries ≈ "
                  f"{fit['evaluate_at_10k_s']:.0f} s")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": {"platform": platform.platform(), "processor": platform.processor(),
                               "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)},
                   "gallery": args.gallery, "identities": args.identities, "cams": args.cams,
                   "rows": rows, "fits": fits}, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
