"""Synthetic multi-camera vehicles written in the VeRi-776 layout (DESIGN §6, issue 3 item 6).

`generate(out, cfg)` writes
    out/image_train/  training identities, every frame of every passage
    out/image_test/   unseen identities, every frame of every passage (the gallery)
    out/image_query/  one frame per (unseen identity, camera) passage, a copy of that image_test file
    out/synth.json    the config used and the counts
with names `VVVV_cCCC_FFFFFFFF_0.jpg` (vehicle id, camera, frame number), so the VeRi-776 reader reads it.

VeRi-776's convention is kept: the query images are also in image_test, and evaluation ignores gallery images
of the query's identity *and* camera (its own passage), so a query must be found in other cameras.
Each identity passes each of its cameras once, so the VeRi tracklet rule (tracklet = camera + vehicle id)
recovers exactly the passages the generator made.

Determinism: every random choice comes from a generator seeded by (seed, what, ids...) — identity traits by
(seed, vehicle), a camera by (seed, camera), a route by (seed, vehicle), a frame by (seed, vehicle, camera,
frame) — so an image does not depend on the order or the number of the others, and the same seed gives
byte-identical JPEGs.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from reid.data.synthetic_camera import SUPERSAMPLE, make_camera, render_frame
from reid.data.synthetic_vehicle import BODY_PALETTE, draw_vehicle, sample_vehicle
from reid.errors import ReidError

GENERATOR_VERSION = 2          # bump when a change alters the images, so ensure_synthetic regenerates
SPLITS = ("image_train", "image_query", "image_test")
NAME = re.compile(r"^(\d{4})_c(\d{3})_(\d{8})_(\d+)\.jpg$")
_FRAME_STEP = 5                # frame numbers of one passage, like a 5-frame detector stride

# Seed-stream tags: which kind of randomness a generator serves.
_TRAITS, _CAMERA, _ROUTE, _FRAME = 1, 2, 3, 4


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
    colours: int = 8             # body palette size (most common colours first), shared by many identities
    occlusion: float = 0.3       # probability that a frame is partly occluded
    noise: float = 1.0           # multiplier on each camera's sensor noise (0 = none)
    blur: float = 1.0            # multiplier on each camera's blur (0 = none)
    jpeg_quality: int = 90
    # Viewpoints cameras are drawn from, comma-separated, from side / front / rear. Issue 3 specifies a camera's
    # viewpoint as scale, rotation and mirror: "side" (mirrored per camera) is that; front and rear cameras make
    # a much harder cross-view task that a CPU run of minutes does not learn (README: synthetic data).
    views: str = "side"
    lighting: float = 1.0        # multiplier on each camera's colour cast / exposure / gamma / haze (0 = identical)


def validate_synth(cfg: SynthConfig) -> None:
    """Raise ReidError naming the first setting the generator cannot honour."""
    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ReidError(f"synth.{key}: got {getattr(cfg, key)!r}, expected {expected}")
    need(cfg.identities >= 1, "identities", "an integer >= 1")
    need(cfg.test_identities >= 1, "test_identities", "an integer >= 1 (query/gallery need unseen identities)")
    need(cfg.identities + cfg.test_identities <= 9999, "test_identities",
         f"identities + test_identities <= 9999 (4-digit vehicle ids; identities is {cfg.identities})")
    need(2 <= cfg.cameras <= 999, "cameras", "2..999 (3-digit camera ids)")
    need(cfg.min_cameras >= 2, "min_cameras", "an integer >= 2 (CTACL needs cross-camera passages)")
    need(cfg.max_cameras >= cfg.min_cameras, "max_cameras", f">= min_cameras ({cfg.min_cameras})")
    need(cfg.max_cameras <= cfg.cameras, "max_cameras",
         f"<= cameras ({cfg.cameras}): lower synth.max_cameras or raise synth.cameras")
    need(cfg.min_frames >= 1, "min_frames", "an integer >= 1")
    need(cfg.max_frames >= cfg.min_frames, "max_frames", f">= min_frames ({cfg.min_frames})")
    need(cfg.max_frames <= 1000, "max_frames", "<= 1000")
    need(16 <= cfg.height <= 1024, "height", "16..1024 pixels")
    need(16 <= cfg.width <= 1024, "width", "16..1024 pixels")
    need(cfg.seed >= 0, "seed", "an integer >= 0")
    need(1 <= cfg.colours <= len(BODY_PALETTE), "colours", f"1..{len(BODY_PALETTE)}")
    need(0.0 <= cfg.occlusion <= 1.0, "occlusion", "a probability in [0, 1]")
    need(cfg.noise >= 0, "noise", "a number >= 0")
    need(cfg.blur >= 0, "blur", "a number >= 0")
    need(1 <= cfg.jpeg_quality <= 100, "jpeg_quality", "1..100")
    need(cfg.lighting >= 0, "lighting", "a number >= 0")
    need(bool(camera_view_list(cfg)) and set(camera_view_list(cfg)) <= {"side", "front", "rear"}, "views",
         "a comma-separated list of side, front, rear")


def camera_view_list(cfg: SynthConfig) -> list[str]:
    return [v.strip() for v in cfg.views.split(",") if v.strip()]


def _rng(cfg: SynthConfig, *ids: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, *ids])


def plan_passages(cfg: SynthConfig, vid: int) -> list[tuple[int, list[int]]]:
    """The route of vehicle `vid`: [(camera, [frame numbers])...], distinct cameras numbered from 1."""
    rng = _rng(cfg, _ROUTE, vid)
    n_cams = int(rng.integers(cfg.min_cameras, cfg.max_cameras + 1))
    cams = rng.choice(np.arange(1, cfg.cameras + 1), n_cams, replace=False)
    time = int(rng.integers(0, 10_000_000))
    route = []
    for cam in cams:
        n = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
        route.append((int(cam), [time + _FRAME_STEP * k for k in range(n)]))
        time += _FRAME_STEP * n + int(rng.integers(500, 5000))  # driving to the next camera
    return route


def camera_views(cfg: SynthConfig) -> dict[int, str]:
    """{camera: side / front / rear}: which way each camera sees the vehicles (for diagnostics only)."""
    views = camera_view_list(cfg)
    return {c: make_camera(_rng(cfg, _CAMERA, c), cfg.height, cfg.width, cfg.blur, cfg.noise, views, cfg.lighting).view
            for c in range(1, cfg.cameras + 1)}


def image_name(vid: int, cam: int, frame: int) -> str:
    return f"{vid:04d}_c{cam:03d}_{frame:08d}_0.jpg"


def _prepare(out: str) -> None:
    """Create the split folders, removing earlier generator output; refuse to touch anything else."""
    for split in SPLITS:
        folder = os.path.join(out, split)
        os.makedirs(folder, exist_ok=True)
        names = os.listdir(folder)
        foreign = [n for n in names if not NAME.match(n)]
        if foreign:
            raise ReidError(f"{folder}: holds {foreign[0]!r}, which the synthetic generator did not write; "
                            f"expected an empty folder or earlier generator output")
        for n in names:
            os.remove(os.path.join(folder, n))


def _jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    # Fixed encoder settings: the same array and quality always give the same bytes.
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False)
    return buf.getvalue()


def generate(out: str, cfg: SynthConfig) -> dict:
    """Write the dataset under `out` (see module docstring) and return its counts.

    Returns {"train": images, "query": images, "gallery": images, "identities": n, "test_identities": n,
    "cameras": n}. synth.json is written last, so an interrupted run is regenerated by ensure_synthetic.
    """
    validate_synth(cfg)
    try:
        _prepare(out)
    except OSError as e:
        raise ReidError(f"{out}: cannot write the synthetic dataset there ({e.strerror})") from None
    if os.path.exists(os.path.join(out, "synth.json")):
        os.remove(os.path.join(out, "synth.json"))
    H2, W2 = SUPERSAMPLE * cfg.height, SUPERSAMPLE * cfg.width
    views = camera_view_list(cfg)
    cameras = {c: make_camera(_rng(cfg, _CAMERA, c), cfg.height, cfg.width, cfg.blur, cfg.noise, views, cfg.lighting)
               for c in range(1, cfg.cameras + 1)}
    counts = {"train": 0, "query": 0, "gallery": 0}
    used = set()
    first_test = cfg.identities + 1
    for vid in range(1, cfg.identities + cfg.test_identities + 1):
        test = vid >= first_test
        vehicle = sample_vehicle(_rng(cfg, _TRAITS, vid), cfg.colours)
        for cam_id, frames in plan_passages(cfg, vid):
            used.add(cam_id)
            cam = cameras[cam_id]
            layer = draw_vehicle(vehicle, cam.view, W2, H2)
            # VeRi-776 query: one image of each test passage; which frame is part of the route's randomness.
            query_frame = frames[int(_rng(cfg, _ROUTE, vid, cam_id).integers(len(frames)))] if test else None
            for k, frame in enumerate(frames):
                progress = k / (len(frames) - 1) if len(frames) > 1 else 0.5
                arr = render_frame(cam, layer, _rng(cfg, _FRAME, vid, cam_id, frame), progress,
                                   cfg.occlusion, cfg.height, cfg.width)
                data, name = _jpeg(arr, cfg.jpeg_quality), image_name(vid, cam_id, frame)
                if not test:
                    targets = ["image_train"]
                else:
                    targets = ["image_test", "image_query"] if frame == query_frame else ["image_test"]
                for split in targets:
                    with open(os.path.join(out, split, name), "wb") as f:
                        f.write(data)
                    counts[{"image_train": "train", "image_query": "query", "image_test": "gallery"}[split]] += 1
    counts.update(identities=cfg.identities, test_identities=cfg.test_identities, cameras=len(used))
    meta = {"generator": "reid.data.synthetic", "version": GENERATOR_VERSION,
            "config": dataclasses.asdict(cfg), "counts": counts}
    with open(os.path.join(out, "synth.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return counts


def ensure_synthetic(out: str, cfg: SynthConfig) -> None:
    """Generate under `out` unless out/synth.json already records this exact config and generator version."""
    try:
        with open(os.path.join(out, "synth.json")) as f:
            meta = json.load(f)
        if meta.get("version") == GENERATOR_VERSION and meta.get("config") == dataclasses.asdict(cfg):
            return
    except (OSError, ValueError, AttributeError):
        pass  # missing or unreadable record: (re)generate
    generate(out, cfg)
