"""Synthetic multi-camera vehicles in the VeRi-776 layout (DESIGN §6, issue 3 item 6). Work in progress."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SynthConfig:
    identities: int = 200        # training identities
    test_identities: int = 100   # unseen identities for query/gallery
    cameras: int = 10
    min_cameras: int = 2         # cameras each identity passes (>= 2)
    max_cameras: int = 4
    min_frames: int = 3          # frames per tracklet (one passage)
    max_frames: int = 6
    height: int = 64
    width: int = 64
    seed: int = 0
    colours: int = 8             # body palette size, shared by many identities
    occlusion: float = 0.3       # probability that a frame is partly occluded
    noise: float = 1.0           # scale of each camera's sensor noise (0 = none)
    blur: float = 1.0            # scale of each camera's blur (0 = none)
    jpeg_quality: int = 90


def generate(out: str, cfg: SynthConfig) -> dict:
    raise NotImplementedError("synthetic generator: being written")


def ensure_synthetic(out: str, cfg: SynthConfig) -> None:
    raise NotImplementedError("synthetic generator: being written")
