"""Benchmark: one CTACL training step's loss work vs the floor of its matrix products (issue 4, "Performance").

A step = ``ctacl_loss`` forward + backward + memory update ``m_idx ← normalize(½·m_idx + ½·f)``, at B=128,
D=2048, on random normalised memories shaped like VeRi-776 (N=37,778, 20 cameras) and VeRi-Wild
(N=277,797, 174 cameras), tracklets of 5-10 rows. Compared with, in the same run:
  floor        the bare products the issue names: s = f·Mᵀ, r = h·Mᵀ forward and dL/ds·M backward, each
               one call in its fastest form on this CPU ((N, D)·(D, B), see ``reid.losses._scores``);
  fused floor  the bare products as the loss runs them: s and r from one (N, D)·(D, 2B) product taken in
               chunks of memory rows, then dL/ds·M; the tighter bound;
  naive        a per-anchor loop (torch ops over N per anchor, autograd) timed on a few anchors and scaled
               to B, checked against the vectorised loss on those anchors.
Floors and step alternate in every repetition, so ratios stay meaningful on a shared, loaded machine.
Also timed: the camera-centroid pass (inside the step) and ways to find the per-anchor grey-zone cut.
Peak extra memory is measured in a fresh subprocess as the ru_maxrss growth over one step.

    python benchmarks/loss_step.py [--sizes veri776,veriwild] [--reps 5] [--out benchmarks/results/loss_step.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from reid.losses import (camera_alignment_loss, camera_centroids, ctacl_loss, grey_zone_sizes,
                         grey_zone_thresholds)

SIZES = {"veri776": (37_778, 20), "veriwild": (277_797, 174)}
LOSS_KW = {"temperature": 0.07, "topk": 5, "grey_zone": 0.01, "cam_weight": 0.2}


def make_memory(n, n_cams, dim, seed):
    """Random unit rows (N, D) with cameras and tracklets of 5-10 consecutive rows."""
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(n, dim, generator=g)
    memory.div_(memory.norm(dim=1, keepdim=True))  # in place: no second N×D copy
    sizes = torch.randint(5, 11, (n // 5 + 1,), generator=g)
    tracklets = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)[:n]
    tracklet_cams = torch.randint(0, n_cams, (sizes.numel(),), generator=g)
    return memory, tracklet_cams[tracklets], tracklets


def make_batch(memory, memory_cams, memory_tracklets, batch, seed):
    g = torch.Generator().manual_seed(seed + 1)
    rows = torch.randperm(memory.shape[0], generator=g)[:batch]
    features = F.normalize(memory[rows] + 0.3 * torch.randn(batch, memory.shape[1], generator=g), dim=1)
    return features, memory_cams[rows], memory_tracklets[rows], rows


def loss_step(features, cams, tracklets, rows, memory, memory_cams, memory_tracklets):
    f = features.clone().requires_grad_(True)
    loss = ctacl_loss(f, cams, tracklets, memory, memory_cams, memory_tracklets, **LOSS_KW)
    loss.backward()
    with torch.no_grad():  # after backward, as in training (DESIGN §3)
        memory[rows] = F.normalize(0.5 * memory[rows] + 0.5 * f.detach(), dim=1)
    return float(loss.detach())


def floor_step(features, hard, grad_logits, memory):
    """The three (B, N, D) products the issue names as the floor, nothing else."""
    memory @ features.T
    memory @ hard.T
    grad_logits @ memory


def fused_floor_step(features, hard, grad_logits, memory, chunk_rows=16384):
    """The products as the loss really runs them, bare: s and r from one (N, D)·(D, 2B) product taken in
    chunks of memory rows (as ``reid.losses._scores`` does, minus its transposed copy), then backward."""
    both = torch.cat([features, hard]).T
    for start in range(0, memory.shape[0], chunk_rows):
        memory[start:start + chunk_rows] @ both
    grad_logits @ memory


def naive_anchor_loss(f, cam, tracklet, memory, memory_cams, memory_tracklets, centroids, temperature, topk,
                      grey_zone, cam_weight):
    """DESIGN §3 for one anchor with plain torch ops over N (what one writes first)."""
    s = memory @ f / temperature
    same = memory_cams == cam
    positives = torch.nonzero(same & (memory_tracklets == tracklet)).squeeze(1)
    hard_row = positives[s.detach()[positives].argmin()]
    r = memory @ memory[hard_row]
    other = torch.nonzero(~same).squeeze(1)
    k = min(topk, other.numel())
    by_r = other[r[other].topk(max(k, math.floor(grey_zone * other.numel() + 1e-9))).indices]
    hard, easy = by_r[:k], other[s.detach()[other].topk(k).indices]
    keep = torch.ones_like(same)
    keep[by_r[:math.floor(grey_zone * other.numel() + 1e-9)]] = False
    denominator = torch.logsumexp(torch.cat([s[keep], s[hard], s[easy]]), 0)
    numerator = torch.cat([s[positives], s[hard], s[easy]])
    return denominator - numerator.mean() + cam_weight * camera_alignment_loss(f[None], centroids)[0]


def naive_time(features, cams, tracklets, memory, memory_cams, memory_tracklets, anchors):
    """Per-anchor loop on the first ``anchors`` anchors, scaled to the batch. Returns (seconds, loss)."""
    t0 = time.perf_counter()
    centroids = camera_centroids(memory, memory_cams)[1]
    t_shared = time.perf_counter() - t0
    f = features[:anchors].clone().requires_grad_(True)
    t0 = time.perf_counter()
    losses = [naive_anchor_loss(f[i], cams[i], tracklets[i], memory, memory_cams, memory_tracklets, centroids,
                                **LOSS_KW) for i in range(anchors)]
    torch.stack(losses).mean().backward()
    t_loop = time.perf_counter() - t0
    return t_shared + t_loop * features.shape[0] / anchors, float(torch.stack(losses).mean().detach())


def grey_zone_cut_alternatives(memory, memory_cams, features, cams, grey_zone, reps):
    """Times ways to find each anchor's grey-zone cut (the ⌊ρ|O_i|⌋-th largest r over O_i; the count differs
    per anchor). All must give the same thresholds; returns {name: median seconds}."""
    ranking = (memory @ features.T).T.contiguous()
    ranking.masked_fill_(cams[:, None] == memory_cams[None, :], -math.inf)
    sizes = grey_zone_sizes(ranking.isfinite().sum(1), grey_zone)
    depth = int(sizes.max())

    def topk_sorted():  # what reid.losses does (the same top-k also yields H_i)
        return grey_zone_thresholds(ranking.topk(depth, dim=1, sorted=True).values, sizes)

    def topk_unsorted_then_small_sort():
        values = ranking.topk(depth, dim=1, sorted=False).values
        return grey_zone_thresholds(values.sort(dim=1, descending=True).values, sizes)

    def full_sort():
        return grey_zone_thresholds(ranking.sort(dim=1, descending=True).values, sizes)

    def kthvalue_per_distinct_count():  # kthvalue takes one k, so group anchors by their cut
        out = torch.full(sizes.shape, math.inf)
        for size in sizes.unique().tolist():
            if size > 0:
                rows = torch.nonzero(sizes == size).squeeze(1)
                out[rows] = torch.kthvalue(-ranking[rows], size, dim=1).values.neg()
        return out

    expected = topk_sorted()
    times = {}
    for fn in (topk_sorted, topk_unsorted_then_small_sort, kthvalue_per_distinct_count, full_sort):
        runs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            got = fn()
            runs.append(time.perf_counter() - t0)
        assert torch.equal(got, expected), fn.__name__
        times[fn.__name__] = statistics.median(runs)
    return times


def product_layouts(memory, features, reps):
    """Why ``reid.losses._scores`` computes (M·fᵀ)ᵀ: times s = f·Mᵀ in both layouts (median seconds)."""
    layouts = {"f @ M.T": lambda: features @ memory.T,
               "(M @ f.T).T copied to (B, N)": lambda: (memory @ features.T).T.contiguous()}
    times = {}
    for name, fn in layouts.items():
        runs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
    return times


def estimate_extra_bytes(batch, n, dtype_bytes=4):
    """Largest set of (B, N) buffers alive at once inside ctacl_loss (see reid/losses.py): logits s (reused
    as dL/ds and kept for backward), ranking r, two bool masks (same camera, grey zone) and a bool temporary.
    The transposed product is made in chunks of 4M elements, so it adds no (B, N) term."""
    return batch * n * (2 * dtype_bytes + 3)


def probe_memory(args, name):
    """Runs in a fresh process: ru_maxrss growth (bytes) over one loss step, after the memory exists."""
    n, n_cams = SIZES[name]
    memory, memory_cams, memory_tracklets = make_memory(n, n_cams, args.dim, args.seed)
    batch = make_batch(memory, memory_cams, memory_tracklets, args.batch, args.seed)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss_step(*batch, memory, memory_cams, memory_tracklets)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # Linux reports KiB


def run_size(args, name):
    n, n_cams = SIZES[name]
    probe = subprocess.run([sys.executable, __file__, "--probe", name, "--dim", str(args.dim), "--batch",
                            str(args.batch), "--seed", str(args.seed), "--threads", str(args.threads)],
                           capture_output=True, text=True, check=True)
    peak_extra = int(probe.stdout.strip().splitlines()[-1])

    memory, memory_cams, memory_tracklets = make_memory(n, n_cams, args.dim, args.seed)
    features, cams, tracklets, rows = make_batch(memory, memory_cams, memory_tracklets, args.batch, args.seed)
    hard = memory[rows].clone()
    grad_logits = torch.randn(args.batch, n)

    floor_step(features, hard, grad_logits, memory)  # warm-up: thread pools, allocator, page faults
    fused_floor_step(features, hard, grad_logits, memory)
    loss_step(features, cams, tracklets, rows, memory, memory_cams, memory_tracklets)
    floors, fused, steps, centroid = [], [], [], []
    for _ in range(args.reps):  # interleaved, so load changes hit all alike
        t0 = time.perf_counter()
        floor_step(features, hard, grad_logits, memory)
        floors.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fused_floor_step(features, hard, grad_logits, memory)
        fused.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loss_step(features, cams, tracklets, rows, memory, memory_cams, memory_tracklets)
        steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        camera_centroids(memory, memory_cams)  # part of the step; a memory bank could keep it up to date
        centroid.append(time.perf_counter() - t0)
    del grad_logits
    naive_s, naive_loss = naive_time(features, cams, tracklets, memory, memory_cams, memory_tracklets,
                                     args.naive_anchors)
    fast_loss = float(ctacl_loss(features[:args.naive_anchors], cams[:args.naive_anchors],
                                 tracklets[:args.naive_anchors], memory, memory_cams, memory_tracklets, **LOSS_KW))
    ratios = [s / f for s, f in zip(steps, floors)]
    layouts = product_layouts(memory, features, max(1, args.reps // 2))
    cut = grey_zone_cut_alternatives(memory, memory_cams, features, cams, LOSS_KW["grey_zone"], max(1, args.reps // 2))
    return {
        "name": name, "N": n, "cameras": n_cams, "B": args.batch, "D": args.dim,
        "floor_s": statistics.median(floors), "loss_step_s": statistics.median(steps),
        "ratio_to_floor": statistics.median(ratios), "ratios": ratios, "floors_s": floors, "steps_s": steps,
        "fused_floor_s": statistics.median(fused),
        "ratio_to_fused_floor": statistics.median([s / f for s, f in zip(steps, fused)]), "fused_floors_s": fused,
        "centroids_s": statistics.median(centroid), "grey_zone_cut_s": cut, "product_layouts_s": layouts,
        "naive_s": naive_s, "naive_anchors_timed": args.naive_anchors,
        "naive_over_loss_step": naive_s / statistics.median(steps),
        "naive_vs_fast_loss_rel_diff": abs(naive_loss - fast_loss) / abs(fast_loss),
        "peak_extra_mb": peak_extra / 2**20, "estimated_extra_mb": estimate_extra_bytes(args.batch, n) / 2**20,
        "memory_bank_mb": n * args.dim * 4 / 2**20, "n_squared_mb": n * n * 4 / 2**20,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="veri776,veriwild")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--naive-anchors", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "loss_step.json"))
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        print(probe_memory(args, args.probe))
        return

    results = []
    for name in args.sizes.split(","):
        if name not in SIZES:
            parser.error(f"--sizes: unknown size {name!r}, expected some of {sorted(SIZES)}")
        results.append(run_size(args, name))
        r = results[-1]
        print(f"[{name}] floor {r['floor_s']:.2f}s  step {r['loss_step_s']:.2f}s  ratio {r['ratio_to_floor']:.2f}",
              flush=True)

    header = (f"{'memory':10s} {'N':>8s} {'cams':>5s} {'floor s':>8s} {'fused s':>8s} {'step s':>8s} "
              f"{'step/floor':>10s} {'step/fused':>10s} {'centroids s':>11s} {'naive s':>8s} {'naive/step':>10s} "
              f"{'peak extra MB':>14s} {'est. MB':>8s}")
    print(f"\nB={args.batch} D={args.dim} threads={args.threads} reps={args.reps} (medians; torch {torch.__version__})")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['name']:10s} {r['N']:8d} {r['cameras']:5d} {r['floor_s']:8.2f} {r['fused_floor_s']:8.2f} "
              f"{r['loss_step_s']:8.2f} {r['ratio_to_floor']:10.2f} {r['ratio_to_fused_floor']:10.2f} "
              f"{r['centroids_s']:11.2f} {r['naive_s']:8.1f} {r['naive_over_loss_step']:10.1f} "
              f"{r['peak_extra_mb']:14.0f} {r['estimated_extra_mb']:8.0f}")
    print("\ns = f·Mᵀ layouts (seconds):")
    for r in results:
        print(f"{r['name']:10s} " + "  ".join(f"{k}: {v:.3f}" for k, v in r["product_layouts_s"].items()))
    print("\ngrey-zone cut alternatives (seconds, same thresholds):")
    for r in results:
        print(f"{r['name']:10s} " + "  ".join(f"{k} {v:.3f}" for k, v in r["grey_zone_cut_s"].items()))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"benchmark": "loss_step", "torch": torch.__version__, "threads": args.threads,
                   "loss": LOSS_KW, "load_average_at_end": os.getloadavg(), "results": results}, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
