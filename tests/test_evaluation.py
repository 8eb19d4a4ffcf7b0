"""evaluate(): exact mAP / mINP / CMC against a brute-force full-sort reference written from the standard rule."""
import numpy as np
import pytest
import torch

from reid.errors import ReidError
from reid.evaluation import (evaluate, evaluate_distances, pairwise_similarity, rank1_same_vs_cross_camera,
                             top_matches)


def brute_force_distances(dist, qp, gp, qc, gc):
    """Per query: drop junk (same pid and same camera), sort the whole gallery by distance with ties put
    negatives before positives, then AP = mean precision at each positive, INP = positives / rank of
    the last positive, CMC from the first positive. Queries of unknown identity (< 0) or without a
    positive are skipped."""
    qp, gp, qc, gc = (np.asarray(x) for x in (qp, gp, qc, gc))
    aps, inps, first_hits = [], [], []
    for i in range(len(dist)):
        keep = ~((gp == qp[i]) & (gc == qc[i]))
        is_positive = (gp == qp[i])[keep]
        if qp[i] < 0 or not is_positive.any():
            continue
        order = np.lexsort((is_positive, dist[i][keep]))  # by distance, then False (negative) first
        hit_ranks = np.flatnonzero(is_positive[order]) + 1
        aps.append(np.mean(np.arange(1, len(hit_ranks) + 1) / hit_ranks))
        inps.append(len(hit_ranks) / hit_ranks[-1])
        first_hits.append(hit_ranks[0])
    first = np.array(first_hits)
    return {"mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)), "rank1": float((first <= 1).mean()),
            "rank5": float((first <= 5).mean()), "rank10": float((first <= 10).mean()),
            "valid_queries": len(aps), "skipped_queries": len(dist) - len(aps)}


def brute_force(qf, gf, qp, gp, qc, gc):
    """`brute_force_distances` on the float64 Euclidean distances of the L2-normalised features."""
    qf, gf = (x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True) for x in (qf, gf))
    return brute_force_distances(((qf[:, None, :] - gf[None]) ** 2).sum(-1), qp, gp, qc, gc)


def unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_split(seed, q=40, g=300, d=16, ids=20, cams=5):
    rng = np.random.default_rng(seed)
    return (unit(rng, q, d), unit(rng, g, d), rng.integers(0, ids, q), rng.integers(0, ids, g),
            rng.integers(0, cams, q), rng.integers(0, cams, g))


def assert_same_metrics(result, expected):
    for key in ("mAP", "mINP", "rank1", "rank5", "rank10"):
        assert result[key] == pytest.approx(expected[key], abs=1e-9), key
    assert result["valid_queries"] == expected["valid_queries"]
    assert result["skipped_queries"] == expected["skipped_queries"]


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 1000, None])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_full_sort_for_any_chunk_size(seed, chunk_size):
    data = random_split(seed)
    assert_same_metrics(evaluate(*data, chunk_size=chunk_size), brute_force(*data))


def test_clustered_features_match_brute_force_with_many_positives_per_query():
    rng = np.random.default_rng(3)
    centres = unit(rng, 12, 32)
    gp, qp = rng.integers(0, 12, 500), rng.integers(0, 12, 60)
    gf = centres[gp] + 1.2 * unit(rng, 500, 32)
    qf = centres[qp] + 1.2 * unit(rng, 60, 32)
    gf, qf = gf / np.linalg.norm(gf, axis=1, keepdims=True), qf / np.linalg.norm(qf, axis=1, keepdims=True)
    data = (qf, gf, qp, gp, rng.integers(0, 6, 60), rng.integers(0, 6, 500))
    expected = brute_force(*data)
    assert 0.2 < expected["mAP"] < 1.0  # a non-trivial ranking
    assert_same_metrics(evaluate(*data, chunk_size=7), expected)


def test_torch_and_numpy_inputs_and_gallery_order_give_the_same_result():
    qf, gf, qp, gp, qc, gc = random_split(4)
    reference = evaluate(qf, gf, qp, gp, qc, gc)
    as_torch = evaluate(*(torch.as_tensor(x) for x in (qf, gf, qp, gp, qc, gc)), chunk_size=5)
    perm = np.random.default_rng(0).permutation(len(gf))
    shuffled = evaluate(qf, gf[perm], qp, gp[perm], qc, gc[perm])
    for key in ("mAP", "rank1", "rank5", "rank10"):
        assert as_torch[key] == pytest.approx(reference[key], abs=1e-12)
        assert shuffled[key] == pytest.approx(reference[key], abs=1e-12)


def test_queries_without_a_valid_match_are_skipped_and_counted():
    qf, gf, qp, gp, qc, gc = random_split(5, q=10, g=60, ids=5, cams=3)
    qp = qp.copy()
    qp[0] = 99   # identity absent from the gallery
    qp[1] = -1   # unknown identity: never evaluated
    expected = brute_force(qf[2:], gf, qp[2:], gp, qc[2:], gc)
    for chunk_size in (1, 2, None):  # chunks made only of skipped queries included
        result = evaluate(qf, gf, qp, gp, qc, gc, chunk_size=chunk_size)
        assert result["skipped_queries"] == 2 + expected["skipped_queries"]
        assert result["valid_queries"] == expected["valid_queries"]
        assert result["mAP"] == pytest.approx(expected["mAP"], abs=1e-12)


def test_identity_seen_only_by_the_query_camera_is_skipped_and_its_images_are_junk():
    # Query 0 (pid 7, camera 2): its only gallery images are in camera 2 -> junk -> skipped.
    # Query 1 (pid 1, camera 0): the pid-7 junk must not count against query 0 only; for query 1
    # they are ordinary negatives.
    qf = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    gf = np.array([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0], [0.6, 0.8]], np.float32)
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    qp, gp = np.array([7, 1]), np.array([7, 7, 5, 1])
    qc, gc = np.array([2, 0]), np.array([2, 2, 1, 1])
    result = evaluate(qf, gf, qp, gp, qc, gc)
    assert result["valid_queries"] == 1 and result["skipped_queries"] == 1
    # Query 1's ranking: gallery 2 (pid 5, sim 1.0) then gallery 3 (its match, sim 0.8): AP = 1/2.
    assert result["mAP"] == pytest.approx(0.5)
    assert result["rank1"] == 0.0 and result["rank5"] == 1.0


def test_same_identity_same_camera_junk_neither_hits_nor_misses():
    qf = np.array([[1.0, 0.0]], np.float32)
    gf = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]], np.float32)
    result = evaluate(qf, gf, [3], [3, 3, 4], [0], [0, 1, 1])  # gallery 0 is junk, gallery 1 the true match
    assert result["mAP"] == 1.0 and result["rank1"] == 1.0


def test_ties_between_a_negative_and_a_positive_rank_the_negative_first():
    qf = np.array([[1.0, 0.0]], np.float32)
    gf = np.array([[0.6, 0.8], [0.6, 0.8], [0.0, 1.0]], np.float32)  # tie: negative and positive
    for order in ([0, 1, 2], [1, 0, 2]):
        gp, gc = np.array([5, 9, 5])[order], np.array([1, 1, 1])[order]
        result = evaluate(qf, gf, [5], gp, [0], gc)
        assert result["rank1"] == 0.0
        assert result["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # positives at ranks 2 and 3


def test_minp_is_positives_over_the_rank_of_the_hardest_positive():
    # Query similarities: junk 0.95, negative 0.9, positive 0.8, negatives 0.7 and 0.6, positive 0.5.
    sims = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    gf = np.stack([sims, np.sqrt(1 - sims**2)], 1).astype(np.float32)
    result = evaluate(np.array([[1.0, 0.0]], np.float32), gf, [3], [3, 4, 3, 5, 6, 3], [0], [0, 1, 1, 1, 1, 2])
    assert result["mINP"] == pytest.approx(2 / 5)  # positives at ranks 2 and 5 once the junk is dropped
    assert result["mAP"] == pytest.approx((1 / 2 + 2 / 5) / 2)
    assert result["rank1"] == 0.0 and result["rank5"] == 1.0


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_exact_ties_rank_negatives_before_positives_whatever_the_chunk_or_gallery_order(chunk_size):
    # Six distinct gallery points (one-hot rows: every similarity is exactly a query coordinate), so
    # each score is shared by ~30 positives, negatives and junk images at once.
    rng = np.random.default_rng(15)
    gf = np.eye(6, dtype=np.float32)[rng.integers(0, 6, 200)]
    qf, qp, gp = unit(rng, 30, 6), rng.integers(0, 8, 30), rng.integers(0, 8, 200)
    qc, gc = rng.integers(0, 3, 30), rng.integers(0, 3, 200)
    expected = brute_force(qf, gf, qp, gp, qc, gc)
    assert_same_metrics(evaluate(qf, gf, qp, gp, qc, gc, chunk_size=chunk_size), expected)
    perm = rng.permutation(200)
    assert_same_metrics(evaluate(qf, gf[perm], qp, gp[perm], qc, gc[perm], chunk_size=chunk_size), expected)


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_distances_with_many_ties_and_any_spread_match_brute_force(scale):
    rng = np.random.default_rng(16)
    dist = rng.integers(0, 6, (25, 120)).astype(np.float32) * np.float32(scale)
    dist[3] = 0.0  # one query where everything ties
    labels = (rng.integers(-1, 6, 25), rng.integers(-1, 6, 120), rng.integers(0, 3, 25), rng.integers(0, 3, 120))
    expected = brute_force_distances(dist, *labels)
    for chunk_size in (4, None):
        assert_same_metrics(evaluate_distances(dist, *labels, chunk_size=chunk_size), expected)


@pytest.mark.parametrize("bins", [1, 2, 16])
def test_exact_when_many_gallery_items_share_a_score_bin_with_a_positive(monkeypatch, bins):
    # With a handful of bins most items fall in a bin holding a positive: the exact comparison decides.
    import reid.evaluation

    monkeypatch.setattr(reid.evaluation, "_BINS", bins)
    data = random_split(18, q=30, g=400, ids=6)
    assert_same_metrics(evaluate(*data, chunk_size=7), brute_force(*data))


def test_gallery_rows_need_not_be_unit_length():
    qf, gf, qp, gp, qc, gc = random_split(17)
    scales = np.random.default_rng(17).uniform(0.1, 10.0, (len(gf), 1)).astype(np.float32)
    expected = brute_force(qf, gf, qp, gp, qc, gc)
    assert_same_metrics(evaluate(qf * 3, gf * scales, qp, gp, qc, gc, chunk_size=6), expected)


def test_perfect_features_score_one_and_values_stay_in_unit_range():
    pids = np.repeat(np.arange(6), 4)
    feats = np.eye(6, dtype=np.float32)[pids]
    cams = np.tile(np.arange(4), 6)
    perfect = evaluate(feats, feats, pids, pids, cams, cams, max_rank=3)
    assert perfect["mAP"] == 1.0 and perfect["rank1"] == perfect["rank3"] == perfect["rank10"] == 1.0
    noisy = evaluate(*random_split(6))
    assert set(noisy) == {"mAP", "mINP", "rank1", "rank5", "rank10", "valid_queries", "skipped_queries"}
    assert all(0.0 <= noisy[k] <= 1.0 for k in ("mAP", "mINP", "rank1", "rank5", "rank10"))
    assert noisy["rank1"] <= noisy["rank5"] <= noisy["rank10"]


def test_distance_matrix_entry_point_agrees_with_features():
    qf, gf, qp, gp, qc, gc = random_split(7)
    dist = ((qf[:, None] - gf[None]) ** 2).sum(-1)
    assert_same_metrics(evaluate_distances(dist, qp, gp, qc, gc, chunk_size=9), brute_force(qf, gf, qp, gp, qc, gc))


def test_pairwise_similarity_is_cosine():
    qf, gf, *_ = random_split(8, q=3, g=4)
    np.testing.assert_allclose(pairwise_similarity(qf * 3, gf).numpy(), qf @ gf.T, atol=1e-6)


def test_bad_inputs_raise_one_line_errors():
    qf, gf, qp, gp, qc, gc = random_split(9, q=4, g=10)
    with pytest.raises(ReidError, match="same D"):
        evaluate(qf, gf[:, :3], qp, gp, qc, gc)
    with pytest.raises(ReidError, match="gallery_cams"):
        evaluate(qf, gf, qp, gp, qc, gc[:5])
    bad = qf.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ReidError, match="NaN"):
        evaluate(bad, gf, qp, gp, qc, gc)
    with pytest.raises(ReidError, match="none of the 4 queries"):
        evaluate(qf, gf, qp + 100, gp, qc, gc)


def test_top_matches_leaves_out_junk_and_pads_with_minus_one():
    qf = np.array([[1.0, 0.0]], np.float32)
    gf = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)
    assert top_matches(qf, gf, k=3).tolist() == [[0, 1, 2]]
    assert top_matches(qf, gf, [3], [3, 3, 4], [0], [0, 1, 1], k=3).tolist() == [[1, 2, -1]]


def test_same_vs_cross_camera_rank1_shows_a_camera_gap():
    # Features = weak identity part + strong camera part + noise. Within one camera the camera part
    # cancels and identity decides; across cameras it does not, so cross-camera Rank-1 is lower.
    rng = np.random.default_rng(10)
    ids, cams = 8, 3
    pid = np.repeat(np.arange(ids), cams * 2)
    cam = np.tile(np.repeat(np.arange(cams), 2), ids)
    identity = unit(rng, ids, 16)[pid]
    camera = unit(rng, cams, 16)[cam]
    feats = 0.5 * identity + 2.0 * camera + 0.3 * unit(rng, len(pid), 16)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    index = np.arange(len(pid))
    result = rank1_same_vs_cross_camera(feats, feats, pid, pid, cam, cam, query_gallery_index=index, chunk_size=5)
    assert result["same_camera_queries"] == len(pid) and result["cross_camera_queries"] == len(pid)
    assert result["same_camera_rank1"] > result["cross_camera_rank1"]
    # Without excluding itself, each query trivially finds itself in its own camera.
    trivial = rank1_same_vs_cross_camera(feats, feats, pid, pid, cam, cam)
    assert trivial["same_camera_rank1"] == 1.0


def test_same_camera_rank1_is_nan_when_no_identity_repeats_within_a_camera():
    qf, gf = np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32)
    result = rank1_same_vs_cross_camera(qf, gf, [0, 1], [0, 1], [0, 0], [1, 1])
    assert np.isnan(result["same_camera_rank1"]) and result["cross_camera_rank1"] == 1.0


# --- k-reciprocal re-ranking -------------------------------------------------------------------

def naive_rerank(qf, gf, k1, k2, lam):
    """Zhong et al. 2017 with Python sets, one sample at a time (Eqs. 4, 6, 7, 10-12)."""
    x = np.concatenate([qf, gf]).astype(np.float64)
    n = len(x)
    d = np.clip(2 - 2 * x @ x.T, 0, None)
    np.fill_diagonal(d, 0)
    order = np.argsort(d, axis=1, kind="stable")
    knn = lambda p, k: set(order[p, : k + 1].tolist())
    recip = lambda p, k: {y for y in knn(p, k) if p in knn(y, k)}
    half = max(1, round(k1 / 2))
    v = np.zeros((n, n))
    for p in range(n):
        r = recip(p, k1)
        expanded = set(r)
        for y in r:
            ry = recip(y, half)
            if len(r & ry) >= 2 / 3 * len(ry):
                expanded |= ry
        for y in expanded:
            v[p, y] = np.exp(-d[p, y])
    if k2 > 1:
        v = np.stack([v[order[p, :k2]].mean(0) for p in range(n)])
    nq = len(qf)
    out = np.zeros((nq, len(gf)))
    for i in range(nq):
        for j in range(len(gf)):
            a, b = v[i], v[nq + j]
            out[i, j] = (1 - lam) * (1 - np.minimum(a, b).sum() / np.maximum(a, b).sum()) + lam * d[i, nq + j]
    return out


def clustered(seed, n, ids=8, d=16, noise=1.0):
    rng = np.random.default_rng(seed)
    centres = unit(rng, ids, d)
    pids = rng.integers(0, ids, n)
    x = centres[pids] + noise * rng.normal(size=(n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), pids


def test_rerank_equals_a_per_sample_implementation_of_the_paper():
    from reid.rerank import rerank

    qf, _ = clustered(11, 12)
    gf, _ = clustered(12, 40)
    expected = naive_rerank(qf, gf, k1=6, k2=3, lam=0.3)
    got = rerank(qf, gf, k1=6, k2=3, lambda_=0.3, chunk_size=5).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_rerank_keeps_a_perfect_ranking_perfect_and_lambda_one_is_the_original_distance():
    from reid.rerank import rerank

    rng = np.random.default_rng(13)
    pids = np.repeat(np.arange(6), 4)
    cams = np.tile(np.arange(4), 6)
    feats = np.eye(6, dtype=np.float32)[pids] + 0.01 * rng.normal(size=(24, 6)).astype(np.float32)
    result = evaluate_distances(rerank(feats[:6], feats, k1=3, k2=2), pids[:6], pids, cams[:6], cams)
    assert result["mAP"] == 1.0
    unit_feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    original = ((unit_feats[:6, None] - unit_feats[None]) ** 2).sum(-1)
    np.testing.assert_allclose(rerank(feats[:6], feats, lambda_=1.0, k1=3, k2=2).numpy(), original, atol=1e-5)


def test_rerank_improves_map_on_noisy_identity_clusters():
    from reid.rerank import rerank

    feats, pids = clustered(14, 340, ids=20, d=32, noise=1.1)  # one set of identity centres
    qf, qp, gf, gp = feats[:40], pids[:40], feats[40:], pids[40:]
    qc, gc = np.zeros(40, int), np.ones(300, int)
    plain = evaluate(qf, gf, qp, gp, qc, gc)["mAP"]
    reranked = evaluate_distances(rerank(qf, gf), qp, gp, qc, gc)["mAP"]
    assert reranked > plain + 0.05


def test_rerank_refuses_sizes_beyond_the_dense_limit():
    from reid.rerank import MAX_SAMPLES, rerank

    with pytest.raises(ReidError, match="at most"):
        rerank(np.zeros((1, 2), np.float32), np.zeros((MAX_SAMPLES, 2), np.float32))
