"""Image loading, torch Datasets and torchvision ``transforms.v2`` pipelines (DESIGN §3).

``TrainImages`` yields (image, camera, tracklet, row) and is never given identities, so the
training side cannot read them.  ``EvalImages`` yields (image, row) for embedding
query/gallery images and for filling the memory bank.

Corrupt files: by default a :class:`CorruptImageError` (a ReidError) whose message is one
line naming the file, also when raised inside a DataLoader worker.  With
``skip_corrupt=True`` a blank image is returned instead and counted in ``.skipped``, a
counter in shared memory so skips in worker processes are seen by the caller.
"""

from __future__ import annotations

import logging

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms import v2

from reid.errors import ReidError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
_SKIP_SLOTS = 1024  # one counter slot per DataLoader worker (+ the main process)


class CorruptImageError(ReidError):
    """An image file PIL cannot read.  ``str(exc)`` is one line naming the file.

    DataLoader re-raises a worker's exception as ``type(exc)("Caught ... Original Traceback
    ... <Type>: <message>")``; the constructor recovers the original one-line message and
    keeps the worker's traceback in ``.worker_traceback``.
    """

    def __init__(self, message: str = ""):
        self.worker_traceback = ""
        if message.startswith("Caught ") and "\n" in message:
            self.worker_traceback = message
            tail = message.rstrip().splitlines()[-1]
            marker = f"{type(self).__name__}: "
            message = tail.split(marker, 1)[1] if marker in tail else tail
        super().__init__(message)


def _corrupt(path: str, exc: BaseException) -> CorruptImageError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return CorruptImageError(f"{path}: corrupt or unreadable image ({reason}), expected a JPEG/PNG file")


def verify_image(path: str) -> None:
    """Open ``path``'s header (and PIL's cheap integrity check); raise CorruptImageError if unreadable."""
    try:
        with Image.open(path) as image:
            image.verify()
    except _READ_ERRORS as exc:
        raise _corrupt(path, exc) from None


def read_image(path: str) -> Image.Image:
    """Decode ``path`` fully as RGB; raise CorruptImageError naming the file if it cannot."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except _READ_ERRORS as exc:
        raise _corrupt(path, exc) from None


def train_transform(height: int, width: int, *, flip: float = 0.5, pad: int = 10,
                    jitter: float = 0.2, erasing: float = 0.5, rotation: float = 0.0, shear: float = 0.0,
                    scale: float = 0.0, hue: float = 0.0, blur: float = 0.0) -> v2.Compose:
    """Training augmentations: PIL image -> (3, height, width) float32, normalised.

    Resize, horizontal flip, optional random affine (``rotation`` and ``shear`` in degrees, ``scale`` as ±
    a share; the original uses rotation 10°), pad + random crop, colour jitter (brightness/contrast/
    saturation ``jitter``, hue ``hue``), Gaussian blur with probability ``blur``, ImageNet normalisation,
    then random erasing with probability ``erasing`` (on the normalised tensor, as in the original).
    The affine, hue and blur steps imitate what differs between two cameras (tilt, viewpoint skew, zoom,
    colour cast, optics), so that features learnt within cameras transfer across them.
    """
    steps = [v2.ToImage(), v2.Resize((height, width), antialias=True), v2.RandomHorizontalFlip(flip)]
    if rotation or shear or scale:
        steps.append(v2.RandomAffine(degrees=rotation, shear=(-shear, shear) if shear else None,
                                     scale=(1.0 - scale, 1.0 + scale) if scale else None))
    if pad:
        steps += [v2.Pad(pad), v2.RandomCrop((height, width))]
    if jitter or hue:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=hue))
    if blur:
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=blur))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if erasing:
        steps.append(v2.RandomErasing(p=erasing))
    return v2.Compose(steps)


def eval_transform(height: int, width: int) -> v2.Compose:
    """Deterministic: PIL image -> resize -> (3, height, width) float32, ImageNet-normalised."""
    return v2.Compose([v2.ToImage(), v2.Resize((height, width), antialias=True),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class _ImageFiles(Dataset):
    """Shared loading: decode, transform, and the corrupt-file policy."""

    def __init__(self, paths, transform, skip_corrupt: bool = False):
        self.paths = list(paths)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        # Shared memory so that worker processes' skips reach the caller; one slot per worker
        # because += on one shared cell from several processes could lose counts.
        self._skips = torch.zeros(_SKIP_SLOTS, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def skipped(self) -> int:
        """How many corrupt images were replaced by blanks so far (all workers together)."""
        return int(self._skips.sum())

    def _image(self, row: int):
        path = self.paths[row]
        try:
            image = read_image(path)
        except CorruptImageError as exc:
            if not self.skip_corrupt:
                raise
            info = get_worker_info()
            self._skips[(info.id + 1 if info else 0) % _SKIP_SLOTS] += 1
            log.warning("skipping %s", exc)
            image = Image.new("RGB", (64, 64))  # blank; the transform gives it the usual shape
        return self.transform(image) if self.transform is not None else image


class TrainImages(_ImageFiles):
    """Training images: ``ds[(row, seed)] -> (image (3,H,W) float, camera int, tracklet int, row int)``.

    paths: n paths; cams, tracklets: (n,) int ids (``Split.training_view()``).  No identities.
    The random augmentation of ``(row, seed)`` is drawn from a generator seeded with ``seed`` (the sampler's
    function of seed, epoch, step and position in the global batch), so the same image in the same step
    is augmented the same way whichever rank or DataLoader worker loads it. A bare ``row`` uses the
    process's own random stream.
    """

    def __init__(self, paths, cams, tracklets, transform, skip_corrupt: bool = False):
        super().__init__(paths, transform, skip_corrupt)
        if not (len(cams) == len(tracklets) == len(self.paths)):
            raise ReidError(f"TrainImages: {len(self.paths)} paths, {len(cams)} cameras and "
                            f"{len(tracklets)} tracklets, expected equal lengths")
        self.cams = torch.as_tensor(cams, dtype=torch.int64)
        self.tracklets = torch.as_tensor(tracklets, dtype=torch.int64)

    def __getitem__(self, item):
        if isinstance(item, (tuple, list)):
            row, seed = int(item[0]), int(item[1])
            with torch.random.fork_rng(devices=[]):  # torchvision's v2 transforms draw from torch's CPU stream
                torch.default_generator.manual_seed(seed)  # the CPU stream only: no GPU generator is touched
                image = self._image(row)
        else:
            row = int(item)
            image = self._image(row)
        return image, int(self.cams[row]), int(self.tracklets[row]), row


class TrainBatch:
    """DataLoader ``collate_fn`` for ``TrainImages``: stacks a (possibly empty) list of samples into
    ``(images (b, 3, H, W), cams (b,), tracklets (b,), rows (b,))`` — a rank may own none of a step's images."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width

    def __call__(self, samples):
        if not samples:
            empty = torch.empty(0, dtype=torch.int64)
            return torch.empty(0, 3, self.height, self.width), empty, empty.clone(), empty.clone()
        images, cams, tracklets, rows = zip(*samples)
        return (torch.stack(images), torch.tensor(cams, dtype=torch.int64),
                torch.tensor(tracklets, dtype=torch.int64), torch.tensor(rows, dtype=torch.int64))


class EvalImages(_ImageFiles):
    """Images to embed (query, gallery, or train for the memory fill): ``ds[row] -> (image, row)``."""

    def __getitem__(self, row):
        row = int(row)
        return self._image(row), row
