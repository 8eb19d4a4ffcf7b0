"""The vectorised CTACL loss equals a naive per-anchor reading of DESIGN.md §3 (loss and gradient)."""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from reid.errors import ReidError
from reid.losses import ctacl_loss, ctacl_loss_parts
from reid.loss_terms import MemoryShard, camera_alignment_loss, camera_centroids, grey_zone_sizes

torch.set_num_threads(1)


# ------------------------------------------------------------------ the reference: DESIGN §3, one anchor at a time


def reference_ctacl(features, cams, tracklets, memory, memory_cams, memory_tracklets, *, temperature=0.07, topk=5,
                    grey_zone=0.01, cam_weight=0.2, warmup=False, hard_topk=None, easy_topk=None, variant="seed"):
    """Returns (loss, per-anchor H lists, per-anchor E lists). Python lists are the multisets of §3.

    variant "center": H_i, E_i and the grey zone ranked by (x − μ_{c_i})·(m_j − μ_{c_j}) / ‖m_j − μ_{c_j}‖ with μ_c the
    mean memory row of camera c (x = h_i or f_i); "camera_softmax": each numerator entry p's log-softmax is taken
    over the denominator's entries of p's camera only."""
    hard_k = topk if hard_topk is None else hard_topk
    easy_k = topk if easy_topk is None else easy_topk
    options = set(variant.split("+")) - {"seed"}
    m = memory.double()
    rows = range(m.shape[0])
    mu = {int(c): m[memory_cams == c].mean(0) for c in memory_cams.unique()}

    def mining_score(x, ci, j):
        if "center" not in options:
            return float(x @ m[j])
        centred = m[j] - mu[int(memory_cams[j])]
        return float((x - mu[ci]) @ centred / centred.norm())

    per_anchor, hard_lists, easy_lists = [], [], []
    for i in range(features.shape[0]):
        s = m @ features[i] / temperature
        sv = s.detach()
        A = [j for j in rows if memory_cams[j] == cams[i]]
        P = [j for j in A if memory_tracklets[j] == tracklets[i]]
        if warmup:
            per_anchor.append(-sum(s[p] - torch.logsumexp(s[A], 0) for p in P) / len(P))
            continue
        j_star = min(P, key=lambda j: float(sv[j]))
        h = m[j_star]
        O = [j for j in rows if memory_cams[j] != cams[i]]
        r = {j: mining_score(h, int(cams[i]), j) for j in O}
        s_mine = {j: mining_score(features[i].detach().double(), int(cams[i]), j) for j in O}
        by_r = sorted(O, key=lambda j: -r[j])
        by_s = sorted(O, key=lambda j: -s_mine[j])
        H, E = by_r[:hard_k], by_s[:easy_k]
        grey = set(by_r[:math.floor(Fraction(repr(grey_zone)) * len(O))])
        N = [j for j in O if j not in grey]
        numerator, denominator = P + H + E, A + H + E + N
        if "camera_softmax" in options:
            def lse(p):
                return torch.logsumexp(s[[k for k in denominator if memory_cams[k] == memory_cams[p]]], 0)
            per_anchor.append(-sum(s[p] - lse(p) for p in numerator) / len(numerator))
        else:
            lse = torch.logsumexp(s[denominator], 0)
            per_anchor.append(-sum(s[p] - lse for p in numerator) / len(numerator))
        hard_lists.append(H)
        easy_lists.append(E)
    loss = torch.stack(per_anchor).mean()
    if not warmup:
        cameras = sorted(set(memory_cams.tolist()))
        centroids = torch.stack([F.normalize(m[memory_cams == c].mean(0), dim=0) for c in cameras])
        kl = []
        for i in range(features.shape[0]):
            p = torch.softmax(centroids @ features[i], 0)
            u = 1.0 / len(cameras)
            kl.append(sum(u * (math.log(u) - torch.log(p[c])) for c in range(len(cameras))))
        loss = loss + cam_weight * torch.stack(kl).mean()
    return loss, hard_lists, easy_lists


# ------------------------------------------------------------------ data and comparison


def make_problem(seed, n_cams=4, tracklets_per_cam=5, rows_per_tracklet=(1, 6), batch=6, dim=8):
    """Random normalised memory with several cameras and tracklets; anchors are noisy copies of memory rows."""
    g = torch.Generator().manual_seed(seed)
    cams, tracklets = [], []
    for c in range(n_cams):
        for t in range(tracklets_per_cam):
            size = int(torch.randint(rows_per_tracklet[0], rows_per_tracklet[1] + 1, (1,), generator=g))
            cams += [c] * size
            tracklets += [t] * size
    memory = F.normalize(torch.randn(len(cams), dim, generator=g, dtype=torch.float64), dim=1)
    own = torch.randperm(len(cams), generator=g)[:batch]
    features = F.normalize(memory[own] + 0.5 * torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=1)
    return {"features": features, "cams": torch.tensor(cams)[own], "tracklets": torch.tensor(tracklets)[own],
            "memory": memory, "memory_cams": torch.tensor(cams), "memory_tracklets": torch.tensor(tracklets)}


def loss_and_grad(fn, problem, **kwargs):
    features = problem["features"].clone().requires_grad_(True)
    args = dict(problem, features=features)
    out = fn(**args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach(), features.grad, out


def assert_rel_close(actual, expected, rel=1e-5):
    scale = expected.abs().max().clamp(min=1e-12)
    assert (actual - expected).abs().max() <= rel * scale, f"{actual} vs {expected}"


def assert_matches_reference(problem, **kwargs):
    loss, grad, _ = loss_and_grad(ctacl_loss, problem, **kwargs)
    ref_loss, ref_grad, ref = loss_and_grad(reference_ctacl, problem, **kwargs)
    assert_rel_close(loss, ref_loss)
    assert_rel_close(grad, ref_grad)
    return ref


# ------------------------------------------------------------------ agreement with the reference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_loss_and_gradient_equal_the_per_anchor_reference(seed):
    problem = make_problem(seed)
    ref_hard, ref_easy = assert_matches_reference(problem, grey_zone=0.1)[1:]
    parts = ctacl_loss_parts(**problem, grey_zone=0.1)
    assert parts["hard_ids"].tolist() == ref_hard
    assert parts["easy_ids"].tolist() == ref_easy
    assert int(parts["counts"]["grey"].min()) > 0  # the grey zone really removed rows here


@pytest.mark.parametrize("seed", [0, 1])
def test_warmup_loss_and_gradient_equal_the_per_anchor_reference(seed):
    assert_matches_reference(make_problem(seed), warmup=True)


def test_default_hyperparameters_equal_the_reference_with_a_one_percent_grey_zone():
    problem = make_problem(3, n_cams=3, tracklets_per_cam=40, rows_per_tracklet=(3, 8), batch=5)
    assert_matches_reference(problem)
    assert int(ctacl_loss_parts(**problem)["counts"]["grey"].min()) >= 1


@pytest.mark.parametrize("ablation", [{"hard_topk": 0}, {"easy_topk": 0}, {"hard_topk": 0, "easy_topk": 0},
                                      {"grey_zone": 0.0}, {"cam_weight": 0.0}, {"topk": 3, "easy_topk": 7}],
                         ids=["without_hard_positives", "without_easy_positives", "without_any_cross_camera",
                              "without_grey_zone", "without_camera_loss", "different_hard_and_easy_k"])
def test_ablation_switches_equal_the_reference(ablation):
    assert_matches_reference(make_problem(4), **{"grey_zone": 0.1, **ablation})


def test_without_hard_positives_returns_no_hard_ids():
    parts = ctacl_loss_parts(**make_problem(4), hard_topk=0)
    assert parts["hard_ids"].shape == (6, 0) and parts["easy_ids"].shape == (6, 5)
    assert int(parts["counts"]["hard"].sum()) == 0


# ------------------------------------------------------------------ edge cases of DESIGN §3


def test_tracklet_of_one_image_is_its_own_positive_and_hard_positive():
    problem = make_problem(5, rows_per_tracklet=(1, 1))
    parts = ctacl_loss_parts(**problem, grey_zone=0.1)
    assert parts["counts"]["positives"].tolist() == [1] * 6
    assert_matches_reference(problem, grey_zone=0.1)
    assert_matches_reference(problem, warmup=True)


def test_fewer_than_topk_other_camera_rows_takes_what_exists():
    problem = make_problem(6, n_cams=1, tracklets_per_cam=6, batch=4)
    extra = F.normalize(torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=1)
    problem["memory"] = torch.cat([problem["memory"], extra])
    problem["memory_cams"] = torch.cat([problem["memory_cams"], torch.tensor([1, 1])])
    problem["memory_tracklets"] = torch.cat([problem["memory_tracklets"], torch.tensor([0, 1])])
    ref_hard, ref_easy = assert_matches_reference(problem)[1:]
    parts = ctacl_loss_parts(**problem)
    n = problem["memory"].shape[0]
    for ids, ref in ((parts["hard_ids"], ref_hard), (parts["easy_ids"], ref_easy)):
        assert ids[:, 2:].eq(-1).all() and ids[:, :2].ge(n - 2).all()
        assert ids[:, :2].tolist() == ref
    assert parts["counts"]["hard"].tolist() == [2] * 4


def test_only_one_camera_in_memory_leaves_just_the_tracklet_terms():
    problem = make_problem(7, n_cams=1, batch=4)
    assert_matches_reference(problem)
    parts = ctacl_loss_parts(**problem)
    assert parts["hard_ids"].eq(-1).all() and float(parts["cam"]) == pytest.approx(0.0, abs=1e-12)


def test_grey_zone_of_size_zero_removes_nothing():
    problem = make_problem(8)  # |O_i| < 100, so ⌊0.01·|O_i|⌋ = 0
    parts = ctacl_loss_parts(**problem, grey_zone=0.01)
    assert int(parts["counts"]["grey"].max()) == 0
    assert_matches_reference(problem, grey_zone=0.01)
    assert float(parts["loss"]) == pytest.approx(float(ctacl_loss(**problem, grey_zone=0.0)), rel=1e-12)


def test_camera_without_memory_rows_gets_no_centroid():
    problem = make_problem(9, n_cams=4)
    keep = problem["memory_cams"] != 2
    for key in ("memory", "memory_cams", "memory_tracklets"):
        problem[key] = problem[key][keep]
    has_row = problem["cams"] != 2
    for key in ("features", "cams", "tracklets"):
        problem[key] = problem[key][has_row]
    problem["memory_cams"] = torch.where(problem["memory_cams"] == 3, 7, problem["memory_cams"])  # ids with gaps
    problem["cams"] = torch.where(problem["cams"] == 3, 7, problem["cams"])
    assert_matches_reference(problem)
    centroids, present = camera_centroids(problem["memory"], problem["memory_cams"], 8)
    assert torch.nonzero(present).flatten().tolist() == [0, 1, 7] and centroids.shape == (8, 8)
    assert ctacl_loss_parts(**problem)["counts"]["cameras"] == 3


def test_row_picked_as_hard_and_as_easy_positive_counts_twice():
    # Anchor = its tracklet's only row, so r and s rank O_i identically and H_i = E_i.
    memory = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64), dim=1)
    problem = {"features": memory[:1].clone(), "cams": torch.tensor([0]), "tracklets": torch.tensor([0]),
               "memory": memory, "memory_cams": torch.tensor([0, 1, 1]), "memory_tracklets": torch.tensor([0, 0, 1])}
    kwargs = {"topk": 1, "grey_zone": 0.0, "cam_weight": 0.0, "temperature": 0.5}
    parts = ctacl_loss_parts(**problem, **kwargs)
    assert parts["hard_ids"].tolist() == [[1]] and parts["easy_ids"].tolist() == [[1]]
    s0, s1, s2 = 1.0 / 0.5, 0.8 / 0.5, 0.0
    # Π = {0, 1, 1}; Δ = A ⊎ H ⊎ E ⊎ N = {0} ⊎ {1} ⊎ {1} ⊎ {1, 2}
    lse = math.log(math.exp(s0) + 3 * math.exp(s1) + math.exp(s2))
    by_hand = -((s0 - lse) + 2 * (s1 - lse)) / 3
    assert float(parts["loss"]) == pytest.approx(by_hand, rel=1e-12)
    assert_matches_reference(problem, **kwargs)


def test_anchor_without_a_memory_row_of_its_tracklet_is_a_clear_error():
    problem = make_problem(10)
    problem["tracklets"] = problem["tracklets"].clone()
    problem["tracklets"][2] = 999
    with pytest.raises(ReidError, match=r"anchors \[2\].*P_i is empty"):
        ctacl_loss(**problem)


# ------------------------------------------------------------------ contract details


def test_memory_is_read_only_and_gets_no_gradient():
    problem = make_problem(11)
    memory = problem["memory"].clone().requires_grad_(True)
    before = memory.detach().clone()
    features = problem["features"].clone().requires_grad_(True)
    ctacl_loss(**dict(problem, features=features, memory=memory)).backward()
    assert memory.grad is None and torch.equal(memory.detach(), before)


def test_updating_the_memory_before_backward_is_refused_not_silently_wrong():
    problem = make_problem(17)
    features = problem["features"].clone().requires_grad_(True)
    loss = ctacl_loss(**dict(problem, features=features))
    problem["memory"][0] = 0.0  # the memory update belongs after backward (DESIGN §3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_given_centroids_equal_centroids_from_memory():
    problem = make_problem(18)
    centroids, present = camera_centroids(problem["memory"], problem["memory_cams"], 4)
    assert present.all()  # one centroid per distinct memory camera, in sorted order
    assert float(ctacl_loss(**problem, centroids=centroids)) == pytest.approx(float(ctacl_loss(**problem)), rel=1e-12)


def test_parts_report_the_same_loss_and_the_mode_terms():
    problem = make_problem(12)
    full = ctacl_loss_parts(**problem, grey_zone=0.1)
    assert float(full["loss"]) == pytest.approx(float(ctacl_loss(**problem, grey_zone=0.1)), rel=1e-12)
    assert float(full["loss"]) == pytest.approx(float(full["inter"] + 0.2 * full["cam"]), rel=1e-12)
    intra = ctacl_loss_parts(**problem, warmup=True)
    assert float(full["intra"]) == pytest.approx(float(intra["loss"]), rel=1e-12)
    assert float(intra["inter"]) == 0.0 and intra["hard_ids"].shape == (6, 0)


def test_camera_term_is_kl_from_uniform_without_temperature():
    features = F.normalize(torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), dim=1)
    centroids = F.normalize(torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), dim=1)
    p = torch.softmax(features @ centroids.T, 1)
    expected = (0.2 * torch.log(0.2 / p)).sum(1)
    everywhere = torch.ones(5, dtype=torch.bool)
    assert torch.allclose(camera_alignment_loss(features, centroids, everywhere, 5), expected, rtol=1e-12)
    # An absent camera (no memory rows) takes no part: the same as leaving its row out.
    padded, some = torch.cat([centroids, torch.zeros(1, 4, dtype=torch.float64)]), torch.arange(6) < 5
    assert torch.allclose(camera_alignment_loss(features, padded, some, 5), expected, rtol=1e-12)


def test_float32_loss_is_close_to_float64():
    problem = make_problem(13)
    single = {k: (v.float() if v.is_floating_point() else v) for k, v in problem.items()}
    assert float(ctacl_loss(**single)) == pytest.approx(float(ctacl_loss(**problem)), rel=1e-5)


def test_bfloat16_memory_bank_is_accepted_and_gives_a_float32_loss():
    problem = {k: (v.float() if v.is_floating_point() else v) for k, v in make_problem(16).items()}
    single = ctacl_loss(**problem)
    features = problem["features"].clone().requires_grad_(True)
    half = ctacl_loss(**dict(problem, features=features, memory=problem["memory"].bfloat16()))
    half.backward()
    assert half.dtype == torch.float32 and features.grad.dtype == torch.float32
    assert float(half.detach()) == pytest.approx(float(single), rel=2e-2)


def test_helpers_grey_zone_size_and_the_tracklet_index():
    assert grey_zone_sizes(torch.tensor([100, 99, 0, 277797]), 0.29).tolist() == [29, 28, 0, 80561]
    memory_cams, memory_tracklets = torch.tensor([0, 1, 1, 0]), torch.tensor([5, 5, 5, 4])
    shard = MemoryShard.build(torch.zeros(4, 2), memory_cams, memory_tracklets, torch.arange(4),
                              torch.tensor([2, 2]), lambda: None)
    assert shard.longest_tracklet == 2 and shard.total_rows == 4 and shard.fewest_camera_rows == 2
    rows, valid, counts = shard.positives(torch.tensor([1, 0, 0]), torch.tensor([5, 5, 9]))
    assert counts.tolist() == [2, 1, 0]  # (camera 0, tracklet 9) has no row
    assert sorted(rows[0][valid[0]].tolist()) == [1, 2] and rows[1][valid[1]].tolist() == [0]


@pytest.mark.parametrize("change, field", [
    ({"features": torch.zeros(6)}, "features shape"),
    ({"memory": torch.zeros(10, 3, dtype=torch.float64)}, "memory shape"),
    ({"cams": torch.zeros(5, dtype=torch.long)}, "cams"),
    ({"memory_tracklets": torch.zeros(3)}, "memory_tracklets"),
], ids=["features_not_2d", "memory_width", "cams_length", "memory_tracklets_float"])
def test_bad_shapes_are_one_line_errors_naming_the_field(change, field):
    with pytest.raises(ReidError, match=field):
        ctacl_loss(**dict(make_problem(14), **change))


def test_bad_hyperparameters_are_errors():
    for kwargs in ({"temperature": 0.0}, {"topk": -1}, {"grey_zone": 1.0}, {"easy_topk": 2.5}):
        with pytest.raises(ReidError):
            ctacl_loss(**make_problem(15), **kwargs)


@pytest.mark.parametrize("grey_zone", [0.02, 0.5, 0.9])
def test_narrow_and_wide_grey_zones_match_the_reference(grey_zone):
    # 0.02: the cut is selected among each row's top-k candidates; 0.5 and 0.9: among all rows (no sort)
    problem = make_problem(21, n_cams=5, tracklets_per_cam=8)
    assert_matches_reference(problem, grey_zone=grey_zone)
    assert_matches_reference(problem, grey_zone=grey_zone, hard_topk=0)


@pytest.mark.parametrize("variant", ["center", "camera_softmax", "center+camera_softmax"])
@pytest.mark.parametrize("kwargs", [{}, {"grey_zone": 0.3}, {"grey_zone": 0.0, "hard_topk": 0}, {"easy_topk": 2}],
                         ids=["default", "wide_grey", "no_grey_no_hard", "easy_2"])
def test_loss_variants_match_their_per_anchor_reading(variant, kwargs):
    problem = make_problem(22, n_cams=5, tracklets_per_cam=6)
    assert_matches_reference(problem, variant=variant, **kwargs)
    # and they are other losses than the seed's
    assert float(ctacl_loss(**problem, variant=variant, **kwargs)) != float(ctacl_loss(**problem, **kwargs))


def test_an_unknown_variant_is_a_clear_error():
    with pytest.raises(ReidError, match="variant 'centre'"):
        ctacl_loss(**make_problem(23), variant="centre")
