"""The memory bank on one process: fill, update rule, centroids, bf16 rows, checkpoints by global row id."""

import pytest
import torch
import torch.nn.functional as F

from reid.errors import ReidError
from reid.loss_terms import camera_centroids
from reid.memory import MemoryBank


def bank(dtype=torch.float32, ids=(10, 3, 7, 42, 5)):
    ids = torch.tensor(ids)
    b = MemoryBank(ids, torch.tensor([0, 1, 0, 2, 1]), torch.arange(5), dim=4, num_cameras=4, dtype=dtype)
    b.fill(ids, torch.randn(5, 4, generator=torch.Generator().manual_seed(0)))
    return b


def test_fill_stores_normalised_rows_under_their_global_ids():
    b = bank()
    assert torch.allclose(b.rows.norm(dim=1), torch.ones(5))
    feats = torch.tensor([[3.0, 0, 0, 4]])
    b.fill(torch.tensor([42]), feats)
    assert torch.allclose(b.rows[b.local_index(torch.tensor([42]))], torch.tensor([[0.6, 0, 0, 0.8]]))


def test_update_is_the_normalised_average_of_row_and_feature():
    b = bank()
    before = b.rows.clone()
    f = F.normalize(torch.randn(2, 4), dim=1)
    b.update(torch.tensor([7, 5]), f)
    pos = b.local_index(torch.tensor([7, 5]))
    assert torch.allclose(b.rows[pos], F.normalize(0.5 * before[pos] + 0.5 * f, dim=1))
    untouched = torch.ones(5, dtype=torch.bool)
    untouched[pos] = False
    assert torch.equal(b.rows[untouched], before[untouched])


def test_centroids_skip_cameras_without_rows():
    b = bank(torch.float64)
    centroids, present = b.camera_centroids()
    assert present.tolist() == [True, True, True, False]
    ref, ref_present = camera_centroids(b.rows, b.cams, 4)
    assert torch.equal(present, ref_present) and torch.allclose(centroids[present], ref[present])


def test_bf16_rows_halve_the_bank():
    assert bank(torch.bfloat16).rows.dtype == torch.bfloat16
    assert bank(torch.bfloat16).rows.nbytes * 2 == bank().rows.nbytes


def test_save_and_load_round_trip_by_global_id_in_any_order(tmp_path):
    a = bank()
    a.save(str(tmp_path))
    b = bank(ids=(5, 42, 7, 3, 10))  # same rows, other local order
    b.rows.zero_()
    b.load(str(tmp_path))
    for gid in (10, 3, 7, 42, 5):
        assert torch.equal(a.rows[a.local_index([gid])], b.rows[b.local_index([gid])])
    assert not list(tmp_path.glob("*.tmp"))


def test_loading_a_checkpoint_without_some_own_rows_is_an_error(tmp_path):
    bank().save(str(tmp_path))
    other = MemoryBank(torch.tensor([10, 99]), torch.tensor([0, 0]), torch.tensor([0, 1]), 4, 4)
    with pytest.raises(ReidError, match="missing"):
        other.load(str(tmp_path))
    with pytest.raises(ReidError, match="no memory_rank"):
        other.load(str(tmp_path / "empty"))


def test_update_before_backward_of_the_loss_is_refused():
    from reid.losses import sharded_ctacl_loss

    b = bank()
    f = b.rows[:2].clone().requires_grad_()
    out = sharded_ctacl_loss(f, b.cams[:2], b.tracklets[:2], b.global_ids[:2], b, temperature=0.07, topk=2,
                             grey_zone=0.0, cam_weight=0.2, warmup=False)
    b.update(b.global_ids[:2], f.detach())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out["loss"].backward()


def test_centroid_sums_follow_updates_even_with_a_row_drawn_twice():
    b = bank(torch.float64)
    b.camera_centroids()  # starts the running sums
    f = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    b.update(torch.tensor([7, 7, 42]), f)
    centroids, present = b.camera_centroids()
    ref, _ = camera_centroids(b.rows, b.cams, 4)
    assert torch.allclose(centroids[present], ref[present], atol=1e-12)
