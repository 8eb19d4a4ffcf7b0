"""Camera shards and the global-batch sampler (DESIGN §4: the batch does not depend on the world size)."""

import numpy as np
import pytest

from reid.data.sampler import GlobalBatchSampler, partition_cameras, shard_imbalance
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


def rank_parts(cams, world, batch_size=16, epoch=2, seed=1):
    """Per rank, the list of (row, seed) pairs of every step."""
    shards = partition_cameras(IMAGES_PER_CAMERA, world)
    out = []
    for shard in shards:
        sampler = GlobalBatchSampler(cams, batch_size, seed, shard_cams=shard)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("world", (2, 3, 4))
def test_ranks_parts_of_each_step_make_up_the_one_process_global_batch(world):
    cams = make_cams()
    one = rank_parts(cams, 1)[0]
    parts = rank_parts(cams, world)
    assert all(len(p) == len(one) == len(cams) // 16 for p in parts)
    for step, batch in enumerate(one):
        union = [pair for p in parts for pair in p[step]]
        assert sorted(union) == sorted(batch)  # the same rows with the same augmentation seeds
        assert len(batch) == 16


def test_an_epoch_draws_each_image_at_most_once_and_steps_are_images_over_batch_size():
    cams = make_cams()
    sampler = GlobalBatchSampler(cams, 16, seed=0)
    rows = [row for batch in sampler for row, _ in batch]
    assert len(rows) == len(set(rows)) == (len(cams) // 16) * 16
    assert len(GlobalBatchSampler(cams, 16, seed=0, max_steps=3)) == 3  # train.steps_per_epoch caps an epoch
    assert len(GlobalBatchSampler(cams, 16, seed=0, max_steps=99)) == len(cams) // 16


def test_every_step_holds_each_cameras_share_of_the_images_within_two():
    cams = make_cams()
    sampler = GlobalBatchSampler(cams, 16, seed=4)
    share = 16 * IMAGES_PER_CAMERA / IMAGES_PER_CAMERA.sum()
    for epoch in range(3):
        for step in range(len(sampler)):
            rows, _ = sampler.global_batch(epoch, step)
            counts = np.bincount(cams[rows], minlength=len(IMAGES_PER_CAMERA))
            assert np.all(np.abs(counts - share) < 2.0), (epoch, step, counts, share)


def test_each_ranks_part_stays_close_to_its_shards_share():
    cams = make_cams()
    shards = partition_cameras(IMAGES_PER_CAMERA, 3)
    sampler = GlobalBatchSampler(cams, 16, seed=2)
    counts = sampler.rank_counts(0, shards)
    share = 16 * np.array([IMAGES_PER_CAMERA[s].sum() for s in shards]) / IMAGES_PER_CAMERA.sum()
    assert counts.shape == (len(sampler), 3) and np.all(counts.sum(1) == 16)
    assert np.all(np.abs(counts - share) < 3.0), (counts, share)


def test_draw_is_reproducible_per_epoch_and_reshuffles_between_epochs():
    cams = make_cams()
    a, b = GlobalBatchSampler(cams, 8, seed=5), GlobalBatchSampler(cams, 8, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(GlobalBatchSampler(cams, 8, seed=6)) != list(GlobalBatchSampler(cams, 8, seed=5))


def test_a_global_batch_larger_than_the_training_set_is_an_error_naming_the_key():
    with pytest.raises(ReidError, match=r"train.batch_size.*got 500.*185 training images"):
        GlobalBatchSampler(make_cams(), 500, seed=0)
