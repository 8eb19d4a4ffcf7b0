"""The CTACL loss over camera-sharded memory (DESIGN §4), exactly equal to ``reid.losses.ctacl_loss``.

Each rank holds the memory rows of its cameras and draws anchors from them, so for an anchor i the sets
``A_i``, ``P_i`` and the hard positive ``h_i`` live on its own rank (its owner). Only the other-camera
set ``O_i`` spans ranks. Per step (B_u = Σ_r B_r union anchors, K = topk, N_r rows on this rank):

1. anchors ``f`` (differentiable) and ``h`` are gathered: O(B·D·R) bytes;
2. every rank scores the union batch against its own rows: ``s = f·M_rᵀ/τ``, ``r = h·M_rᵀ`` (B_u, N_r);
3. local top-K by ``r`` (H_i) and by ``s`` (E_i) with global ids are gathered and merged: O(B·K·R);
4. the grey-zone cut (the ⌊ρ|O_i|⌋-th largest ``r`` over O_i, over all ranks) is found exactly by radix
   selection on the float bits of ``r``: 4 (fp32) or 8 (fp64) rounds, each an all-reduce of a (B_u, 256)
   histogram — no ρ·N candidates are shipped, and bytes do not grow with N;
5. log-sum-exp pieces: a max and a sum over each rank's non-grey rows, all-reduced: O(B·R);
6. from the reduced values every rank knows every anchor's loss and ``dL/ds`` on its own rows; a small
   autograd Function hands ``dL/ds · M_r/τ`` to the gathered anchors, and the gather's backward sums
   these over ranks into each anchor's owner.

Scaling: rank r returns ``loss_r = R · (Σ_{i own} ℓ_i + λ Σ_{i own} L_cam(i)) / B_u``, plus gradient terms
for every union anchor scored against its rows. Summed over ranks these give R · ∇(union-batch mean loss);
DDP averages gradients over R, so the model sees exactly the gradient of the single-process loss on the
union batch and the whole memory. With one process this is ``reid.losses.ctacl_loss`` (value and gradient).
Memory per rank: a few (B_u, N_r) buffers, never (N, D).
"""

from __future__ import annotations

import math

import torch

from reid import dist
from reid.errors import ReidError
from reid.losses import (ThroughLogits, camera_alignment_loss, ctacl_loss_parts, grey_zone_sizes,
                         hardest_positive_rows, positive_pairs)
from reid.memory import MemoryBank

__all__ = ["sharded_ctacl_loss", "grey_zone_cut", "radix_select_keys"]


def _order_keys(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Integer keys with the same order as the floats x (int64 tensor) and their bit width (32 or 64)."""
    if x.dtype == torch.float64:
        bits, width = x.view(torch.int64), 64
        return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits), width
    bits = x.float().contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long(), 32


def _to_unsigned(keys: torch.Tensor, width: int) -> torch.Tensor:
    """Signed-order keys → bit patterns whose unsigned order is the same (top byte first = most significant)."""
    return keys + (1 << 31) if width == 32 else keys ^ (-(1 << 63))


def _to_signed(pattern: torch.Tensor, width: int) -> torch.Tensor:
    return pattern - (1 << 31) if width == 32 else pattern ^ (-(1 << 63))


def radix_select_keys(keys: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, width: int) -> torch.Tensor:
    """Per row, the key of the k-th largest valid entry over ALL ranks (exact), by radix selection.

    keys: (B, N_r) int64 signed-order keys (``_order_keys``); valid: (B, N_r) bool; k: (B,) int64 ≥ 1 and at
    most the global number of valid entries. One round per byte, most significant first: each rank counts
    its candidates per 256 digit values, the (B, 256) counts are summed over ranks, and the bin holding the
    k-th largest fixes the next byte. Returns (B,) int64 signed-order keys.
    """
    b = keys.shape[0]
    rows, cols = valid.nonzero(as_tuple=True)
    pattern = _to_unsigned(keys[rows, cols], width)
    del cols
    prefix = torch.zeros(b, dtype=torch.long, device=keys.device)
    remaining = k.clone()
    for shift in range(width - 8, -1, -8):
        digit = (pattern >> shift) & 255
        hist = torch.bincount(rows * 256 + digit, minlength=b * 256).view(b, 256).to(torch.int32)
        hist = dist.sum_across_ranks(hist).long().flip(1)  # bins from the largest digit down
        above = hist.cumsum(1)
        pos = (above < remaining[:, None]).sum(1).clamp(max=255)  # first bin where the count reaches k
        remaining = remaining - (above.gather(1, pos[:, None]) - hist.gather(1, pos[:, None])).squeeze(1)
        chosen = 255 - pos
        prefix = (prefix << 8) | chosen
        keep = digit == chosen[rows]
        rows, pattern = rows[keep], pattern[keep]
    return _to_signed(prefix, width)


def grey_zone_cut(ranking: torch.Tensor, valid: torch.Tensor, sizes: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per anchor, the ``sizes[i]``-th largest value of ``ranking`` among ``valid`` entries of all ranks.

    ranking: (B, N_r) float; valid: (B, N_r) bool (O_i on this rank); sizes: (B,) int64 (0 → +inf, no cut).
    Anchors are processed ``chunk`` at a time so the integer keys stay small; ``chunk`` must be the same
    on every rank (the collectives of each chunk line up). Returns (B,) thresholds in ranking's dtype:
    j is in the grey zone iff valid and ``ranking_ij >= threshold_i`` (as ``reid.losses``).
    """
    out = torch.full(sizes.shape, math.inf, dtype=ranking.dtype, device=ranking.device)
    for start in range(0, ranking.shape[0], chunk):
        part = slice(start, start + chunk)
        keys, width = _order_keys(ranking[part])
        cut = radix_select_keys(keys, valid[part], sizes[part].clamp(min=1), width)
        bits = torch.where(cut < 0, cut ^ (0x7FFFFFFFFFFFFFFF if width == 64 else 0x7FFFFFFF), cut)
        value = (bits.view(torch.float64) if width == 64 else bits.to(torch.int32).view(torch.float32))
        out[part] = torch.where(sizes[part] > 0, value.to(ranking.dtype), out[part])
    return out


def _scores(memory: torch.Tensor, *xs: torch.Tensor, rows_per_block: int = 8192) -> list[torch.Tensor]:
    """``x·M_rᵀ`` (B, N_r) for each x, at least fp32, from one pass over the memory.

    The xs are stacked so the N_r × D rows are read once, and each block is computed as (M·xᵀ)ᵀ: on CPU
    that layout is markedly faster than x·Mᵀ with a transposed operand (measured for reid.losses in
    benchmarks/loss_step.py). The product runs in the memory's precision, as in ``reid.losses``.
    """
    x = torch.cat([t.to(memory.dtype) for t in xs])
    dtype = torch.float32 if memory.dtype in (torch.float16, torch.bfloat16) else memory.dtype
    out = torch.empty(x.shape[0], memory.shape[0], dtype=dtype, device=x.device)
    for start in range(0, memory.shape[0], rows_per_block):
        out[:, start:start + rows_per_block] = (memory[start:start + rows_per_block] @ x.T).T
    return list(out.split([t.shape[0] for t in xs]))


def _merge_topk(values, ids, local_pos, k_global: int):
    """Global top-k of per-rank candidate lists. values: (B, K) (-inf pads), ids: (B, K) global row ids,
    local_pos: (B, K) positions in this rank's rows. Returns merged values order, ids, and this rank's
    (mine mask, local positions) for the merged picks, each (B, k_global)."""
    k_local = values.shape[1]
    all_values = dist.gather_candidates(values)
    all_ids = dist.gather_candidates(ids)
    order = all_values.topk(k_global, dim=1).indices
    mine = torch.div(order, k_local, rounding_mode="floor") == dist.rank()
    pos = local_pos.gather(1, order % k_local)
    return all_ids.gather(1, order), mine, pos


def _local_topk(scores, k: int):
    """(values, positions) of the top-k per row, padded with -inf/0 to exactly k columns."""
    b, n = scores.shape
    kk = min(k, n)
    values, pos = scores.topk(kk, dim=1)
    if kk < k:
        values = torch.cat([values, values.new_full((b, k - kk), -math.inf)], 1)
        pos = torch.cat([pos, pos.new_zeros(b, k - kk)], 1)
    return values, pos


def sharded_ctacl_loss(features, cams, tracklets, row_ids, bank: MemoryBank, *, temperature=0.07, topk=5,
                       grey_zone=0.01, cam_weight=0.2, warmup=False, hard_topk=None, easy_topk=None,
                       exact=True) -> dict:
    """CTACL loss (DESIGN §3) of the union batch over the whole sharded memory; see the module docstring.

    features: (B_r, D) this rank's anchors, L2-normalised, with grad; cams, tracklets: (B_r,) int64;
    row_ids: (B_r,) their global memory rows (this rank's). ``exact`` is accepted for the config; only the
    exact grey-zone cut is implemented (it is already O(B·R) bytes per round).
    Returns ``loss`` (backprop it on every rank; scaled for DDP's averaging, see module docstring),
    ``intra``/``inter``/``cam`` (0-dim float64 tensors, union-batch means; inter/cam 0 in warm-up) and ``hard_ids``/
    ``easy_ids`` (B_r, K) global rows of the mined positives, -1 where fewer than K exist.
    """
    hard_k = topk if hard_topk is None else hard_topk
    easy_k = topk if easy_topk is None else easy_topk
    if features.dim() != 2 or features.shape[1] != bank.dim:
        raise ReidError(f"sharded_ctacl_loss: features shape {tuple(features.shape)}, expected (B, {bank.dim})")
    bank.local_index(row_ids)  # every anchor's row must be this rank's (camera shards)
    world = dist.world_size()
    cams, tracklets = cams.long(), tracklets.long()
    b = features.shape[0]
    memory = bank.rows.detach()
    empty = torch.empty(b, 0, dtype=torch.long, device=features.device)

    if warmup:  # A_i and P_i are on the anchor's own rank: the single-process loss over own rows is exact
        zero = features.new_zeros((), dtype=torch.float64)
        if b == 0:  # this rank owns none of the step's images: it still joins every collective
            own_loss, own_sum = features.sum() * 0.0, zero
        else:
            parts = ctacl_loss_parts(features, cams, tracklets, memory, bank.cams, bank.tracklets,
                                     temperature=temperature, warmup=True)
            own_loss, own_sum = parts["loss"], parts["intra"].detach().double() * b
        total = dist.sum_across_ranks(torch.stack([zero + b, own_sum]))
        loss = own_loss * (world * b / total[0]).to(own_loss.dtype)
        return {"loss": loss, "intra": total[1] / total[0], "inter": zero, "cam": zero.clone(),
                "hard_ids": empty, "easy_ids": empty}

    inv_t = 1.0 / temperature
    with torch.no_grad():
        # Own anchors: positives and the hard positive h_i (least similar row of the own tracklet).
        anchor_index, row_index, n_pos = positive_pairs(cams, tracklets, bank.cams, bank.tracklets)
        if bool((n_pos == 0).any()):
            bad = torch.nonzero(n_pos == 0).flatten()[:5].tolist()
            raise ReidError(f"sharded_ctacl_loss: anchors {bad} have no memory row of their own camera and "
                            "tracklet on this rank, expected each anchor's own row in its rank's shard")
        scaled = features.detach().to(memory.dtype) * inv_t
        pair_logits = (scaled[anchor_index] * memory[row_index]).sum(1)
        hard_rows = hardest_positive_rows(pair_logits, anchor_index, row_index, b)
        own_info = torch.stack([cams.to(torch.float64), n_pos.to(torch.float64)], 1)
        hard_vectors = memory[hard_rows].to(features.dtype)

    union, sizes = dist.gather_anchors(features)  # (B_u, D), differentiable
    offset, b_u = sum(sizes[: dist.rank()]), sum(sizes)
    with torch.no_grad():
        union_hard = dist.gather_rows(hard_vectors, sizes)
        info = dist.gather_rows(own_info, sizes)
        cams_u, n_pos_u = info[:, 0].long(), info[:, 1].long()
        logits, ranking = _scores(memory, union.detach() * inv_t, union_hard)  # s, r: (B_u, N_r) each
        same = cams_u[:, None] == bank.cams[None, :]  # A_i on this rank
        camera_rows = bank.camera_rows()
        n_other = camera_rows.sum() - camera_rows[cams_u]  # |O_i| over all ranks
        own = slice(offset, offset + b)
        pos_sum = torch.zeros(b_u, dtype=logits.dtype, device=logits.device)
        pos_sum[own] = torch.zeros(b, dtype=logits.dtype, device=logits.device).index_add_(
            0, anchor_index, logits[offset + anchor_index, row_index])
        pos_sum = dist.sum_across_ranks(pos_sum)

        # H_i and E_i: local top-K by r and by s over this rank's part of O_i, merged to the global top-K.
        ranking.masked_fill_(same, -math.inf)
        other_logits = logits.masked_fill(same, -math.inf)
        n_all = int(camera_rows.sum())
        picks_ids, picks_mine, picks_pos, picks_ok = [], [], [], []
        for k, scores in ((hard_k, ranking), (easy_k, other_logits)):
            if k == 0:
                continue
            values, pos = _local_topk(scores, k)
            ids = bank.global_ids[pos]
            k_global = min(k, n_all)
            merged_ids, mine, merged_pos = _merge_topk(values, ids, pos, k_global)
            picks_ids.append(merged_ids)
            picks_mine.append(mine)
            picks_pos.append(merged_pos)
            picks_ok.append(torch.arange(k_global, device=logits.device)[None, :] < n_other[:, None])
        del other_logits
        n_hard_cols = picks_ids[0].shape[1] if hard_k else 0
        if picks_ids:
            picked_ids, mine, picked_pos, picked_ok = (torch.cat(x, 1) for x in
                                                        (picks_ids, picks_mine, picks_pos, picks_ok))
        else:
            picked_ids = picked_pos = torch.empty(b_u, 0, dtype=torch.long, device=logits.device)
            mine = picked_ok = torch.empty(b_u, 0, dtype=torch.bool, device=logits.device)
        # s of each pick, from its owner (zero elsewhere) and summed: O(B·K) bytes.
        picked = torch.where(mine, logits.gather(1, picked_pos), 0.0)
        picked = dist.sum_across_ranks(picked).masked_fill_(~picked_ok, -math.inf)

        # Grey zone: the ⌊ρ|O_i|⌋ largest r of O_i, cut found exactly across ranks (radix selection).
        n_grey = grey_zone_sizes(n_other, grey_zone)
        # Anchor chunks of ~4M scores: the same count on every rank since it is derived from global sizes.
        chunk = max(1, (1 << 22) * world // max(1, n_all))
        threshold = grey_zone_cut(ranking, ~same, n_grey, chunk)
        grey = ranking >= threshold[:, None]  # -inf on A_i, so only O_i rows
        del ranking

        # Denominator Δ_i = A_i ⊎ N_i ⊎ H_i ⊎ E_i: every non-grey row plus the picks (DESIGN §3 multisets).
        logits.masked_fill_(grey, -math.inf)
        shift = dist.max_across_ranks(logits.amax(1))
        if picked.shape[1]:
            shift = torch.maximum(shift, picked.amax(1))
        e = logits.sub_(shift[:, None]).exp_()
        base_local = e.sum(1)
        a_local = torch.where(same[own], e[own], 0.0).sum(1)  # for the logged L_intra
        base = dist.sum_across_ranks(base_local)
        picked_e = torch.exp(picked - shift[:, None])
        z = base + picked_e.sum(1)
        n_num = n_pos_u + picked_ok.sum(1)
        num_sum = pos_sum + picked.masked_fill(~picked_ok, 0).sum(1)
        per_anchor = shift + torch.log(z) - num_sum / n_num

        # dL/ds on this rank's rows for every union anchor (mean over the union batch).
        inv_z = 1.0 / (b_u * z)
        inv_num = 1.0 / (b_u * n_num.to(e.dtype))
        grad = e.mul_(inv_z[:, None])
        grad.scatter_add_(1, picked_pos, (picked_e * inv_z[:, None] - inv_num[:, None]) * (picked_ok & mine))
        grad.index_put_((offset + anchor_index, row_index), -inv_num[offset + anchor_index], accumulate=True)
        value = per_anchor[own].sum() / b_u
        intra_own = (shift[own] + torch.log(a_local) - pos_sum[own] / n_pos).sum()

    # The same hand-off as the single-process loss: dL/ds · M_r / τ to the union anchors (then back to owners).
    loss = ThroughLogits.apply(union, value.to(features.dtype), grad, memory, inv_t)
    cam_sum = features.new_zeros(())
    if cam_weight != 0:
        centroids, present = bank.camera_centroids()
        cam_own = camera_alignment_loss(features, centroids[present].to(features.dtype))
        cam_sum = cam_own.sum()
        loss = loss + cam_weight * cam_sum / b_u
    logs = dist.sum_across_ranks(torch.stack([intra_own.double(), cam_sum.detach().double()]))
    hard_ids = torch.where(picked_ok, picked_ids, -1)[own]
    return {"loss": loss * world, "intra": logs[0] / b_u, "inter": per_anchor.mean().double(),
            "cam": logs[1] / b_u,
            "hard_ids": hard_ids[:, :n_hard_cols] if hard_k else empty,
            "easy_ids": hard_ids[:, n_hard_cols:] if easy_k else empty}
