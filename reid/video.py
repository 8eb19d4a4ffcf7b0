"""The video protocol (VVeRI-901, or any dataset with real tracklet ids): query and gallery items are tracklets.

A tracklet's feature is the mean of its frames' embeddings (optionally of at most ``frames`` evenly spaced
frames), L2-normalised; its camera and identity are its frames' (one camera by construction, one identity by
the dataset). The standard re-ID rule then applies at tracklet level: gallery tracklets of the query's
identity seen by the query's camera are junk. Evaluation itself is ``reid.evaluation.evaluate`` on the pooled
items, so its exactness carries over.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from reid.data.records import Split, natural_key
from reid.errors import ReidError

LEVELS = ("auto", "image", "tracklet")
REAL_TRACKLETS = ("vveri901", "csv")  # formats whose tracklet ids come from a tracker, not from (camera, vehicle)


def evaluation_level(level: str, dataset_format: str) -> str:
    """``eval.level`` → "image" or "tracklet": auto is tracklet for VVeRI-901 (a video benchmark), image otherwise.

    Tracklet level needs real tracklet ids; VeRi-776 and VeRi-Wild only have (camera, vehicle) groups, which would
    pool every image of a vehicle in a camera into one item — a different protocol, refused here.
    """
    if level not in LEVELS:
        raise ReidError(f"config key 'eval.level': got {level!r}, expected one of {', '.join(LEVELS)}")
    if level == "auto":
        return "tracklet" if dataset_format == "vveri901" else "image"
    if level == "tracklet" and dataset_format not in REAL_TRACKLETS:
        raise ReidError(f"config key 'eval.level': tracklet given for data.format={dataset_format}, expected a "
                        f"format with real tracklet ids ({', '.join(REAL_TRACKLETS)}) or eval.level=image")
    return level


@dataclass
class TrackletItems:
    """The tracklets of one split as evaluation items.

    frames: per tracklet, the split rows whose embeddings are averaged (in frame order); cams, pids: (T,) int64;
    paths: (T,) a representative frame per tracklet (its first used frame), for pictures.
    """
    frames: list
    cams: np.ndarray
    pids: np.ndarray
    paths: list

    def __len__(self) -> int:
        return len(self.frames)


def tracklet_items(split: Split, frames: int = 0) -> TrackletItems:
    """Group ``split``'s rows by tracklet, in tracklet-id order; ``frames`` > 0 keeps at most that many evenly
    spaced frames of each (in natural path order, i.e. frame order for VVeRI-901's numbered frames)."""
    if frames < 0:
        raise ReidError(f"config key 'eval.frames': got {frames}, expected 0 (all frames) or a positive count")
    order = np.argsort(split.tracklets, kind="stable")
    bounds = np.flatnonzero(np.diff(split.tracklets[order])) + 1
    groups = np.split(order, bounds) if order.size else []
    chosen, cams, pids, paths = [], [], [], []
    for rows in groups:
        rows = np.array(sorted(rows.tolist(), key=lambda r: natural_key(split.paths[r])), dtype=np.int64)
        if frames and rows.size > frames:
            rows = rows[np.unique(np.linspace(0, rows.size - 1, frames).round().astype(np.int64))]
        if np.unique(split.pids[rows]).size != 1:
            raise ReidError(f"tracklet of {split.paths[rows[0]]}: frames of several identities "
                            f"({sorted(set(split.pids[rows].tolist()))}), expected one identity per tracklet")
        chosen.append(rows)
        cams.append(int(split.cams[rows[0]]))
        pids.append(int(split.pids[rows[0]]))
        paths.append(split.paths[rows[0]])
    return TrackletItems(chosen, np.array(cams, dtype=np.int64), np.array(pids, dtype=np.int64), paths)


def pool_tracklets(frame_features: torch.Tensor, items: TrackletItems) -> torch.Tensor:
    """Frame embeddings → (T, D) tracklet features: each tracklet's mean over its chosen frames, L2-normalised.

    frame_features: (Σ frames, D), the rows of ``np.concatenate(items.frames)`` in that order.
    """
    sizes = torch.tensor([r.size for r in items.frames], dtype=torch.long, device=frame_features.device)
    if frame_features.shape[0] != int(sizes.sum()):
        raise ReidError(f"pool_tracklets: {frame_features.shape[0]} frame features given, expected "
                        f"{int(sizes.sum())} (the chosen frames of {len(items)} tracklets)")
    owner = torch.repeat_interleave(torch.arange(len(items), device=frame_features.device), sizes)
    sums = frame_features.new_zeros(len(items), frame_features.shape[1]).index_add_(0, owner, frame_features)
    return F.normalize(sums / sizes[:, None].to(frame_features.dtype), dim=1)
