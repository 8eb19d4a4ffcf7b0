"""Search index / queries / CLI and the retrieval picture, with a tiny stand-in embedding model."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from reid import search
from reid.errors import ReidError
from reid.visualize import GREEN, GREY, RED, save_retrieval_grid

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (220, 210, 30)}


class MeanColour(nn.Module):
    """Stand-in for the re-ID model: (B, 3, H, W) → (B, 3) mean colour, L2-normalised."""

    def forward(self, x):
        return nn.functional.normalize(x.mean((2, 3)) - 0.3, dim=1)


def to_tensor(img):
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32) / 255.0).permute(2, 0, 1)


def write_image(path, rgb, jitter=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    colour = tuple(int(np.clip(c + jitter, 0, 255)) for c in rgb)
    Image.new("RGB", (20, 16), colour).save(path)
    return str(path)


@pytest.fixture
def gallery_dir(tmp_path):
    root = tmp_path / "gallery"
    for name, rgb in COLOURS.items():
        for k in range(3):
            write_image(root / name / f"{name}_{k}.jpg", rgb, jitter=8 * k - 8)
    return root


def test_index_round_trip_ranks_images_of_the_query_colour_first(gallery_dir, tmp_path):
    paths = search.list_images(str(gallery_dir))
    assert len(paths) == 12 and paths == sorted(paths)
    index = search.build_index(MeanColour(), paths, to_tensor, batch_size=5)
    search.save_index(str(tmp_path / "idx"), index, paths, {"checkpoint": "x.pt"})
    loaded, loaded_paths, meta = search.load_index(str(tmp_path / "idx"))
    assert loaded.ntotal == 12 and loaded_paths == paths and meta["dim"] == 3
    query = write_image(tmp_path / "q_blue.png", COLOURS["blue"], jitter=3)
    scores, ids = search.query_index(loaded, MeanColour(), [query], to_tensor, topk=5)
    assert scores.shape == (1, 5) and np.all(np.diff(scores[0]) <= 1e-6)
    assert {os.path.basename(os.path.dirname(loaded_paths[j])) for j in ids[0][:3]} == {"blue"}


def test_index_embeddings_are_unit_vectors_so_scores_are_cosines(gallery_dir):
    feats = search.embed_images(MeanColour(), search.list_images(str(gallery_dir)), to_tensor)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


def test_cli_index_then_query_prints_ranked_lists_and_writes_a_picture(gallery_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(search, "load_embedder", lambda checkpoint, device: (MeanColour(), to_tensor))
    out = tmp_path / "idx"
    assert search.main(["index", "--checkpoint", "m.pt", "--images", str(gallery_dir), "--out", str(out),
                        "--device", "cpu"]) == 0
    assert sorted(os.listdir(out)) == ["index.faiss", "meta.json", "paths.txt"]
    q1 = write_image(tmp_path / "q1.jpg", COLOURS["red"])
    q2 = write_image(tmp_path / "q2.jpg", COLOURS["yellow"])
    picture = tmp_path / "pic" / "top.png"
    assert search.main(["query", "--index", str(out), "--checkpoint", "m.pt", "--images", q1, q2,
                        "--topk", "4", "--picture", str(picture), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "query 1/2" in printed and "query 2/2" in printed
    first_hit = [line for line in printed.splitlines() if line.strip().startswith("1 ")]
    assert "red" in first_hit[0] and "yellow" in first_hit[1]
    with Image.open(picture) as img:
        assert img.width > img.height > 0


def test_cli_errors_name_the_problem(gallery_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(search, "load_embedder", lambda checkpoint, device: (MeanColour(), to_tensor))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReidError, match="no images"):
        search.main(["index", "--checkpoint", "m.pt", "--images", str(tmp_path / "empty"), "--out", "x"])
    with pytest.raises(ReidError, match="not a search index"):
        search.main(["query", "--index", str(tmp_path / "empty"), "--checkpoint", "m.pt", "--images", "q.jpg"])
    broken = write_image(tmp_path / "bad" / "b.jpg", COLOURS["red"])
    open(broken, "wb").write(b"not an image")
    with pytest.raises(ReidError, match="b.jpg"):
        search.main(["index", "--checkpoint", "m.pt", "--images", str(tmp_path / "bad"), "--out", "x"])


def test_query_with_a_model_of_another_dimension_is_refused(gallery_dir, tmp_path):
    paths = search.list_images(str(gallery_dir))
    index = search.build_index(MeanColour(), paths, to_tensor)
    wider = nn.Sequential(MeanColour(), nn.Linear(3, 5))
    with pytest.raises(ReidError, match="5 dimensions"):
        search.query_index(index, wider, paths[:1], to_tensor)


# --- retrieval picture ---------------------------------------------------------------------------

def frame_colour(img, row, col, cell=24, border=3, gap=12):
    pitch_w, pitch_h = cell + 2 * border + 4, cell + 2 * border + 14 + 4
    x = col * pitch_w + (gap if col else 0) + 2 + 1
    return img.getpixel((x, row * pitch_h + 2 + 1))


def test_picture_frames_matches_green_others_red_and_skips_same_camera_junk(tmp_path):
    q = [write_image(tmp_path / "q0.jpg", (0, 0, 0))]
    g = [write_image(tmp_path / f"g{k}.jpg", (10 * k, 0, 0)) for k in range(4)]
    # Ranked: g0 (same id, same camera: junk), g1 (other id), g2 (same id, other camera), g3 (other id).
    path = save_retrieval_grid(str(tmp_path / "grid.png"), q, g, [[0, 1, 2, 3]], [5], [5, 6, 5, 7], [0], [0, 1, 1, 2],
                               topk=3, cell=(24, 24), border=3)
    with Image.open(path) as img:
        img = img.convert("RGB")
        assert img.size == ((24 + 10) * 4 + 12, 24 + 10 + 14)
        assert [frame_colour(img, 0, c) for c in (1, 2, 3)] == [RED, GREEN, RED]


def test_picture_without_identities_uses_neutral_frames_and_checks_shapes(tmp_path):
    q = [write_image(tmp_path / "q.jpg", (0, 0, 0))]
    g = [write_image(tmp_path / "g.jpg", (9, 9, 9))]
    path = save_retrieval_grid(str(tmp_path / "n.png"), q, g, [[0, -1]], cell=(24, 24), border=3, topk=2)
    with Image.open(path) as img:
        assert frame_colour(img.convert("RGB"), 0, 1) == GREY
    with pytest.raises(ReidError, match="ranked_gallery_idx"):
        save_retrieval_grid(str(tmp_path / "x.png"), q, g, [[0], [0]])
    with pytest.raises(ReidError, match="cannot read image"):
        save_retrieval_grid(str(tmp_path / "x.png"), [str(tmp_path / "missing.jpg")], g, [[0]])
