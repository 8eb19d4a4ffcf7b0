"""data.decode=gpu: workers read bytes, the device decodes and augments; checked on the CPU device."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from reid.config import Config, load_config
from reid.data import gpu_decode
from reid.data.gpu_decode import (EncodedBatch, EncodedTrainImages, GpuAugment, decode_rate, draw_params,
                                  make_gpu_pipeline)
from reid.data.images import (IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, TrainImages, eval_transform,
                              read_image, train_transform)
from reid.errors import ReidError

H, W = 32, 16
# torchvision 0.29 deprecates its decoders for TorchCodec; 0.26 (the GPU machines') does not
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
OFF = dict(flip=0.0, pad=0, jitter=0.0, erasing=0.0)  # every augmentation off


def _picture(h, w, shift=0):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy * 5 + shift, xx * 10, 120 + 60 * np.sin(yy / 5)], -1).clip(0, 255).astype(np.uint8)


@pytest.fixture
def files(tmp_path):
    """Three JPEGs and a PNG of different sizes (no left-right symmetry), a corrupt 'JPEG', a missing file."""
    paths = []
    for k, (h, w) in enumerate([(48, 24), (40, 30), (64, 20)]):
        paths.append(str(tmp_path / f"car{k}.jpg"))
        Image.fromarray(_picture(h, w, 20 * k)).save(paths[-1], quality=95)
    paths.append(str(tmp_path / "car3.png"))
    Image.fromarray(_picture(36, 18, 7)).save(paths[-1])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage, not an image")
    return paths + [str(tmp_path / "broken.jpg"), str(tmp_path / "missing.jpg")]


def _batch(ds, rows, seeds):
    encoded, *_ = EncodedBatch()([ds[(r, s)] for r, s in zip(rows, seeds)])
    return encoded


def test_batch_is_normalised_float_images_of_the_configured_size(files):
    ds = EncodedTrainImages(files[:4], [0, 1, 2, 3], [5, 6, 7, 8])
    encoded, cams, tracklets, rows = EncodedBatch()([ds[(r, 10 + r)] for r in range(4)])
    assert cams.tolist() == [0, 1, 2, 3] and tracklets.tolist() == [5, 6, 7, 8] and rows.tolist() == [0, 1, 2, 3]
    images = GpuAugment(H, W, ds.paths, "cpu")(encoded)
    assert images.shape == (4, 3, H, W) and images.dtype == torch.float32 and images.device.type == "cpu"
    white = Image.new("RGB", (20, 50), (255, 255, 255))
    white.save(files[0])
    plain = GpuAugment(H, W, ds.paths, "cpu", **OFF)(_batch(ds, [0], [1]))
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(plain[0], expected[:, None, None].expand(3, H, W), atol=1e-5)


def test_same_seed_same_augmentation_whatever_the_batch_order_or_company(files):
    ds = EncodedTrainImages(files[:4], [0] * 4, [0] * 4)
    augment = GpuAugment(H, W, ds.paths, "cpu", rotation=10, shear=5, scale=0.1, hue=0.1, blur=0.5)
    together = augment(_batch(ds, [0, 1, 2, 3], [11, 12, 13, 14]))
    apart = augment(_batch(ds, [3, 1, 0], [14, 12, 99]))  # another order, another seed for image 0
    assert torch.equal(apart[0], together[3]) and torch.equal(apart[1], together[1])
    assert not torch.allclose(apart[2], together[0])  # different seeds augment differently


def test_same_seed_same_augmentation_whichever_loader_worker_read_the_bytes(files):
    ds = EncodedTrainImages(files[:4], [0] * 4, [0] * 4)
    augment = GpuAugment(H, W, ds.paths, "cpu", hue=0.1, blur=0.5)
    steps = [[(0, 7), (1, 8)], [(2, 9), (3, 10)], [(1, 8), (0, 7)]]
    loaded = [augment(batch[0]) for batch in DataLoader(ds, batch_sampler=steps, collate_fn=EncodedBatch(),
                                                        num_workers=2)]
    direct = augment(_batch(ds, [0, 1, 2, 3], [7, 8, 9, 10]))
    assert torch.equal(torch.cat(loaded[:2]), direct)  # steps 0 and 1 were read by different workers
    assert torch.equal(loaded[2], direct[[1, 0]])


def test_with_augmentation_off_the_batch_is_close_to_the_pil_eval_path(files, tmp_path):
    Image.fromarray(_picture(30, 20)[..., 0]).save(tmp_path / "grey.png")  # loaded as RGB, as PIL's convert
    Image.fromarray(np.dstack([_picture(30, 20), np.full((30, 20), 128, np.uint8)])).save(tmp_path / "alpha.png")
    paths = files[:4] + [str(tmp_path / "grey.png"), str(tmp_path / "alpha.png")]
    ds = EncodedTrainImages(paths, [0] * 6, [0] * 6)
    ours = GpuAugment(H, W, ds.paths, "cpu", **OFF)(_batch(ds, range(6), range(6)))
    pil = torch.stack([eval_transform(H, W)(read_image(path)) for path in paths])
    assert (ours - pil).abs().mean() < 0.05  # other JPEG decoder, float instead of uint8 after the resize


@pytest.mark.parametrize("option", [dict(flip=0.5), dict(pad=4), dict(jitter=0.4), dict(hue=0.2),
                                    dict(erasing=0.5), dict(rotation=10, shear=10, scale=0.2), dict(blur=0.5),
                                    None], ids=["flip", "pad", "jitter", "hue", "erasing", "affine", "blur", "defaults"])
def test_each_augmentation_changes_images_as_much_as_train_transform_does(files, option):
    """Mean |augmented - plain| over 300 seeds, against the PIL path (``None``: the default options)."""
    n, kwargs = 300, {} if option is None else {**OFF, **option}
    ds = EncodedTrainImages(files[:1] * n, [0] * n, [0] * n)
    ours = GpuAugment(H, W, ds.paths, "cpu", **kwargs)(_batch(ds, range(n), range(1000, 1000 + n)))
    pil_ds = TrainImages(files[:1] * n, [0] * n, [0] * n, train_transform(H, W, **kwargs))
    pil = torch.stack([pil_ds[(k, 5000 + k)][0] for k in range(n)])
    plain = eval_transform(H, W)(read_image(files[0]))
    ours_change, pil_change = (ours - plain).abs().mean(), (pil - plain).abs().mean()
    assert abs(ours_change - pil_change) < 0.2 * pil_change + 0.01, (float(ours_change), float(pil_change))


def test_flip_mirrors_the_plain_image_in_about_flip_share_of_seeds(files):
    n = 300
    ds = EncodedTrainImages(files[:1] * n, [0] * n, [0] * n)
    plain = GpuAugment(H, W, ds.paths, "cpu", **OFF)(_batch(ds, [0], [0]))[0]
    out = GpuAugment(H, W, ds.paths, "cpu", **{**OFF, "flip": 0.3})(_batch(ds, range(n), range(n)))
    flipped = (out == plain.flip(-1)).flatten(1).all(1)
    assert bool(((out == plain).flatten(1).all(1) | flipped).all())
    assert 0.22 < flipped.float().mean() < 0.38


def test_pad_and_crop_shift_the_image_by_at_most_pad_pixels_with_black_fill(files):
    ds = EncodedTrainImages(files[:1] * 20, [0] * 20, [0] * 20)
    padded = TF.pad(GpuAugment(H, W, ds.paths, "cpu", **OFF).decode_resized(_batch(ds, [0], [0]))[0], [3] * 4)
    crops = {(dy, dx): TF.normalize(padded[:, 3 + dy:3 + dy + H, 3 + dx:3 + dx + W], IMAGENET_MEAN, IMAGENET_STD)
             for dy in range(-3, 4) for dx in range(-3, 4)}
    out = GpuAugment(H, W, ds.paths, "cpu", **{**OFF, "pad": 3})(_batch(ds, range(20), range(20)))
    seen = [next((s for s, crop in crops.items() if torch.allclose(image, crop, atol=1e-6)), None) for image in out]
    assert None not in seen and len(set(seen)) > 10  # every crop is a drawn shift of at most 3 pixels


def _slots(**values):
    """One image's uniform draws: 0.5 except the named slots of gpu_decode's layout (a list fills consecutive ones)."""
    u = torch.full((1, gpu_decode._SLOTS), 0.5, dtype=torch.float64)
    for name, value in values.items():
        value = torch.tensor(value, dtype=torch.float64).reshape(-1)
        start = getattr(gpu_decode, f"_{name.upper()}")
        u[0, start:start + len(value)] = value
    return u


def test_affine_is_torchvision_affine_to_the_pixel():
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    augment = GpuAugment(H, W, [], "cpu", rotation=10, shear=10, scale=0.2)
    ours = augment._affine(x, _slots(angle=0.9, shear=0.2, scale=0.7))  # 8°, shear -6°, zoom 1.08
    assert torch.equal(ours, TF.affine(x, angle=8.0, translate=[0, 0], scale=1.08, shear=[-6.0, 0.0]))


def test_colour_jitter_applies_torchvisions_adjustments_in_the_drawn_order():
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1))
    augment = GpuAugment(H, W, [], "cpu", jitter=0.4, hue=0.2)
    # order slots rank hue, saturation, brightness, contrast; factors 1.2, 0.76, 1.08, hue 0.1
    u = _slots(order=[0.3, 0.4, 0.2, 0.1], jitter=[0.75, 0.2, 0.6, 0.75])
    expected = TF.adjust_contrast(TF.adjust_brightness(TF.adjust_saturation(TF.adjust_hue(
        x, 0.1), 1.08), 1.2), 0.76)
    assert torch.allclose(augment._colour(x, u), expected, atol=1e-5)


def test_blur_is_torchvision_gaussian_blur_and_leaves_unchosen_images_untouched():
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(2))
    augment = GpuAugment(H, W, [], "cpu", blur=0.5)
    u = torch.cat([_slots(blur=0.1, sigma=0.5), _slots(blur=0.9)])  # sigma 0.8 / not chosen
    out = augment._blur(x, u)
    assert torch.allclose(out[0], TF.gaussian_blur(x[0], [5, 5], [0.8, 0.8]), atol=1e-6)
    assert torch.equal(out[1], x[1])


def test_erasing_blanks_one_rectangle_of_2_to_33_percent_in_about_erasing_share_of_seeds(files):
    n = 200
    ds = EncodedTrainImages(files[:1] * n, [0] * n, [0] * n)
    out = GpuAugment(H, W, ds.paths, "cpu", **{**OFF, "erasing": 0.5})(_batch(ds, range(n), range(n)))
    erased = (out == 0).all(1)  # (n, H, W): pixels set to 0 after normalising
    share = erased.flatten(1).float().mean(1)
    assert 0.4 < (share > 0).float().mean() < 0.6
    assert bool(((share == 0) | ((share >= 0.015) & (share <= 0.36))).all())  # 2-33 % of the area, rounded sides
    rows, cols = erased.any(2), erased.any(1)
    assert torch.equal(erased.flatten(1).sum(1), rows.sum(1) * cols.sum(1))  # a rectangle


def test_parameters_come_from_the_images_seed_only():
    seeds = torch.tensor([3, 2**62 - 1, 3])
    u = draw_params(seeds)
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert torch.equal(draw_params(seeds[1:2])[0], u[1])


def test_corrupt_file_raises_one_line_error_naming_it(files):
    ds = EncodedTrainImages(files, [0] * 6, [0] * 6)
    augment = GpuAugment(H, W, ds.paths, "cpu")
    with pytest.raises(CorruptImageError, match=r"broken\.jpg: corrupt or unreadable image") as err:
        augment(_batch(ds, [0, 4], [0, 1]))
    assert isinstance(err.value, ReidError) and "\n" not in str(err.value) and ".cpp" not in str(err.value)
    with pytest.raises(CorruptImageError, match=r"missing\.jpg: corrupt or unreadable image") as err:
        next(iter(DataLoader(ds, batch_sampler=[[(5, 0)]], collate_fn=EncodedBatch(), num_workers=1)))
    assert "\n" not in str(err.value)  # raised in a loader worker, still one line


def test_skip_corrupt_gives_blank_images_and_counts_them(files):
    ds = EncodedTrainImages(files, [0] * 6, [0] * 6, skip_corrupt=True)
    augment = GpuAugment(H, W, ds.paths, "cpu", skip_corrupt=True, **OFF)
    out = augment(_batch(ds, [4, 0, 5], [0, 1, 2]))
    black = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for k in (0, 2):
        assert torch.allclose(out[k], black[:, None, None].expand(3, H, W))
    assert augment.skipped == 2 and not torch.allclose(out[1], black[:, None, None].expand(3, H, W))


def test_empty_batch_gives_no_images_of_the_configured_size(files):
    encoded, cams, tracklets, rows = EncodedBatch()([])
    images = GpuAugment(H, W, files, "cpu", rotation=10, hue=0.1, blur=1.0)(encoded)
    assert images.shape == (0, 3, H, W) and images.dtype == torch.float32
    assert cams.shape == tracklets.shape == rows.shape == (0,)


def test_pipeline_from_config_feeds_a_loader_with_batch_sampler_steps(files):
    cfg = Config()
    cfg.data.height, cfg.data.width, cfg.data.decode = H, W, "gpu"
    dataset, collate, augment = make_gpu_pipeline(cfg, files[:4], [0, 0, 1, 1], [0, 1, 2, 3], torch.device("cpu"))
    loader = DataLoader(dataset, batch_sampler=[[(0, 5), (3, 6)], []], collate_fn=collate)
    shapes = [(tuple(augment(images).shape), cams.tolist()) for images, cams, _, _ in loader]
    assert shapes == [((2, 3, H, W), [0, 1]), ((0, 3, H, W), [])]


def test_config_data_decode_is_cpu_or_gpu():
    assert load_config(overrides=[]).data.decode == "cpu"
    assert load_config(overrides=["data.decode=gpu", "device=cpu"]).data.decode == "gpu"  # allowed on a CPU
    with pytest.raises(ReidError, match=r"'data.decode': got 'nvjpeg', expected one of cpu, gpu"):
        load_config(overrides=["data.decode=nvjpeg"])


def test_decode_rate_counts_images_per_second_and_names_a_corrupt_file(files):
    assert decode_rate(files[:4] * 4, "cpu", batch=8) > 0
    with pytest.raises(CorruptImageError, match=r"broken\.jpg"):
        decode_rate(files[:5], "cpu", batch=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (batched nvjpeg decode)")
def test_cuda_decode_is_close_to_the_cpu_decode_and_augments_alike(files):
    ds = EncodedTrainImages(files[:4], [0] * 4, [0] * 4)
    encoded = _batch(ds, range(4), range(4))
    cpu = GpuAugment(H, W, ds.paths, "cpu", rotation=10, hue=0.1, blur=0.5)(encoded)
    cuda = GpuAugment(H, W, ds.paths, "cuda", rotation=10, hue=0.1, blur=0.5)(encoded)
    assert cuda.device.type == "cuda" and (cuda.cpu() - cpu).abs().mean() < 0.05
    with pytest.raises(CorruptImageError, match=r"broken\.jpg"):
        GpuAugment(H, W, files, "cuda")(_batch(EncodedTrainImages(files, [0] * 6, [0] * 6), [0, 4], [0, 1]))
