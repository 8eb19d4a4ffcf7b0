"""Search: index folders and dataset splits, queries that need only the index, ivf/pq, one-line errors, the picture."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from reid import search, search_cli
from reid.errors import ReidError

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (220, 210, 30)}
SETTINGS = {"height": 8, "width": 8, "flip": True}


class MeanColour(nn.Module):
    """Stand-in for the re-ID model: (B, 3, H, W) → (B, 3) mean colour, L2-normalised."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # extract_features reads the parameter dtype

    def forward(self, x):
        return nn.functional.normalize(x.mean((2, 3)) + 0.1, dim=1)


def write_image(path, rgb, jitter=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    colour = tuple(int(np.clip(c + jitter, 0, 255)) for c in rgb)
    Image.new("RGB", (20, 16), colour).save(path)
    return str(path)


@pytest.fixture
def stand_in_model(monkeypatch, tmp_path):
    """`load_embedder` → the colour model; returns a checkpoint file for the index to remember."""
    calls = []

    def load(checkpoint, device):
        calls.append(checkpoint)
        return MeanColour(), dict(SETTINGS)

    monkeypatch.setattr(search_cli, "load_embedder", load)
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"stand-in")
    return str(ckpt), calls


@pytest.fixture
def gallery_dir(tmp_path):
    root = tmp_path / "gallery"
    for name, rgb in COLOURS.items():
        for k in range(3):
            write_image(root / name / f"{name}_{k}.jpg", rgb, jitter=8 * k - 8)
    return root


@pytest.fixture
def veri_dir(tmp_path):
    """A VeRi-776-layout set: vehicle v is painted COLOURS[v], seen by cameras c001..c003."""
    root = tmp_path / "veri"
    for folder in ("image_train", "image_query", "image_test"):
        (root / folder).mkdir(parents=True)
    for v, rgb in enumerate(COLOURS.values(), 1):
        for c in (1, 2, 3):
            write_image(root / "image_test" / f"{v:04d}_c{c:03d}_{c * 100:08d}_0.jpg", rgb, jitter=6 * c)
        write_image(root / "image_query" / f"{v:04d}_c004_00000100_0.jpg", rgb)
        write_image(root / "image_train" / f"{v:04d}_c001_00000100_0.jpg", rgb)
        write_image(root / "image_train" / f"{v:04d}_c002_00000100_0.jpg", rgb)
    return root


def run_json(argv, capsys):
    assert search_cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_query_needs_only_the_index_which_remembers_checkpoint_and_transform(gallery_dir, tmp_path, stand_in_model,
                                                                            capsys):
    ckpt, calls = stand_in_model
    out = tmp_path / "idx"
    assert search_cli.main(["index", "--checkpoint", ckpt, "--images", str(gallery_dir), "--out", str(out),
                        "--device", "cpu", "--batch-size", "5"]) == 0
    assert sorted(os.listdir(out)) == ["index.faiss", "meta.json", "paths.txt"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["checkpoint"] == os.path.abspath(ckpt) and meta["transform"] == SETTINGS
    assert meta["index"]["type"] == "flat" and meta["count"] == 12 and meta["dim"] == 3
    capsys.readouterr()
    q1 = write_image(tmp_path / "q1.jpg", COLOURS["red"])
    q2 = write_image(tmp_path / "q2.jpg", COLOURS["yellow"])
    picture = tmp_path / "pic" / "top.png"
    assert search_cli.main(["query", "--index", str(out), q1, q2, "--topk", "4", "--picture", str(picture)]) == 0
    assert calls[-1] == os.path.abspath(ckpt)
    printed = capsys.readouterr().out
    assert "query 1/2" in printed and "query 2/2" in printed
    first_hit = [line for line in printed.splitlines() if line.strip().startswith("1 ")]
    assert "red" in first_hit[0] and "yellow" in first_hit[1]
    with Image.open(picture) as img:
        assert img.width > img.height > 0


def test_indexed_image_queried_comes_back_first_with_score_one(gallery_dir, tmp_path, stand_in_model, capsys):
    ckpt, _ = stand_in_model
    search_cli.main(["index", "--checkpoint", ckpt, "--images", str(gallery_dir), "--out", str(tmp_path / "idx")])
    capsys.readouterr()
    q = str(gallery_dir / "blue" / "blue_2.jpg")
    answers = run_json(["query", "--index", str(tmp_path / "idx"), q, "--topk", "5", "--json"], capsys)
    assert [a["query"] for a in answers] == [q]
    hits = answers[0]["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5] and "camera" not in hits[0]
    assert hits[0]["path"] == q and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert {os.path.basename(os.path.dirname(h["path"])) for h in hits[:3]} == {"blue"}
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))


def test_dataset_index_prints_camera_and_pid_beside_each_hit(veri_dir, tmp_path, stand_in_model, capsys):
    ckpt, _ = stand_in_model
    out = tmp_path / "idx"
    assert search_cli.main(["index", "--checkpoint", ckpt, "--dataset", "veri776", str(veri_dir), "--out", str(out)]) == 0
    assert "indexed 12 images" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["dataset"] == {"format": "veri776", "root": str(veri_dir), "split": "gallery",
                                         "protocol": "small"}
    q = str(veri_dir / "image_test" / "0003_c002_00000200_0.jpg")
    answers = run_json(["query", "--index", str(out), q, "--topk", "3", "--json"], capsys)
    first = answers[0]["hits"][0]
    assert (answers[0]["camera"], answers[0]["pid"]) == ("c002", 3)
    assert (first["path"], first["camera"], first["pid"]) == (q, "c002", 3)
    assert first["score"] == pytest.approx(1.0, abs=1e-5)
    assert [h["pid"] for h in answers[0]["hits"]] == [3, 3, 3]  # blue is vehicle 3 under every camera
    # A query from another split is not indexed: no labels of its own, its vehicle's images rank first.
    other = str(veri_dir / "image_query" / "0001_c004_00000100_0.jpg")
    assert search_cli.main(["query", "--index", str(out), other, "--topk", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("0001_c004_00000100_0.jpg") and "c00" in lines[1] and " 1 " in lines[1]


def test_dataset_split_train_is_indexed_when_asked(veri_dir, tmp_path, stand_in_model, capsys):
    ckpt, _ = stand_in_model
    search_cli.main(["index", "--checkpoint", ckpt, "--dataset", "veri776", str(veri_dir), "train", "--out",
                 str(tmp_path / "idx")])
    assert "indexed 8 images" in capsys.readouterr().out
    labels = (tmp_path / "idx" / "labels.tsv").read_text().splitlines()
    assert labels[:3] == ["camera\tpid", "c001\t1", "c002\t1"]


def test_ivf_returns_the_exact_top1_for_vectors_in_the_index():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2000, 32)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    exact = search.build_faiss_index(feats)
    ivf = search.build_faiss_index(feats, ivf=16)
    assert type(ivf).__name__ == "IndexIVFFlat" and ivf.ntotal == 2000
    rows = rng.choice(2000, 100, replace=False)
    for index, nprobe in ((exact, 1), (ivf, 1), (ivf, 4)):
        scores, ids = search.search_index(index, feats[rows], topk=5, nprobe=nprobe)
        np.testing.assert_array_equal(ids[:, 0], rows)
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_ivf_with_all_cells_probed_equals_exact_search():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((500, 16)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    queries = feats[:20] + 0.3 * rng.standard_normal((20, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, exact_ids = search.search_index(search.build_faiss_index(feats), queries, topk=10)
    _, ivf_ids = search.search_index(search.build_faiss_index(feats, ivf=8), queries, topk=10, nprobe=8)
    np.testing.assert_array_equal(ivf_ids, exact_ids)


def test_pq_index_compresses_rows_and_keeps_them_searchable(tmp_path, gallery_dir):
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((600, 16)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    index = search.build_faiss_index(feats, ivf=4, pq=8)
    assert type(index).__name__ == "IndexIVFPQ" and index.pq.M == 8 and index.code_size == 8
    _, ids = search.search_index(index, feats[:50], topk=10, nprobe=4)
    assert all(i in row for i, row in enumerate(ids))  # each indexed vector is among its own 10 nearest


def test_ivf_and_nprobe_are_remembered_by_the_index(gallery_dir, tmp_path, stand_in_model, capsys):
    ckpt, _ = stand_in_model
    search_cli.main(["index", "--checkpoint", ckpt, "--images", str(gallery_dir), "--out", str(tmp_path / "idx"),
                 "--ivf", "2", "--nprobe", "2"])
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["index"] == {"type": "ivf", "metric": "inner_product", "nlist": 2, "pq": 0, "nprobe": 2}
    capsys.readouterr()
    q = str(gallery_dir / "green" / "green_0.jpg")
    hits = run_json(["query", "--index", str(tmp_path / "idx"), q, "--json", "--topk", "12"], capsys)[0]["hits"]
    assert hits[0]["path"] == q and len(hits) == 12  # both cells probed: every row ranked


def test_errors_are_one_line_and_name_the_flag_or_file(gallery_dir, tmp_path, stand_in_model, veri_dir):
    ckpt, _ = stand_in_model
    (tmp_path / "empty").mkdir()
    index_args = ["index", "--checkpoint", ckpt, "--out", str(tmp_path / "x")]
    cases = [
        (index_args + ["--images", str(tmp_path / "empty")], "--images: no images"),
        (index_args + ["--images", str(tmp_path / "nowhere")], "--images: '.*nowhere' is not a folder"),
        (index_args + ["--dataset", "market", str(veri_dir)], "--dataset: format 'market' unknown, expected one of"),
        (index_args + ["--dataset", "veri776", str(veri_dir), "val"], "--dataset: split 'val' unknown"),
        (index_args + ["--dataset", "veri776"], "--dataset: expected FORMAT ROOT"),
        (index_args + ["--images", str(gallery_dir), "--ivf", "-1"], "--ivf: expected a number of cells"),
        (index_args + ["--images", str(gallery_dir), "--ivf", "100"], "--ivf: NLIST=100 cells but only 12 images"),
        (index_args + ["--images", str(gallery_dir), "--pq", "4"], "--pq: product quantisation needs --ivf"),
        (index_args + ["--images", str(gallery_dir), "--ivf", "2", "--pq", "3"], "--pq: needs at least 256 images"),
        (index_args + ["--images", str(gallery_dir), "--ivf", "two"], "argument --ivf: invalid int value: 'two'"),
        (index_args + ["--images", str(gallery_dir), "--nprobe", "0"], "--nprobe: expected a number of cells"),
        (index_args + ["--images", str(gallery_dir), "--dataset", "veri776", "r"], "not allowed with argument"),
        (["query", "--index", str(tmp_path / "empty"), str(ckpt)], "'.*empty' is not a search index"),
        (["query", "--index", str(tmp_path / "empty"), "missing.jpg"], "IMAGE: query image 'missing.jpg' not found"),
        (["query", "--index", str(tmp_path / "empty")], "give at least one query IMAGE"),
        (["query", "--index", str(tmp_path / "empty"), ckpt, "--topk", "0"], "--topk: expected ≥ 1, got 0"),
    ]
    for argv, message in cases:
        with pytest.raises(ReidError, match=message) as info:
            search_cli.main(argv)
        assert "\n" not in str(info.value), argv
    with pytest.raises(ReidError, match="--pq: expected M ≥ 1 dividing the embedding dimension 16, got 5"):
        search.build_faiss_index(np.eye(300, 16, dtype=np.float32), ivf=2, pq=5)
    broken = write_image(tmp_path / "bad" / "b.jpg", COLOURS["red"])
    open(broken, "wb").write(b"not an image")
    with pytest.raises(ReidError, match="b.jpg"):
        search_cli.main(index_args + ["--images", str(tmp_path / "bad")])


def test_damaged_index_folders_are_named_in_the_error(gallery_dir, tmp_path, stand_in_model):
    ckpt, _ = stand_in_model
    idx = tmp_path / "idx"
    search_cli.main(["index", "--checkpoint", ckpt, "--images", str(gallery_dir), "--out", str(idx)])
    q = str(gallery_dir / "red" / "red_0.jpg")
    os.remove(ckpt)
    with pytest.raises(ReidError, match=r"--index: checkpoint '.*m.pt' recorded in '.*meta.json' not found"):
        search_cli.main(["query", "--index", str(idx), q])
    (idx / "meta.json").write_text("{not json")
    with pytest.raises(ReidError, match=r"--index: '.*meta.json' cannot be read \(JSONDecodeError\)"):
        search_cli.main(["query", "--index", str(idx), q])
    (idx / "meta.json").write_text("{}")
    (idx / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(ReidError, match=r"--index: '.*index.faiss' cannot be read by faiss") as info:
        search_cli.main(["query", "--index", str(idx), q])
    assert "\n" not in str(info.value)


def test_query_with_a_model_of_another_dimension_is_refused(gallery_dir):
    paths = search.list_images(str(gallery_dir))
    index = search.build_faiss_index(search.embed_images(MeanColour(), paths, SETTINGS))
    wider = nn.Sequential(MeanColour(), nn.Linear(3, 5))
    with pytest.raises(ReidError, match="5 dimensions"):
        search.search_index(index, search.embed_images(wider, paths[:1], SETTINGS), topk=3)


def test_index_embeddings_are_unit_vectors_so_scores_are_cosines(gallery_dir):
    feats = search.embed_images(MeanColour(), search.list_images(str(gallery_dir)), SETTINGS)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


def test_real_checkpoint_transform_is_read_from_its_config(tmp_path, veri_dir, capsys):
    from reid.config import Config, config_to_dict
    from reid.model import build_model

    cfg = Config()
    cfg.model.arch, cfg.data.height, cfg.data.width, cfg.eval.flip = "resnet18", 32, 16, False
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg.model).state_dict(), "config": config_to_dict(cfg)}, tmp_path / "r18.pt")
    out = tmp_path / "idx"
    search_cli.main(["index", "--checkpoint", str(tmp_path / "r18.pt"), "--dataset", "veri776", str(veri_dir), "query",
                 "--out", str(out), "--device", "cpu"])
    assert json.loads((out / "meta.json").read_text())["transform"] == {"height": 32, "width": 16, "flip": False}
    capsys.readouterr()
    q = str(veri_dir / "image_query" / "0002_c004_00000100_0.jpg")
    first = run_json(["query", "--index", str(out), q, "--json", "--topk", "1"], capsys)[0]["hits"][0]
    assert (first["path"], first["camera"], first["pid"]) == (q, "c004", 2)
    assert first["score"] == pytest.approx(1.0, abs=1e-5)
