"""The pieces of the CTACL loss (DESIGN §3) that are not the loss's algebra: the memory a rank scores against
(``MemoryShard``: rows, labels, the tracklet index and the few global facts), the grey-zone size and its exact
cut across ranks (radix selection), scoring against the memory and merging per-rank candidate lists, the
camera-centred scores of ``loss.variant=center``, the camera-alignment term and the autograd hand-off
``dL/ds · M / τ``. The loss itself is ``reid.losses``; it reads these and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reid.dist import Ranks
from reid.errors import ReidError

# ----------------------------------------------------------------------------------------- the memory shard


@dataclass
class MemoryShard:
    """The memory rows one rank scores against, and what the loss must know about all of them.

    rows: (N_r, D) L2-normalised; cams, tracklets, global_ids: (N_r,) int64; camera_rows: (C,) int64 rows of each
    camera over all ranks; centroids: () → ((C, D) normalised camera centroids, (C,) bool present, (C, D) row sums
    per camera), over all ranks (one collective). The rest is derived once by ``build`` (host values, so a training step needs no host synchronisation
    to find positives or size its buffers): the sorted (camera, tracklet) keys, the longest tracklet, the total
    row count and the smallest camera.
    """

    rows: torch.Tensor
    cams: torch.Tensor
    tracklets: torch.Tensor
    global_ids: torch.Tensor
    camera_rows: torch.Tensor
    centroids: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    total_rows: int = 0
    cameras_present: int = 0
    fewest_camera_rows: int = 0
    tracklet_span: int = 1
    longest_tracklet: int = 0
    sorted_keys: torch.Tensor | None = None
    key_order: torch.Tensor | None = None

    @classmethod
    def build(cls, rows, cams, tracklets, global_ids, camera_rows, centroids) -> "MemoryShard":
        if tracklets.numel() and int(tracklets.min()) < 0:
            raise ReidError(f"memory tracklet ids: {int(tracklets.min())} given, expected ids >= 0")
        shard = cls(rows, cams.long(), tracklets.long(), global_ids.long(), camera_rows.long(), centroids)
        counts = shard.camera_rows.tolist()
        shard.total_rows = int(sum(counts))
        present = [c for c in counts if c > 0]
        shard.cameras_present = len(present)
        shard.fewest_camera_rows = min(present) if present else 0
        shard.tracklet_span = int(shard.tracklets.max()) + 1 if shard.tracklets.numel() else 1
        shard.sorted_keys, shard.key_order = torch.sort(shard.cams * shard.tracklet_span + shard.tracklets)
        if shard.sorted_keys.numel():
            shard.longest_tracklet = int(torch.unique_consecutive(shard.sorted_keys, return_counts=True)[1].max())
        return shard

    def positives(self, cams, tracklets):
        """``P_i`` of each anchor as padded local rows: (B, L) int64 rows, (B, L) bool valid, (B,) |P_i|, with L
        the longest tracklet (fixed per shard, so no host synchronisation). |P_i| = 0 if the anchor's camera and
        tracklet have no row on this rank."""
        n, longest = self.sorted_keys.numel(), self.longest_tracklet
        known = (tracklets >= 0) & (tracklets < self.tracklet_span)
        keys = torch.where(known, cams * self.tracklet_span + tracklets, -1)
        lo = torch.searchsorted(self.sorted_keys, keys)
        count = torch.searchsorted(self.sorted_keys, keys, right=True) - lo
        offsets = torch.arange(longest, device=cams.device)
        valid = offsets[None, :] < count[:, None]
        rows = self.key_order[(lo[:, None] + offsets[None, :]).clamp(max=max(n - 1, 0))] if n else \
            torch.zeros(cams.shape[0], 0, dtype=torch.long, device=cams.device)
        return rows, valid, count

    def pair_logits(self, scaled, rows, valid, chunk_elements: int = 1 << 24):
        """``s_ij = f_i·m_j/τ`` on the positive pairs: scaled (B, D) = f/τ, rows/valid (B, L). Returns (B, L) in
        at least fp32 (0 where invalid), anchors in chunks so the gathered (b, L, D) block stays small."""
        b, longest = rows.shape
        dtype = torch.promote_types(scaled.dtype, torch.float32)
        out = torch.zeros(b, longest, dtype=dtype, device=scaled.device)
        step = max(1, chunk_elements // max(1, longest * self.rows.shape[1]))
        for start in range(0, b, step):
            block = self.rows[rows[start:start + step]].to(dtype)  # (b, L, D)
            out[start:start + step] = torch.bmm(block, scaled[start:start + step].to(dtype)[:, :, None])[:, :, 0]
        return out.masked_fill_(~valid, 0.0)

    def grey_depth(self, grey_zone: float) -> int:
        """An upper bound of ⌊ρ|O_i|⌋ over every possible anchor (|O_i| = N − rows of i's camera)."""
        return int(math.floor((self.total_rows - self.fewest_camera_rows) * grey_zone + 1e-9))


def hardest_positive_rows(pair_logits, rows, valid):
    """``j*_i = argmin_{j∈P_i} s_ij`` (DESIGN §3 hard positive) from padded pairs (B, L). Returns (B,) local rows
    (0 where P_i is empty). Ties are irrelevant (DESIGN): the largest row among equal minima is taken."""
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    masked = pair_logits.masked_fill(~valid, math.inf)
    at_lowest = valid & (masked == masked.amin(1, keepdim=True))
    return torch.where(at_lowest, rows, -1).amax(1).clamp(min=0)


# ----------------------------------------------------------------------------------------- the grey zone


def grey_zone_sizes(n_other, grey_zone: float):
    """⌊ρ·|O_i|⌋ per anchor. n_other: (B,) int64. Returns (B,) int64.

    The small epsilon makes decimal ρ behave as written (0.29·100 is 28.999… in binary, but means 29).
    """
    return torch.floor(n_other.to(torch.float64) * grey_zone + 1e-9).long()


def _order_keys(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Integer keys with the same order as the floats x (int64 for float64, else int32) and their bit width."""
    if x.dtype == torch.float64:
        bits, width = x.view(torch.int64), 64
        return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits), width
    bits = x.float().contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits), 32


def _from_order_keys(keys: torch.Tensor, width: int) -> torch.Tensor:
    bits = torch.where(keys < 0, keys ^ (0x7FFFFFFFFFFFFFFF if width == 64 else 0x7FFFFFFF), keys)
    return bits.view(torch.float64) if width == 64 else bits.to(torch.int32).view(torch.float32)


def radix_select(values: torch.Tensor, k: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Per row, the k-th largest of ``values`` over every rank's columns, exactly, by radix selection.

    values: (B, M) float (this rank's candidates; -inf for none); k: (B,) int64 ≥ 1 and at most the number of
    finite candidates over all ranks. One round per byte of the float's order-preserving bits, most significant
    first, for all anchors at once: each rank counts its candidates that still match the prefix per 256 digit
    values, the (B, 256) counts are summed over ranks (the round's one collective: 4 for fp32, 8 for fp64,
    whatever N is), and the bin holding the k-th largest fixes the next byte. Returns (B,) in values' dtype.
    """
    keys, width = _order_keys(values)
    pattern = keys ^ -(1 << (width - 1))  # flipping the sign bit: unsigned order, top byte first
    b = values.shape[0]
    prefix = torch.zeros(b, dtype=torch.long, device=values.device)
    remaining = k.clone()
    match = torch.ones_like(pattern, dtype=torch.bool)
    ones = torch.ones(1, 1, dtype=torch.int32, device=values.device).expand_as(pattern)
    for shift in range(width - 8, -1, -8):
        digit = ((pattern >> shift) & 255).long()
        hist = torch.zeros(b, 257, dtype=torch.int32, device=values.device)
        hist.scatter_add_(1, torch.where(match, digit, 256), ones)  # non-matching candidates land in bin 256
        hist = ranks.sum(hist[:, :256]).long().flip(1)  # bins from the largest digit down
        above = hist.cumsum(1)
        pos = (above < remaining[:, None]).sum(1).clamp(max=255)  # first bin where the count reaches k
        remaining = remaining - (above.gather(1, pos[:, None]) - hist.gather(1, pos[:, None])).squeeze(1)
        chosen = 255 - pos
        prefix = (prefix << 8) | chosen
        match &= digit == chosen[:, None]
    cut = prefix - (1 << 31) if width == 32 else prefix ^ (-(1 << 63))
    return _from_order_keys(cut, width).to(values.dtype)


# ----------------------------------------------------------------------------------------- scoring and merging


def scores(memory: torch.Tensor, *xs: torch.Tensor, rows_per_block: int = 8192) -> list[torch.Tensor]:
    """``x·M_rᵀ`` (B, N_r) for each x from one pass over the memory, in at least fp32.

    The xs are stacked so the N_r × D rows are read once. Each block is computed as (M·xᵀ)ᵀ: on CPU that layout
    is markedly faster than x·Mᵀ with a transposed operand (``reid bench loss``). A bf16 memory is widened
    block by block, so the logits keep fp32 precision (bf16 products would round s to about ±0.03).
    """
    dtype = torch.promote_types(memory.dtype, torch.float32)
    x = torch.cat([t.to(dtype) for t in xs])
    out = torch.empty(x.shape[0], memory.shape[0], dtype=dtype, device=x.device)
    for start in range(0, memory.shape[0], rows_per_block):
        out[:, start:start + rows_per_block] = (memory[start:start + rows_per_block].to(dtype) @ x.T).T
    return list(out.split([t.shape[0] for t in xs]))


def pack_float(*columns: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Side-by-side float columns: one collective, not several. float64 is exact for fp32 values and for ids below
    2^53; fp32 for ids and counts below 2^24."""
    return torch.cat([c.to(dtype)[:, None] if c.dim() == 1 else c.to(dtype) for c in columns], 1)


def local_topk(scores: torch.Tensor, k: int, sorted: bool = True):
    """(values, positions) of the top-k per row, padded with -inf/0 to exactly k columns."""
    b, n = scores.shape
    kk = min(k, n)
    values, pos = scores.topk(kk, dim=1, sorted=sorted)
    if kk < k:
        values = torch.cat([values, values.new_full((b, k - kk), -math.inf)], 1)
        pos = torch.cat([pos, pos.new_zeros(b, k - kk)], 1)
    return values, pos


def merge_picks(gathered, local_pos, k_global: int, ranks: Ranks):
    """Global top-k of every rank's candidate lists. gathered: (B, R, 4, K) packed (mining value, global id, s,
    camera) of every rank; local_pos: (B, K) this rank's candidates' positions in its rows. Returns the picks'
    global ids, their ``s``, their cameras, which are this rank's (mine) and their local positions; each
    (B, k_global)."""
    k_local = local_pos.shape[1]
    order = gathered[:, :, 0].flatten(1).topk(k_global, dim=1).indices
    ids = gathered[:, :, 1].flatten(1).gather(1, order).long()
    s = gathered[:, :, 2].flatten(1).gather(1, order)
    cams = gathered[:, :, 3].flatten(1).gather(1, order).long()
    mine = torch.div(order, k_local, rounding_mode="floor") == ranks.rank
    return ids, s, cams, mine, local_pos.gather(1, order % k_local)


def centring(means, camera_scores, cams_u, cams_r):
    """Variant center: what turns a product x·m_j into (x − μ_{c_i})·(m_j − μ_{c_j}) / ‖m_j − μ_{c_j}‖ for an anchor of
    camera c_i, given x·μ_c: returns the (B_u, N_r) term μ_{c_i}·μ_{c_j} − μ_{c_i}·m_j and the (N_r,) norms
    ‖m_j − μ_{c_j}‖ (rows are unit vectors). means: (C, D) camera means μ; camera_scores: (C, N_r) μ_c·m_j.
    The anchor side's norm is the same for all of an anchor's rows, so rankings do not need it."""
    mm = means @ means.T
    own = camera_scores.gather(0, cams_r[None, :])[0]
    row_norm = (1.0 - 2.0 * own + mm.diagonal()[cams_r]).clamp(min=1e-12).sqrt()
    offset = mm.index_select(0, cams_u).index_select(1, cams_r).sub_(camera_scores.index_select(0, cams_u))
    return offset, row_norm


# ----------------------------------------------------------------------------------------- the camera term


def camera_centroids(memory, memory_cams, num_cameras: int, with_sums: bool = False):
    """``C_c = normalize(Σ_{j: c_j=c} m_j)`` (the sum's direction is the mean's), one pass over the memory.

    memory: (N, D); memory_cams: (N,) in 0..num_cameras-1. Returns ((num_cameras, D), (num_cameras,) bool present)
    and, with ``with_sums``, the (num_cameras, D) row sums too.
    """
    sums = memory.new_zeros(num_cameras, memory.shape[1], dtype=torch.promote_types(memory.dtype, torch.float32))
    sums.index_add_(0, memory_cams, memory.to(sums.dtype))
    present = torch.bincount(memory_cams, minlength=num_cameras) > 0
    return (F.normalize(sums, dim=1), present, sums) if with_sums else (F.normalize(sums, dim=1), present)


def camera_alignment_loss(features, centroids, present, cameras_present: int):
    """``L_cam(i) = KL(uniform ‖ softmax(f_i·Cᵀ))`` over the present cameras (no temperature, DESIGN §3
    literally). features: (B, D); centroids: (C, D); present: (C,) bool; cameras_present = its count (a host int,
    so no synchronisation). KL(u‖p) = logsumexp(z) − mean(z) − log C with z = f_i·Cᵀ. Returns (B,)."""
    z = features @ centroids.to(features.dtype).T
    lse = torch.logsumexp(z.masked_fill(~present, -math.inf), 1)
    return lse - z.masked_fill(~present, 0.0).sum(1) / cameras_present - math.log(cameras_present)


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
        if memory.dtype == grad_logits.dtype:
            grad = grad_logits @ memory
        else:  # a bf16 memory: widened block by block, so dL/ds keeps fp32 precision in the product
            grad = grad_logits.new_zeros(grad_logits.shape[0], memory.shape[1])
            for start in range(0, memory.shape[0], 8192):
                grad += grad_logits[:, start:start + 8192] @ memory[start:start + 8192].to(grad_logits.dtype)
        return grad.to(ctx.features_dtype).mul_(grad_out * ctx.inv_temperature), None, None, None, None
