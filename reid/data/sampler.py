"""Camera shards (DESIGN §4): cameras split over ranks by image count, and the global-batch sampler.

Rank r reads only its cameras' images, so its memory rows, intra-camera terms and hard positives stay local.
Which images a step trains on does not depend on the number of ranks: the global batch is drawn first and each
image then goes to the rank that owns its camera.
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


class GlobalBatchSampler(torch.utils.data.Sampler[list]):
    """The global batch of every step, drawn without knowing the world size, and this rank's part of it.

    ``train.batch_size`` is the global batch (the union over ranks). Each epoch is one pass over all N training
    images in ``N // batch_size`` steps (``max_steps`` > 0 caps it), stratified by camera: every camera's images
    are shuffled and spread evenly over the epoch (systematic sampling with a random phase per camera), so each
    step holds close to ``batch_size · n_c / N`` images of camera c and each rank close to its shard's share.
    The draw and every image's augmentation seed are functions of (seed, epoch, step, position in the global
    batch) only, so 1, 2 or 8 ranks train on the same batches augmented the same way (DESIGN §4).

    cams: (N,) camera of every training row; shard_cams: this rank's cameras (None = all, one process).
    Iterating yields, per step, this rank's ``[(row, augmentation seed), …]`` in global-batch order — possibly
    an empty list when the shard is small and the batch too (the loss and BatchNorm accept empty parts).
    """

    def __init__(self, cams: np.ndarray, batch_size: int, seed: int, shard_cams: np.ndarray | None = None,
                 max_steps: int = 0):
        self.cams = np.asarray(cams, dtype=np.int64).reshape(-1)
        n = self.cams.size
        if batch_size < 1:
            raise ReidError(f"config key 'train.batch_size': got {batch_size}, expected >= 1")
        if n < batch_size:
            raise ReidError(f"config key 'train.batch_size': got {batch_size}, larger than the {n} training images; "
                            "expected at most one global batch per epoch's images")
        self.batch_size, self.seed, self.epoch, self.start_step = batch_size, seed, 0, 0
        self.steps = n // batch_size if max_steps <= 0 else min(max_steps, n // batch_size)
        mine = np.ones(int(self.cams.max()) + 1, dtype=bool)
        if shard_cams is not None:
            mine[:] = False
            mine[np.asarray(shard_cams, dtype=np.int64)] = True
        self._mine = mine
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The epoch to draw; ``start_step`` > 0 continues it from that step (a resume from a mid-epoch
        checkpoint), the earlier steps' batches being exactly the ones already trained."""
        self.epoch, self.start_step = int(epoch), int(start_step)

    def __len__(self) -> int:
        return self.steps - self.start_step

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, augmentation seeds) of the whole epoch in draw order, (N,) each."""
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x5A3])
            n = self.cams.size
            cam_of = self.cams
            # Shuffle within each camera, then place the k-th of n_c images at (k + u_c) / n_c in [0, 1).
            shuffled = np.lexsort((rng.random(n), cam_of))  # rows grouped by camera, random order inside
            counts = np.bincount(cam_of)
            first = np.concatenate([[0], np.cumsum(counts)[:-1]])
            k = np.arange(n) - first[cam_of[shuffled]]
            phase = rng.random(counts.size)
            position = (k + phase[cam_of[shuffled]]) / counts[cam_of[shuffled]]
            rows = shuffled[np.lexsort((rng.random(n), position))]  # ties (equal positions) in random order
            seeds = rng.integers(0, 2**62, size=n, dtype=np.int64)
            self._cached = (epoch, rows, seeds)
        return self._cached[1], self._cached[2]

    def global_batch(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Step ``step``'s global batch: (rows (B,), augmentation seeds (B,)), the same on every rank."""
        if not 0 <= step < self.steps:
            raise ReidError(f"GlobalBatchSampler: step {step} asked, expected 0..{self.steps - 1}")
        rows, seeds = self._epoch_order(epoch)
        span = slice(step * self.batch_size, (step + 1) * self.batch_size)
        return rows[span], seeds[span]

    def rank_counts(self, epoch: int, shards: list[np.ndarray]) -> np.ndarray:
        """(steps, R) images each rank gets at each step of ``epoch`` (for the log and for checks)."""
        owner = np.zeros(int(self.cams.max()) + 1, dtype=np.int64)
        for r, shard in enumerate(shards):
            owner[np.asarray(shard, dtype=np.int64)] = r
        rows, _ = self._epoch_order(epoch)
        per_step = owner[self.cams[rows[: self.steps * self.batch_size]]].reshape(self.steps, self.batch_size)
        return np.stack([(per_step == r).sum(1) for r in range(len(shards))], 1)

    def fewest_per_rank(self, shards: list[np.ndarray], epochs: int) -> int:
        """The fewest images any rank gets at any step of epochs 0..epochs-1 (per-rank BatchNorm needs 2)."""
        return min(int(self.rank_counts(epoch, shards).min()) for epoch in range(epochs))

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            rows, seeds = self.global_batch(self.epoch, step)
            keep = self._mine[self.cams[rows]]
            yield list(zip(rows[keep].tolist(), seeds[keep].tolist()))
