"""Camera shards and the camera-shard sampler (DESIGN §4, issue 5 item 1)."""

import numpy as np
import pytest

from reid.data.sampler import CameraShardSampler, partition_cameras, shard_imbalance
from reid.errors import ReidError

IMAGES_PER_CAMERA = np.array([50, 10, 30, 0, 25, 25, 40, 5])


def test_partition_gives_every_camera_with_images_to_exactly_one_rank():
    shards = partition_cameras(IMAGES_PER_CAMERA, 3)
    assert len(shards) == 3
    everything = np.concatenate(shards)
    assert sorted(everything.tolist()) == [0, 1, 2, 4, 5, 6, 7]  # camera 3 has no images


def test_partition_is_balanced_by_image_count():
    shards = partition_cameras(IMAGES_PER_CAMERA, 3)
    loads = sorted(int(IMAGES_PER_CAMERA[s].sum()) for s in shards)
    assert loads == [60, 60, 65]
    assert shard_imbalance(IMAGES_PER_CAMERA, shards) == pytest.approx(65 / (185 / 3))


def test_more_ranks_than_cameras_is_an_error_naming_both_numbers():
    with pytest.raises(ReidError, match=r"world size 8 .* 7 cameras"):
        partition_cameras(IMAGES_PER_CAMERA, 8)


def make_cams():
    return np.repeat(np.arange(len(IMAGES_PER_CAMERA)), IMAGES_PER_CAMERA)


def test_sampler_yields_only_the_shards_cameras_and_the_same_steps_on_every_rank():
    cams = make_cams()
    shards = partition_cameras(IMAGES_PER_CAMERA, 3)
    steps = max(int(IMAGES_PER_CAMERA[s].sum()) for s in shards) // 8
    lengths = []
    for shard in shards:
        sampler = CameraShardSampler(cams, shard, batch_size=8, steps_per_epoch=steps, seed=1)
        drawn = np.array(list(sampler))
        assert set(cams[drawn].tolist()) <= set(shard.tolist())
        lengths.append(len(drawn))
        assert len(drawn) == len(sampler) == steps * 8
    assert len(set(lengths)) == 1


def test_sampler_is_reproducible_per_epoch_and_reshuffles_between_epochs():
    cams = make_cams()
    a = CameraShardSampler(cams, np.array([0, 2]), 4, 20, seed=5)
    b = CameraShardSampler(cams, np.array([0, 2]), 4, 20, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)


def test_a_short_shard_is_repeated_each_image_once_per_pass():
    cams = make_cams()
    sampler = CameraShardSampler(cams, np.array([7]), batch_size=4, steps_per_epoch=5, seed=0)  # 5 images, 20 draws
    drawn = np.array(list(sampler))
    assert np.all(np.bincount(drawn, minlength=len(cams))[cams == 7] == 4)
