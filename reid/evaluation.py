"""Exact mAP / CMC for re-identification, chunked over queries (DESIGN §5, issue 4 item 6).

Standard rule: for a query of identity ``p`` seen by camera ``c``, gallery images of identity ``p``
*and* camera ``c`` are junk (ignored, neither hit nor miss); positives are the gallery images of ``p``
from other cameras; everything else is a negative. A query with no positive is skipped and counted.
Identities < 0 mean "unknown": such queries are skipped, such gallery images are always negatives.

How it stays exact without sorting the gallery: for AP only the rank of each positive matters, and
rank(k-th positive) = k + (number of negatives ranked above it). Per query chunk we take the (Qc, G)
similarities once, sort only each query's few positive similarities, and `searchsorted` every gallery
similarity into them; a histogram of those bucket ids, summed from the top, gives the number of
negatives above every positive. Cost per chunk: one matrix product + one O(G·log P) pass, no
O(G·log G) sort, and never the whole (Q, G) matrix at once.

Ties (a negative with exactly the similarity of a positive) rank the negative *first*. This is the
pessimistic rule: it never inflates a score, and unlike "break ties by gallery index" the result does
not depend on the order of the gallery. Ties between positives, or between negatives, change nothing.

Similarity is the dot product of the L2-normalised float32 features (rows are re-normalised here, a
no-op for unit rows), so the ranking equals the Euclidean-distance ranking. Everything runs on the
device of `query_features`; numpy inputs run on the CPU.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from reid.errors import ReidError

_CHUNK_BYTES = 256 * 2**20  # working set per query chunk: ~12 bytes per (query, gallery) pair


def _tensor(x, name: str, device, dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=dtype)
    try:
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)
    except (TypeError, ValueError) as exc:
        raise ReidError(f"evaluate: '{name}' must be a tensor or array ({exc})") from None


def _prepare(query_features, gallery_features, query_pids, gallery_pids, query_cams, gallery_cams):
    """→ q (Q, D), g (G, D) float32 (not yet normalised: no copy of a large float32 gallery);
    qp, gp, qc, gc int64; all on the query features' device."""
    device = query_features.device if isinstance(query_features, torch.Tensor) else torch.device("cpu")
    q = _tensor(query_features, "query_features", device, torch.float32)
    g = _tensor(gallery_features, "gallery_features", device, torch.float32)
    if q.dim() != 2 or g.dim() != 2 or q.shape[1] != g.shape[1]:
        raise ReidError(f"evaluate: features must be (Q, D) and (G, D) with the same D, "
                        f"got {tuple(q.shape)} and {tuple(g.shape)}")
    labels = []
    for name, x, n in (("query_pids", query_pids, len(q)), ("gallery_pids", gallery_pids, len(g)),
                       ("query_cams", query_cams, len(q)), ("gallery_cams", gallery_cams, len(g))):
        t = _tensor(x, name, device, torch.int64).reshape(-1)
        if len(t) != n:
            raise ReidError(f"evaluate: '{name}' has {len(t)} entries, expected {n} (one per feature row)")
        labels.append(t)
    for name, t in (("query_features", q), ("gallery_features", g)):
        if len(t) == 0:
            raise ReidError(f"evaluate: '{name}' is empty")
        if not bool(torch.isfinite(t).all()):
            raise ReidError(f"evaluate: '{name}' contains NaN or inf")
    return (q, g, *labels)


def _unit_rows_(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the rows of `x` in place (x must be our own copy)."""
    return x.div_(x.norm(dim=1, keepdim=True).clamp_(min=1e-12))


def pairwise_similarity(a, b) -> torch.Tensor:
    """Cosine similarity: a (n, D), b (m, D) → (n, m) float32 on a's device (rows re-normalised)."""
    device = a.device if isinstance(a, torch.Tensor) else torch.device("cpu")
    a = F.normalize(_tensor(a, "a", device, torch.float32), dim=1)
    b = F.normalize(_tensor(b, "b", device, torch.float32), dim=1)
    return a @ b.T


def auto_chunk_size(num_gallery: int, budget_bytes: int = _CHUNK_BYTES) -> int:
    return max(1, min(4096, budget_bytes // max(1, 12 * num_gallery)))


class _GalleryByIdentity:
    """The gallery permuted so each identity is one contiguous slice [start, end): a query's
    matches are then found by two binary searches instead of an (Qc, G) comparison."""

    def __init__(self, pids: torch.Tensor, cams: torch.Tensor):
        self.order = torch.argsort(pids, stable=True)
        self.pids, self.cams = pids[self.order], cams[self.order]

    def positive_sims(self, sims: torch.Tensor, qpids: torch.Tensor, qcams: torch.Tensor):
        """sims (Qc, G) in gallery-by-identity order → (ascending positive sims padded with +inf
        (Qc, Pmax), positives per query (Qc,)); sets every match (positive or junk) in `sims` to -inf."""
        start = torch.searchsorted(self.pids, qpids)
        count = torch.searchsorted(self.pids, qpids, right=True) - start
        count = torch.where(qpids < 0, torch.zeros_like(count), count)  # unknown identity: no matches
        width = int(count.max()) if len(count) else 0
        if width == 0:
            return sims.new_full((len(sims), 0), math.inf), count
        slot = torch.arange(width, device=sims.device)
        inside = slot[None, :] < count[:, None]
        first = start.clamp(max=len(self.pids) - 1)[:, None]
        cols = torch.where(inside, start[:, None] + slot[None, :], first)
        positive = inside & (self.cams[cols] != qcams[:, None])
        current = sims.gather(1, cols)
        pos_sims = torch.where(positive, current, math.inf)
        # Matches leave the negatives' histogram by dropping below every positive (bucket 0, never read).
        # Padding slots repeat the row's first column and write the same value there, so the scatter is
        # deterministic: -inf where the row has matches, the unchanged similarity where it has none.
        sims.scatter_(1, cols, torch.where((count > 0)[:, None], -math.inf, current))
        return torch.sort(pos_sims, dim=1).values, positive.sum(1)


def _chunk_ranks(sims: torch.Tensor, pos_sims: torch.Tensor, num_pos: torch.Tensor):
    """→ (AP (Qc,), rank of the first positive (Qc,)), for rows with num_pos > 0 (others: garbage).

    `sims` (Qc, G) has matches at -inf; `pos_sims` (Qc, Pmax) ascending, padded with +inf.
    bucket_j = #positives with sim ≤ s_j, so negative j is above the k-th best positive iff
    bucket_j ≥ P + 1 − k (ties: the negative first).
    """
    qc, pmax = pos_sims.shape
    if pmax == 0:  # no query of this chunk has a positive
        return torch.zeros(qc, dtype=torch.float64, device=sims.device), torch.ones_like(num_pos)
    bucket = torch.searchsorted(pos_sims, sims, right=True)
    hist = torch.zeros(qc, pmax + 1, dtype=torch.int64, device=sims.device)
    hist.scatter_add_(1, bucket, torch.ones(1, 1, dtype=torch.int64, device=sims.device).expand_as(bucket))
    above = hist.flip(1).cumsum(1).flip(1)  # above[:, c] = #negatives with bucket ≥ c
    k = torch.arange(1, pmax + 1, device=sims.device, dtype=torch.float64)
    valid = k[None, :] <= num_pos[:, None]
    c = (num_pos[:, None] + 1 - k[None, :].long()).clamp(0, pmax)
    neg_above = above.gather(1, c)
    precision = torch.where(valid, k[None, :] / (k[None, :] + neg_above), torch.zeros((), device=sims.device))
    ap = precision.sum(1, dtype=torch.float64) / num_pos.clamp(min=1)
    return ap, 1 + neg_above[:, 0]


def _metrics(similarity_chunk: Callable[[int, int], torch.Tensor], num_queries: int,
             gallery: _GalleryByIdentity, query_pids, query_cams, chunk_size, max_rank) -> dict:
    """`similarity_chunk(lo, hi)` → (hi - lo, G) similarities in gallery-by-identity column order."""
    if max_rank < 1:
        raise ReidError(f"evaluate: max_rank must be at least 1, got {max_rank}")
    chunk = chunk_size or auto_chunk_size(len(gallery.pids))
    aps, firsts, valid = [], [], []
    for lo in range(0, num_queries, chunk):
        hi = min(num_queries, lo + chunk)
        sims = similarity_chunk(lo, hi)
        pos_sims, num_pos = gallery.positive_sims(sims, query_pids[lo:hi], query_cams[lo:hi])
        ap, first = _chunk_ranks(sims, pos_sims, num_pos)
        aps.append(ap)
        firsts.append(first)
        valid.append(num_pos > 0)
        del sims
    valid = torch.cat(valid)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ReidError(f"evaluate: none of the {num_queries} queries has a gallery image of its identity "
                        f"from another camera (check the query/gallery split, pids and cams)")
    ap, first = torch.cat(aps)[valid], torch.cat(firsts)[valid]
    # Every value is a plain number (callers do `float(v)` over the dict); CMC at 1, 5, 10 and max_rank.
    result = {"mAP": ap.mean().item()}
    for r in sorted({1, 5, 10, max_rank}):
        result[f"rank{r}"] = (first <= r).double().mean().item()
    return {**result, "valid_queries": n_valid, "skipped_queries": num_queries - n_valid}


def evaluate(query_features, gallery_features, query_pids, gallery_pids, query_cams, gallery_cams,
             *, chunk_size: int | None = None, max_rank: int = 10) -> dict:
    """Exact mAP and CMC with the standard rule (module docstring).

    query_features (Q, D), gallery_features (G, D): L2-normalised, torch (any device) or numpy.
    query_pids/query_cams (Q,), gallery_pids/gallery_cams (G,): integers.
    chunk_size: queries per chunk (default: ~256 MiB of working memory).
    → {"mAP", "rank1", "rank5", "rank10" (and "rank<max_rank>"): float in [0, 1],
       "valid_queries": int, "skipped_queries": int}. Raises ReidError when no query is valid.
    """
    q, g, qp, gp, qc, gc = _prepare(query_features, gallery_features, query_pids, gallery_pids,
                                    query_cams, gallery_cams)
    gallery = _GalleryByIdentity(gp, gc)
    g_sorted = _unit_rows_(g[gallery.order])  # the only copy of the gallery: (G, D) in identity order
    del g
    return _metrics(lambda lo, hi: F.normalize(q[lo:hi], dim=1) @ g_sorted.T, len(q), gallery, qp, qc,
                    chunk_size, max_rank)


def evaluate_distances(distances, query_pids, gallery_pids, query_cams, gallery_cams,
                       *, chunk_size: int | None = None, max_rank: int = 10) -> dict:
    """Same metrics from a precomputed (Q, G) distance matrix (smaller = closer), e.g. `reid.rerank.rerank`."""
    device = distances.device if isinstance(distances, torch.Tensor) else torch.device("cpu")
    d = _tensor(distances, "distances", device, torch.float32)
    if d.dim() != 2 or not bool(torch.isfinite(d).all()):
        raise ReidError(f"evaluate: 'distances' must be a finite (Q, G) matrix, got shape {tuple(d.shape)}")
    qp, gp, qc, gc = (_tensor(x, n, device, torch.int64).reshape(-1) for x, n in (
        (query_pids, "query_pids"), (gallery_pids, "gallery_pids"),
        (query_cams, "query_cams"), (gallery_cams, "gallery_cams")))
    if len(qp) != d.shape[0] or len(qc) != d.shape[0] or len(gp) != d.shape[1] or len(gc) != d.shape[1]:
        raise ReidError(f"evaluate: distances {tuple(d.shape)} do not match {len(qp)} query and "
                        f"{len(gp)} gallery labels")
    gallery = _GalleryByIdentity(gp, gc)
    return _metrics(lambda lo, hi: -d[lo:hi][:, gallery.order], d.shape[0], gallery, qp, qc, chunk_size, max_rank)


def top_matches(query_features, gallery_features, query_pids=None, gallery_pids=None, query_cams=None,
                gallery_cams=None, *, k: int = 10, chunk_size: int | None = None) -> torch.Tensor:
    """→ (Q, min(k, G)) gallery indices, most similar first, for pictures and search results.
    With labels given, same-identity-same-camera junk is left out as in `evaluate` (rows that run
    out of non-junk gallery images are padded with -1)."""
    labelled = query_pids is not None
    if labelled:
        q, g, qp, gp, qc, gc = _prepare(query_features, gallery_features, query_pids, gallery_pids,
                                        query_cams, gallery_cams)
    else:
        q = _tensor(query_features, "query_features", None, torch.float32)
        g = _tensor(gallery_features, "gallery_features", q.device, torch.float32)
    q, g = F.normalize(q, dim=1), F.normalize(g, dim=1)
    k = min(k, len(g))
    chunk = chunk_size or auto_chunk_size(len(g))
    out = []
    for lo in range(0, len(q), chunk):
        sims = q[lo:lo + chunk] @ g.T
        if labelled:
            junk = (qp[lo:lo + chunk, None] == gp[None]) & (qc[lo:lo + chunk, None] == gc[None])
            sims.masked_fill_(junk, -math.inf)
        values, idx = sims.topk(k, dim=1)
        out.append(torch.where(torch.isinf(values), torch.full_like(idx, -1), idx))
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.int64)


def rank1_same_vs_cross_camera(query_features, gallery_features, query_pids, gallery_pids, query_cams,
                               gallery_cams, *, query_gallery_index=None, chunk_size: int | None = None) -> dict:
    """The camera domain gap as two Rank-1 numbers (a diagnostic; needs identities, never fed to a loss).

    same_camera_rank1: each query searches only the gallery images from *its own* camera, minus
      itself (``query_gallery_index[i]`` = the gallery row of query i, or -1 if absent; pass it when
      query and gallery overlap). A query counts when its identity has at least one such image.
    cross_camera_rank1: each query searches only gallery images from *other* cameras; it counts when
      its identity has at least one image there.
    Hit: the best image of the query's identity is strictly more similar than every other identity's
    image in that restricted gallery (ties count as misses, as in `evaluate`). No junk rule here.
    → {"same_camera_rank1", "cross_camera_rank1": float or nan when no query counts,
       "same_camera_queries", "cross_camera_queries": int}.
    """
    q, g, qp, gp, qc, gc = _prepare(query_features, gallery_features, query_pids, gallery_pids,
                                    query_cams, gallery_cams)
    q, g = F.normalize(q, dim=1), F.normalize(g, dim=1)
    self_idx = (torch.full_like(qp, -1) if query_gallery_index is None
                else _tensor(query_gallery_index, "query_gallery_index", q.device, torch.int64).reshape(-1))
    if len(self_idx) != len(q):
        raise ReidError(f"evaluate: 'query_gallery_index' has {len(self_idx)} entries, expected {len(q)}")
    chunk = chunk_size or auto_chunk_size(len(g))
    hits = {"same": 0, "cross": 0}
    counted = {"same": 0, "cross": 0}
    cols = torch.arange(len(g), device=q.device)
    for lo in range(0, len(q), chunk):
        hi = min(len(q), lo + chunk)
        sims = q[lo:hi] @ g.T
        same_cam = qc[lo:hi, None] == gc[None]
        not_self = cols[None] != self_idx[lo:hi, None]
        match = (qp[lo:hi, None] == gp[None]) & (qp[lo:hi, None] >= 0)
        for name, allowed in (("same", same_cam & not_self), ("cross", ~same_cam)):
            best_pos = sims.masked_fill(~(allowed & match), -math.inf).amax(1)
            best_neg = sims.masked_fill(~(allowed & ~match), -math.inf).amax(1)
            has_pos = (allowed & match).any(1)
            counted[name] += int(has_pos.sum())
            hits[name] += int((has_pos & (best_pos > best_neg)).sum())
    rate = {n: hits[n] / counted[n] if counted[n] else float("nan") for n in hits}
    return {"same_camera_rank1": rate["same"], "cross_camera_rank1": rate["cross"],
            "same_camera_queries": counted["same"], "cross_camera_queries": counted["cross"]}
