"""Camera shards (DESIGN §4): cameras split over ranks by image count, and a sampler over one shard.

Rank r reads only its cameras' images, so its memory rows, intra-camera terms and hard positives stay local.
"""

from __future__ import annotations

import numpy as np
import torch

from reid.errors import ReidError


def partition_cameras(images_per_camera: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Camera ids per rank, balanced by image count (greedy: largest camera to the lightest rank).

    images_per_camera: (C,) counts indexed by camera id. Cameras with no images are left out.
    Returns ``world_size`` sorted int64 arrays. ReidError if there are fewer cameras than ranks.
    """
    counts = np.asarray(images_per_camera, dtype=np.int64).reshape(-1)
    if world_size < 1:
        raise ReidError(f"world size {world_size} given, expected >= 1")
    cameras = np.flatnonzero(counts > 0)
    if world_size > cameras.size:
        raise ReidError(f"camera shards: world size {world_size} is larger than the {cameras.size} cameras with "
                        "training images, expected at most one rank per camera")
    load = np.zeros(world_size, dtype=np.int64)
    shards: list[list[int]] = [[] for _ in range(world_size)]
    # Stable order (count descending, then id) so every rank computes the same partition.
    for cam in sorted(cameras.tolist(), key=lambda c: (-counts[c], c)):
        r = int(np.argmin(load))
        shards[r].append(cam)
        load[r] += counts[cam]
    return [np.array(sorted(s), dtype=np.int64) for s in shards]


def shard_imbalance(images_per_camera, shards) -> float:
    """max / mean images per rank (1.0 = perfectly balanced), for the log."""
    counts = np.asarray(images_per_camera, dtype=np.int64)
    per_rank = np.array([counts[np.asarray(s, dtype=np.int64)].sum() for s in shards], dtype=np.float64)
    return float(per_rank.max() / max(per_rank.mean(), 1e-12))


class CameraShardSampler(torch.utils.data.Sampler[int]):
    """Global row indices of this rank's cameras only, ``steps_per_epoch * batch_size`` per epoch.

    cams: (N,) camera of every training row; shard_cams: this rank's camera ids. Every rank must be given
    the same ``steps_per_epoch`` (the caller decides, e.g. from the largest shard) so collectives line
    up. Shuffled by (seed, epoch): reshuffled passes are concatenated until the epoch is full.
    """

    def __init__(self, cams: np.ndarray, shard_cams: np.ndarray, batch_size: int, steps_per_epoch: int, seed: int):
        cams = np.asarray(cams).reshape(-1)
        if batch_size < 1 or steps_per_epoch < 1:
            raise ReidError(f"CameraShardSampler: batch_size {batch_size} / steps_per_epoch {steps_per_epoch} "
                            "given, expected both >= 1")
        self.indices = np.flatnonzero(np.isin(cams, np.asarray(shard_cams)))
        if self.indices.size == 0:
            raise ReidError(f"CameraShardSampler: cameras {list(np.asarray(shard_cams))} have no training images, "
                            "expected a shard with at least one image")
        self.batch_size, self.steps_per_epoch, self.seed, self.epoch = batch_size, steps_per_epoch, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.batch_size

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        need = len(self)
        passes = -(-need // self.indices.size)
        order = np.concatenate([rng.permutation(self.indices) for _ in range(passes)])[:need]
        return iter(order.tolist())
