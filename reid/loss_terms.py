"""The small pieces of the CTACL loss (DESIGN §3) that the single-process loss (``reid.losses``) and the
camera-sharded loss (``reid.sharded_loss``) share, so that both compute exactly the same thing:
positive pairs, the hardest positive, the grey-zone size and cut, the multiset denominator, camera
centroids and the camera-alignment term, and the autograd hand-off ``dL/ds · M / τ``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------- helpers


def positive_pairs(cams, tracklets, memory_cams, memory_tracklets):
    """Every (anchor, memory row) pair of the same camera and tracklet: the sets ``P_i``, flattened.

    cams, tracklets: (B,) int64; memory_cams, memory_tracklets: (N,) int64.
    Returns ``anchor_index`` (P,), ``row_index`` (P,) (sorted by anchor) and ``counts`` (B,) = |P_i|.
    Sorting the N memory keys once costs O(N log N) instead of a (B, N) comparison.
    """
    n = memory_cams.numel()
    # One int64 key per (camera, tracklet): compact each id first so the product cannot overflow.
    # (torch.unique(dim=0) on the pairs would do the same but is ~50x slower on CPU.)
    _, cam_id = torch.unique(torch.cat([memory_cams, cams]), return_inverse=True)
    tracklet_values, tracklet_id = torch.unique(torch.cat([memory_tracklets, tracklets]), return_inverse=True)
    pair_id = cam_id * tracklet_values.numel() + tracklet_id
    sorted_ids, order = torch.sort(pair_id[:n], stable=True)
    anchor_ids = pair_id[n:]
    lo = torch.searchsorted(sorted_ids, anchor_ids)
    counts = torch.searchsorted(sorted_ids, anchor_ids, right=True) - lo
    anchor_index = torch.repeat_interleave(torch.arange(cams.numel(), device=cams.device), counts)
    first = torch.cumsum(counts, 0) - counts  # where each anchor's block starts in the flat list
    within = torch.arange(anchor_index.numel(), device=cams.device) - first[anchor_index]
    return anchor_index, order[lo[anchor_index] + within], counts


def hardest_positive_rows(pair_logits, anchor_index, row_index, batch_size: int):
    """``j*_i = argmin_{j∈P_i} s_ij`` (DESIGN §3 hard positive), from the flat pair list.

    pair_logits, anchor_index, row_index: (P,). Returns (B,) int64 memory rows (-1 if ``P_i`` is empty).
    Ties are irrelevant (DESIGN): the largest row id among equal minima is taken.
    """
    lowest = pair_logits.new_full((batch_size,), math.inf).scatter_reduce(0, anchor_index, pair_logits, "amin")
    at_lowest = pair_logits == lowest[anchor_index]
    rows = torch.full((batch_size,), -1, dtype=torch.long, device=row_index.device)
    return rows.scatter_reduce(0, anchor_index[at_lowest], row_index[at_lowest], "amax")


def grey_zone_sizes(n_other, grey_zone: float):
    """⌊ρ·|O_i|⌋ per anchor. n_other: (B,) int64. Returns (B,) int64.

    The small epsilon makes decimal ρ behave as written (0.29·100 is 28.999… in binary, but means 29).
    """
    return torch.floor(n_other.to(torch.float64) * grey_zone + 1e-9).long()


def grey_zone_thresholds(ranked_values, sizes):
    """Per-anchor cut: the ``sizes[i]``-th largest ``r`` among ``O_i``; +inf where the grey zone is empty.

    ranked_values: (B, k) values of ``r`` over ``O_i`` sorted descending, k ≥ max(sizes); sizes: (B,).
    A row j of ``O_i`` is in the grey zone iff ``r_ij >= threshold_i`` (ties are irrelevant, DESIGN §3).
    """
    if ranked_values.shape[1] == 0:
        return ranked_values.new_full(sizes.shape, math.inf)
    cut = ranked_values.gather(1, (sizes - 1).clamp(min=0)[:, None]).squeeze(1)
    return torch.where(sizes > 0, cut, torch.full_like(cut, math.inf))


def log_denominator(base_log_sum, selected_logits):
    """``log Σ_{k∈Δ_i} exp s_ik`` for the multiset Δ_i = base ⊎ selected.

    base_log_sum: (B,) ``log Σ exp s`` over the plain rows (here A_i ∪ N_i); selected_logits: (B, K')
    logits of the extra picks (H_i and E_i side by side, one column per pick so a row picked twice
    counts twice; -inf pads a missing pick). Returns (B,).
    """
    return torch.logsumexp(torch.cat([base_log_sum[:, None], selected_logits], 1), 1)


def camera_centroids(memory, memory_cams):
    """``C_c = normalize(mean_{j: c_j=c} m_j)`` over the cameras that have memory rows.

    memory: (N, D); memory_cams: (N,). Returns ``camera_ids`` (C,) sorted and ``centroids`` (C, D).
    Normalising the sum equals normalising the mean; one pass over the memory.
    """
    camera_ids, slot = torch.unique(memory_cams, return_inverse=True)
    sums = memory.new_zeros(camera_ids.numel(), memory.shape[1]).index_add_(0, slot, memory)
    return camera_ids, F.normalize(sums, dim=1)


def camera_alignment_loss(features, centroids):
    """``L_cam(i) = KL(uniform ‖ softmax(f_i·Cᵀ))`` (no temperature, DESIGN §3 literally).

    features: (B, D); centroids: (C, D). Returns (B,). KL(u‖p) = Σ_c u_c log(u_c/p_c)
    = logsumexp(z) − mean(z) − log C with z = f_i·Cᵀ.
    """
    z = features @ centroids.T
    return torch.logsumexp(z, 1) - z.mean(1) - math.log(centroids.shape[0])


# ----------------------------------------------------------------------------------------- autograd


class ThroughLogits(torch.autograd.Function):
    """Gives ``features`` the gradient of a loss whose ``dL/ds`` (B, N) was computed in the forward pass.

    s = features·Mᵀ/τ, so dL/dfeatures = dL/ds · M / τ: the one (B, N)·(N, D) product of backward.
    """

    @staticmethod
    def forward(ctx, features, value, grad_logits, memory, inv_temperature):
        ctx.save_for_backward(grad_logits, memory)  # memory's version counter guards against early updates
        ctx.inv_temperature = inv_temperature
        ctx.features_dtype = features.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grad_logits, memory = ctx.saved_tensors
        grad = (grad_logits.to(memory.dtype) @ memory).to(ctx.features_dtype)
        return grad.mul_(grad_out * ctx.inv_temperature), None, None, None, None
