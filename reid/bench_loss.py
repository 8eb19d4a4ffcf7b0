"""`reid bench loss`: the training path's loss step against the floor of its matrix products.

A loss step is what ``train_one_epoch`` runs between the model and the optimizer: ``sharded_ctacl_loss`` (world
size 1) forward + backward + ``MemoryBank.update``, at B=128, D=2048, on memories shaped like VeRi-776 and
VeRi-Wild. Compared with, in the same run:
  floor  the bare products of the loss, nothing else: s = f·Mᵀ and r = h·Mᵀ as one (N, D)·(D, 2B) product
         taken in blocks of memory rows, then dL/ds·M of backward;
  naive  a per-anchor loss written straightforwardly with torch ops (DESIGN §3 read literally), timed on a few
         anchors and scaled to B, and checked against the vectorised loss (value and gradient) on those anchors.
Floor and step alternate in every repetition, so the ratio stays meaningful on a shared, loaded machine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from reid.bench_common import LOSS_KW, dataset_bank, draw_batch, median, peak_extra_bytes, timed
from reid.losses import sharded_ctacl_loss

_FLOOR_ROWS = 16_384


def loss_step(bank, rows, cams, tracklets, features) -> torch.Tensor:
    """One training-path loss step: forward, backward, then the memory update (after the loss, DESIGN §3)."""
    f = features.clone().requires_grad_(True)
    out = sharded_ctacl_loss(f, cams, tracklets, rows, bank, check=False, **LOSS_KW)
    out["loss"].backward()
    bank.update(rows, f.detach(), check=False)
    return out["loss"].detach()


def floor_step(memory, features, hard, grad_logits) -> None:
    """The loss's products, bare: [f; h]·Mᵀ in blocks of rows (one read of M), then dL/ds·M."""
    both = torch.cat([features, hard]).T
    for start in range(0, memory.shape[0], _FLOOR_ROWS):
        memory[start:start + _FLOOR_ROWS] @ both
    grad_logits @ memory


def naive_centroids(memory, memory_cams):
    """``C_c = normalize(mean of camera c's rows)`` for the cameras that have rows, one camera at a time."""
    return torch.stack([F.normalize(memory[memory_cams == c].mean(0), dim=0)
                        for c in torch.unique(memory_cams).tolist()])


def naive_anchor_loss(f, cam, tracklet, memory, memory_cams, memory_tracklets, centroids, *, temperature, topk,
                      grey_zone, cam_weight):
    """DESIGN §3 for one anchor f (D,), the way one writes it first: full sorts over N, index lists, autograd."""
    s = memory @ f / temperature
    same = memory_cams == cam
    positives = torch.nonzero(same & (memory_tracklets == tracklet)).squeeze(1)
    hard_row = positives[s.detach()[positives].argmin()]
    r = memory @ memory[hard_row]
    other = torch.nonzero(~same).squeeze(1)
    by_r = other[r[other].argsort(descending=True)]
    by_s = other[s.detach()[other].argsort(descending=True)]
    k = min(topk, other.numel())
    hard, easy = by_r[:k], by_s[:k]
    grey = by_r[:math.floor(grey_zone * other.numel() + 1e-9)]
    keep = torch.ones_like(same)
    keep[grey] = False
    log_denominator = torch.logsumexp(torch.cat([s[keep], s[hard], s[easy]]), 0)
    numerator = torch.cat([s[positives], s[hard], s[easy]])
    contrastive = log_denominator - numerator.mean()
    # KL(uniform ‖ softmax(f·Cᵀ)) = Σ_c (1/C)·log((1/C) / p_c)
    log_p = torch.log_softmax(centroids @ f, 0)
    alignment = (-math.log(centroids.shape[0]) - log_p).mean()
    return contrastive + cam_weight * alignment


def naive_check(bank, rows, cams, tracklets, features, anchors: int, device):
    """Times the per-anchor loop on ``anchors`` anchors (scaled to B) and compares it with the vectorised loss.

    Returns ``(seconds for B anchors, relative loss difference, relative gradient difference)``.
    """
    a = slice(0, anchors)
    f_fast = features[a].clone().requires_grad_(True)
    fast = sharded_ctacl_loss(f_fast, cams[a], tracklets[a], rows[a], bank, **LOSS_KW)["loss"]
    fast.backward()
    memory = bank.rows.detach()
    order = bank.local_index(rows[a])
    t_shared, centroids = timed(lambda: naive_centroids(memory, bank.cams), device)
    f = features[a].clone().requires_grad_(True)

    def loop():
        losses = [naive_anchor_loss(f[i], bank.cams[order[i]], bank.tracklets[order[i]], memory, bank.cams,
                                    bank.tracklets, centroids, **LOSS_KW) for i in range(anchors)]
        total = torch.stack(losses).mean()
        total.backward()
        return total

    t_loop, naive = timed(loop, device)
    loss_diff = abs(float(naive.detach()) - float(fast.detach())) / abs(float(fast.detach()))
    grad_diff = float((f.grad - f_fast.grad).abs().max() / f_fast.grad.abs().max())
    return t_shared + t_loop * features.shape[0] / anchors, loss_diff, grad_diff


def run_size(name: str, s, device) -> dict:
    bank = dataset_bank(name, s.divisor, s.dim, s.seed, device)
    rows, cams, tracklets, features = draw_batch(bank, s.batch, s.seed + 1)
    hard = bank.rows[bank.local_index(rows)].clone()
    grad_logits = torch.randn(s.batch, len(bank), device=device)
    floor = lambda: floor_step(bank.rows, features, hard, grad_logits)  # noqa: E731
    step = lambda: loss_step(bank, rows, cams, tracklets, features)  # noqa: E731

    # The first step, before anything else ran at this size: memory freed by earlier work would hide its peak.
    _, peak = peak_extra_bytes(step, device)
    floor()  # warm-up: thread pools, allocator, page faults
    floors, steps = [], []
    for _ in range(s.reps):  # interleaved, so load changes hit both alike
        floors.append(timed(floor, device)[0])
        steps.append(timed(step, device)[0])
    naive_s, loss_diff, grad_diff = naive_check(bank, rows, cams, tracklets, features, s.naive_anchors, device)
    step_s = median(steps)
    return {
        "name": name, "N": len(bank), "cameras": bank.num_cameras, "B": s.batch, "D": s.dim,
        "floor_s": median(floors), "loss_step_s": step_s,
        "ratio_to_floor": median([t / f for t, f in zip(steps, floors)]),
        "floors_s": floors, "steps_s": steps,
        "naive_s": naive_s, "naive_anchors_timed": s.naive_anchors, "naive_over_loss_step": naive_s / step_s,
        "naive_vs_vectorised_loss_rel_diff": loss_diff, "naive_vs_vectorised_grad_rel_diff": grad_diff,
        "peak_extra_mb": None if peak is None else peak / 2**20,
        "memory_bank_mb": bank.rows.numel() * bank.rows.element_size() / 2**20,
    }


def run(s, device) -> dict:
    return {"sizes": [run_size(name, s, device) for name in s.sizes.split(",")]}


def table(result: dict) -> str:
    head = (f"{'memory':9} {'N':>8} {'cams':>4} {'B':>4} {'D':>5} {'floor s':>8} {'step s':>8} {'step/floor':>10} "
            f"{'naive s':>8} {'naive/step':>10} {'naive vs loss':>13} {'peak +MB':>8}")
    lines = [head, "-" * len(head)]
    for r in result["sizes"]:
        peak = "?" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f}"
        lines.append(f"{r['name']:9} {r['N']:>8} {r['cameras']:>4} {r['B']:>4} {r['D']:>5} {r['floor_s']:>8.3f} "
                     f"{r['loss_step_s']:>8.3f} {r['ratio_to_floor']:>10.2f} {r['naive_s']:>8.2f} "
                     f"{r['naive_over_loss_step']:>10.1f} {r['naive_vs_vectorised_loss_rel_diff']:>13.1e} "
                     f"{peak:>8}")
    return "\n".join(lines)
