"""`reid bench eval`: exact evaluation at VeRi-Wild large-protocol shape (10,000 queries × 128,517 gallery, D=2048).

Random unit features (timing only; random features are the hard case for ``evaluate``: a query's positives
spread over the whole score range), a gallery shaped like VeRi-Wild large (128,517 images of 10,000 identities,
174 cameras). Measured on a subset of the queries and extrapolated to 10,000 (each timed ``repeats`` times,
alternating, the fastest kept: other work on shared cores only adds time):
  matmul    the bare similarity products of the same query chunks (q_chunk·gᵀ, float32, into one reused
            output buffer), the unavoidable part;
  evaluate  ``reid.evaluation.evaluate`` on the same queries, one-off set-up (gallery norms, identity index)
            included, so its per-query time is an upper bound for 10,000 queries;
  peak      the largest resident (CPU) or allocated (GPU) memory ``evaluate`` adds on top of its inputs;
  check     mAP, mINP and CMC of ``evaluate`` against a chunked full-sort reference (torch.sort of every row:
            the straightforward method) on the first ``check_queries`` queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reid.bench_common import peak_extra_bytes, timed
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


def matmul_floor(q, g, chunk):
    out = torch.empty(min(chunk, len(q)), len(g), device=q.device)
    for lo in range(0, len(q), chunk):
        torch.matmul(q[lo:lo + chunk], g.T, out=out[:len(q[lo:lo + chunk])])


def sort_reference(q, g, qp, gp, qc, gc, chunk):
    """The straightforward method: per query the whole gallery sorted, junk dropped, metrics read off the
    positions of the positives (random features: no ties, so no tie rule is needed)."""
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


def run(s, device) -> dict:
    chunk = s.chunk or auto_chunk_size(s.gallery)
    q, g, qp, gp, qc, gc = make_split(s.queries, s.gallery, s.dim, s.identities, s.cameras, s.seed, device)
    t_eval, t_matmul = [], []
    for _ in range(s.repeats):
        t, (_, matmul_peak) = timed(lambda: peak_extra_bytes(lambda: matmul_floor(q, g, chunk), device), device)
        t_matmul.append(t)
        t, (result, peak) = timed(lambda: peak_extra_bytes(
            lambda: evaluate(q, g, qp, gp, qc, gc, chunk_size=chunk), device), device)
        t_eval.append(t)
    t_eval, t_matmul = min(t_eval), min(t_matmul)
    n = min(s.check_queries, s.queries)
    subset = evaluate(q[:n], g, qp[:n], gp, qc[:n], gc, chunk_size=chunk)
    reference = sort_reference(q[:n], g, qp[:n], gp, qc[:n], gc, min(chunk, 32))
    ms_eval, ms_matmul = 1e3 * t_eval / s.queries, 1e3 * t_matmul / s.queries
    return {
        "gallery": s.gallery, "identities": s.identities, "cameras": s.cameras, "dim": s.dim,
        "queries_timed": s.queries, "repeats": s.repeats, "chunk": chunk,
        "evaluate_ms_per_query": ms_eval, "matmul_ms_per_query": ms_matmul, "ratio": t_eval / t_matmul,
        "evaluate_at_10k_s_upper_bound": ms_eval * FULL_QUERIES / 1e3, "matmul_at_10k_s": ms_matmul * FULL_QUERIES / 1e3,
        "peak_extra_bytes": peak, "matmul_peak_extra_bytes": matmul_peak,
        "similarity_chunk_bytes": min(chunk, s.queries) * s.gallery * 4,
        "metrics": result, "check_queries": n, "check_evaluate": {k: subset[k] for k in reference},
        "check_full_sort": reference, "check_max_abs_difference": max(abs(subset[k] - reference[k]) for k in reference),
    }


def table(r: dict) -> str:
    peak = ("unknown" if r["peak_extra_bytes"] is None else
            f"{r['peak_extra_bytes'] / 2**20:.0f} MiB (one chunk of similarities: "
            f"{r['similarity_chunk_bytes'] / 2**20:.0f} MiB)")
    return "\n".join([
        f"gallery {r['gallery']:,} × D {r['dim']} ({r['identities']:,} identities, {r['cameras']} cameras), "
        f"{r['queries_timed']:,} queries timed, chunk {r['chunk']}",
        f"  evaluate      {r['evaluate_ms_per_query']:8.2f} ms/query  (≈ {r['evaluate_at_10k_s_upper_bound']:.0f} s "
        f"for {FULL_QUERIES:,} queries)",
        f"  bare matmul   {r['matmul_ms_per_query']:8.2f} ms/query  (≈ {r['matmul_at_10k_s']:.0f} s)",
        f"  ratio         {r['ratio']:8.3f}  (evaluate / bare matmul)",
        f"  peak extra    {peak}",
        f"  check         {r['check_queries']} queries vs full sort: max |difference| "
        f"{r['check_max_abs_difference']:.1e} (mAP {r['check_evaluate']['mAP']:.4f})",
    ])
