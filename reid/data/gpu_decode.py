"""JPEG decoding and training augmentation on the training device, batched (``data.decode=gpu``).

With ``data.decode=cpu`` DataLoader workers decode with PIL and run ``train_transform``; 16 CPU cores decode
only about 10,000 small JPEGs/s. Here workers only read file bytes (``EncodedTrainImages``), the collate
packs them into one flat uint8 tensor (``EncodedBatch``: one shared-memory segment per batch, not one per
image), and ``GpuAugment`` decodes them with ``torchvision.io.decode_jpeg`` on the device (one batched call on
CUDA; other formats through ``decode_image`` on the CPU) and applies ``train_transform``'s augmentations as
batched tensor ops. Each image's random parameters come from a ``torch.Generator`` seeded by its sampler seed,
drawn on the CPU, so an image is augmented the same way whichever rank, worker or batch position it has.
Pixels differ slightly from the PIL path (other decoder and resampler, float instead of uint8 between steps);
the parameter distributions are those of ``train_transform``. On a CPU device the same code decodes on the CPU.
"""
from __future__ import annotations

import logging
import math
import re
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from reid.data.images import IMAGENET_MEAN, IMAGENET_STD, _corrupt
from reid.errors import ReidError

log = logging.getLogger(__name__)

_JPEG_MAGIC = (0xFF, 0xD8, 0xFF)
_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
# Fixed slots in each image's uniform draws, so switching one augmentation off leaves the others' draws as they were.
_FLIP, _ANGLE, _SCALE, _SHEAR, _TOP, _LEFT, _ORDER, _JITTER, _BLUR, _SIGMA, _ERASE, _ATTEMPTS = (
    0, 1, 2, 3, 4, 5, 6, 10, 14, 15, 16, 17)  # _ORDER: 4 slots; _JITTER: brightness, contrast, saturation, hue
_ERASE_TRIES = 10                                  # RandomErasing: 10 tries of (area, log ratio, top, left)
_SLOTS = _ATTEMPTS + 4 * _ERASE_TRIES


class EncodedImages(NamedTuple):
    """A batch's undecoded files: ``data`` (total bytes,) uint8, image k is ``data[offsets[k]:offsets[k+1]]``;
    ``rows`` (b,) their dataset rows (to name a corrupt file), ``seeds`` (b,) their augmentation seeds."""
    data: torch.Tensor
    offsets: torch.Tensor
    rows: torch.Tensor
    seeds: torch.Tensor

    def files(self) -> list[torch.Tensor]:
        return list(torch.split(self.data, self.offsets.diff().tolist())) if len(self.rows) else []


class EncodedTrainImages(Dataset):
    """``ds[(row, seed)] -> (file bytes (n,) uint8, camera, tracklet, row, seed)``; no decoding, no identities.

    A file that cannot be read raises CorruptImageError naming it; with ``skip_corrupt`` it gives no bytes and
    ``GpuAugment`` turns it into a blank image and counts it. A bare ``row`` draws its seed from torch's stream.
    """

    def __init__(self, paths, cams, tracklets, skip_corrupt: bool = False):
        self.paths, self.skip_corrupt = list(paths), skip_corrupt
        if not (len(cams) == len(tracklets) == len(self.paths)):
            raise ReidError(f"EncodedTrainImages: {len(self.paths)} paths, {len(cams)} cameras and "
                            f"{len(tracklets)} tracklets, expected equal lengths")
        self.cams = torch.as_tensor(cams, dtype=torch.int64)
        self.tracklets = torch.as_tensor(tracklets, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        if isinstance(item, (tuple, list)):
            row, seed = int(item[0]), int(item[1])
        else:
            row, seed = int(item), int(torch.randint(2**62, ()))
        try:
            with open(self.paths[row], "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        except OSError as exc:
            if not self.skip_corrupt:
                raise _corrupt(self.paths[row], exc) from None
            data = torch.empty(0, dtype=torch.uint8)
        return data, int(self.cams[row]), int(self.tracklets[row]), row, seed


class EncodedBatch:
    """DataLoader ``collate_fn`` for ``EncodedTrainImages``: a (possibly empty) list of samples ->
    ``(EncodedImages, cams (b,), tracklets (b,), rows (b,))``, the shape of ``TrainBatch``'s output."""

    def __call__(self, samples):
        files, cams, tracklets, rows, seeds = zip(*samples) if samples else ((), (), (), (), ())
        offsets = torch.tensor([0] + [len(f) for f in files], dtype=torch.int64).cumsum(0)
        data = torch.cat(files) if files else torch.empty(0, dtype=torch.uint8)
        rows = torch.tensor(rows, dtype=torch.int64)
        return (EncodedImages(data, offsets, rows, torch.tensor(seeds, dtype=torch.int64)),
                torch.tensor(cams, dtype=torch.int64), torch.tensor(tracklets, dtype=torch.int64), rows.clone())


def _is_jpeg(file: torch.Tensor) -> bool:
    return len(file) >= 3 and tuple(file[:3].tolist()) == _JPEG_MAGIC


def _decode_other(file: torch.Tensor, device: torch.device) -> torch.Tensor:
    image = decode_image(file, mode=ImageReadMode.RGB)
    return (image[0] if image.ndim == 4 else image).to(device)  # an animated GIF: its first frame, as PIL


def decode_files(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | RuntimeError]:
    """Encoded files -> (3, h, w) uint8 (uint16 for 16-bit PNGs) RGB images on ``device``, or the decoder's
    error for a file no decoder reads. JPEGs: one ``decode_jpeg`` call (batched nvjpeg on CUDA, per image on the
    CPU); anything else, and a JPEG that nvjpeg refuses (CMYK, arithmetic coding): ``decode_image`` on the CPU."""
    out: list = [None] * len(files)
    jpegs = [k for k, f in enumerate(files) if _is_jpeg(f)]
    if jpegs:
        try:
            for k, image in zip(jpegs, decode_jpeg([files[k] for k in jpegs], mode=ImageReadMode.RGB, device=device)):
                out[k] = image
        except RuntimeError:  # one bad file fails the whole call: decode them one by one
            for k in jpegs:
                try:
                    out[k] = decode_jpeg(files[k], mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    pass
    for k, file in enumerate(files):
        if out[k] is None:
            try:
                out[k] = _decode_other(file, device)
            except (RuntimeError, ValueError) as exc:
                out[k] = RuntimeError(re.sub(r"^\w+, \S+:\d+, ", "", str(exc)))  # drop the C++ source location
    return out


def draw_params(seeds: torch.Tensor) -> torch.Tensor:
    """(b,) seeds -> (b, _SLOTS) float64 uniforms in [0, 1), row k from a generator seeded by seeds[k]."""
    out = torch.empty(len(seeds), _SLOTS, dtype=torch.float64)
    g = torch.Generator()
    for k, seed in enumerate(seeds.tolist()):
        out[k] = torch.rand(_SLOTS, generator=g.manual_seed(seed), dtype=torch.float64)
    return out


def _uniform(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + u * (hi - lo)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    sector = torch.floor(h * 6)
    f = h * 6 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = sector.long().remainder(6)
    table = torch.stack([torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table.gather(0, sector[None, :, None].expand(1, -1, 3, -1, -1))[0]


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (x * x.new_tensor(_GREY)[None, :, None, None]).sum(1, keepdim=True)


class GpuAugment:
    """Encoded batch -> (b, 3, height, width) float32 on ``device``: decode, resize, then ``train_transform``'s
    augmentations (same options and defaults) as batched ops, ImageNet-normalised; (0, 3, H, W) for no images.

    ``paths`` name corrupt files: CorruptImageError, or with ``skip_corrupt`` a blank image counted in ``.skipped``.
    """

    def __init__(self, height: int, width: int, paths, device, *, skip_corrupt: bool = False, flip: float = 0.5,
                 pad: int = 10, jitter: float = 0.2, erasing: float = 0.5, rotation: float = 0.0,
                 shear: float = 0.0, scale: float = 0.0, hue: float = 0.0, blur: float = 0.0):
        self.height, self.width, self.paths, self.device = height, width, paths, torch.device(device)
        self.skip_corrupt, self.skipped = skip_corrupt, 0
        self.flip, self.pad, self.jitter, self.erasing, self.hue, self.blur = flip, pad, jitter, erasing, hue, blur
        self.rotation, self.shear, self.scale = rotation, shear, scale
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device)[None, :, None, None]
        self.std = torch.tensor(IMAGENET_STD, device=self.device)[None, :, None, None]

    @torch.no_grad()
    def __call__(self, encoded: EncodedImages) -> torch.Tensor:
        x = self.decode_resized(encoded)
        if not len(x):  # this rank owns none of the step's images
            return x
        u = draw_params(encoded.seeds)
        if self.flip:
            x = torch.where(self._to_device(u[:, _FLIP] < self.flip)[:, None, None, None], x.flip(-1), x)
        if self.rotation or self.shear or self.scale:
            x = self._affine(x, u)
        if self.pad:
            x = self._pad_crop(x, u)
        if self.jitter or self.hue:
            x = self._colour(x, u)
        if self.blur and bool((u[:, _BLUR] < self.blur).any()):
            x = self._blur(x, u)
        x = (x - self.mean) / self.std
        if self.erasing:
            x = self._erase(x, u)
        return x

    def decode_resized(self, encoded: EncodedImages) -> torch.Tensor:
        """(b, 3, height, width) float32 in [0, 1] on the device: decoded files, antialiased bilinear resize."""
        out = torch.zeros(len(encoded.rows), 3, self.height, self.width, device=self.device)
        for k, (image, row) in enumerate(zip(decode_files(encoded.files(), self.device), encoded.rows.tolist())):
            if isinstance(image, Exception):
                exc = _corrupt(self.paths[row], image)
                if not self.skip_corrupt:
                    raise exc
                self.skipped += 1
                log.warning("skipping %s", exc)
                continue  # blank, augmented like the others (as images.py's blank image)
            image = image.float() / (65535.0 if image.dtype == torch.uint16 else 255.0)
            if image.shape[1:] != (self.height, self.width):
                image = F.interpolate(image[None], (self.height, self.width), mode="bilinear", antialias=True,
                                      align_corners=False)[0]
            out[k] = image.clamp_(0, 1)
        return out

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, torch.float32 if t.is_floating_point() else t.dtype, non_blocking=True)

    def _affine(self, x, u):
        """RandomAffine: rotation about the centre, x-shear and zoom in pixel units; nearest, black fill."""
        angle = torch.deg2rad(_uniform(u[:, _ANGLE], -self.rotation, self.rotation))
        shear = torch.deg2rad(_uniform(u[:, _SHEAR], -self.shear, self.shear))
        zoom = _uniform(u[:, _SCALE], 1 - self.scale, 1 + self.scale)
        cos, sin, tan = angle.cos(), angle.sin(), shear.tan()
        # inverse of zoom * R(angle) @ [[1, tan], [0, 1]] (output pixel -> input pixel, centred coordinates):
        # torchvision's affine(angle, scale, shear=(shear, 0)) to the pixel, as tests/test_gpu_decode.py pins
        inv = torch.stack([torch.stack([cos - tan * sin, sin + tan * cos], 1),
                           torch.stack([-sin, cos], 1)], 1) / zoom[:, None, None]
        h, w = self.height, self.width
        inv[:, 0, 1] *= h / w  # to grid_sample's [-1, 1] coordinates on each axis
        inv[:, 1, 0] *= w / h
        theta = self._to_device(torch.cat([inv, torch.zeros(len(x), 2, 1, dtype=inv.dtype)], 2))
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)

    def _pad_crop(self, x, u):
        """Pad by ``pad`` black pixels, then a random (height, width) crop: a shift of up to ±pad."""
        span = 2 * self.pad + 1
        top = self._to_device((u[:, _TOP] * span).long().clamp_(max=span - 1))
        left = self._to_device((u[:, _LEFT] * span).long().clamp_(max=span - 1))
        padded = F.pad(x, (self.pad,) * 4)
        rows = top[:, None, None] + torch.arange(self.height, device=x.device)[None, :, None]
        cols = left[:, None, None] + torch.arange(self.width, device=x.device)[None, None, :]
        batch = torch.arange(len(x), device=x.device)[:, None, None]
        return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()  # (b, H, W, 3) -> (b, 3, H, W)

    def _colour(self, x, u):
        """ColorJitter: brightness, contrast, saturation and hue in a random order per image."""
        j = self.jitter
        factors = [_uniform(u[:, _JITTER + i], max(0.0, 1 - j), 1 + j) for i in range(3)]
        factors.append(_uniform(u[:, _JITTER + 3], -self.hue, self.hue))
        enabled = [0, 1, 2] * bool(j) + [3] * bool(self.hue)
        order = u[:, _ORDER:_ORDER + 4].argsort(1)  # a random permutation of the four operations
        for position in range(4):
            for op in enabled:
                chosen = order[:, position] == op
                if not bool(chosen.any()):
                    continue
                if op == 3:  # the HSV round trip is not exact: apply it to the chosen images only
                    hsv = _rgb_to_hsv(x)
                    hsv[:, 0] = (hsv[:, 0] + self._to_device(factors[3])[:, None, None]) % 1.0
                    x = torch.where(self._to_device(chosen)[:, None, None, None], _hsv_to_rgb(hsv), x)
                    continue
                f = self._to_device(torch.where(chosen, factors[op], 1.0))[:, None, None, None]  # 1 = unchanged
                if op == 0:
                    x = (x * f).clamp_(0, 1)
                elif op == 1:
                    x = (f * x + (1 - f) * _grey(x).mean((2, 3), keepdim=True)).clamp_(0, 1)
                else:
                    x = (f * x + (1 - f) * _grey(x)).clamp_(0, 1)
        return x

    def _blur(self, x, u):
        """GaussianBlur(5, sigma in [0.1, 1.5]) with probability ``blur``, separable, reflect padding."""
        taps = torch.arange(-2, 3, dtype=torch.float64)
        sigma = _uniform(u[:, _SIGMA], 0.1, 1.5)
        kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
        kernel = kernel / kernel.sum(1, keepdim=True)
        kernel[u[:, _BLUR] >= self.blur] = (taps == 0).double()  # a delta leaves the others exactly as they were
        kernel = self._to_device(kernel)[:, :, None, None, None]
        h, w = self.height, self.width
        padded = F.pad(x, (2, 2, 0, 0), mode="reflect")
        x = sum(kernel[:, t] * padded[..., t:t + w] for t in range(5))
        padded = F.pad(x, (0, 0, 2, 2), mode="reflect")
        return sum(kernel[:, t] * padded[..., t:t + h, :] for t in range(5))

    def _erase(self, x, u):
        """RandomErasing: one rectangle of 2-33 % of the image, aspect 0.3-3.3, set to 0 (after normalising)."""
        h, w = self.height, self.width
        tries = u[:, _ATTEMPTS:].reshape(len(u), _ERASE_TRIES, 4)
        area = h * w * _uniform(tries[..., 0], 0.02, 0.33)
        aspect = torch.exp(_uniform(tries[..., 1], math.log(0.3), math.log(3.3)))
        eh, ew = torch.round(torch.sqrt(area * aspect)).long(), torch.round(torch.sqrt(area / aspect)).long()
        fits = (eh < h) & (ew < w)
        first = fits.long().argmax(1, keepdim=True)  # the first try that fits, as torchvision's loop
        eh, ew, t = eh.gather(1, first)[:, 0], ew.gather(1, first)[:, 0], tries[torch.arange(len(u)), first[:, 0]]
        top, left = (t[:, 2] * (h - eh + 1)).long(), (t[:, 3] * (w - ew + 1)).long()
        erase = (u[:, _ERASE] < self.erasing) & fits.any(1)
        box = self._to_device(torch.stack([top, top + eh, left, left + ew], 1))
        ys = torch.arange(h, device=x.device)[None, :, None]
        xs = torch.arange(w, device=x.device)[None, None, :]
        inside = ((ys >= box[:, 0, None, None]) & (ys < box[:, 1, None, None]) & (xs >= box[:, 2, None, None])
                  & (xs < box[:, 3, None, None]) & self._to_device(erase)[:, None, None])
        return x.masked_fill(inside[:, None], 0.0)


def make_gpu_pipeline(cfg, paths, cams, tracklets, device):
    """``data.decode=gpu``: (dataset, collate_fn, augment) for the training loader and loop; ``augment(images)``
    turns the loader's first batch item into the (b, 3, H, W) float32 batch on ``device``."""
    dataset = EncodedTrainImages(paths, cams, tracklets, skip_corrupt=cfg.data.skip_corrupt)
    augment = GpuAugment(cfg.data.height, cfg.data.width, dataset.paths, device,
                         skip_corrupt=cfg.data.skip_corrupt, **vars(cfg.augment))
    return dataset, EncodedBatch(), augment


def decode_rate(paths, device, batch: int = 256) -> float:
    """Images/s that ``decode_files`` decodes ``paths`` on ``device`` in batches of ``batch`` (files read into
    memory first and not timed; no resize or augmentation; one untimed warm-up batch)."""
    device, paths, files = torch.device(device), list(paths), []
    for path in paths:
        with open(path, "rb") as f:
            files.append(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8))
    if not files:
        raise ReidError("decode_rate: no image paths given, expected at least one")

    def run(lo):
        for path, image in zip(paths[lo:lo + batch], decode_files(files[lo:lo + batch], device)):
            if isinstance(image, Exception):
                raise _corrupt(path, image)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run(0)
    start = time.perf_counter()
    for lo in range(0, len(files), batch):
        run(lo)
    return len(files) / (time.perf_counter() - start)
