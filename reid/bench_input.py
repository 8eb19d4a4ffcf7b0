"""`reid bench input`: images/s of the two input paths of training, against what the full step consumes.

JPEGs of vehicle-crop size (about 256×128, sizes varying like real crops) are written to a temporary folder and
read back through the training code at the default augmentations (``AugmentConfig``):
  data.decode=cpu  what one DataLoader worker does per image: PIL decode + ``train_transform`` (``TrainImages``);
                   decode alone (``read_image``) is timed too;
  data.decode=gpu  workers only read bytes (``EncodedTrainImages``, ``EncodedBatch``); the device decodes a
                   batch in one call (``torchvision.io.decode_jpeg(list, device=...)``: nvJPEG on CUDA) and
                   ``GpuAugment`` applies the same augmentations as batched tensor ops (reid/data/gpu_decode.py).
                   On a CPU device the same code runs on the CPU.
Both are set against the images/s the ``step`` section's full step consumes, when it ran.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np
import torch
from PIL import Image

from reid.bench_common import median, timed
from reid.config import AugmentConfig
from reid.data.gpu_decode import EncodedBatch, EncodedTrainImages, GpuAugment, decode_files
from reid.data.images import TrainImages, read_image, train_transform


def write_jpegs(folder: str, count: int, height: int, width: int, seed: int) -> list[str]:
    """``count`` JPEGs (quality 90) of smooth colour regions plus sensor noise, sizes within ±15 % of H×W."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h = int(height * rng.uniform(0.85, 1.15))
        w = int(width * rng.uniform(0.85, 1.15))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
        pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 8, (h, w, 3))
        path = os.path.join(folder, f"{i:05d}.jpg")
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _worker_rate(paths, s) -> dict:
    """What one DataLoader worker does per image: decode + ``train_transform``, timed sequentially."""
    aug = AugmentConfig()
    zeros = np.zeros(len(paths), dtype=np.int64)
    dataset = TrainImages(paths, zeros, zeros, train_transform(s.height, s.width, **dataclasses.asdict(aug)))
    cpu = torch.device("cpu")
    dataset[(0, 0)]  # warm-up
    decode, full = [], []
    for _ in range(s.reps):  # alternated, so load changes hit both alike
        decode.append(timed(lambda: [read_image(p) for p in paths], cpu)[0])
        full.append(timed(lambda: [dataset[(i, i)] for i in range(len(paths))], cpu)[0])
    return {"decode_images_per_s": len(paths) / median(decode), "worker_images_per_s": len(paths) / median(full)}


def _device_rate(paths, s, device) -> dict:
    """``data.decode=gpu``: workers only read bytes (``EncodedTrainImages`` + ``EncodedBatch``), the device decodes
    a batch in one call and augments it (``GpuAugment``); each part timed per batch of ``gpu_batch`` images."""
    aug = AugmentConfig()
    zeros = np.zeros(len(paths), dtype=np.int64)
    dataset, collate = EncodedTrainImages(paths, zeros, zeros), EncodedBatch()
    augment = GpuAugment(s.height, s.width, paths, device, **dataclasses.asdict(aug))
    cpu = torch.device("cpu")
    batches = [list(range(lo, min(lo + s.gpu_batch, len(paths)))) for lo in range(0, len(paths), s.gpu_batch)]

    def read():
        return [collate([dataset[(i, i)] for i in rows]) for rows in batches]

    encoded = [batch[0] for batch in read()]
    augment(encoded[0])  # warm-up: decoder handles, kernels
    reads, decodes, full = [], [], []
    for _ in range(s.reps):
        reads.append(timed(read, cpu)[0])
        decodes.append(timed(lambda: [decode_files(e.files(), device) for e in encoded], device)[0])
        full.append(timed(lambda: [augment(e) for e in encoded], device)[0])
    return {"batched_device": str(device), "gpu_batch": s.gpu_batch,
            "read_bytes_images_per_s": len(paths) / median(reads),
            "batched_decode_images_per_s": len(paths) / median(decodes),
            "batched_decode_augment_images_per_s": len(paths) / median(full)}


def run(s, device, consumed_images_per_s: float | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="reid-bench-") as folder:
        paths = write_jpegs(folder, s.images, s.height, s.width, s.seed)
        result = {"images": len(paths), "height": s.height, "width": s.width, **_worker_rate(paths, s),
                  **_device_rate(paths, s, device)}
    result["step_consumes_images_per_s"] = consumed_images_per_s
    if consumed_images_per_s:
        result["workers_to_feed_step"] = consumed_images_per_s / result["worker_images_per_s"]
        result["batched_over_step"] = result["batched_decode_augment_images_per_s"] / consumed_images_per_s
    return result


def table(r: dict) -> str:
    where = r["batched_device"]
    rows = [(f"{r['images']} JPEGs of about {r['height']}×{r['width']}; data.decode=cpu, per DataLoader worker:", None),
            ("  decode only (PIL)", r["decode_images_per_s"]),
            ("  decode + train_transform", r["worker_images_per_s"]),
            (f"data.decode=gpu on {where}, batches of {r['gpu_batch']}:", None),
            ("  worker: read bytes + collate", r["read_bytes_images_per_s"]),
            (f"  {where}: batched decode", r["batched_decode_images_per_s"]),
            (f"  {where}: batched decode + GpuAugment", r["batched_decode_augment_images_per_s"])]
    lines = [label if rate is None else f"{label:<40} {rate:9.1f} img/s" for label, rate in rows]
    if r["step_consumes_images_per_s"]:
        lines.append(f"the full step consumes {r['step_consumes_images_per_s']:.1f} img/s: "
                     f"{r['workers_to_feed_step']:.2f} PIL workers keep up; batched decode on {where} covers it "
                     f"{r['batched_over_step']:.1f}×")
    return "\n".join(lines)
