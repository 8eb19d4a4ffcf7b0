"""Image datasets and transforms: shapes, the no-identity training view, corrupt files."""

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from reid.data.images import (CorruptImageError, EvalImages, TrainImages, eval_transform, read_image,
                              train_transform)
from reid.errors import ReidError


@pytest.fixture
def files(tmp_path):
    """Two real images (a JPEG and a PNG) and one corrupt 'JPEG'."""
    good_jpg, good_png, bad = tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "broken.jpg"
    Image.new("RGB", (20, 40), (200, 10, 10)).save(good_jpg)
    Image.new("L", (12, 30), 90).save(good_png)  # greyscale: loaded as RGB
    bad.write_bytes(b"\xff\xd8\xff garbage, not an image")
    return [str(good_jpg), str(good_png), str(bad)]


def test_train_transform_gives_normalised_float_images_of_the_configured_size():
    torch.manual_seed(0)
    image = Image.new("RGB", (50, 90), (10, 200, 30))
    out = train_transform(32, 16)(image)
    assert out.shape == (3, 32, 16) and out.dtype == torch.float32
    rotated = train_transform(32, 16, rotation=10.0, erasing=0.0)(image)
    assert rotated.shape == (3, 32, 16)


def test_camera_like_augmentations_change_the_image_but_not_its_shape():
    image = Image.new("RGB", (50, 90), (10, 200, 30))
    plain = train_transform(32, 16, flip=0.0, pad=0, jitter=0.0, erasing=0.0)
    assert torch.equal(plain(image), plain(image))  # nothing random left
    camera_like = train_transform(32, 16, flip=0.0, pad=0, jitter=0.0, erasing=0.0, hue=0.2, blur=1.0)
    torch.manual_seed(0)
    outs = [camera_like(image) for _ in range(3)]
    assert all(o.shape == (3, 32, 16) for o in outs)
    assert not torch.allclose(outs[0], outs[1])  # the hue shift is drawn per image
    affine = train_transform(32, 16, flip=0.0, pad=0, jitter=0.0, erasing=0.0, rotation=10.0, shear=10.0,
                             scale=0.2)
    assert affine(image).shape == (3, 32, 16)


def test_eval_transform_is_deterministic_and_normalised():
    image = Image.new("RGB", (50, 90), (255, 255, 255))
    a, b = eval_transform(32, 16)(image), eval_transform(32, 16)(image)
    assert torch.equal(a, b) and a.shape == (3, 32, 16)
    assert torch.allclose(a[0], torch.full((32, 16), (1 - 0.485) / 0.229), atol=1e-5)


def test_train_images_yield_image_camera_tracklet_row_and_no_identity(files):
    ds = TrainImages(files[:2], [3, 1], [7, 0], eval_transform(16, 8))
    image, camera, tracklet, row = ds[1]
    assert image.shape == (3, 16, 8) and (camera, tracklet, row) == (1, 0, 1)
    assert len(ds) == 2 and not hasattr(ds, "pids")
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch[0].shape == (2, 3, 16, 8) and batch[1].tolist() == [3, 1] and batch[3].tolist() == [0, 1]


def test_train_images_reject_mismatched_columns(files):
    with pytest.raises(ReidError, match=r"2 paths, 1 cameras and 2 tracklets"):
        TrainImages(files[:2], [0], [0, 1], None)


def test_eval_images_yield_image_and_row(files):
    image, row = EvalImages(files[:2], eval_transform(16, 8))[0]
    assert image.shape == (3, 16, 8) and row == 0
    assert read_image(files[1]).mode == "RGB"


def test_corrupt_image_raises_one_line_error_naming_the_file(files):
    ds = EvalImages(files, eval_transform(16, 8))
    with pytest.raises(CorruptImageError, match=r"broken\.jpg: corrupt or unreadable image") as err:
        ds[2]
    assert isinstance(err.value, ReidError) and "\n" not in str(err.value)


def _first_error(loader):
    """The exception a loader raises, with its traceback dropped so the worker shuts down now
    (a loader iterator freed later by the cycle collector waits 5 s for its workers)."""
    try:
        list(loader)
    except Exception as exc:  # noqa: BLE001 - the test inspects whatever comes out
        exc.__traceback__ = None
        return exc
    raise AssertionError("the loader raised nothing")


def test_corrupt_image_in_a_dataloader_worker_keeps_the_file_on_the_first_line(files):
    ds = TrainImages(files, [0, 1, 0], [0, 1, 0], eval_transform(16, 8))
    exc = _first_error(DataLoader(ds, batch_size=3, num_workers=1))
    assert isinstance(exc, CorruptImageError) and isinstance(exc, ReidError)
    assert str(exc).startswith(files[2] + ": corrupt or unreadable image") and "\n" not in str(exc)
    assert "worker" in exc.worker_traceback


def test_skip_corrupt_returns_a_blank_image_and_counts_it(files):
    ds = EvalImages(files, eval_transform(16, 8), skip_corrupt=True)
    image, row = ds[2]
    assert image.shape == (3, 16, 8) and row == 2 and ds.skipped == 1
    assert torch.allclose(image[0], torch.full((16, 8), -0.485 / 0.229), atol=1e-5)  # black


def test_skips_in_dataloader_workers_reach_the_caller(files):
    ds = TrainImages(files * 2, [0, 1, 0] * 2, [0, 1, 0] * 2, eval_transform(16, 8), skip_corrupt=True)
    rows = torch.cat([b[3] for b in DataLoader(ds, batch_size=2, num_workers=2)])
    assert sorted(rows.tolist()) == list(range(6)) and ds.skipped == 2


def test_an_images_augmentation_depends_on_its_seed_not_on_the_worker_or_the_order(tmp_path):
    """Issue 10 item 2: the same image with the same (step, position) seed is augmented identically whichever
    rank or DataLoader worker loads it, whatever that process's own random state."""
    from reid.data.images import TrainBatch

    paths = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 60), (40 * i, 200 - 30 * i, 90)).save(path)
        paths.append(str(path))
    ds = TrainImages(paths, [0, 1, 0, 1], [0, 1, 2, 3],
                     train_transform(32, 16, rotation=10.0, hue=0.1, blur=0.5, erasing=0.5))
    items = [(row, 1000 + 7 * row) for row in range(4)]
    torch.manual_seed(123)
    alone = [ds[item][0] for item in items]
    torch.manual_seed(999)  # another process state, the reverse order, in two worker processes
    backwards = items[::-1]
    reverse = DataLoader(ds, batch_sampler=[backwards[:2], backwards[2:]], num_workers=2,
                         collate_fn=TrainBatch(32, 16))  # one batch per worker
    images = torch.cat([batch[0] for batch in reverse]).flip(0)
    assert all(torch.equal(a, b) for a, b in zip(alone, images))
    reseeded = [ds[(row, seed + 1)][0] for row, seed in items]
    assert not any(torch.equal(a, b) for a, b in zip(alone, reseeded))  # the seed does draw the augmentation


def test_a_rank_without_images_in_a_step_gets_an_empty_batch_of_the_right_shape():
    from reid.data.images import TrainBatch

    images, cams, tracklets, rows = TrainBatch(32, 16)([])
    assert images.shape == (0, 3, 32, 16) and cams.shape == tracklets.shape == rows.shape == (0,)
    assert rows.dtype == torch.int64
