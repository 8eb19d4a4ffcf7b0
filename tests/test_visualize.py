"""Pictures people look at: the retrieval grid's frames and the per-camera mAP chart."""
import numpy as np
import pytest
from PIL import Image

from reid.errors import ReidError
from reid.visualize import GREEN, GREY, QUERY_BLUE, RED, save_camera_map_chart, save_retrieval_grid


def write_image(path, colour):
    Image.new("RGB", (20, 30), colour).save(path)
    return str(path)


def frame_colour(img, row, col, cell=24, border=3, gap=12):
    pitch_w, pitch_h = cell + 2 * border + 4, cell + 2 * border + 14 + 4
    x = col * pitch_w + (gap if col else 0) + 2 + 1
    return img.getpixel((x, row * pitch_h + 2 + 1))


def test_grid_frames_matches_green_others_red_and_same_camera_junk_grey_where_it_ranks(tmp_path):
    q = [write_image(tmp_path / "q0.jpg", (0, 0, 0))]
    g = [write_image(tmp_path / f"g{k}.jpg", (10 * k, 0, 0)) for k in range(4)]
    # Ranked: g0 (same id, same camera: junk), g1 (other id), g2 (same id, other camera), g3 (other id).
    path = save_retrieval_grid(str(tmp_path / "grid.png"), q, g, [[0, 1, 2, 3]], [5], [5, 6, 5, 7], [0], [0, 1, 1, 2],
                               topk=4, cell=(24, 24), border=3)
    with Image.open(path) as img:
        img = img.convert("RGB")
        assert [frame_colour(img, 0, c) for c in (0, 1, 2, 3, 4)] == [QUERY_BLUE, GREY, RED, GREEN, RED]


def test_camera_chart_draws_one_bar_per_camera_with_its_height(tmp_path):
    path = save_camera_map_chart(str(tmp_path / "c.png"), ["c1", "c2", "c3"], [1.0, 0.5, float("nan")], [4, 2, 0])
    with Image.open(path) as img:
        img = np.asarray(img.convert("RGB"))
    blue = np.all(img == QUERY_BLUE, axis=2)
    columns = blue.any(axis=0)
    starts = np.flatnonzero(columns[1:] & ~columns[:-1]) + 1
    heights = [int(blue[:, x + 2].sum()) for x in starts]
    assert len(starts) == 2 and heights[0] == 200 and heights[1] == 100  # NaN: an empty slot
    with pytest.raises(ReidError, match="one of each per camera"):
        save_camera_map_chart(str(tmp_path / "x.png"), ["c1"], [0.1, 0.2], [1, 1])


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
