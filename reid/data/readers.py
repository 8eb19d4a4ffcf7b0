"""Dataset readers, one per format, reading each dataset in its native layout (DESIGN §1).

Every reader returns raw per-split rows (path, camera name, tracklet name, identity name);
``records.build_dataset`` assigns the contiguous ids.  Where a format has no tracklet ids
(VeRi-776, VeRi-Wild) the tracklet is (camera, vehicle id): the images a single-camera
tracker would have linked.  Every file-name and directory pattern sits in :class:`Layout`,
so a variant of a dataset is a ``Layout(...)`` change, not a code change.

Existence checks list each directory once (``os.listdir``) instead of stat-ing every file,
which keeps VeRi-Wild's 400k-image lists fast.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass

from reid.data.records import SPLITS, RawSplit, ReidDataset, build_dataset, natural_key
from reid.errors import ReidError

FORMATS = ("veri776", "veriwild", "vveri901", "csv")


@dataclass(frozen=True)
class Layout:
    """File-name and directory patterns of every format (regexes use named groups)."""

    image_suffixes: tuple = (".jpg", ".jpeg", ".png")
    # VeRi-776: one folder per split, identity and camera in the file name.
    veri776_dirs: tuple = (("train", "image_train"), ("query", "image_query"), ("gallery", "image_test"))
    veri776_name: str = r"^(?P<pid>\d+)_(?P<camera>c\d+)_(?P<frame>\d+)_(?P<index>\d+)\.(?:jpe?g|png)$"
    # VeRi-Wild: lists of ``vid/img`` under lists_dir, cameras from vehicle_info.
    veriwild_images: str = "images"
    veriwild_lists: str = "train_test_split"
    veriwild_train: str = "train_list.txt"
    veriwild_gallery: tuple = ("test_{n}.txt", "test_{n}_id.txt")  # first that exists wins
    veriwild_query: tuple = ("test_{n}_query.txt", "test_{n}_id_query.txt")
    veriwild_info: tuple = ("train_test_split/vehicle_info.txt", "vehicle_info.txt")
    veriwild_suffix: str = ".jpg"  # appended to list entries that carry no suffix
    protocols: tuple = (("small", 3000), ("medium", 5000), ("large", 10000))
    # VVeRI-901: list files at the root, camera = 2nd '_' token of the tracklet dir.
    vveri_lists: tuple = (("train", "train.txt"), ("query", "query.txt"), ("gallery", "gallery.txt"))
    vveri_tracklet_dir: str = r"^[^_]+_(?P<camera>[A-Za-z]\d+)(?:_.*)?$"
    # CSV manifest columns.
    csv_required: tuple = ("path", "camera", "tracklet")
    csv_optional: tuple = ("pid", "split")


class _Listing:
    """Directory -> set of file names, each directory listed at most once."""

    def __init__(self):
        self._cache = {}

    def names(self, directory: str):
        """Names in ``directory``, or None when it is missing or not a directory."""
        if directory not in self._cache:
            try:
                self._cache[directory] = set(os.listdir(directory))
            except (FileNotFoundError, NotADirectoryError):
                self._cache[directory] = None
        return self._cache[directory]


def _require_dir(path: str, expected: str) -> None:
    if not os.path.isdir(path):
        raise ReidError(f"{path}: folder not found, expected {expected}")


def _read_lines(path: str, expected: str) -> list:
    """(line number, stripped text) of the non-blank lines of a text file."""
    if not os.path.isfile(path):
        raise ReidError(f"{path}: file not found, expected {expected}")
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # -sig: tolerate a BOM
        return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]


def _is_image(name: str, layout: Layout) -> bool:
    return os.path.splitext(name)[1].lower() in layout.image_suffixes


# ---------------------------------------------------------------- VeRi-776
def read_veri776(root: str, layout: Layout) -> ReidDataset:
    """``image_train/``, ``image_query/``, ``image_test/`` (gallery); names ``VVVV_cCCC_FFFFFFFF_I.jpg``.

    Non-image files (Thumbs.db, name_*.txt) are ignored; an image whose name does not parse
    is an error.  tracklet = (camera, vehicle id).
    """
    expected = "a VeRi-776 folder holding " + ", ".join(d + "/" for _, d in layout.veri776_dirs)
    _require_dir(root, expected)
    pattern = re.compile(layout.veri776_name)
    raw, where = {}, {}
    for split, folder in layout.veri776_dirs:
        directory = os.path.join(root, folder)
        _require_dir(directory, expected)
        paths, cams, tracklets, pids = [], [], [], []
        for name in sorted(os.listdir(directory), key=natural_key):
            if not _is_image(name, layout):
                continue
            match = pattern.match(name)
            if match is None:
                raise ReidError(f"{os.path.join(directory, name)}: file name does not match "
                                f"the VeRi-776 pattern {layout.veri776_name}")
            paths.append(os.path.join(directory, name))
            cams.append(match["camera"])
            tracklets.append(match["pid"])
            pids.append(match["pid"])
        raw[split], where[split] = RawSplit(paths, cams, tracklets, pids), directory
    return build_dataset("veri776", root, raw, where=where)


# ---------------------------------------------------------------- VeRi-Wild
def _veriwild_cameras(root: str, layout: Layout):
    """``vid/img`` -> camera name from vehicle_info.txt, or None when no copy has the file.

    Rows are ``vid/img;camera;time;model;type;color`` after the header
    ``id/image;Camera ID;Time;Model;Type;Color``.
    """
    for relative in layout.veriwild_info:
        path = os.path.join(root, relative)
        if os.path.isfile(path):
            break
    else:
        return None, None
    cameras = {}
    for n, line in _read_lines(path, "vehicle_info.txt"):
        fields = line.split(";", 2)
        if n == 1 and not fields[0][:1].isdigit():
            continue  # the header line
        if len(fields) < 2 or "/" not in fields[0] or not fields[1].strip():
            raise ReidError(f"{path}:{n}: got {line[:80]!r}, expected 'vid/img;camera;time;model;type;color'")
        cameras[os.path.splitext(fields[0].strip())[0]] = fields[1].strip()
    return cameras, path


def _read_veriwild_list(path, images_dir, cameras, info_path, listing, layout) -> RawSplit:
    """Lines ``vid/img`` or ``vid/img vid camera``; the camera comes from vehicle_info.txt,
    or from the third column when no vehicle_info.txt exists."""
    paths, cams, tracklets, pids = [], [], [], []
    for n, line in _read_lines(path, "a VeRi-Wild list of 'vid/img' lines"):
        tokens = line.split()
        entry = tokens[0]
        if len(tokens) not in (1, 3) or entry.count("/") != 1:
            raise ReidError(f"{path}:{n}: got {line[:80]!r}, expected 'vid/img' or 'vid/img vid camera'")
        vid, image = entry.split("/")
        stem, suffix = os.path.splitext(image)
        if suffix.lower() not in layout.image_suffixes:
            stem, image = image, image + layout.veriwild_suffix
        key = f"{vid}/{stem}"
        if cameras is not None:
            if key not in cameras:
                raise ReidError(f"{path}:{n}: image {key} has no row in {info_path}")
            camera = cameras[key]
        elif len(tokens) == 3:
            camera = tokens[2]
        else:
            raise ReidError(f"{path}:{n}: no camera for {key}: expected vehicle_info.txt in "
                            f"{' or '.join(layout.veriwild_info)} or 'vid/img vid camera' lines")
        folder = f"{images_dir}{os.sep}{vid}"
        names = listing.names(folder)
        if names is None or image not in names:
            raise ReidError(f"{path}:{n}: listed image {folder}{os.sep}{image} not found")
        paths.append(f"{folder}{os.sep}{image}")
        cams.append(camera)
        tracklets.append(vid)
        pids.append(vid)
    return RawSplit(paths, cams, tracklets, pids)


def read_veriwild(root: str, protocol: str, layout: Layout) -> ReidDataset:
    """``images/<vid>/<img>.jpg`` + ``train_test_split/{train_list,test_N,test_N_query}.txt``.

    Protocols small/medium/large use the 3,000/5,000/10,000-query lists; the gallery lists
    include the queries (evaluation's same-camera rule removes them).  tracklet = (camera, vid).
    """
    expected = (f"a VeRi-Wild folder holding {layout.veriwild_images}/<vid>/<img>.jpg and "
                f"{layout.veriwild_lists}/{layout.veriwild_train}")
    _require_dir(root, expected)
    images_dir = os.path.join(root, layout.veriwild_images)
    _require_dir(images_dir, expected)
    lists_dir = os.path.join(root, layout.veriwild_lists)
    _require_dir(lists_dir, expected)
    size = dict(layout.protocols)[protocol]
    files = {"train": os.path.join(lists_dir, layout.veriwild_train)}
    for split, candidates in (("gallery", layout.veriwild_gallery), ("query", layout.veriwild_query)):
        paths = [os.path.join(lists_dir, c.format(n=size)) for c in candidates]
        files[split] = next((p for p in paths if os.path.isfile(p)), paths[0])
        if not os.path.isfile(files[split]):
            raise ReidError(f"{files[split]}: {split} list for protocol {protocol} not found, expected "
                            + " or ".join(paths))
    cameras, info_path = _veriwild_cameras(root, layout)
    listing = _Listing()
    raw = {split: _read_veriwild_list(path, images_dir, cameras, info_path, listing, layout)
           for split, path in files.items()}
    return build_dataset("veriwild", root, raw, where=files)


# ---------------------------------------------------------------- VVeRI-901
def _vveri_tracklet(root: str, entry: str, listing: _Listing):
    """Resolve a list entry ``<prefix>/<prefix>/<vid>/<tracklet dir>`` to a folder under root.

    Tried in order: ``root/<entry>`` (leading '/' dropped), then ``root/<vid>/<tracklet dir>``
    (the last two components), because the prefix folders of the original machine are often
    not part of a copy.  Returns (folder, its file names) or (None, tried folders).
    """
    parts = [p for p in entry.replace("\\", "/").split("/") if p and p != "."]
    tried = []
    for candidate in (os.path.join(root, *parts), os.path.join(root, *parts[-2:])):
        if candidate in tried:
            continue
        names = listing.names(candidate)
        if names is not None:
            return candidate, names
        tried.append(candidate)
    return None, tried


def read_vveri901(root: str, layout: Layout) -> ReidDataset:
    """``<vid>/<tracklet dir>/<frame>.png`` listed in train.txt / query.txt / gallery.txt.

    Each frame is a record; the tracklet is the real tracklet directory (named ``<vid>/<dir>``),
    the camera the second '_' token of its name (``L3_C12_V7`` -> ``C12``), the identity the
    vid folder.  A trailing label column in the lists is ignored.
    """
    expected = "a VVeRI-901 folder holding " + ", ".join(f for _, f in layout.vveri_lists)
    _require_dir(root, expected)
    pattern = re.compile(layout.vveri_tracklet_dir)
    listing = _Listing()
    raw, where = {}, {}
    for split, list_name in layout.vveri_lists:
        list_path = os.path.join(root, list_name)
        paths, cams, tracklets, pids = [], [], [], []
        for n, line in _read_lines(list_path, expected):
            entry = line.split()[0]
            folder, names = _vveri_tracklet(root, entry, listing)
            if folder is None:
                raise ReidError(f"{list_path}:{n}: listed tracklet {entry} not found, looked for "
                                + " and ".join(names))
            vid, tracklet_dir = os.path.basename(os.path.dirname(folder)), os.path.basename(folder)
            match = pattern.match(tracklet_dir)
            if match is None:
                raise ReidError(f"{list_path}:{n}: tracklet folder {tracklet_dir} does not match "
                                f"the VVeRI-901 pattern {layout.vveri_tracklet_dir}")
            frames = sorted((f for f in names if _is_image(f, layout)), key=natural_key)
            if not frames:
                raise ReidError(f"{list_path}:{n}: listed tracklet {folder} holds no "
                                f"{'/'.join(layout.image_suffixes)} frames")
            paths.extend(os.path.join(folder, f) for f in frames)
            cams.extend([match["camera"]] * len(frames))
            tracklets.extend([f"{vid}/{tracklet_dir}"] * len(frames))
            pids.extend([vid] * len(frames))
        raw[split], where[split] = RawSplit(paths, cams, tracklets, pids), list_path
    return build_dataset("vveri901", root, raw, where=where)


# ---------------------------------------------------------------- CSV manifest
def read_csv(path: str, layout: Layout) -> ReidDataset:
    """A manifest ``path,camera,tracklet[,pid][,split]``; ``root`` is the CSV file itself.

    Paths are relative to the CSV's folder (absolute paths are kept); cameras and tracklets
    may be any strings, a tracklet is local to its camera; split train/query/gallery, absent
    -> train; pid absent or empty -> unknown (-1).  Query and gallery may be empty (a
    training-only manifest); train may not.
    """
    columns = "path,camera,tracklet[,pid][,split]"
    if not os.path.isfile(path):
        raise ReidError(f"{path}: manifest not found, expected a CSV file with header {columns}")
    base = os.path.dirname(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ReidError(f"{path}: empty manifest, expected a header {columns}")
    header = [c.strip().lower() for c in rows[0]]
    known = layout.csv_required + layout.csv_optional
    unknown = [c for c in header if c not in known]
    missing = [c for c in layout.csv_required if c not in header]
    if unknown or missing or len(set(header)) != len(header):
        raise ReidError(f"{path}:1: header {','.join(header)!r}, expected {columns}")
    col = {c: header.index(c) for c in header}
    out = {s: ([], [], [], []) for s in SPLITS}
    seen = {}
    listing = _Listing()
    for n, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise ReidError(f"{path}:{n}: {len(row)} fields, expected {len(header)} ({','.join(header)})")
        value = {c: row[i].strip() for c, i in col.items()}
        for c in layout.csv_required:
            if not value[c]:
                raise ReidError(f"{path}:{n}: empty {c}, expected a value")
        split = value.get("split", "").lower() or "train"
        if split not in SPLITS:
            raise ReidError(f"{path}:{n}: split {value['split']!r}, expected one of {', '.join(SPLITS)}")
        image = os.path.normpath(os.path.join(base, value["path"]))
        if image in seen:
            raise ReidError(f"{path}: duplicate path {value['path']} on lines {seen[image]} and {n}")
        seen[image] = n
        names = listing.names(os.path.dirname(image))
        if names is None or os.path.basename(image) not in names:
            raise ReidError(f"{path}:{n}: listed image {image} not found")
        for column, item in zip(out[split], (image, value["camera"], value["tracklet"], value.get("pid", ""))):
            column.append(item)
    raw = {s: RawSplit(*cols) if cols[0] else None for s, cols in out.items()}
    return build_dataset("csv", path, raw, where={s: path for s in SPLITS}, optional_eval=True)


# ---------------------------------------------------------------- entry point
def check_image_files(dataset: ReidDataset) -> None:
    """Open every image's header with PIL; raise ReidError naming the first unreadable file."""
    from reid.data.images import verify_image  # PIL/torch only when asked for

    for split in SPLITS:
        for path in dataset.split(split).paths:
            verify_image(path)


def load_dataset(format: str, root: str, protocol: str = "small", check_images: bool = False,
                 layout: Layout | None = None) -> ReidDataset:
    """Read a dataset in its native layout into a :class:`ReidDataset`.

    format: one of FORMATS; root: dataset folder (the CSV file for ``csv``);
    protocol: small/medium/large (VeRi-Wild test lists; checked for every format);
    check_images: open every image header and name the first corrupt file;
    layout: patterns, for dataset variants.  Every bad input is a one-line ReidError.
    """
    layout = layout or Layout()
    if format not in FORMATS:
        raise ReidError(f"data.format: got {format!r}, expected one of {', '.join(FORMATS)}")
    if protocol not in dict(layout.protocols):
        raise ReidError(f"data.protocol: got {protocol!r}, expected one of "
                        + ", ".join(name for name, _ in layout.protocols))
    root = os.path.abspath(os.path.expanduser(str(root)))
    if format == "veri776":
        dataset = read_veri776(root, layout)
    elif format == "veriwild":
        dataset = read_veriwild(root, protocol, layout)
    elif format == "vveri901":
        dataset = read_vveri901(root, layout)
    else:
        dataset = read_csv(root, layout)
    if check_images:
        check_image_files(dataset)
    return dataset
