"""The CTACL loss on one process, exactly as DESIGN.md §3, vectorised over anchors.

Notation (DESIGN §3): anchors ``f_i`` (B, D), memory rows ``m_j`` (N, D), logits ``s_ij = f_i·m_j/τ``;
``A_i`` same-camera rows, ``P_i`` same camera and tracklet, hard positive ``h_i`` = row of ``P_i`` with the
lowest ``s``, ``O_i`` other-camera rows ranked by ``r_ij = h_i·m_j``, ``H_i``/``E_i`` top-K of ``O_i`` by
``r``/``s``, grey zone = top-⌊ρ|O_i|⌋ of ``O_i`` by ``r``, ``N_i`` = the rest of ``O_i``.

How it is computed: ``h_i`` needs ``s`` only on the few rows of ``P_i``, so it is picked first and
``s`` and ``r`` come from one (2B, D)·(D, N) product (the memory is read once). One no-grad pass over
them yields the loss value *and* ``dL/ds`` (B, N); a small autograd Function hands ``dL/ds · M / τ`` to
``features`` in backward, so autograd never stores (B, N) intermediates. Beyond the products: one top-k
over ``r`` (hard positives and grey-zone cut together), a top-K over ``s``, a few elementwise passes and
one pass over the memory for the camera centroids: 1.1-1.2x the bare products at VeRi-776 and VeRi-Wild
scale (benchmarks/loss_step.py). Extra memory: two float and three bool (B, N) buffers, never O(N²).
The multisets of §3 become integer weights per (anchor, row): a row picked as both hard and easy
positive weighs 2 in the numerator and, being also in ``N_i`` unless in the grey zone, up to 3 in the
denominator ("an entry chosen twice counts twice").

Camera term: ``L_cam(i) = KL(uniform ‖ softmax(f_i·Cᵀ))`` with **no temperature**, literally as DESIGN §3
writes it (the original code is not available to check). With unit vectors the logits lie in [-1, 1], so
this term is small and gentle; a temperature would be a one-line change in ``camera_alignment_loss``.

The shared pieces live in ``reid.loss_terms`` (re-exported here), so the camera-sharded loss agrees with
this one exactly: ``positive_pairs``, ``hardest_positive_rows``, ``grey_zone_sizes``, ``grey_zone_thresholds``,
``log_denominator``, ``camera_centroids`` and ``camera_alignment_loss``.
"""

from __future__ import annotations

import math

import torch

from reid.errors import ReidError
from reid.loss_terms import (ThroughLogits, camera_alignment_loss, camera_centroids, grey_zone_sizes,  # noqa: F401
                             grey_zone_thresholds, hardest_positive_rows, log_denominator, positive_pairs)

__all__ = [
    "ctacl_loss", "ctacl_loss_parts", "positive_pairs", "hardest_positive_rows", "grey_zone_sizes",
    "grey_zone_thresholds", "log_denominator", "camera_centroids", "camera_alignment_loss", "ThroughLogits",
]


# ----------------------------------------------------------------------------------------- the loss


def _scores(memory, *xs, chunk_elements=1 << 22):
    """``x·Mᵀ`` for each x (R_k, D) as contiguous (R_k, N) tensors (at least float32), from one product.

    memory: (N, D). One product with the stacked xs reads the N×D memory once. It is computed as
    ``(M·xᵀ)ᵀ`` over chunks of memory rows: on CPU (MKL) the (n, D)·(D, R) product plus a transposed
    copy is ~1.5x faster than (R, D)·(D, N) with a transposed operand, and chunks keep the transposed
    temporary small (measured in benchmarks/loss_step.py).
    """
    x = torch.cat(xs) if len(xs) > 1 else xs[0]
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    outs = [torch.empty(part.shape[0], memory.shape[0], dtype=dtype, device=x.device) for part in xs]
    step = max(1, chunk_elements // max(1, x.shape[0]))
    for start in range(0, memory.shape[0], step):
        block = (memory[start:start + step] @ x.T).T
        for out, part in zip(outs, block.split([o.shape[0] for o in outs])):
            out[:, start:start + step].copy_(part)
    return outs


def _check(features, cams, tracklets, memory, memory_cams, memory_tracklets, temperature, ks, grey_zone):
    def fail(what, given, expected):
        raise ReidError(f"ctacl_loss: {what} is {given}, expected {expected}")

    if features.dim() != 2 or features.shape[0] == 0:
        fail("features shape", tuple(features.shape), "(B, D) with B >= 1")
    if memory.dim() != 2 or memory.shape[0] == 0 or memory.shape[1] != features.shape[1]:
        fail("memory shape", tuple(memory.shape), f"(N, {features.shape[1]}) with N >= 1")
    if not (features.is_floating_point() and memory.is_floating_point()):
        fail("features/memory dtype", f"{features.dtype}/{memory.dtype}", "floating point")
    for name, t, n in (("cams", cams, features.shape[0]), ("tracklets", tracklets, features.shape[0]),
                       ("memory_cams", memory_cams, memory.shape[0]),
                       ("memory_tracklets", memory_tracklets, memory.shape[0])):
        if t.shape != (n,) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            fail(name, f"{tuple(t.shape)} {t.dtype}", f"({n},) integer")
    if not temperature > 0:
        fail("temperature", temperature, "> 0")
    for name, k in ks.items():
        if not (isinstance(k, int) and k >= 0):
            fail(name, k, "an integer >= 0")
    if not 0 <= grey_zone < 1:
        fail("grey_zone", grey_zone, "in [0, 1)")


def _ctacl(features, cams, tracklets, memory, memory_cams, memory_tracklets, *, temperature=0.07, topk=5,
           grey_zone=0.01, cam_weight=0.2, warmup=False, hard_topk=None, easy_topk=None, centroids=None,
           with_parts=False):
    hard_k = topk if hard_topk is None else hard_topk
    easy_k = topk if easy_topk is None else easy_topk
    _check(features, cams, tracklets, memory, memory_cams, memory_tracklets, temperature,
           {"topk": topk, "hard_topk": hard_k, "easy_topk": easy_k}, grey_zone)
    cams, tracklets = cams.long(), tracklets.long()
    memory_cams, memory_tracklets = memory_cams.long(), memory_tracklets.long()
    memory = memory.detach()
    b, n = features.shape[0], memory.shape[0]

    with torch.no_grad():
        anchor_index, row_index, n_pos = positive_pairs(cams, tracklets, memory_cams, memory_tracklets)
        if bool((n_pos == 0).any()):
            bad = torch.nonzero(n_pos == 0).flatten()[:5].tolist()
            raise ReidError(f"ctacl_loss: anchors {bad} have no memory row of their own camera and tracklet "
                            "(P_i is empty), expected each anchor's own row to be in memory")
        camera_ids, camera_rows = torch.unique(memory_cams, return_counts=True)
        slot = torch.searchsorted(camera_ids, cams).clamp(max=camera_ids.numel() - 1)
        n_same = torch.where(camera_ids[slot] == cams, camera_rows[slot], 0)  # |A_i| (≥ |P_i| ≥ 1)
        n_other = n - n_same

        # s = f·Mᵀ/τ, computed in the memory's precision (a bf16 memory bank stays bf16 in the product).
        scaled = features.detach().to(memory.dtype) * (1.0 / temperature)
        if warmup:
            (logits,) = _scores(memory, scaled)  # s = f·Mᵀ/τ, (B, N)
        else:
            # h_i needs s only on the few rows of P_i, so pick it first and get s and r = h·Mᵀ from one
            # product with M: (2B, D)·(D, N) reads the N×D memory once instead of twice.
            pair_logits = (scaled[anchor_index] * memory[row_index]).sum(1)
            hard_rows = hardest_positive_rows(pair_logits, anchor_index, row_index, b)
            logits, ranking = _scores(memory, scaled, memory[hard_rows])  # (B, N) each
        pos_logits = logits[anchor_index, row_index]
        pos_sum = logits.new_zeros(b).index_add_(0, anchor_index, pos_logits)
        if warmup:
            terms = _intra_terms(logits, cams, memory_cams, anchor_index, row_index, n_pos, pos_sum)
        else:
            terms = _full_terms(logits, ranking, cams, memory_cams, anchor_index, row_index, n_pos, n_other,
                                pos_sum, hard_k, easy_k, grey_zone, with_parts)
            del ranking
        value, grad_logits = terms["per_anchor"].mean(), terms["grad_logits"]

    loss = ThroughLogits.apply(features, value.to(features.dtype), grad_logits, memory, 1.0 / temperature)
    cam = None
    if not warmup and (cam_weight != 0 or with_parts):
        if centroids is None:
            centroids = camera_centroids(memory, memory_cams)[1]
        with torch.set_grad_enabled(cam_weight != 0 and torch.is_grad_enabled()):
            cam = camera_alignment_loss(features, centroids.detach().to(features.dtype)).mean()
        if cam_weight != 0:
            loss = loss + cam_weight * cam
    if not with_parts:
        return {"loss": loss}

    zero = value.new_zeros(())
    empty = torch.empty(b, 0, dtype=torch.long, device=features.device)
    return {
        "loss": loss,
        "intra": (value if warmup else terms["intra"]).detach(),
        "inter": zero if warmup else value.detach(),
        "cam": zero if cam is None else cam.detach(),
        "counts": {"positives": n_pos, "same_camera": n_same, "other_camera": n_other,
                   "hard": terms.get("n_hard", torch.zeros_like(n_pos)),
                   "easy": terms.get("n_easy", torch.zeros_like(n_pos)),
                   "grey": terms.get("n_grey", torch.zeros_like(n_pos)),
                   "cameras": camera_ids.numel()},
        "hard_ids": terms.get("hard_ids", empty),
        "easy_ids": terms.get("easy_ids", empty),
    }


def _intra_terms(logits, cams, memory_cams, anchor_index, row_index, n_pos, pos_sum):
    """Warm-up: ``L_intra(i) = −mean_{p∈P_i} s_ip + log Σ_{k∈A_i} exp s_ik`` and its dL/ds. Consumes logits."""
    b = logits.shape[0]
    logits.masked_fill_(cams[:, None] != memory_cams[None, :], -math.inf)  # keep A_i only
    shift = logits.amax(1)
    e = logits.sub_(shift[:, None]).exp_()
    z = e.sum(1)
    per_anchor = shift + torch.log(z) - pos_sum / n_pos
    grad = e.mul_((1.0 / (b * z))[:, None])  # softmax over A_i, already divided by B for the mean
    grad.index_put_((anchor_index, row_index), -(1.0 / (b * n_pos.to(grad.dtype)))[anchor_index], accumulate=True)
    return {"per_anchor": per_anchor, "grad_logits": grad}


def _full_terms(logits, ranking, cams, memory_cams, anchor_index, row_index, n_pos, n_other, pos_sum, hard_k,
                easy_k, grey_zone, with_parts):
    """Full mode: ``L_cl(i)`` (multisets Π_i, Δ_i of DESIGN §3) and its dL/ds (B, N).

    logits: s (B, N); ranking: r = h·Mᵀ (B, N). Both buffers are consumed (overwritten).
    """
    b, n = logits.shape
    same_cam = cams[:, None] == memory_cams[None, :]  # A_i, (B, N) bool

    # r over O_i; one sorted top-k serves both H_i (first hard_k) and the grey-zone cut.
    ranking.masked_fill_(same_cam, -math.inf)
    n_grey = grey_zone_sizes(n_other, grey_zone)
    depth = min(max(hard_k, int(n_grey.max())), n)
    ranked_values, ranked_ids = ranking.topk(depth, dim=1, sorted=True)
    threshold = grey_zone_thresholds(ranked_values, n_grey)
    grey = ranking >= threshold[:, None]

    # E_i: top-k of O_i by s. The ranking buffer is free now; reuse it for s restricted to O_i.
    easy_k = min(easy_k, n)
    other_logits = torch.where(same_cam, logits.new_tensor(-math.inf), logits, out=ranking) if easy_k else None
    if easy_k:
        easy_ids = other_logits.topk(easy_k, dim=1).indices
    else:
        easy_ids = torch.empty(b, 0, dtype=torch.long, device=logits.device)
    hard_ids = ranked_ids[:, :min(hard_k, n)]
    # Fewer than K other-camera rows: only the first |O_i| picks exist (the rest are -inf fillers).
    hard_ok = torch.arange(hard_ids.shape[1], device=logits.device)[None, :] < n_other[:, None]
    easy_ok = torch.arange(easy_k, device=logits.device)[None, :] < n_other[:, None]
    hard_ids, easy_ids = hard_ids.masked_fill(~hard_ok, 0), easy_ids.masked_fill(~easy_ok, 0)
    picked_ids = torch.cat([hard_ids, easy_ids], 1)  # (B, K_h + K_e): H_i ⊎ E_i, one column per pick
    picked_ok = torch.cat([hard_ok, easy_ok], 1)
    picked = logits.gather(1, picked_ids).masked_fill_(~picked_ok, -math.inf)
    del other_logits, ranking

    # Denominator Δ_i = A_i ⊎ N_i ⊎ H_i ⊎ E_i; A_i ∪ N_i is every row outside the grey zone.
    logits.masked_fill_(grey, -math.inf)
    shift = logits.amax(1)  # finite: A_i is never empty
    if picked.shape[1]:
        shift = torch.maximum(shift, picked.amax(1))
    e = logits.sub_(shift[:, None]).exp_()  # exp(s − shift) on A_i ∪ N_i, 0 on the grey zone
    base = e.sum(1)
    picked_e = torch.exp(picked - shift[:, None])  # 0 for missing picks
    z = base + picked_e.sum(1)
    n_picked = picked_ok.sum(1)
    n_num = n_pos + n_picked  # |Π_i|
    num_sum = pos_sum + picked.masked_fill(~picked_ok, 0).sum(1)
    per_anchor = shift + torch.log(z) - num_sum / n_num

    out = {"per_anchor": per_anchor}
    if with_parts:  # L_intra for logging only: same P_i over A_i alone
        a_sum = torch.where(same_cam, e, 0).sum(1)
        out["intra"] = (shift + torch.log(a_sum) - pos_sum / n_pos).mean()
        out.update(hard_ids=torch.where(hard_ok, hard_ids, -1), easy_ids=torch.where(easy_ok, easy_ids, -1),
                   n_hard=hard_ok.sum(1), n_easy=easy_ok.sum(1), n_grey=n_grey)

    # dL/ds_ij = (w_den_ij·exp s_ij / Z_i − w_num_ij / |Π_i|) / B, weights = multiset multiplicities.
    inv_z = 1.0 / (b * z)
    inv_num = 1.0 / (b * n_num.to(e.dtype))
    grad = e.mul_(inv_z[:, None])
    grad.scatter_add_(1, picked_ids, (picked_e * inv_z[:, None] - inv_num[:, None]) * picked_ok)
    grad.index_put_((anchor_index, row_index), -inv_num[anchor_index], accumulate=True)
    out["grad_logits"] = grad
    return out


def ctacl_loss(features, cams, tracklets, memory, memory_cams, memory_tracklets, *, temperature=0.07, topk=5,
               grey_zone=0.01, cam_weight=0.2, warmup=False, hard_topk=None, easy_topk=None, centroids=None):
    """CTACL loss of DESIGN §3, a scalar with gradient w.r.t. ``features`` only.

    features: (B, D) L2-normalised; cams, tracklets: (B,) int64; memory: (N, D) L2-normalised (read, never
    modified, no gradient); memory_cams, memory_tracklets: (N,) int64. Every anchor's (camera, tracklet) must
    have a memory row (in training its own row), else ``ReidError``.
    ``warmup=True``: mean ``L_intra``. Otherwise mean ``L_cl`` + ``cam_weight``·mean ``L_cam``.
    ``hard_topk``/``easy_topk``: K for H_i / E_i (None → ``topk``; 0 drops that kind of positive);
    ``grey_zone=0`` drops the grey zone; ``cam_weight=0`` the camera term (ablations).
    ``centroids``: optional (C, D) normalised camera centroids (e.g. kept by the memory bank); computed
    from ``memory`` when None. Backward must run before the memory is updated in place.
    """
    return _ctacl(features, cams, tracklets, memory, memory_cams, memory_tracklets, temperature=temperature,
                  topk=topk, grey_zone=grey_zone, cam_weight=cam_weight, warmup=warmup, hard_topk=hard_topk,
                  easy_topk=easy_topk, centroids=centroids)["loss"]


def ctacl_loss_parts(features, cams, tracklets, memory, memory_cams, memory_tracklets, *, temperature=0.07, topk=5,
                     grey_zone=0.01, cam_weight=0.2, warmup=False, hard_topk=None, easy_topk=None, centroids=None):
    """``ctacl_loss`` plus its parts for logging and diagnostics (same arguments).

    Returns ``loss`` (scalar with grad, identical to ``ctacl_loss``); ``intra`` = mean L_intra,
    ``inter`` = mean L_cl, ``cam`` = mean L_cam (detached 0-dim tensors; ``inter`` and ``cam`` are 0 in
    warm-up, where they are not computed); ``counts`` = per-anchor (B,) int64 tensors ``positives`` |P_i|,
    ``same_camera`` |A_i|, ``other_camera`` |O_i|, ``hard`` |H_i|, ``easy`` |E_i|, ``grey`` ⌊ρ|O_i|⌋, and
    ``cameras`` (int, cameras with memory rows); ``hard_ids``/``easy_ids`` (B, min(K, N)) int64 memory rows
    of H_i / E_i in rank order, -1 where fewer than K other-camera rows exist ((B, 0) in warm-up).
    """
    return _ctacl(features, cams, tracklets, memory, memory_cams, memory_tracklets, temperature=temperature,
                  topk=topk, grey_zone=grey_zone, cam_weight=cam_weight, warmup=warmup, hard_topk=hard_topk,
                  easy_topk=easy_topk, centroids=centroids, with_parts=True)
