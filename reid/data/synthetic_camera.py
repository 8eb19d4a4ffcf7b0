"""What a synthetic camera does to a vehicle: viewpoint, background, occluders, lighting, blur and noise.

Each camera is a fixed installation with its own domain (DESIGN §6): a viewpoint (side / front / rear, mirrored,
skewed as a three-quarter view, scaled, tilted), a background texture, a colour cast, gamma and haze, optics blur
and sensor noise. These differ between cameras as they do in deployments, which is what makes cross-camera
matching harder than same-camera matching. Within a passage (tracklet) the vehicle moves a little from frame
to frame (drives across a side view, approaches a front view) and may be partly hidden by an occluder.

Images are painted at twice the output size and box-downscaled, which anti-aliases the polygon edges.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 2
_SHAKE = 3  # pixels of background jitter (camera shake) at the supersampled size


@dataclass
class Camera:
    view: str                  # side / front / rear (synthetic_vehicle.VIEWS)
    mirror: bool               # side view: vehicle drives right-to-left instead of left-to-right
    shear: float               # horizontal skew, a cheap stand-in for a three-quarter view
    scale: float
    rotation: float            # degrees; the camera is not level
    dy: float                  # vertical offset of the vehicle, in frame heights
    gain: np.ndarray           # (3,) per-channel gain: brightness times colour cast
    gamma: float
    haze: float                # share of the haze colour mixed into every pixel
    haze_colour: np.ndarray    # (3,) in [0, 1]
    blur: float                # Gaussian radius in output pixels
    noise: float               # sensor noise std, in 0..255 units
    occluder_colour: tuple
    background: np.ndarray     # (2H + 2*_SHAKE, 2W + 2*_SHAKE, 3) uint8, this camera's scene


def make_camera(rng: np.random.Generator, height: int, width: int, blur: float, noise: float,
                views: list[str] = ("side", "side", "front", "rear"), lighting: float = 1.0) -> Camera:
    """Sample one camera installation for (height, width) output images, its viewpoint drawn from `views`;
    `lighting` scales how far its colour cast, exposure, gamma and haze stray from a neutral camera."""
    cast = 1.0 + lighting * rng.uniform(-0.18, 0.18, 3)
    exposure = 1.0 + lighting * (rng.uniform(0.6, 1.25) - 1.0)
    return Camera(
        view=str(rng.choice(list(views))), mirror=bool(rng.random() < 0.5),
        shear=float(rng.uniform(-0.3, 0.3)), scale=float(rng.uniform(0.8, 1.05)),
        rotation=float(rng.uniform(-8, 8)), dy=float(rng.uniform(-0.06, 0.06)),
        gain=(exposure * cast).astype(np.float32), gamma=float(1.0 + lighting * (rng.uniform(0.75, 1.35) - 1.0)),
        haze=float(lighting * rng.uniform(0.0, 0.25)), haze_colour=rng.uniform(0.6, 1.0, 3).astype(np.float32),
        blur=float(rng.uniform(0.0, 1.0) * blur), noise=float(rng.uniform(2.0, 9.0) * noise),
        occluder_colour=tuple(int(c) for c in rng.integers(30, 220, 3)),
        background=_background(rng, SUPERSAMPLE * height + 2 * _SHAKE, SUPERSAMPLE * width + 2 * _SHAKE),
    )


def _smooth(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """(h, w) float32 low-frequency noise in about [-1, 1]: a coarse random grid, bicubically enlarged."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A scene: a wall / building / foliage band above a horizon, a road with lane lines below."""
    horizon = int(h * rng.uniform(0.2, 0.55))
    upper, road = rng.integers(40, 230, 3), rng.integers(50, 150) + rng.integers(-15, 16, 3)
    img = np.empty((h, w, 3), np.float32)
    img[:horizon] = upper
    img[horizon:] = road
    img += _smooth(rng, h, w, int(rng.integers(3, 8)))[..., None] * rng.uniform(10, 35)
    img += rng.normal(0, rng.uniform(2, 8), (h, w, 3))  # fixed grain of the scene itself (asphalt, leaves)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    if rng.random() < 0.6:  # windows of a building along the upper band
        step_x, step_y = int(rng.integers(8, 20)), int(rng.integers(8, 16))
        shade = tuple(int(c) for c in np.clip(upper * rng.uniform(0.4, 0.8), 0, 255))
        for y in range(2, max(horizon - 4, 2), step_y):
            for x in range(int(rng.integers(0, step_x)), w, step_x):
                draw.rectangle([x, y, x + step_x // 2, y + step_y // 2], fill=shade)
    lane = (235, 235, 225) if rng.random() < 0.6 else (230, 190, 40)
    for _ in range(int(rng.integers(1, 3))):
        y0, y1 = rng.uniform(horizon, h, 2)
        draw.line([(0, y0), (w, y1)], fill=lane, width=int(rng.integers(1, 4)))
    return np.asarray(pil)


def render_frame(cam: Camera, layer: Image.Image, rng: np.random.Generator, progress: float,
                 occlusion: float, height: int, width: int) -> np.ndarray:
    """One frame of a passage: `layer` (RGBA vehicle, supersampled size) seen by `cam` -> (height, width, 3) uint8.

    `progress` in [0, 1] is where the frame lies in the passage; `rng` is this frame's own generator.
    """
    H2, W2 = SUPERSAMPLE * height, SUPERSAMPLE * width
    ox, oy = rng.integers(0, 2 * _SHAKE + 1, 2)
    scene = Image.fromarray(cam.background[oy:oy + H2, ox:ox + W2]).convert("RGBA")
    zoom = 1.0
    if cam.view != "side":  # approaching a front camera, leaving a rear one
        zoom = 0.92 + 0.16 * (progress if cam.view == "front" else 1 - progress)
    drive = (progress - 0.5) * 0.12 * W2 * (-1 if cam.mirror else 1) if cam.view == "side" else 0.0
    forward = _affine(
        centre=(W2 / 2, H2 / 2), mirror=cam.mirror, scale=cam.scale * zoom * (1 + rng.normal(0, 0.04)),
        shear=cam.shear, degrees=cam.rotation + rng.normal(0, 2.0),
        shift=(drive + rng.normal(0, 0.02) * W2, (cam.dy + rng.normal(0, 0.02)) * H2))
    inverse = np.linalg.inv(forward)[:2].ravel()
    moved = layer.transform((W2, H2), Image.AFFINE, tuple(float(x) for x in inverse), resample=Image.BILINEAR)
    img = Image.alpha_composite(scene, moved).convert("RGB")
    if rng.random() < occlusion:
        _occlude(ImageDraw.Draw(img), cam, rng, H2, W2)
    img = img.resize((width, height), Image.BOX)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr ** cam.gamma * (cam.gain * rng.uniform(0.93, 1.07))  # light changes a little during a passage
    arr = (1 - cam.haze) * arr + cam.haze * cam.haze_colour
    img = Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8))
    if cam.blur > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(cam.blur))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, cam.noise, (height, width, 3)).astype(np.float32)
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8)


def _affine(centre: tuple, mirror: bool, scale: float, shear: float, degrees: float, shift: tuple) -> np.ndarray:
    """3x3 matrix: vehicle-layer pixel -> frame pixel (mirror, scale, skew and tilt about the centre, then shift)."""
    cx, cy = centre
    to_origin = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], np.float64)
    flip = np.diag([-1.0 if mirror else 1.0, 1.0, 1.0])
    size = np.diag([scale, scale, 1.0])
    skew = np.array([[1, shear, 0], [0, 1, 0], [0, 0, 1]], np.float64)
    a = np.deg2rad(degrees)
    turn = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    back = np.array([[1, 0, cx + shift[0]], [0, 1, cy + shift[1]], [0, 0, 1]], np.float64)
    return back @ turn @ skew @ size @ flip @ to_origin


def _occlude(draw: ImageDraw.ImageDraw, cam: Camera, rng: np.random.Generator, H2: int, W2: int) -> None:
    """Hide part of the vehicle behind a pole, a passing object from below, or foliage."""
    colour = tuple(int(c) for c in np.clip(np.array(cam.occluder_colour) + rng.integers(-25, 26, 3), 0, 255))
    kind = int(rng.integers(3))
    if kind == 0:
        x, half = rng.uniform(0.2, 0.8) * W2, rng.uniform(0.03, 0.07) * W2
        draw.rectangle([x - half, 0, x + half, H2], fill=colour)
    elif kind == 1:
        w, h = rng.uniform(0.3, 0.55) * W2, rng.uniform(0.2, 0.4) * H2
        x0 = 0 if rng.random() < 0.5 else W2 - w
        draw.rectangle([x0, H2 - h, x0 + w, H2], fill=colour)
    else:
        cx, cy = rng.uniform(0.15, 0.85) * W2, rng.uniform(0.15, 0.85) * H2
        rx, ry = rng.uniform(0.1, 0.2) * W2, rng.uniform(0.1, 0.2) * H2
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
