"""Recall and query time of `reid search`'s approximate indexes (--ivf, --ivf + --pq) against exact search.

Two galleries of unit vectors (gallery × D): `random` (uniform on the sphere: the worst case for IVF, since
there is no cluster structure and every neighbour is almost equally far) and `clustered` (a few images per
identity around an identity centre, like re-ID embeddings; queries are new images of indexed identities). Every index is built and searched with
`reid.search.build_faiss_index` / `search_index`, the code `reid search` runs. For each row:
  recall@10   |approx top-10 ∩ exact top-10| / 10, averaged over the queries
  build s     training (k-means) + adding the gallery
  query ms    search time per query, all queries in one batch
Prints a table; --json also writes it (without a path to benchmarks/results/search_scale.json).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/search_scale.py --json
    python benchmarks/search_scale.py --gallery 1000000 --nlist 4096 --nprobe 16 64 256   # at scale (GPU if faiss-gpu)
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for benchmarks.common
from benchmarks.common import add_json_flag, write_json  # noqa: E402
from reid.search import _faiss, build_faiss_index, search_index  # noqa: E402

TOPK = 10


def unit_rows(rng, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_rows(rng, n: int, queries: int, dim: int, per_identity: int, spread: float):
    """Gallery: `per_identity` images around each of n / per_identity centres; queries: new images of random ones."""
    centres = unit_rows(rng, max(1, n // per_identity), dim)
    noisy = lambda ids: centres[ids] + spread * unit_rows(rng, len(ids), dim)  # noqa: E731
    gallery, q = noisy(np.arange(n) % len(centres)), noisy(rng.integers(0, len(centres), queries))
    return [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (gallery, q)]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def measure(data: str, gallery, queries, args) -> list[dict]:
    exact, build_s = timed(build_faiss_index, gallery)
    (_, truth), search_s = timed(search_index, exact, queries, TOPK)
    rows = [{"data": data, "index": "exact (flat)", "nprobe": None, "recall@10": 1.0, "build_s": build_s,
             "query_ms": 1000 * search_s / len(queries), "bytes_per_row": 4 * args.dim}]
    for name, pq in ((f"ivf {args.nlist}", 0), (f"ivf {args.nlist} + pq {args.pq}", args.pq)):
        index, build_s = timed(build_faiss_index, gallery, ivf=args.nlist, pq=pq)
        for nprobe in args.nprobe:
            (_, ids), search_s = timed(search_index, index, queries, TOPK, nprobe)
            recall = np.mean([len(set(a) & set(b)) / TOPK for a, b in zip(ids, truth)])
            rows.append({"data": data, "index": name, "nprobe": nprobe, "recall@10": float(recall),
                         "build_s": build_s, "query_ms": 1000 * search_s / len(queries),
                         "bytes_per_row": pq or 4 * args.dim})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--nlist", type=int, default=256, help="IVF cells (--ivf)")
    p.add_argument("--pq", type=int, default=64, help="PQ bytes per row (--pq)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--data", nargs="+", default=["random", "clustered"], choices=["random", "clustered"])
    p.add_argument("--per-identity", type=int, default=10, help="clustered: images per identity")
    p.add_argument("--spread", type=float, default=1.0, help="clustered: noise norm around the identity centre")
    p.add_argument("--seed", type=int, default=0)
    add_json_flag(p, "search_scale")
    args = p.parse_args()

    rows = []
    for data in args.data:
        rng = np.random.default_rng(args.seed)
        if data == "random":
            gallery, queries = unit_rows(rng, args.gallery, args.dim), unit_rows(rng, args.queries, args.dim)
        else:
            gallery, queries = clustered_rows(rng, args.gallery, args.queries, args.dim, args.per_identity, args.spread)
        rows += measure(data, gallery, queries, args)

    faiss = _faiss()
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    print(f"{args.gallery} × {args.dim} unit vectors, {args.queries} queries, faiss {faiss.__version__}, "
          f"{'GPU ×' + str(gpus) if gpus else 'CPU'}")
    print(f"{'data':<10} {'index':<22} {'nprobe':>6} {'recall@10':>10} {'build s':>8} {'query ms':>9} {'bytes/row':>10}")
    for r in rows:
        print(f"{r['data']:<10} {r['index']:<22} {r['nprobe'] or '-':>6} {r['recall@10']:>10.3f} {r['build_s']:>8.2f} "
              f"{r['query_ms']:>9.3f} {r['bytes_per_row']:>10}")
    write_json(args.json, {"args": vars(args), "faiss": faiss.__version__, "gpus": gpus, "machine": platform.machine(),
                           "processor": platform.processor(), "rows": rows})


if __name__ == "__main__":
    main()
