"""Exact mAP / mINP / CMC for re-identification, chunked over queries (DESIGN §5, issue 4 item 6, issue 12 item 2).

Standard rule: for a query of identity ``p`` seen by camera ``c``, gallery images of identity ``p``
*and* camera ``c`` are junk (ignored, neither hit nor miss); positives are the gallery images of ``p``
from other cameras; everything else is a negative. A query with no positive is skipped and counted.
Identities < 0 mean "unknown": such queries are skipped, such gallery images are always negatives.

Ranks: the k-th best positive of a query (k = 1..P) has rank k + (number of negatives with a similarity
≥ its own). So ties between a negative and a positive rank the negative *first* (pessimistic: it never
inflates a score, and the result does not depend on the order of the gallery); ties between positives,
or between negatives, change nothing. AP = mean over k of k / rank_k; CMC counts the rank of the best
positive; mINP averages P / rank_P (rank of the hardest positive, Ye et al. 2021).

How it stays exact without sorting the gallery. Per query chunk the (Qc, G) similarities are computed
once (the unavoidable matrix product). Negatives above a positive = items with a similarity ≥ it, minus
the query's matches (positives + junk: a few, found through the gallery grouped by identity). Items ≥
each positive are counted in one pass: every similarity gets a bin between the query's lowest and highest
positive (`_bin_keys`, monotone in the similarity), a histogram counts the bins above a positive's bin,
and only the few items that share a bin with a positive are compared exactly (`_count_at_least`).
Working memory is ~12 bytes per (query, gallery) pair of one chunk, allocated once; a float32 tensor
gallery is never copied.

Similarity is the cosine of the float32 features (query rows re-normalised, gallery columns scaled by
1/‖g‖), so the ranking equals the Euclidean-distance ranking of L2-normalised features. Everything runs
on the device of `query_features`; numpy inputs run on the CPU.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from reid.errors import ReidError

_CHUNK_BYTES = 256 * 2**20  # working set per query chunk: ~12 bytes per (query, gallery) pair
_BINS = 4096  # similarity bins per query between its lowest and highest positive (`_bin_keys`)


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
        if not _all_finite(t):
            raise ReidError(f"evaluate: '{name}' contains NaN or inf")
    return (q, g, *labels)


def _all_finite(x: torch.Tensor) -> bool:
    """Finite row norms mean finite entries; only a non-finite norm (or an overflow) pays the full check,
    which allocates a (rows, D) mask: seconds for a 128,000 × 2,048 gallery."""
    return bool(torch.isfinite(torch.linalg.vector_norm(x, dim=-1)).all()) or bool(torch.isfinite(x).all())


def pairwise_similarity(a, b) -> torch.Tensor:
    """Cosine similarity: a (n, D), b (m, D) → (n, m) float32 on a's device (rows re-normalised)."""
    device = a.device if isinstance(a, torch.Tensor) else torch.device("cpu")
    a = F.normalize(_tensor(a, "a", device, torch.float32), dim=1)
    b = F.normalize(_tensor(b, "b", device, torch.float32), dim=1)
    return a @ b.T


def auto_chunk_size(num_gallery: int, budget_bytes: int = _CHUNK_BYTES) -> int:
    return max(1, min(4096, budget_bytes // max(1, 12 * num_gallery)))


class _GalleryByIdentity:
    """Gallery indices grouped by identity: a query's matches (positives and junk) are one slice,
    found by two binary searches instead of a (Qc, G) comparison."""

    def __init__(self, pids: torch.Tensor, cams: torch.Tensor):
        self.order = torch.argsort(pids, stable=True)
        self.pids, self.cams = pids[self.order], cams[self.order]

    def matches(self, qpids: torch.Tensor, qcams: torch.Tensor):
        """qpids, qcams (Qc,) → cols (Qc, M) gallery indices of each query's identity (padded with a
        valid index), is_match (Qc, M) for the real entries, is_positive (Qc, M) those from another camera."""
        start = torch.searchsorted(self.pids, qpids)
        count = torch.searchsorted(self.pids, qpids, right=True) - start
        count = torch.where(qpids < 0, torch.zeros_like(count), count)  # unknown identity: no matches
        width = int(count.max()) if len(count) else 0
        slot = torch.arange(width, device=qpids.device)
        is_match = slot[None, :] < count[:, None]
        at = torch.where(is_match, start[:, None] + slot[None, :], torch.zeros_like(is_match, dtype=torch.int64))
        is_positive = is_match & (self.cams[at] != qcams[:, None])
        return self.order[at], is_match, is_positive


def _bin_keys(sims: torch.Tensor, thresholds: torch.Tensor, valid: torch.Tensor, scratch: torch.Tensor,
              keys: torch.Tensor) -> torch.Tensor:
    """sims (Qc, G), thresholds (Qc, T) with valid (Qc, T) → keys (Qc, G) int32, row·(_BINS + 2) + bin,
    written into `keys` by way of `scratch` (Qc, G) float32 (buffers reused across chunks: a fresh
    100 MB tensor per chunk costs as much as the arithmetic, in page faults).

    Bin 1.._BINS spans [lowest, highest] valid threshold of the row, 0 is below, _BINS + 1 above. Every
    step (subtract, scale by a positive number, clamp, truncate) is monotone, so within a row a larger
    similarity never gets a smaller key: keys decide every comparison except between items of one bin.
    """
    has_any = valid.any(1, keepdim=True)
    lo = torch.where(valid, thresholds, math.inf).amin(1, keepdim=True)
    hi = torch.where(valid, thresholds, -math.inf).amax(1, keepdim=True)
    lo, hi = torch.where(has_any, lo, 0.0), torch.where(has_any, hi, 0.0)
    # Finite and positive whatever the spread (no 0·inf = nan); the highest threshold lands in bin ≤ _BINS.
    scale = (_BINS - 1) / (hi - lo).clamp_(min=1e-30, max=1e30)
    torch.sub(sims, lo, out=scratch).mul_(scale).clamp_(-1, _BINS)
    rows = torch.arange(len(sims), device=sims.device, dtype=torch.int32)[:, None]
    return keys.copy_(scratch).add_(rows * (_BINS + 2) + 1)  # copy_ truncates toward zero


def _count_at_least(sims: torch.Tensor, thresholds: torch.Tensor, threshold_cols: torch.Tensor,
                    valid: torch.Tensor, scratch: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Exact number of items per row with a similarity ≥ each threshold, without sorting the rows.

    sims (Qc, G); thresholds (Qc, T), entries of `sims` at columns threshold_cols (Qc, T); valid (Qc, T)
    → (Qc, T) int64 (entries where not valid: meaningless). scratch, keys: buffers as in `_bin_keys`.
    """
    qc, g = sims.shape
    keys = _bin_keys(sims, thresholds, valid, scratch, keys)
    threshold_keys = keys.gather(1, threshold_cols).long()
    shared = torch.zeros(qc * (_BINS + 2), dtype=torch.bool, device=sims.device)
    shared[threshold_keys[valid]] = True
    # Items in a bin no threshold shares: above a threshold iff their bin is (one histogram).
    hist = torch.bincount(keys.view(-1), minlength=len(shared)).masked_fill_(shared, 0)
    at_or_above = hist.view(qc, -1).flip(1).cumsum(1).flip(1).view(-1)
    count = at_or_above[threshold_keys]
    # Items sharing a bin with some threshold (a few per threshold): compared exactly, row by row.
    near = shared.index_select(0, keys.view(-1)).nonzero().squeeze(1)
    row, values = near // g, sims.view(-1)[near]
    per_row = torch.bincount(row, minlength=qc)
    width = int(per_row.max()) if len(near) else 0
    slot = torch.arange(len(near), device=sims.device) - (per_row.cumsum(0) - per_row)[row]
    padded = sims.new_full((qc, width), -math.inf)
    padded[row, slot] = values
    padded = padded.sort(dim=1).values
    return count + width - torch.searchsorted(padded, thresholds)  # left side: first index ≥ threshold


def _positive_ranks(sims: torch.Tensor, cols: torch.Tensor, is_match: torch.Tensor, is_positive: torch.Tensor,
                    scratch: torch.Tensor, keys: torch.Tensor):
    """sims (Qc, G); cols, is_match, is_positive (Qc, M) from `_GalleryByIdentity.matches`
    → ranks (Qc, M) int64 of each query's positives, best first (entries k > num_pos: meaningless),
    num_pos (Qc,). scratch, keys: buffers as in `_bin_keys`."""
    match_sims = sims.gather(1, cols)
    pos_sims, order = torch.where(is_positive, match_sims, -math.inf).sort(dim=1, descending=True)
    num_pos = is_positive.sum(1)
    k = torch.arange(1, cols.shape[1] + 1, device=sims.device)
    valid = k[None, :] <= num_pos[:, None]
    at_least = _count_at_least(sims, pos_sims, cols.gather(1, order), valid, scratch, keys)
    matches_sorted = torch.where(is_match, match_sims, -math.inf).sort(dim=1).values
    matches_at_least = cols.shape[1] - torch.searchsorted(matches_sorted, pos_sims)
    return k[None, :] + (at_least - matches_at_least), num_pos


def _metrics(similarity_chunk: Callable[[int, int, torch.Tensor], torch.Tensor], num_queries: int,
             gallery: _GalleryByIdentity, query_pids, query_cams, chunk_size, max_rank) -> dict:
    """`similarity_chunk(lo, hi, out)` writes the (hi - lo, G) similarities of queries lo..hi-1 to the
    gallery into `out` and returns it."""
    if max_rank < 1:
        raise ReidError(f"evaluate: max_rank must be at least 1, got {max_rank}")
    # At most 2**31 / (_BINS + 2) queries per chunk: the (row, bin) keys are int32.
    chunk = max(1, min(num_queries, chunk_size or auto_chunk_size(len(gallery.pids)), 2**31 // (_BINS + 2)))
    # The working memory, ~12 bytes per (query, gallery) pair of a chunk, allocated once.
    sims_buf = torch.empty(chunk, len(gallery.pids), device=query_pids.device)
    scratch, keys = torch.empty_like(sims_buf), torch.empty_like(sims_buf, dtype=torch.int32)
    aps, inps, firsts, valid = [], [], [], []
    for lo in range(0, num_queries, chunk):
        hi = min(num_queries, lo + chunk)
        cols, is_match, is_positive = gallery.matches(query_pids[lo:hi], query_cams[lo:hi])
        if cols.shape[1] == 0:  # no query of this chunk has a gallery image of its identity
            cols, is_match, is_positive = (torch.zeros(hi - lo, 1, dtype=x.dtype, device=x.device)
                                           for x in (cols, is_match, is_positive))
        sims = similarity_chunk(lo, hi, sims_buf[:hi - lo])
        ranks, num_pos = _positive_ranks(sims, cols, is_match, is_positive, scratch[:hi - lo], keys[:hi - lo])
        k = torch.arange(1, ranks.shape[1] + 1, device=ranks.device, dtype=torch.float64)
        precision = torch.where(k[None, :] <= num_pos[:, None], k[None, :] / ranks, 0.0)
        aps.append(precision.sum(1, dtype=torch.float64) / num_pos.clamp(min=1))
        last = ranks.gather(1, (num_pos - 1).clamp(min=0)[:, None])[:, 0]
        inps.append(num_pos.double() / last)
        firsts.append(ranks[:, 0])
        valid.append(num_pos > 0)
    valid = torch.cat(valid)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ReidError(f"evaluate: none of the {num_queries} queries has a gallery image of its identity "
                        f"from another camera (check the query/gallery split, pids and cams)")
    first = torch.cat(firsts)[valid]
    # Every value is a plain number (callers do `float(v)` over the dict); CMC at 1, 5, 10 and max_rank.
    result = {"mAP": torch.cat(aps)[valid].mean().item(), "mINP": torch.cat(inps)[valid].mean().item()}
    for r in sorted({1, 5, 10, max_rank}):
        result[f"rank{r}"] = (first <= r).double().mean().item()
    return {**result, "valid_queries": n_valid, "skipped_queries": num_queries - n_valid}


def evaluate(query_features, gallery_features, query_pids, gallery_pids, query_cams, gallery_cams,
             *, chunk_size: int | None = None, max_rank: int = 10) -> dict:
    """Exact mAP, mINP and CMC with the standard rule and the tie rule of the module docstring.

    query_features (Q, D), gallery_features (G, D): torch (any device) or numpy; rows need not be unit.
    query_pids/query_cams (Q,), gallery_pids/gallery_cams (G,): integers.
    chunk_size: queries per chunk (default: ~256 MiB of working memory).
    → {"mAP", "mINP", "rank1", "rank5", "rank10" (and "rank<max_rank>"): float in [0, 1],
       "valid_queries": int, "skipped_queries": int}. Raises ReidError when no query is valid.
    """
    q, g, qp, gp, qc, gc = _prepare(query_features, gallery_features, query_pids, gallery_pids,
                                    query_cams, gallery_cams)
    inv_norm = 1.0 / torch.linalg.vector_norm(g, dim=1).clamp_(min=1e-12)  # (G,): no copy of the gallery

    def similarity_chunk(lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        return torch.matmul(F.normalize(q[lo:hi], dim=1), g.T, out=out).mul_(inv_norm)

    return _metrics(similarity_chunk, len(q), _GalleryByIdentity(gp, gc), qp, qc, chunk_size, max_rank)


def evaluate_distances(distances, query_pids, gallery_pids, query_cams, gallery_cams,
                       *, chunk_size: int | None = None, max_rank: int = 10) -> dict:
    """Same metrics from a precomputed (Q, G) distance matrix (smaller = closer), e.g. `reid.rerank.rerank`."""
    device = distances.device if isinstance(distances, torch.Tensor) else torch.device("cpu")
    d = _tensor(distances, "distances", device, torch.float32)
    if d.dim() != 2 or not _all_finite(d):
        raise ReidError(f"evaluate: 'distances' must be a finite (Q, G) matrix, got shape {tuple(d.shape)}")
    qp, gp, qc, gc = (_tensor(x, n, device, torch.int64).reshape(-1) for x, n in (
        (query_pids, "query_pids"), (gallery_pids, "gallery_pids"),
        (query_cams, "query_cams"), (gallery_cams, "gallery_cams")))
    if len(qp) != d.shape[0] or len(qc) != d.shape[0] or len(gp) != d.shape[1] or len(gc) != d.shape[1]:
        raise ReidError(f"evaluate: distances {tuple(d.shape)} do not match {len(qp)} query and "
                        f"{len(gp)} gallery labels")
    return _metrics(lambda lo, hi, out: torch.neg(d[lo:hi], out=out), d.shape[0], _GalleryByIdentity(gp, gc),
                    qp, qc, chunk_size, max_rank)


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
