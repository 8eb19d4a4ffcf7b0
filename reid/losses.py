"""The CTACL loss (DESIGN §3) over camera-sharded memory (DESIGN §4): one implementation for one process and
for R ranks. ``ctacl_loss(features, cams, tracklets, memory, memory_cams, memory_tracklets)`` is its one-rank
case; ``sharded_ctacl_loss(features, cams, tracklets, rows, bank)`` is what training calls at every world size.

Notation: anchors ``f_i``, memory rows ``m_j``, logits ``s_ij = f_i·m_j/τ``; ``A_i`` same-camera rows, ``P_i``
same camera and tracklet, hard positive ``h_i`` = row of ``P_i`` with the lowest ``s``, ``O_i`` other-camera rows
ranked by ``r_ij = h_i·m_j``, ``H_i``/``E_i`` top-K of ``O_i`` by ``r``/``s``, grey zone = top-⌊ρ|O_i|⌋ of ``O_i``
by ``r``, ``N_i`` = the rest of ``O_i``. A row picked as both hard and easy positive weighs 2 in the numerator and
up to 3 in the denominator ("an entry chosen twice counts twice").

Each rank holds the rows of its cameras and draws anchors from them, so ``A_i``, ``P_i`` and ``h_i`` live on the
anchor's own rank; only ``O_i`` spans ranks. One full-mode step (B_u union anchors, N_r rows on this rank):

1. own anchors: ``P_i`` from the shard's tracklet index, ``s`` on those pairs, ``h_i``; the ranks' batch sizes,
   the anchors (with gradient) and a packed (h_i, camera, |P_i|, Σ_P s) row per anchor are gathered: three
   collectives, and the sizes are the step's one host synchronisation in the loss;
2. ``s`` and ``r`` of the union batch against this rank's rows from one (N_r, D)·(D, 2B_u) product;
3. one top-k of ``r`` over ``O_i`` (depth: the largest grey zone any anchor can have) holds this rank's part of
   the grey zone and its hard-positive candidates (with a wide grey zone every row is a candidate instead);
   the grey-zone cut (the ⌊ρ|O_i|⌋-th largest ``r`` over all ranks) is found exactly by radix selection over
   those candidates: 4 (fp32) or 8 (fp64) all-reduces of (B_u, 256) counts. Rows tied with the cut all fall in
   the grey zone (DESIGN §3 leaves ties open; with continuous features they do not occur);
4. top-K of ``s`` over ``O_i``; the local hard and easy candidates (value, global id, ``s``) are gathered in one
   collective and merged into the global ``H_i`` and ``E_i``;
5. per rank, over its non-grey rows: max and Σexp of ``s`` (plus the logged ``L_intra`` and ``L_cam`` of its
   own anchors) — one gather; every rank then knows every anchor's loss and ``dL/ds`` on its own rows;
6. a small autograd Function hands ``dL/ds · M_r/τ`` to the union anchors; the gather's backward sums these
   over ranks into each anchor's owner.
Collectives per step do not depend on N or on the number of cameras; bytes are O(B·(D + K·R)). No host
synchronisation beyond the union's sizes (``reid.syncs``). Extra memory: two (B_u, N_r) float buffers, two bool
ones, and the radix selection's (B_u, depth) integer temporaries (depth ≤ N_r).

Scaling: rank r returns ``loss_r = R · (Σ_{i own} ℓ_i + λ Σ_{i own} L_cam(i)) / B_u``. Summed over ranks these
give R · ∇(union-batch mean loss); DDP averages gradients over R, so the model sees exactly the gradient of
the loss on the union batch and the whole memory.

Camera term: ``L_cam(i) = KL(uniform ‖ softmax(f_i·Cᵀ))`` with no temperature, literally as DESIGN §3 writes it.
"""

from __future__ import annotations

import math

import torch

from reid.dist import ALL_RANKS, ONE_PROCESS, Ranks
from reid.errors import ReidError
from reid.loss_terms import (MemoryShard, ThroughLogits, camera_alignment_loss, camera_centroids, centring,
                             grey_zone_sizes, hardest_positive_rows, local_topk, merge_picks, pack_float, radix_select,
                             scores)

__all__ = ["ctacl_loss", "ctacl_loss_parts", "sharded_ctacl_loss"]


def _warmup(features, cams, rows, valid, n_pos, pos_sum, shard: MemoryShard, ranks: Ranks, inv_t):
    """``L_intra(i) = −mean_{p∈P_i} s_ip + log Σ_{k∈A_i} exp s_ik`` and its gradient; A_i and P_i are on the anchor's
    own rank, so only the logged union mean crosses ranks."""
    b = features.shape[0]
    memory = shard.rows
    with torch.no_grad():
        (logits,) = scores(memory, features.detach() * inv_t)
        logits.masked_fill_(cams[:, None] != shard.cams[None, :], -math.inf)  # keep A_i only
        shift = logits.amax(1) if logits.shape[1] else logits.new_zeros(b)
        e = logits.sub_(shift[:, None]).exp_()
        z = e.sum(1)
        per_anchor = shift + torch.log(z) - pos_sum / n_pos
        total = ranks.sum(torch.stack([per_anchor.new_full((), b), per_anchor.sum()]).double())
        b_u = total[0].to(e.dtype)
        grad = e.mul_((1.0 / (b_u * z))[:, None])  # softmax over A_i, divided by B_u for the union mean
        grad.scatter_add_(1, rows, torch.where(valid, -(1.0 / (b_u * n_pos.to(grad.dtype)))[:, None], 0.0))
        value = per_anchor.sum() / b_u
    loss = ThroughLogits.apply(features, value.to(features.dtype), grad, memory, inv_t)
    mean = total[1] / total[0]
    zero = mean.new_zeros(())
    return {"loss": loss * ranks.world, "intra": mean, "inter": zero, "cam": zero.clone(), "per_anchor": per_anchor}


def _loss(features, cams, tracklets, shard: MemoryShard, ranks: Ranks, *, temperature, hard_k, easy_k, grey_zone,
          cam_weight, warmup, variant=frozenset()) -> dict:
    """The loss of this rank's anchors over every rank's shard (see the module docstring). Returns ``loss`` (scaled
    for DDP's averaging: backprop it on every rank), ``intra``/``inter``/``cam`` (0-dim float64 union-batch means),
    ``hard_ids``/``easy_ids`` (B_r, K) global rows (-1 where fewer than K exist), ``counts`` and ``missing`` (0-dim
    bool: some anchor has no row of its own camera and tracklet; the caller decides when to look)."""
    inv_t = 1.0 / temperature
    b = features.shape[0]
    memory = shard.rows
    work = torch.promote_types(memory.dtype, torch.float32)
    with torch.no_grad():
        rows_p, valid_p, n_pos = shard.positives(cams, tracklets)
        pair = shard.pair_logits(features.detach().to(work) * inv_t, rows_p, valid_p)
        pos_sum = pair.sum(1)
        missing = (n_pos == 0).any()
        n_other = shard.total_rows - shard.camera_rows[cams]
    counts = {"positives": n_pos, "same_camera": shard.camera_rows[cams], "other_camera": n_other,
              "cameras": shard.cameras_present}
    empty = torch.empty(b, 0, dtype=torch.long, device=features.device)
    if warmup:
        out = _warmup(features, cams, rows_p, valid_p, n_pos, pos_sum, shard, ranks, inv_t)
        zeros = torch.zeros_like(n_pos)
        counts.update(hard=zeros, easy=zeros, grey=zeros)
        return {**out, "hard_ids": empty, "easy_ids": empty, "counts": counts, "missing": missing}

    with torch.no_grad():
        hard_rows = hardest_positive_rows(pair, rows_p, valid_p)
        # (B_r, D + 3) in the working precision: camera ids and |P_i| are far below 2^24
        own_rows = pack_float(memory[hard_rows], cams, n_pos, pos_sum, dtype=work)
    centroids, present, camera_sums = shard.centroids()  # one collective: the camera term's and the means
    center, camera_softmax = "center" in variant, "camera_softmax" in variant
    union, sizes = ranks.gather_anchors(features)  # (B_u, D), differentiable
    offset, b_u = sum(sizes[: ranks.rank]), sum(sizes)
    own = slice(offset, offset + b)
    with torch.no_grad():
        packed = ranks.gather_rows(own_rows, sizes)
        d = memory.shape[1]
        cams_u, n_pos_u, pos_sum_u = packed[:, d].long(), packed[:, d + 1].long(), packed[:, d + 2]
        hard_u, cams_r = packed[:, :d], shard.cams
        means = camera_sums.to(work) / shard.camera_rows.clamp(min=1)[:, None].to(work) if center else None
        # s, r: (B_u, N_r) each (and μ_c·m_j (C, N_r) with center), from one pass over the memory
        logits, ranking, *camera_scores = scores(memory, union.detach() * inv_t, hard_u, *([means] if center else []))
        same = cams_u[:, None] == cams_r[None, :]  # A_i on this rank
        n_other_u = shard.total_rows - shard.camera_rows[cams_u]
        if center:  # variant center: r (and s below) of the rows with each camera's mean removed, renormalised
            offset_rows, row_norm = centring(means, camera_scores[0], cams_u, cams_r)
            ranking.sub_((hard_u.to(work) @ means.T).index_select(1, cams_r)).add_(offset_rows).div_(row_norm)

        # One top-k of r over O_i holds this rank's hard candidates and its part of the grey zone (the global
        # ⌊ρ|O_i|⌋ largest are among every rank's local ⌊ρ|O_i|⌋ largest).
        ranking.masked_fill_(same, -math.inf)
        n_grey = grey_zone_sizes(n_other_u, grey_zone)
        depth = max(hard_k, shard.grey_depth(grey_zone))
        if 4 * depth >= memory.shape[0]:  # a wide grey zone: select among all rows rather than sort most of them
            candidates = ranking
            hard_values, hard_pos = local_topk(ranking, hard_k)
        else:
            candidates, candidate_pos = local_topk(ranking, depth, sorted=False)
            hard_values, at = local_topk(candidates, hard_k)
            hard_pos = candidate_pos.gather(1, at)
        threshold = radix_select(candidates, n_grey.clamp(min=1), ranks)
        del candidates
        threshold = torch.where(n_grey > 0, threshold, math.inf)
        grey = ranking >= threshold[:, None]  # -inf on A_i, so only O_i rows

        # E_i candidates: top-K of s over O_i (the ranking buffer is free now). Then both kinds merged globally.
        if center:
            other_logits = torch.mul(logits, temperature, out=ranking).sub_(
                (union.detach().to(work) @ means.T).index_select(1, cams_r)).add_(offset_rows).div_(row_norm)
            del offset_rows
        else:
            other_logits = ranking.copy_(logits)
        easy_values, easy_pos = local_topk(other_logits.masked_fill_(same, -math.inf), easy_k)
        del other_logits, ranking
        cand_values = torch.cat([hard_values, easy_values], 1)
        cand_pos = torch.cat([hard_pos, easy_pos], 1)
        if memory.shape[0]:
            cand_s, cand_ids, cand_cams = logits.gather(1, cand_pos), shard.global_ids[cand_pos], cams_r[cand_pos]
        else:  # a rank without rows offers only -inf fillers
            cand_s, cand_ids, cand_cams = cand_values.clone(), cand_pos, cand_pos
        k_all = cand_values.shape[1]
        gathered = ranks.gather_candidates(pack_float(cand_values, cand_ids, cand_s, cand_cams))
        gathered = gathered.view(b_u, ranks.world, 4, k_all)
        picks = []
        for k, cols in ((hard_k, slice(0, hard_k)), (easy_k, slice(hard_k, k_all))):
            k_global = min(k, shard.total_rows)
            ids, s, pick_cams, mine, pos = merge_picks(gathered[..., cols], cand_pos[:, cols], k_global, ranks)
            ok = torch.arange(k_global, device=logits.device)[None, :] < n_other_u[:, None]
            picks.append((ids, s.to(work), pick_cams, mine, pos, ok))
        picked_ids, picked, picked_cams, mine, picked_pos, picked_ok = (torch.cat(x, 1) for x in zip(*picks))
        picked = picked.masked_fill(~picked_ok, -math.inf)

        # Denominator Δ_i = A_i ⊎ N_i ⊎ H_i ⊎ E_i: every non-grey row plus the picks. Each rank sums exp(s − its own
        # max) over its rows; the (max, sum) pairs of all ranks combine into the global log-sum-exp.
        logits.masked_fill_(grey, -math.inf)
        local_max = logits.amax(1) if logits.shape[1] else logits.new_full((b_u,), -math.inf)
        local_shift = torch.where(torch.isfinite(local_max), local_max, 0.0)
        e = logits.sub_(local_shift[:, None]).exp_()
        local_sum = e.sum(1)
        if camera_softmax:  # per camera, still relative to this rank's shift
            local_cameras = e.new_zeros(b_u, shard.camera_rows.numel()).index_add_(1, cams_r, e)
        # Logged only: L_intra of own anchors (A_i is on this rank) and their camera term.
        a_sum = torch.where(same[own], e[own], 0.0).sum(1)
        intra_own = local_shift[own] + torch.log(a_sum) - pos_sum / n_pos
    with torch.set_grad_enabled(cam_weight != 0 and torch.is_grad_enabled()):
        cam_own = camera_alignment_loss(features, centroids, present, shard.cameras_present)
    with torch.no_grad():
        logged = torch.zeros(b_u, 2, dtype=torch.float64, device=features.device)
        logged[own, 0], logged[own, 1] = intra_own.double(), cam_own.detach().double()
        parts = ranks.gather_candidates(pack_float(local_max, local_sum, logged)).view(b_u, ranks.world, 4)
        maxes, sums = parts[..., 0].to(work), parts[..., 1].to(work)
        shift = maxes.amax(1)
        if picked.shape[1]:
            shift = torch.maximum(shift, picked.amax(1))
        picked_e = torch.exp(picked - shift[:, None])  # 0 for missing picks
        n_num = n_pos_u + picked_ok.sum(1)
        num_sum = pos_sum_u + picked.masked_fill(~picked_ok, 0).sum(1)
        inv_num = 1.0 / (b_u * n_num.to(work))
        to_shift = torch.exp(local_shift - shift)  # this rank's sums → the common shift
        if camera_softmax:
            # Variant camera_softmax: each positive p competes with Δ_i restricted to p's camera. Cameras are whole
            # on their ranks, so the per-camera sums of all ranks add up exactly.
            z_cam = ranks.sum(local_cameras * to_shift[:, None]).scatter_add_(1, picked_cams, picked_e)
            n_cam = torch.zeros_like(z_cam).scatter_add_(1, picked_cams, picked_ok.to(work))
            n_cam.scatter_add_(1, cams_u[:, None], n_pos_u[:, None].to(work))  # P_i: the anchor's own camera
            log_z = torch.where(n_cam > 0, torch.log(z_cam), 0.0)
            per_anchor = shift + ((n_cam * log_z).sum(1) - num_sum) / n_num
            weight = torch.where(n_cam > 0, n_cam / z_cam, 0.0) * inv_num[:, None]  # (B_u, C)
            row_weight = weight.index_select(1, cams_r) * to_shift[:, None]
            pick_weight = weight.gather(1, picked_cams)
        else:
            z_parts = sums * torch.exp(torch.where(torch.isfinite(maxes), maxes, shift[:, None]) - shift[:, None])
            z = z_parts.sum(1) + picked_e.sum(1)
            per_anchor = shift + torch.log(z) - num_sum / n_num
            inv_z = 1.0 / (b_u * z)
            row_weight, pick_weight = (to_shift * inv_z)[:, None], inv_z[:, None]

        # dL/ds_ij = (w_den_ij·exp s_ij / Z − w_num_ij / |Π_i|) / B_u on this rank's rows, weights = multiplicities
        # (Z: the anchor's denominator, or with camera_softmax the one of row j's camera, times its positives there).
        grad = e.mul_(row_weight)
        if memory.shape[0]:  # a rank without rows has no picks of its own (only fillers)
            grad.scatter_add_(1, picked_pos, (picked_e * pick_weight - inv_num[:, None]) * (picked_ok & mine))
        grad[own].scatter_add_(1, rows_p, torch.where(valid_p, -inv_num[own][:, None], 0.0))
        value = per_anchor[own].sum() / b_u
        logged_sum = parts[..., 2:].sum((0, 1)) / b_u

    loss = ThroughLogits.apply(union, value.to(features.dtype), grad, memory, inv_t)
    if cam_weight != 0:
        loss = loss + cam_weight * cam_own.sum() / b_u
    ids = torch.where(picked_ok, picked_ids, -1)[own]
    n_hard_cols = min(hard_k, shard.total_rows)
    counts.update(hard=picked_ok[own, :n_hard_cols].sum(1), easy=picked_ok[own, n_hard_cols:].sum(1),
                  grey=n_grey[own])
    return {"loss": loss * ranks.world, "intra": logged_sum[0], "inter": per_anchor.mean().double(),
            "cam": logged_sum[1], "hard_ids": ids[:, :n_hard_cols], "easy_ids": ids[:, n_hard_cols:],
            "counts": counts, "missing": missing, "per_anchor": per_anchor[own]}


# ----------------------------------------------------------------------------------------- entry points


def _variant(variant: str) -> frozenset:
    options = frozenset(part.strip() for part in variant.split("+"))
    if options == {"seed"}:
        return frozenset()
    if not options <= {"center", "camera_softmax"}:
        raise ReidError(f"ctacl_loss: variant {variant!r}, expected seed or center / camera_softmax joined with '+'")
    return options


def _topks(topk, hard_topk, easy_topk) -> tuple[int, int]:
    return (topk if hard_topk is None else hard_topk), (topk if easy_topk is None else easy_topk)


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


def ctacl_loss_parts(features, cams, tracklets, memory, memory_cams, memory_tracklets, *, temperature=0.07, topk=5,
                     grey_zone=0.01, cam_weight=0.2, warmup=False, hard_topk=None, easy_topk=None, centroids=None,
                     variant="seed"):
    """``ctacl_loss`` plus its parts for logging and diagnostics (same arguments).

    Returns ``loss`` (scalar with grad, identical to ``ctacl_loss``); ``intra`` = mean L_intra, ``inter`` = mean
    L_cl, ``cam`` = mean L_cam (0-dim float64; ``inter`` and ``cam`` are 0 in warm-up); ``counts`` = per-anchor
    (B,) int64 ``positives`` |P_i|, ``same_camera`` |A_i|, ``other_camera`` |O_i|, ``hard`` |H_i|, ``easy`` |E_i|,
    ``grey`` ⌊ρ|O_i|⌋, and ``cameras`` (int, cameras with memory rows); ``hard_ids``/``easy_ids`` (B, min(K, N))
    memory rows of H_i / E_i in rank order, -1 where fewer than K other-camera rows exist ((B, 0) in warm-up).
    """
    hard_k, easy_k = _topks(topk, hard_topk, easy_topk)
    _check(features, cams, tracklets, memory, memory_cams, memory_tracklets, temperature,
           {"topk": topk, "hard_topk": hard_k, "easy_topk": easy_k}, grey_zone)
    # Compact camera and tracklet ids (any integers are allowed here) to 0..C-1 and 0..T-1.
    camera_ids, memory_slot = torch.unique(memory_cams.long(), return_inverse=True)
    slot = torch.searchsorted(camera_ids, cams.long()).clamp(max=camera_ids.numel() - 1)
    anchor_slot = torch.where(camera_ids[slot] == cams, slot, camera_ids.numel())  # unknown camera: no rows
    tracklet_ids, memory_tracklet = torch.unique(memory_tracklets.long(), return_inverse=True)
    at = torch.searchsorted(tracklet_ids, tracklets.long()).clamp(max=tracklet_ids.numel() - 1)
    anchor_tracklet = torch.where(tracklet_ids[at] == tracklets, at, -1)
    memory = memory.detach()
    n_cams = camera_ids.numel()
    present = torch.arange(n_cams + 1, device=memory.device) < n_cams  # slot n_cams: cameras not in memory
    if centroids is None:
        def camera_table():
            return camera_centroids(memory, memory_slot, n_cams + 1, with_sums=True)
    else:
        if centroids.shape != (n_cams, memory.shape[1]):
            raise ReidError(f"ctacl_loss: centroids shape {tuple(centroids.shape)}, expected ({n_cams}, "
                            f"{memory.shape[1]}): one row per distinct memory camera, in sorted order")
        table = torch.cat([centroids.detach(), centroids.new_zeros(1, centroids.shape[1])])

        def camera_table():
            return table, present, camera_centroids(memory, memory_slot, n_cams + 1, with_sums=True)[2]
    shard = MemoryShard.build(memory, memory_slot, memory_tracklet, torch.arange(memory.shape[0], device=memory.device),
                              torch.bincount(memory_slot, minlength=n_cams + 1), camera_table)
    parts = _loss(features, anchor_slot, anchor_tracklet, shard, ONE_PROCESS, temperature=temperature,
                  hard_k=hard_k, easy_k=easy_k, grey_zone=grey_zone, cam_weight=cam_weight, warmup=warmup,
                  variant=_variant(variant))
    if bool(parts.pop("missing")):
        bad = torch.nonzero(parts["counts"]["positives"] == 0).flatten()[:5].tolist()
        raise ReidError(f"ctacl_loss: anchors {bad} have no memory row of their own camera and tracklet "
                        "(P_i is empty), expected each anchor's own row to be in memory")
    parts.pop("per_anchor")
    return parts


def ctacl_loss(features, cams, tracklets, memory, memory_cams, memory_tracklets, *, temperature=0.07, topk=5,
               grey_zone=0.01, cam_weight=0.2, warmup=False, hard_topk=None, easy_topk=None, centroids=None,
               variant="seed"):
    """CTACL loss of DESIGN §3 on one process, a scalar with gradient w.r.t. ``features`` only.

    features: (B, D) L2-normalised; cams, tracklets: (B,) int; memory: (N, D) L2-normalised (read, never modified,
    no gradient); memory_cams, memory_tracklets: (N,) int. Every anchor's (camera, tracklet) must have a memory row
    (in training its own row), else ``ReidError``. ``warmup=True``: mean ``L_intra``. Otherwise mean ``L_cl`` +
    ``cam_weight``·mean ``L_cam``. ``hard_topk``/``easy_topk``: K for H_i / E_i (None → ``topk``; 0 drops that kind
    of positive); ``grey_zone=0`` drops the grey zone; ``cam_weight=0`` the camera term (ablations).
    ``centroids``: optional (C, D) normalised camera centroids, one per distinct memory camera in sorted order;
    computed from ``memory`` when None. Backward must run before the memory is updated in place.
    ``variant``: "seed" (DESIGN §3) or options joined with "+": "center" mines H_i, E_i and the grey zone on
    camera-centred rows, "camera_softmax" lets each positive compete only with its own camera's rows (config
    ``loss.variant``). This is ``sharded_ctacl_loss`` with one rank holding every row: the same code.
    """
    return ctacl_loss_parts(features, cams, tracklets, memory, memory_cams, memory_tracklets, temperature=temperature,
                            topk=topk, grey_zone=grey_zone, cam_weight=cam_weight, warmup=warmup, hard_topk=hard_topk,
                            easy_topk=easy_topk, centroids=centroids, variant=variant)["loss"]


def sharded_ctacl_loss(features, cams, tracklets, row_ids, bank, *, temperature=0.07, topk=5, grey_zone=0.01,
                       cam_weight=0.2, warmup=False, hard_topk=None, easy_topk=None, check=True,
                       variant="seed") -> dict:
    """The CTACL loss of the union batch over the whole camera-sharded memory, on every rank (training's loss).

    features: (B_r, D) this rank's anchors, L2-normalised, with grad; cams, tracklets: (B_r,) int64; row_ids: (B_r,)
    their global memory rows (this rank's); bank: ``reid.memory.MemoryBank``. Returns ``loss`` (backprop it on every
    rank; scaled for DDP's averaging), ``intra``/``inter``/``cam`` (0-dim float64 union-batch means; inter/cam 0 in
    warm-up), ``hard_ids``/``easy_ids`` (B_r, min(K, N)) global rows of the mined positives (-1 where fewer than K
exist),
    ``counts`` (as ``ctacl_loss_parts``) and ``missing`` (0-dim bool tensor). ``check=True`` verifies the rows and
    positives at once (host synchronisations); training passes False and reads ``missing`` with its one per-step
    synchronisation instead.
    """
    hard_k, easy_k = _topks(topk, hard_topk, easy_topk)
    if features.dim() != 2 or features.shape[1] != bank.dim:
        raise ReidError(f"sharded_ctacl_loss: features shape {tuple(features.shape)}, expected (B, {bank.dim})")
    if check:
        bank.local_index(row_ids)  # every anchor's row must be this rank's (camera shards)
    parts = _loss(features, cams.long(), tracklets.long(), bank.shard(), ALL_RANKS, temperature=temperature,
                  hard_k=hard_k, easy_k=easy_k, grey_zone=grey_zone, cam_weight=cam_weight, warmup=warmup,
                  variant=_variant(variant))
    if check and bool(parts["missing"]):
        bad = torch.nonzero(parts["counts"]["positives"] == 0).flatten()[:5].tolist()
        raise ReidError(f"sharded_ctacl_loss: anchors {bad} have no memory row of their own camera and "
                        "tracklet on this rank, expected each anchor's own row in its rank's shard")
    return parts
