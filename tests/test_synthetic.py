"""The synthetic multi-camera vehicle generator (issue 3 item 6, DESIGN §6): layout, determinism, bad input."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from reid.data.synthetic import SynthConfig, ensure_synthetic, generate, validate_synth
from reid.data.synthetic_vehicle import sample_vehicle
from reid.errors import ReidError

NAME = re.compile(r"^(\d{4})_c(\d{3})_(\d{8})_(\d)\.jpg$")  # VeRi-776: vehicle, camera, frame, index
SPLITS = ("image_train", "image_query", "image_test")


def tiny(**kw) -> SynthConfig:
    base = dict(identities=6, test_identities=4, cameras=4, min_cameras=2, max_cameras=3, min_frames=2,
                max_frames=4, height=32, width=32, seed=3)
    base.update(kw)
    return SynthConfig(**base)


def digests(root) -> dict:
    return {(split, n): hashlib.sha256(open(os.path.join(root, split, n), "rb").read()).hexdigest()
            for split in SPLITS for n in sorted(os.listdir(os.path.join(root, split)))}


def records(root, split) -> list[tuple[int, int, int]]:
    """(vehicle, camera, frame) of every file, failing on a name the VeRi-776 pattern does not read."""
    out = []
    for n in sorted(os.listdir(os.path.join(root, split))):
        m = NAME.match(n)
        assert m, f"{split}/{n} does not follow VVVV_cCCC_FFFFFFFF_I.jpg"
        out.append((int(m.group(1)), int(m.group(2)), int(m.group(3))))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    cfg = tiny()
    return root, cfg, generate(str(root), cfg)


def test_writes_the_veri776_layout_with_readable_jpegs_of_the_configured_size(dataset):
    root, cfg, _ = dataset
    for split in SPLITS:
        assert records(root, split), f"{split} is empty"
        for n in os.listdir(root / split):
            with Image.open(root / split / n) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (cfg.width, cfg.height))


def test_counts_returned_match_the_files_and_synth_json_records_the_config(dataset):
    root, cfg, counts = dataset
    assert counts["train"] == len(os.listdir(root / "image_train"))
    assert counts["query"] == len(os.listdir(root / "image_query"))
    assert counts["gallery"] == len(os.listdir(root / "image_test"))
    assert counts["identities"] == cfg.identities and counts["test_identities"] == cfg.test_identities
    meta = json.loads((root / "synth.json").read_text())
    assert meta["config"] == dataclasses.asdict(cfg)
    assert meta["counts"] == counts


def test_identity_counts_and_train_test_identities_are_disjoint(dataset):
    root, cfg, _ = dataset
    train = {v for v, _, _ in records(root, "image_train")}
    test = {v for v, _, _ in records(root, "image_test")}
    assert len(train) == cfg.identities and len(test) == cfg.test_identities
    assert not train & test


def test_every_identity_passes_between_min_and_max_cameras(dataset):
    root, cfg, _ = dataset
    for split in ("image_train", "image_test"):
        cams = defaultdict(set)
        for v, c, _ in records(root, split):
            cams[v].add(c)
            assert 1 <= c <= cfg.cameras
        assert all(cfg.min_cameras <= len(cs) <= cfg.max_cameras for cs in cams.values())


def test_each_passage_is_a_tracklet_of_min_to_max_consecutive_frames(dataset):
    root, cfg, _ = dataset
    for split in ("image_train", "image_test"):
        frames = defaultdict(list)
        for v, c, f in records(root, split):
            frames[(v, c)].append(f)
        for fs in frames.values():
            assert cfg.min_frames <= len(fs) <= cfg.max_frames
            steps = np.diff(sorted(fs))
            assert len(set(steps)) <= 1 and (steps > 0).all()  # one passage: evenly spaced frames


def test_query_is_one_image_per_test_passage_and_also_in_the_gallery_as_in_veri776(dataset):
    root, _, _ = dataset
    passages = Counter((v, c) for v, c, _ in records(root, "image_query"))
    assert set(passages) == {(v, c) for v, c, _ in records(root, "image_test")}
    assert set(passages.values()) == {1}
    for n in os.listdir(root / "image_query"):
        assert (root / "image_query" / n).read_bytes() == (root / "image_test" / n).read_bytes()


def test_same_seed_gives_byte_identical_files(dataset, tmp_path):
    root, cfg, _ = dataset
    generate(str(tmp_path), cfg)
    assert digests(tmp_path) == digests(root)
    assert (tmp_path / "synth.json").read_bytes() == (root / "synth.json").read_bytes()


def test_different_seed_gives_different_images(dataset, tmp_path):
    root, cfg, _ = dataset
    generate(str(tmp_path), dataclasses.replace(cfg, seed=cfg.seed + 1))
    a, b = digests(root), digests(tmp_path)
    assert not set(a.values()) & set(b.values())


def test_an_image_depends_only_on_seed_vehicle_camera_and_frame_not_on_the_others(dataset, tmp_path):
    root, cfg, _ = dataset
    generate(str(tmp_path), dataclasses.replace(cfg, identities=cfg.identities - 2))
    a, b = digests(root), digests(tmp_path)
    kept = {k: v for k, v in b.items() if k[0] == "image_train"}
    assert kept and all(a[k] == v for k, v in kept.items())


def test_palette_colour_is_shared_by_many_identities_but_traits_differ():
    vehicles = [sample_vehicle(np.random.default_rng([0, 1, vid]), 8) for vid in range(200)]
    colours = Counter(v.colour for v in vehicles)
    assert len(colours) <= 8 and colours.most_common(1)[0][1] >= 20
    assert len(set(vehicles)) == len(vehicles)  # no two identities look the same in every trait


def test_ensure_synthetic_generates_once_then_leaves_a_matching_dataset_alone(tmp_path):
    cfg = tiny(identities=3, test_identities=2, cameras=2, max_cameras=2, max_frames=2)
    ensure_synthetic(str(tmp_path), cfg)
    marker = tmp_path / "image_train" / sorted(os.listdir(tmp_path / "image_train"))[0]
    marker.write_bytes(b"left alone")
    ensure_synthetic(str(tmp_path), cfg)
    assert marker.read_bytes() == b"left alone"
    ensure_synthetic(str(tmp_path), dataclasses.replace(cfg, seed=cfg.seed + 1))  # config differs: regenerate
    assert not marker.exists() or marker.read_bytes() != b"left alone"
    assert json.loads((tmp_path / "synth.json").read_text())["config"]["seed"] == cfg.seed + 1


def test_ensure_synthetic_regenerates_when_synth_json_is_missing(tmp_path):
    cfg = tiny(identities=3, test_identities=2, cameras=2, max_cameras=2, max_frames=2)
    generate(str(tmp_path), cfg)
    before = digests(tmp_path)
    (tmp_path / "synth.json").unlink()
    (tmp_path / "image_test" / sorted(os.listdir(tmp_path / "image_test"))[0]).unlink()
    ensure_synthetic(str(tmp_path), cfg)
    assert digests(tmp_path) == before and (tmp_path / "synth.json").exists()


@pytest.mark.parametrize("override, key", [
    (dict(min_cameras=1), "synth.min_cameras"),
    (dict(cameras=4, max_cameras=5), "synth.max_cameras"),
    (dict(min_frames=4, max_frames=2), "synth.max_frames"),
    (dict(identities=9000, test_identities=1000), "synth.test_identities"),
    (dict(occlusion=1.5), "synth.occlusion"),
    (dict(height=4), "synth.height"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(tmp_path, override, key):
    with pytest.raises(ReidError, match=re.escape(key)) as e:
        generate(str(tmp_path), tiny(**override))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "image_train").exists()  # nothing written before the check


def test_refuses_to_delete_files_it_did_not_write(tmp_path):
    (tmp_path / "image_train").mkdir()
    (tmp_path / "image_train" / "notes.txt").write_text("mine")
    with pytest.raises(ReidError, match="notes.txt"):
        generate(str(tmp_path), tiny(identities=2, test_identities=1, cameras=2, max_cameras=2, max_frames=2))
    assert (tmp_path / "image_train" / "notes.txt").read_text() == "mine"


def test_each_camera_has_its_own_viewpoint_background_and_colour_cast():
    from reid.data.synthetic import camera_views
    from reid.data.synthetic_camera import make_camera

    cams = [make_camera(np.random.default_rng([0, 2, c]), 32, 32, 1.0, 1.0) for c in range(1, 7)]
    assert len({tuple(np.round(c.gain, 3)) for c in cams}) == len(cams)
    assert len({c.background.tobytes() for c in cams}) == len(cams)
    views = camera_views(SynthConfig(cameras=10, views="side,front,rear"))
    assert set(views) == set(range(1, 11)) and set(views.values()) <= {"side", "front", "rear"}
    assert len(set(views.values())) >= 2  # cameras can see vehicles from different sides
    cams = [make_camera(np.random.default_rng([0, 2, c]), 32, 32, 1.0, 1.0, ["side"]) for c in range(1, 11)]
    assert {c.view for c in cams} == {"side"} and len({c.mirror for c in cams}) == 2  # default: mirrored side views


def test_views_setting_is_validated():
    with pytest.raises(ReidError, match="synth.views"):
        validate_synth(SynthConfig(views="top"))
