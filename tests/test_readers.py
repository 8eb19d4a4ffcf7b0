"""Dataset readers: tiny fixture trees in each native layout, exact counts and ids, bad input."""

import os

import numpy as np
import pytest
from PIL import Image

from reid.data.readers import FORMATS, Layout, load_dataset
from reid.errors import ReidError

VEHICLE_INFO_HEADER = "id/image;Camera ID;Time;Model;Type;Color"


def write_image(path, kind="jpg", colour=(120, 30, 200)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (6, 4), colour).save(path, "PNG" if kind == "png" else "JPEG")


def write_text(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


# ---------------------------------------------------------------- VeRi-776
VERI776 = {
    "image_train": ["0001_c001_00000010_0.jpg", "0001_c001_00000020_0.jpg", "0001_c002_00000030_0.jpg",
                    "0002_c002_00000040_0.jpg", "0002_c010_00000050_0.jpg", "0002_c010_00000060_1.jpg"],
    "image_query": ["0005_c001_00000070_0.jpg"],
    "image_test": ["0005_c002_00000080_0.jpg", "0005_c010_00000090_0.jpg", "0006_c002_00000095_0.jpg"],
}


def make_veri776(root, files=VERI776):
    for folder, names in files.items():
        os.makedirs(root / folder, exist_ok=True)
        for name in names:
            write_image(str(root / folder / name))
    (root / "image_train" / "Thumbs.db").write_bytes(b"\0junk")
    return root


def test_veri776_counts_and_ids_are_exact(tmp_path):
    ds = load_dataset("veri776", str(make_veri776(tmp_path)))
    assert ds.camera_names == ["c001", "c002", "c010"]  # natural order, shared by all splits
    assert ds.summary() == {
        "train": {"images": 6, "cameras": 3, "tracklets": 4, "identities": 2},
        "query": {"images": 1, "cameras": 1, "tracklets": 1, "identities": 1},
        "gallery": {"images": 3, "cameras": 2, "tracklets": 3, "identities": 2},
    }
    assert ds.train.cams.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.train.tracklets.tolist() == [0, 0, 1, 2, 3, 3]  # tracklet = (camera, vehicle)
    assert ds.train.tracklet_names == [("c001", "0001"), ("c002", "0001"), ("c002", "0002"), ("c010", "0002")]
    assert ds.train.pids.tolist() == [1, 1, 1, 2, 2, 2]
    assert ds.query.cams.tolist() == [0] and ds.gallery.cams.tolist() == [1, 2, 1]
    assert all(os.path.isabs(p) and p.endswith(".jpg") for p in ds.train.paths)
    assert ds.train.cams.dtype == np.int64 and ds.train.tracklets.dtype == np.int64


def test_training_view_carries_no_identities(tmp_path):
    view = load_dataset("veri776", str(make_veri776(tmp_path))).train.training_view()
    assert view._fields == ("paths", "cams", "tracklets")


def test_veri776_unparsable_image_name_names_file_and_pattern(tmp_path):
    make_veri776(tmp_path)
    write_image(str(tmp_path / "image_train" / "car_c001.jpg"))
    with pytest.raises(ReidError, match=r"car_c001\.jpg.*pattern") as err:
        load_dataset("veri776", str(tmp_path))
    assert Layout().veri776_name in str(err.value) and "\n" not in str(err.value)


def test_missing_root_names_path_and_expected_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ReidError, match=r"nowhere.*image_train/, image_query/, image_test/"):
        load_dataset("veri776", str(missing))


def test_missing_split_folder_names_it(tmp_path):
    make_veri776(tmp_path)
    for name in VERI776["image_query"]:
        os.remove(tmp_path / "image_query" / name)
    os.rmdir(tmp_path / "image_query")
    with pytest.raises(ReidError, match=r"image_query: folder not found"):
        load_dataset("veri776", str(tmp_path))


def test_empty_split_is_an_error(tmp_path):
    make_veri776(tmp_path, {**VERI776, "image_test": []})
    with pytest.raises(ReidError, match=r"image_test: veri776 gallery split is empty"):
        load_dataset("veri776", str(tmp_path))


def test_training_split_with_one_camera_is_an_error(tmp_path):
    make_veri776(tmp_path, {**VERI776, "image_train": ["0001_c001_00000010_0.jpg", "0002_c001_00000020_0.jpg"]})
    with pytest.raises(ReidError, match=r"one camera only \(c001\).*cross-camera"):
        load_dataset("veri776", str(tmp_path))


def test_corrupt_image_is_named_when_checking_images(tmp_path):
    make_veri776(tmp_path)
    bad = tmp_path / "image_test" / "0006_c002_00000095_0.jpg"
    bad.write_bytes(b"not a jpeg at all")
    assert len(load_dataset("veri776", str(tmp_path)).gallery) == 3  # headers not opened by default
    with pytest.raises(ReidError, match=r"0006_c002_00000095_0\.jpg: corrupt"):
        load_dataset("veri776", str(tmp_path), check_images=True)


def test_unknown_format_and_protocol_are_one_line_errors(tmp_path):
    with pytest.raises(ReidError, match=r"data.format: got 'market'.*veri776"):
        load_dataset("market", str(tmp_path))
    with pytest.raises(ReidError, match=r"data.protocol: got 'huge'.*small, medium, large"):
        load_dataset("veriwild", str(tmp_path), protocol="huge")
    assert FORMATS == ("veri776", "veriwild", "vveri901", "csv")


# ---------------------------------------------------------------- VeRi-Wild
# (vid, img, camera); 00003 is a test vehicle.
WILD_TRAIN = [("00001", "000001", 5), ("00001", "000002", 5), ("00001", "000003", 17),
              ("00002", "000004", 17), ("00002", "000005", 3)]
WILD_TEST = [("00003", "000006", 3), ("00003", "000007", 5), ("00004", "000008", 17), ("00004", "000009", 17)]


def make_veriwild(root, info_at_root=False, id_names=False, three_columns=False, with_info=True):
    for vid, img, _ in WILD_TRAIN + WILD_TEST:
        write_image(str(root / "images" / vid / f"{img}.jpg"))
    if with_info:
        info = [VEHICLE_INFO_HEADER] + [f"{v}/{i};{c};2018-03-11 10:05:04;Audi;SUV;Black"
                                        for v, i, c in WILD_TRAIN + WILD_TEST]
        write_text(str(root / ("" if info_at_root else "train_test_split") / "vehicle_info.txt"), info)

    def line(v, i, c):
        return f"{v}/{i} {v} {c}" if three_columns else f"{v}/{i}"

    lists = root / "train_test_split"
    suffix = "_id" if id_names else ""
    write_text(str(lists / "train_list.txt"), [line(*r) for r in WILD_TRAIN])
    write_text(str(lists / f"test_3000{suffix}.txt"), [line(*r) for r in WILD_TEST])
    write_text(str(lists / f"test_3000{suffix}_query.txt"), [line(*WILD_TEST[0])])
    write_text(str(lists / f"test_5000{suffix}.txt"), [line(*r) for r in WILD_TEST[:3]])
    write_text(str(lists / f"test_5000{suffix}_query.txt"), [line(*r) for r in WILD_TEST[:2]])
    return root


def test_veriwild_official_layout_counts_and_ids(tmp_path):
    ds = load_dataset("veriwild", str(make_veriwild(tmp_path)))
    assert ds.camera_names == ["3", "5", "17"]
    assert ds.summary() == {
        "train": {"images": 5, "cameras": 3, "tracklets": 4, "identities": 2},
        "query": {"images": 1, "cameras": 1, "tracklets": 1, "identities": 1},
        "gallery": {"images": 4, "cameras": 3, "tracklets": 3, "identities": 2},  # includes the query
    }
    assert ds.train.cams.tolist() == [1, 1, 2, 2, 0]
    assert ds.train.tracklets.tolist() == [1, 1, 2, 3, 0]
    assert ds.train.pids.tolist() == [1, 1, 1, 2, 2]
    assert ds.train.paths[0] == str(tmp_path / "images" / "00001" / "000001.jpg")
    assert ds.query.paths == [ds.gallery.paths[0]]


def test_veriwild_protocol_selects_the_test_lists(tmp_path):
    ds = load_dataset("veriwild", str(make_veriwild(tmp_path)), protocol="medium")
    assert (len(ds.query), len(ds.gallery)) == (2, 3)
    with pytest.raises(ReidError, match=r"test_10000\.txt.*protocol large not found"):
        load_dataset("veriwild", str(tmp_path), protocol="large")


@pytest.mark.parametrize("variant", [dict(info_at_root=True), dict(id_names=True), dict(three_columns=True),
                                     dict(info_at_root=True, id_names=True, three_columns=True)])
def test_veriwild_variant_copies_read_the_same(tmp_path, variant):
    official = load_dataset("veriwild", str(make_veriwild(tmp_path / "a"))).summary()
    assert load_dataset("veriwild", str(make_veriwild(tmp_path / "b", **variant))).summary() == official


def test_veriwild_without_vehicle_info_uses_the_list_camera_column(tmp_path):
    ds = load_dataset("veriwild", str(make_veriwild(tmp_path, with_info=False, three_columns=True)))
    assert ds.camera_names == ["3", "5", "17"] and ds.train.cams.tolist() == [1, 1, 2, 2, 0]
    with pytest.raises(ReidError, match=r"train_list\.txt:1: no camera for 00001/000001"):
        load_dataset("veriwild", str(make_veriwild(tmp_path / "b", with_info=False)))


def test_veriwild_list_entry_with_missing_image_is_named(tmp_path):
    make_veriwild(tmp_path)
    os.remove(tmp_path / "images" / "00002" / "000004.jpg")
    with pytest.raises(ReidError, match=r"train_list\.txt:4: listed image .*00002/000004\.jpg not found"):
        load_dataset("veriwild", str(tmp_path))


def test_veriwild_bad_list_line_and_missing_lists_folder(tmp_path):
    make_veriwild(tmp_path)
    write_text(str(tmp_path / "train_test_split" / "train_list.txt"), ["00001/000001 00001"])
    with pytest.raises(ReidError, match=r"train_list\.txt:1: got '00001/000001 00001', expected 'vid/img'"):
        load_dataset("veriwild", str(tmp_path))
    os.replace(tmp_path / "train_test_split", tmp_path / "lists")
    with pytest.raises(ReidError, match=r"train_test_split: folder not found, expected a VeRi-Wild folder"):
        load_dataset("veriwild", str(tmp_path))


# ---------------------------------------------------------------- VVeRI-901
# vid -> tracklet dir -> frames
VVERI = {"001": {"L1_C1_V1": 3, "L1_C2_V1": 2}, "002": {"L2_C2_V9": 2, "L5_C12_V9": 1},
         "003": {"L1_C1_V3": 2, "L3_C12_V3": 2}}


def make_vveri(root, kind="png", prefix="VVeRI/video"):
    for vid, tracklets in VVERI.items():
        for tracklet, frames in tracklets.items():
            for f in range(frames):
                write_image(str(root / vid / tracklet / f"{f + 1:04d}.{kind}"), kind)
    entries = {vid: [f"{prefix}/{vid}/{t}" for t in VVERI[vid]] for vid in VVERI}
    write_text(str(root / "train.txt"), [f"{e} {i}" for i, vid in enumerate(["001", "002"]) for e in entries[vid]])
    write_text(str(root / "query.txt"), entries["003"][:1])
    write_text(str(root / "gallery.txt"), entries["003"][1:])
    return root


def test_vveri901_frames_are_records_with_real_tracklets(tmp_path):
    ds = load_dataset("vveri901", str(make_vveri(tmp_path)))
    assert ds.camera_names == ["C1", "C2", "C12"]
    assert ds.summary() == {
        "train": {"images": 8, "cameras": 3, "tracklets": 4, "identities": 2},
        "query": {"images": 2, "cameras": 1, "tracklets": 1, "identities": 1},
        "gallery": {"images": 2, "cameras": 1, "tracklets": 1, "identities": 1},
    }
    assert ds.train.cams.tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert ds.train.tracklets.tolist() == [0, 0, 0, 1, 1, 2, 2, 3]
    assert ds.train.tracklet_names == [("C1", "001/L1_C1_V1"), ("C2", "001/L1_C2_V1"),
                                       ("C2", "002/L2_C2_V9"), ("C12", "002/L5_C12_V9")]
    assert ds.train.paths[0] == str(tmp_path / "001" / "L1_C1_V1" / "0001.png")
    assert ds.query.cams.tolist() == [0, 0] and ds.gallery.cams.tolist() == [2, 2]


def test_vveri901_list_prefix_resolves_when_present_on_disk(tmp_path):
    make_vveri(tmp_path / "VVeRI" / "video", kind="jpg", prefix="VVeRI/video")
    for name in ("train.txt", "query.txt", "gallery.txt"):
        os.replace(tmp_path / "VVeRI" / "video" / name, tmp_path / name)
    ds = load_dataset("vveri901", str(tmp_path))
    assert ds.train.paths[0] == str(tmp_path / "VVeRI" / "video" / "001" / "L1_C1_V1" / "0001.jpg")
    assert len(ds.train) == 8


def test_vveri901_missing_tracklet_and_bad_folder_name(tmp_path):
    make_vveri(tmp_path)
    write_text(str(tmp_path / "query.txt"), ["x/y/003/L9_C1_V3"])
    with pytest.raises(ReidError, match=r"query\.txt:1: listed tracklet x/y/003/L9_C1_V3 not found"):
        load_dataset("vveri901", str(tmp_path))
    write_image(str(tmp_path / "003" / "tracklet7" / "0001.png"), "png")
    write_text(str(tmp_path / "query.txt"), ["x/y/003/tracklet7"])
    with pytest.raises(ReidError, match=r"tracklet folder tracklet7 does not match the VVeRI-901 pattern"):
        load_dataset("vveri901", str(tmp_path))


# ---------------------------------------------------------------- CSV manifest
def make_csv(tmp_path, rows, header="path,camera,tracklet,pid,split"):
    for row in rows:
        path = row.split(",")[0]
        if not os.path.exists(tmp_path / path):
            write_image(str(tmp_path / path))
    write_text(str(tmp_path / "manifest.csv"), [header] + rows)
    return str(tmp_path / "manifest.csv")


def test_csv_manifest_ids_with_tracklets_local_to_camera(tmp_path):
    csv_path = make_csv(tmp_path, [
        "img/a.jpg,north gate,t1,carA,train", "img/b.jpg,north gate,t1,carA,train",
        "img/c.jpg,south,t1,carA,train",  # same tracklet name, other camera: another tracklet
        "img/d.jpg,south,t2,carB,", "q/e.jpg,north gate,x,carC,query", "g/f.jpg,south,y,carC,gallery",
    ])
    ds = load_dataset("csv", csv_path)
    assert ds.camera_names == ["north gate", "south"]
    assert ds.summary() == {
        "train": {"images": 4, "cameras": 2, "tracklets": 3, "identities": 2},
        "query": {"images": 1, "cameras": 1, "tracklets": 1, "identities": 1},
        "gallery": {"images": 1, "cameras": 1, "tracklets": 1, "identities": 1},
    }
    assert ds.train.tracklets.tolist() == [0, 0, 1, 2]
    assert ds.train.pids.tolist() == [0, 0, 0, 1] and ds.query.pids.tolist() == [2]
    assert ds.train.paths[0] == str(tmp_path / "img" / "a.jpg")


def test_csv_training_only_manifest_without_pids(tmp_path):
    csv_path = make_csv(tmp_path, ["a.jpg,0,t,", "b.jpg,1,t,"][:2], header="path,camera,tracklet,pid")
    ds = load_dataset("csv", csv_path)
    assert ds.summary()["train"] == {"images": 2, "cameras": 2, "tracklets": 2, "identities": 0}
    assert ds.train.pids.tolist() == [-1, -1]
    assert len(ds.query) == 0 and len(ds.gallery) == 0  # allowed for csv: training only


def test_csv_duplicate_paths_name_both_lines(tmp_path):
    csv_path = make_csv(tmp_path, ["a.jpg,0,t", "b.jpg,1,t", "./a.jpg,1,u"], header="path,camera,tracklet")
    with pytest.raises(ReidError, match=r"duplicate path \./a\.jpg on lines 2 and 4"):
        load_dataset("csv", csv_path)


def test_csv_bad_rows_are_named(tmp_path):
    csv_path = make_csv(tmp_path, ["a.jpg,0,t", "b.jpg,1,t"], header="path,camera,tracklet")
    with open(csv_path, "a") as f:
        f.write("missing.jpg,1,t\n")
    with pytest.raises(ReidError, match=r"manifest\.csv:4: listed image .*missing\.jpg not found"):
        load_dataset("csv", csv_path)
    write_text(csv_path, ["path,camera,tracklet,split", "a.jpg,0,t,val"])
    with pytest.raises(ReidError, match=r"manifest\.csv:2: split 'val', expected one of train, query, gallery"):
        load_dataset("csv", csv_path)
    write_text(csv_path, ["path,cam,tracklet", "a.jpg,0,t"])
    with pytest.raises(ReidError, match=r"manifest\.csv:1: header 'path,cam,tracklet', expected path,camera"):
        load_dataset("csv", csv_path)
    with pytest.raises(ReidError, match=r"manifest not found, expected a CSV file"):
        load_dataset("csv", str(tmp_path))


def test_csv_without_training_rows_is_an_error(tmp_path):
    csv_path = make_csv(tmp_path, ["a.jpg,0,t,query", "b.jpg,1,t,gallery"], header="path,camera,tracklet,split")
    with pytest.raises(ReidError, match=r"csv train split is empty"):
        load_dataset("csv", csv_path)
