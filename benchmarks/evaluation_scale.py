"""How long exact evaluation takes at VeRi-Wild large-protocol shape (10,000 queries × 128,517 gallery, D = 2,048).

Random unit features (timing only; random features are the hard case for `evaluate`: a query's positives
spread over the whole score range), a gallery shaped like VeRi-Wild large (128,517 images of 10,000
identities, 174 cameras). Measured on a subset of the queries (--queries) and extrapolated to 10,000
(each timed --repeats times, alternating, the fastest kept):
  matmul    the bare similarity products of the same query chunks (q_chunk @ gᵀ, float32, into one
            reused output buffer), the unavoidable part;
  evaluate  `reid.evaluation.evaluate` on the same queries, one-off set-up (gallery norms, identity
            index) included, so its per-query time is an upper bound for 10,000 queries;
  peak      the largest resident (CPU) or allocated (GPU) memory `evaluate` adds on top of its inputs;
  check     mAP, mINP and CMC of `evaluate` against a chunked full-sort reference (torch.sort of every
            row: the straightforward method) on the first --check-queries queries.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/evaluation_scale.py --json    # ~1-2.5 minutes on 2 CPU cores
    python benchmarks/evaluation_scale.py --gallery 20000 --queries 256      # quick look
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
DEFAULT_JSON = "benchmarks/results/evaluation_scale.json"


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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def peak_extra_bytes(fn, device):
    """→ (fn's result, bytes of memory fn held at its peak beyond what was held before it), None when
    the platform cannot tell (CPU: Linux peak-RSS reset through /proc/self/clear_refs)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        return out, torch.cuda.max_memory_allocated(device) - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (VmHWM) to the current one
        before = _status_kib("VmRSS")
        out = fn()
        return out, 1024 * (_status_kib("VmHWM") - before)
    except OSError:
        return fn(), None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def matmul_floor(q, g, chunk):
    out = torch.empty(min(chunk, len(q)), len(g), device=q.device)
    for lo in range(0, len(q), chunk):
        torch.matmul(q[lo:lo + chunk], g.T, out=out[:len(q[lo:lo + chunk])])


def sort_reference(q, g, qp, gp, qc, gc, chunk):
    """The straightforward method: per query the whole gallery sorted, junk dropped, metrics read off
    the positions of the positives (random features: no ties, so no tie rule is needed)."""
    aps, inps, firsts = [], [], []
    for lo in range(0, len(q), chunk):
        order = torch.sort(q[lo:lo + chunk] @ g.T, dim=1, descending=True).indices
        match = gp[order] == qp[lo:lo + chunk, None]
        junk = match & (gc[order] == qc[lo:lo + chunk, None])
        hits = (match & ~junk).double()
        rank = torch.cumsum((~junk).double(), 1)  # rank among non-junk items
        num = hits.sum(1)
        ok = num > 0
        aps.append(((torch.cumsum(hits, 1) / rank * hits).sum(1) / num.clamp(min=1))[ok])
        inps.append((num / torch.where(hits > 0, rank, 0).amax(1).clamp(min=1))[ok])
        firsts.append(torch.where(hits > 0, rank, torch.inf).amin(1)[ok])
    first = torch.cat(firsts)
    return {"mAP": torch.cat(aps).mean().item(), "mINP": torch.cat(inps).mean().item(),
            **{f"rank{r}": (first <= r).double().mean().item() for r in (1, 5, 10)}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gallery", type=int, default=128_517)
    p.add_argument("--identities", type=int, default=10_000)
    p.add_argument("--cams", type=int, default=174)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--queries", type=int, default=1000, help="queries timed (then extrapolated to 10,000)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (the fastest counts)")
    p.add_argument("--check-queries", type=int, default=100, help="queries checked against the full sort")
    p.add_argument("--chunk-size", type=int, default=None, help="default: evaluate's automatic chunk")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", nargs="?", const=DEFAULT_JSON, default=None,
                   help=f"write the results as JSON (default path {DEFAULT_JSON})")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    chunk = args.chunk_size or auto_chunk_size(args.gallery)
    print(f"gallery {args.gallery:,} × D {args.dim} ({args.identities:,} identities, {args.cams} cameras), "
          f"{args.queries:,} queries timed and extrapolated to {FULL_QUERIES:,}, chunk {chunk} queries, "
          f"device {device}, {torch.get_num_threads()} threads", flush=True)
    q, g, qp, gp, qc, gc = make_split(args.queries, args.gallery, args.dim, args.identities, args.cams, 0, device)

    # Alternated and repeated, the fastest of each kept: the cores are shared, other work only adds time.
    t_eval, t_matmul = [], []
    for _ in range(args.repeats):
        t, (_, matmul_peak) = timed(lambda: peak_extra_bytes(lambda: matmul_floor(q, g, chunk), device), device)
        t_matmul.append(t)
        t, (result, peak) = timed(lambda: peak_extra_bytes(
            lambda: evaluate(q, g, qp, gp, qc, gc, chunk_size=chunk), device), device)
        t_eval.append(t)
    print(f"seconds per run: evaluate {', '.join(f'{t:.1f}' for t in t_eval)}; "
          f"bare matmul {', '.join(f'{t:.1f}' for t in t_matmul)}")
    t_eval, t_matmul = min(t_eval), min(t_matmul)
    n = min(args.check_queries, args.queries)
    subset = evaluate(q[:n], g, qp[:n], gp, qc[:n], gc, chunk_size=chunk)
    reference = sort_reference(q[:n], g, qp[:n], gp, qc[:n], gc, min(chunk, 32))
    diffs = {k: abs(subset[k] - reference[k]) for k in reference}

    ms_eval, ms_matmul = 1e3 * t_eval / args.queries, 1e3 * t_matmul / args.queries
    chunk_bytes = min(chunk, args.queries) * args.gallery * 4
    print(f"evaluate      {ms_eval:8.2f} ms/query  ({t_eval:.1f} s for {args.queries:,} queries; "
          f"≈ {ms_eval * FULL_QUERIES / 1e3:.0f} s for {FULL_QUERIES:,})")
    print(f"bare matmul   {ms_matmul:8.2f} ms/query  ({t_matmul:.1f} s; ≈ {ms_matmul * FULL_QUERIES / 1e3:.0f} s "
          f"for {FULL_QUERIES:,})")
    print(f"ratio         {t_eval / t_matmul:8.3f}  (evaluate / bare matmul)")
    print("peak extra    " + ("unknown" if peak is None else f"{peak / 2**20:8.0f} MiB  (bare matmul: "
                              f"{matmul_peak / 2**20:.0f} MiB; one chunk of similarities: {chunk_bytes / 2**20:.0f} MiB)"))
    print(f"check         {n} queries vs full sort: " + ", ".join(
        f"{k} {subset[k]:.6g} vs {reference[k]:.6g}" for k in reference) +
          f"; max |difference| {max(diffs.values()):.1e}")
    print(f"metrics       {result}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": {"platform": platform.platform(), "processor": platform.processor(),
                                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                                   "device": str(device)},
                       "gallery": args.gallery, "identities": args.identities, "cams": args.cams, "dim": args.dim,
                       "queries_timed": args.queries, "repeats": args.repeats, "chunk": chunk,
                       "evaluate_ms_per_query": ms_eval, "matmul_ms_per_query": ms_matmul,
                       "ratio": t_eval / t_matmul,
                       "evaluate_at_10k_s_upper_bound": ms_eval * FULL_QUERIES / 1e3,
                       "matmul_at_10k_s": ms_matmul * FULL_QUERIES / 1e3,
                       "peak_extra_bytes": peak, "matmul_peak_extra_bytes": matmul_peak,
                       "similarity_chunk_bytes": chunk_bytes,
                       "metrics": result, "check_queries": n, "check_evaluate": {k: subset[k] for k in reference},
                       "check_full_sort": reference, "check_max_abs_difference": max(diffs.values())}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
