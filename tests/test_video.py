"""The video protocol (issue 12 item 4): tracklets as query/gallery items, pinned against a brute force."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reid.data.records import Split
from reid.errors import ReidError
from reid.evaluation import evaluate
from reid.video import evaluation_level, pool_tracklets, tracklet_items


def random_split(rng, n_tracklets, n_pids, n_cams, prefix):
    """Tracklets of 1-6 frames, each of one identity and one camera; frames listed in shuffled order."""
    paths, cams, tracklets, pids = [], [], [], []
    for t in range(n_tracklets):
        pid, cam = int(rng.integers(n_pids)), int(rng.integers(n_cams))
        for f in range(int(rng.integers(1, 7))):
            paths.append(f"/{prefix}/{pid:03d}/t{t}/{f + 1:04d}.png")
            cams.append(cam)
            tracklets.append(t)
            pids.append(pid)
    order = rng.permutation(len(paths))
    pick = lambda xs: np.asarray(xs)[order]  # noqa: E731
    return Split([paths[i] for i in order], pick(cams), pick(tracklets), pick(pids))


def brute_force(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams):
    """Full sort per query; junk = same identity and same camera; AP = mean precision at each hit."""
    aps, hits = [], np.zeros(10)
    for i in range(len(q_pids)):
        keep = ~((g_pids == q_pids[i]) & (g_cams == q_cams[i]))
        scores = (g_feats[keep] @ q_feats[i]).numpy()
        match = (g_pids[keep] == q_pids[i])[np.argsort(-scores, kind="stable")]
        if not match.any():
            continue
        ranks = np.flatnonzero(match) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        hits[ranks[0] - 1:] += 1
    return float(np.mean(aps)), hits / len(aps)


def mean_of_frames(split, features, frames=None):
    """The test's own pooling: per tracklet id, the mean of its frames' features (all of them), normalised."""
    ids = np.unique(split.tracklets)
    pooled = torch.stack([features[torch.as_tensor(np.flatnonzero(split.tracklets == t))].mean(0) for t in ids])
    first = [np.flatnonzero(split.tracklets == t)[0] for t in ids]
    return F.normalize(pooled, dim=1), split.pids[first], split.cams[first]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tracklet_level_map_and_cmc_equal_a_brute_force_over_mean_pooled_tracklets(seed):
    rng = np.random.default_rng(seed)
    query, gallery = random_split(rng, 15, 6, 3, "q"), random_split(rng, 40, 6, 3, "g")
    g = torch.Generator().manual_seed(seed)
    qf = F.normalize(torch.randn(len(query), 8, generator=g, dtype=torch.float64), dim=1)
    gf = F.normalize(torch.randn(len(gallery), 8, generator=g, dtype=torch.float64), dim=1)
    q_items, g_items = tracklet_items(query), tracklet_items(gallery)
    q_pooled = pool_tracklets(qf[torch.as_tensor(np.concatenate(q_items.frames))], q_items)
    g_pooled = pool_tracklets(gf[torch.as_tensor(np.concatenate(g_items.frames))], g_items)
    got = evaluate(q_pooled, g_pooled, q_items.pids, g_items.pids, q_items.cams, g_items.cams)

    q_ref, q_pids, q_cams = mean_of_frames(query, qf)
    g_ref, g_pids, g_cams = mean_of_frames(gallery, gf)
    assert torch.allclose(q_pooled, q_ref) and torch.allclose(g_pooled, g_ref)
    assert np.array_equal(q_items.pids, q_pids) and np.array_equal(g_items.cams, g_cams)
    ap, cmc = brute_force(q_ref, g_ref, q_pids, g_pids, q_cams, g_cams)
    assert abs(float(got["mAP"]) - ap) < 1e-6
    for k in (1, 5, 10):
        assert abs(float(got[f"rank{k}"]) - cmc[k - 1]) < 1e-9


def test_frames_option_keeps_evenly_spaced_frames_in_frame_order():
    paths = [f"/v/001/t0/{f:04d}.png" for f in (10, 2, 7, 1, 5, 3, 9, 4, 8, 6)]  # listed out of order
    split = Split(paths, np.zeros(10, dtype=np.int64), np.zeros(10, dtype=np.int64), np.zeros(10, dtype=np.int64))
    items = tracklet_items(split, frames=3)
    assert [paths[r] for r in items.frames[0]] == ["/v/001/t0/0001.png", "/v/001/t0/0005.png", "/v/001/t0/0010.png"]
    assert items.paths == ["/v/001/t0/0001.png"]
    assert len(tracklet_items(split, frames=0).frames[0]) == 10 == len(tracklet_items(split, frames=20).frames[0])


def test_tracklet_level_is_the_default_for_vveri901_and_refused_without_real_tracklets():
    assert evaluation_level("auto", "vveri901") == "tracklet"
    assert evaluation_level("auto", "veri776") == "image"
    assert evaluation_level("tracklet", "csv") == "tracklet"
    assert evaluation_level("image", "vveri901") == "image"
    with pytest.raises(ReidError, match=r"eval.level.*veriwild.*real tracklet ids"):
        evaluation_level("tracklet", "veriwild")


def test_a_tracklet_of_two_identities_is_a_one_line_error_naming_a_frame():
    split = Split(["/a/1.png", "/a/2.png"], np.zeros(2, dtype=np.int64), np.zeros(2, dtype=np.int64),
                  np.array([0, 1]))
    with pytest.raises(ReidError, match=r"/a/1.png: frames of several identities"):
        tracklet_items(split)


def test_vveri901_run_evaluates_tracklets_by_default_and_frames_with_eval_level_image(tmp_path):
    from reid.config import load_config
    from reid.data.readers import load_dataset
    from reid.model import ReidNet
    from reid.report import evaluate_model
    from tests.test_readers import make_vveri

    root = make_vveri(tmp_path / "vveri")
    dataset = load_dataset("vveri901", str(root))
    model = ReidNet("resnet18", 2).eval()
    common = [f"data.root={root}", "data.format=vveri901", "data.height=32", "data.width=32", "data.workers=0",
              "eval.flip=false"]
    features = {}
    tracklet = evaluate_model(model, dataset, load_config(None, common), "cpu", features)
    image = evaluate_model(model, dataset, load_config(None, common + ["eval.level=image"]), "cpu")
    assert tracklet["valid_queries"] == 1 and image["valid_queries"] == 2  # one query tracklet of two frames
    assert features["query"].shape == (1, 512) and features["gallery_items"][0] == [dataset.gallery.paths[0]]
    assert tracklet["mAP"] == 1.0 and tracklet["rank1"] == 1.0  # one gallery tracklet, of the same vehicle
