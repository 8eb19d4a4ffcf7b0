"""Record tables: one row per image with its camera, tracklet and (evaluation-only) identity.

Every reader (``reid.data.readers``) ends in :func:`build_dataset`, so the id rules live here
once (DESIGN §1):

- camera ids are contiguous ``0..C-1`` over the whole dataset (train, query and gallery share
  one mapping), ordered by natural sort of the original camera name (``c2`` < ``c10``);
- tracklet ids are contiguous ``0..T-1`` *within a split*, ordered by (camera id, natural sort
  of the original tracklet name); a tracklet is local to its camera, so the same original
  name under two cameras is two tracklets;
- ``pids`` are identities for evaluation and clearly labelled diagnostics only; ``-1`` means
  unknown.  Training code receives :meth:`Split.training_view`, which has no ``pids``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from reid.errors import ReidError

SPLITS = ("train", "query", "gallery")


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``c2`` before ``c10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", str(text)) if part != "")


class TrainingRecords(NamedTuple):
    """What the training side may read: no identities, by construction.

    paths: n absolute paths; cams: (n,) int64; tracklets: (n,) int64.
    """

    paths: list
    cams: np.ndarray
    tracklets: np.ndarray


@dataclass
class Split:
    """One split's record table.

    paths: n absolute image paths.
    cams: (n,) int64 contiguous camera ids (mapping shared by all splits of the dataset).
    tracklets: (n,) int64 contiguous ids 0..T-1 within this split, unique across cameras.
    pids: (n,) int64 identity, -1 = unknown — EVALUATION / DIAGNOSTICS ONLY.
    tracklet_names: tracklet id -> (camera name, original tracklet name).
    """

    paths: list
    cams: np.ndarray
    tracklets: np.ndarray
    pids: np.ndarray
    tracklet_names: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def training_view(self) -> TrainingRecords:
        """The columns training may use; identities are left behind on purpose."""
        return TrainingRecords(self.paths, self.cams, self.tracklets)

    def summary(self) -> dict:
        """{"images", "cameras", "tracklets", "identities"}; unknown pids (-1) count as none."""
        return {
            "images": len(self.paths),
            "cameras": int(np.unique(self.cams).size),
            "tracklets": len(self.tracklet_names),
            "identities": int(np.unique(self.pids[self.pids >= 0]).size),
        }

    @classmethod
    def empty(cls) -> "Split":
        return cls([], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), [])


@dataclass
class ReidDataset:
    """A parsed dataset: three splits plus the camera-name table (camera id -> original name)."""

    name: str
    root: str
    train: Split
    query: Split
    gallery: Split
    camera_names: list

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ReidError(f"split: got {name!r}, expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def summary(self) -> dict:
        """{"train": {...}, "query": {...}, "gallery": {...}} with images/cameras/tracklets/identities."""
        return {name: self.split(name).summary() for name in SPLITS}


class RawSplit(NamedTuple):
    """A reader's output for one split, before ids are assigned.

    paths: n absolute paths; cameras, tracklets: n original names (tracklet local to camera);
    pids: n original identity names, "" = unknown.
    """

    paths: Sequence[str]
    cameras: Sequence[str]
    tracklets: Sequence[str]
    pids: Sequence[str]


def _identity_table(raws) -> dict:
    """Identity name -> int, shared by all splits so query and gallery ids compare.

    All-decimal names keep their value (``"0042"`` -> 42, readable in diagnostics); otherwise
    names are numbered in natural order.  "" (unknown) -> -1.
    """
    names = {p for rows in raws for p in rows.pids if p != ""}
    if all(p.isdecimal() for p in names):
        table = {p: int(p) for p in names}
    else:
        table = {p: i for i, p in enumerate(sorted(names, key=natural_key))}
    table[""] = -1
    return table


def _split_table(raw: RawSplit, camera_ids: dict, pid_ids: dict) -> Split:
    """Assign contiguous tracklet ids ordered by (camera id, natural tracklet name)."""
    cams = np.fromiter((camera_ids[c] for c in raw.cameras), np.int64, len(raw.paths))
    keys = {}
    for cam, name in zip(cams.tolist(), raw.tracklets):
        keys.setdefault((cam, name), None)
    ordered = sorted(keys, key=lambda k: (k[0], natural_key(k[1])))
    tracklet_id = {key: i for i, key in enumerate(ordered)}
    tracklets = np.fromiter((tracklet_id[(c, t)] for c, t in zip(cams.tolist(), raw.tracklets)),
                            np.int64, len(raw.paths))
    camera_names = sorted(camera_ids, key=camera_ids.get)
    names = [(camera_names[cam], name) for cam, name in ordered]
    pids = np.fromiter((pid_ids[p] for p in raw.pids), np.int64, len(raw.paths))
    return Split(list(raw.paths), cams, tracklets, pids, names)


def build_dataset(name: str, root: str, raw: dict, *, where: dict | None = None,
                  optional_eval: bool = False) -> ReidDataset:
    """Turn readers' raw splits into a :class:`ReidDataset`, enforcing the split rules.

    raw: {"train": RawSplit, "query": RawSplit | None, "gallery": RawSplit | None}.
    where: split name -> path to name in errors (the folder or list file it came from).
    optional_eval: query/gallery may be empty (csv manifests for training only).
    Raises ReidError for an empty split, or a training split with a single camera
    (CTACL's inter-camera terms need pairs of cameras, DESIGN §3).
    """
    where = where or {}
    for split in SPLITS:
        rows = raw.get(split)
        if rows is None or len(rows.paths) == 0:
            if split != "train" and optional_eval:
                continue
            place = where.get(split, root)
            raise ReidError(f"{place}: {name} {split} split is empty, expected at least one image")
    all_cameras = {c for rows in raw.values() if rows is not None for c in rows.cameras}
    camera_names = sorted(all_cameras, key=natural_key)
    camera_ids = {c: i for i, c in enumerate(camera_names)}
    pid_ids = _identity_table([rows for rows in raw.values() if rows is not None])
    splits = {s: _split_table(raw[s], camera_ids, pid_ids) if raw.get(s) is not None else Split.empty()
              for s in SPLITS}
    train_cameras = np.unique(splits["train"].cams)
    if train_cameras.size < 2:
        place = where.get("train", root)
        raise ReidError(f"{place}: {name} train split has images from one camera only "
                        f"({camera_names[int(train_cameras[0])]}), expected >= 2 cameras "
                        "(CTACL needs cross-camera pairs)")
    return ReidDataset(name, root, splits["train"], splits["query"], splits["gallery"], camera_names)
