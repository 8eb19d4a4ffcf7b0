"""What every `reid bench` section shares: memories shaped like the datasets, timing, peak memory, host syncs.

A benchmark memory is random unit rows (N, D) with cameras and tracklets of 5-10 consecutive rows (one camera
per tracklet), at the sizes of VeRi-776 and VeRi-Wild's training sets. Rows are generated in chunks, so no
second N × D copy is ever made, and a rank can generate only its own rows (``reid bench scaling``).
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

from reid.memory import MemoryBank

__all__ = ["SIZES", "LOSS_KW", "memory_layout", "make_bank", "dataset_bank", "draw_batch",
           "timed", "median", "peak_extra_bytes", "cpu_model", "usable_cores"]

# Training-set rows and cameras of the real datasets (VeRi-Wild: the 174-camera training split).
SIZES = {"veri776": (37_778, 20), "veriwild": (277_797, 174)}
LOSS_KW = {"temperature": 0.07, "topk": 5, "grey_zone": 0.01, "cam_weight": 0.2}
_FILL_ROWS = 65_536


def memory_layout(n: int, cameras: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cameras and tracklets of N memory rows: tracklets of 5-10 consecutive rows, each on one random camera.

    Returns ``(cams (N,), tracklets (N,))`` int64; every camera gets rows when N ≫ 10·cameras.
    """
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(5, 11, (n // 5 + 1,), generator=g)
    tracklets = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)[:n]
    tracklet_cams = torch.randint(0, cameras, (sizes.numel(),), generator=g)
    return tracklet_cams[tracklets], tracklets


def make_bank(global_ids, cams, tracklets, dim: int, cameras: int, seed: int, device) -> MemoryBank:
    """A MemoryBank over ``global_ids`` filled with random unit rows (chunk by chunk)."""
    bank = MemoryBank(global_ids, cams, tracklets, dim, cameras, device=device)
    g = torch.Generator().manual_seed(seed)
    for start in range(0, len(bank), _FILL_ROWS):
        ids = bank.global_ids[start:start + _FILL_ROWS]
        bank.fill(ids, torch.randn(ids.numel(), dim, generator=g).to(device))
    bank.camera_rows()  # one-off collective, before anything is timed
    return bank


def dataset_bank(name: str, divisor: int, dim: int, seed: int, device) -> MemoryBank:
    """The whole memory of dataset ``name`` (rows divided by ``divisor`` for quick runs) in one bank."""
    n, cameras = SIZES[name]
    n = max(n // divisor, 10 * cameras)
    cams, tracklets = memory_layout(n, cameras, seed)
    return make_bank(torch.arange(n), cams, tracklets, dim, cameras, seed, device)


def draw_batch(bank: MemoryBank, batch: int, seed: int):
    """B anchors of the bank: ``(rows (B,) global ids, cams, tracklets, features (B, D) unit, near their rows)``."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randperm(len(bank), generator=g)[:batch].to(bank.device)
    noise = torch.randn(pos.numel(), bank.dim, generator=g).to(bank.device)
    features = F.normalize(bank.rows[pos].float() + 0.3 * noise, dim=1)
    return bank.global_ids[pos], bank.cams[pos], bank.tracklets[pos], features


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """``(seconds, fn())`` with the device's queued work included."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def median(xs) -> float:
    return float(statistics.median(xs))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_extra_bytes(fn, device: torch.device):
    """``(fn(), bytes fn held at its peak beyond what was held before)``; None as bytes when the platform
    cannot tell (CPU: Linux's peak-RSS reset through /proc/self/clear_refs; CUDA: the allocator's peak)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        sync(device)
        return out, torch.cuda.max_memory_allocated(device) - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (VmHWM) to the current one
        before = _status_kib("VmRSS")
    except (OSError, StopIteration):
        return fn(), None
    out = fn()
    return out, 1024 * (_status_kib("VmHWM") - before)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
