"""Search (DESIGN §5): embed images into a faiss index once, then answer image queries with nothing but the index.
The command line (`reid search index|query`) is ``reid.search_cli``.

An index folder holds `index.faiss` (inner product over L2-normalised embeddings, i.e. cosine), `paths.txt`
(row i's absolute image path), `meta.json` (the checkpoint and the transform settings — height, width, flip —
so queries are embedded exactly as the indexed images were; the index type) and, for a dataset split,
`labels.tsv` (row i's camera name and identity, -1 = unknown).
Exact search (`IndexFlatIP`) by default; `--ivf NLIST` clusters the rows into NLIST k-means cells and searches
the `nprobe` nearest ones (`IndexIVFFlat`), `--pq M` also compresses every row to M bytes (`IndexIVFPQ`),
for millions of images (recall against exact: benchmarks/search_scale.py). faiss-gpu is used when it sees a GPU.
faiss is imported inside functions only: machines without it can still import this module.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np
import torch

from reid.errors import ReidError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
INDEX_FILE, PATHS_FILE, META_FILE, LABELS_FILE = "index.faiss", "paths.txt", "meta.json", "labels.tsv"
DATASET_FORMATS = ("veri776", "veriwild", "vveri901", "csv")
DATASET_SPLITS = ("gallery", "query", "train")
PQ_BITS = 8  # bits per PQ sub-code: k-means with 2**8 centroids needs at least 256 training rows
DEFAULT_NPROBE = 16


def _faiss():
    import faiss  # lazily: it brings its own OpenMP runtime, and the GPU machines have no faiss

    return faiss


# --- what gets indexed -------------------------------------------------------------------------------------------

def list_images(folder: str, flag: str = "--images") -> list[str]:
    """All images under `folder` (recursive), absolute paths in sorted order."""
    if not os.path.isdir(folder):
        raise ReidError(f"{flag}: '{folder}' is not a folder")
    found = [os.path.abspath(os.path.join(root, name))
             for root, _, names in os.walk(folder) for name in names if name.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise ReidError(f"{flag}: no images ({', '.join(IMAGE_EXTENSIONS)}) under '{folder}'")
    return sorted(found)


def dataset_rows(format: str, root: str, split: str = "gallery", protocol: str = "small"):
    """A dataset split → (paths, camera names, pids (-1 = unknown)), read by `reid.data.readers.load_dataset`."""
    from reid.data.readers import load_dataset

    if format not in DATASET_FORMATS:
        raise ReidError(f"--dataset: format '{format}' unknown, expected one of {', '.join(DATASET_FORMATS)}")
    if split not in DATASET_SPLITS:
        raise ReidError(f"--dataset: split '{split}' unknown, expected one of {', '.join(DATASET_SPLITS)}")
    dataset = load_dataset(format, root, protocol)
    rows = dataset.split(split)
    if not len(rows):
        raise ReidError(f"--dataset: the {split} split of {format} at '{root}' has no images")
    return list(rows.paths), [dataset.camera_names[int(c)] for c in rows.cams], [int(p) for p in rows.pids]


# --- embeddings ---------------------------------------------------------------------------------------------------

def load_embedder(checkpoint: str, device: torch.device | str):
    """Checkpoint → (model in eval mode, transform settings {"height", "width", "flip"} from its config)."""
    from reid.model import load_model_from_checkpoint

    model, cfg = load_model_from_checkpoint(checkpoint, device)
    data, evaluation = cfg.get("data", {}), cfg.get("eval", {})
    return model, {"height": int(data.get("height", 256)), "width": int(data.get("width", 128)),
                   "flip": bool(evaluation.get("flip", True))}


def embed_images(model: torch.nn.Module, paths: list[str], settings: dict, batch_size: int = 64,
                 device: torch.device | str = "cpu") -> np.ndarray:
    """paths → (n, D) float32 numpy, L2-normalised, embedded as evaluation does (`reid.features`).

    settings: {"height", "width", "flip"}. Loads in this process (no DataLoader workers): a process holding
    faiss's OpenMP pool must not fork.
    """
    from reid.data.images import eval_transform
    from reid.features import extract_features

    if not paths:
        raise ReidError("search: no images to embed")
    feats = extract_features(model, paths, eval_transform(settings["height"], settings["width"]),
                             batch_size=batch_size, device=device, workers=0, flip=bool(settings["flip"]),
                             progress="embed" if len(paths) > batch_size else None)
    return np.ascontiguousarray(feats.float().cpu().numpy())


# --- faiss indexes ------------------------------------------------------------------------------------------------

def check_index_options(rows: int, dim: int, ivf: int = 0, pq: int = 0, nprobe: int = DEFAULT_NPROBE) -> None:
    """One-line errors for index options that faiss would reject (or abort on) later."""
    if ivf < 0:
        raise ReidError(f"--ivf: expected a number of cells NLIST ≥ 1 (0 = exact search), got {ivf}")
    if ivf > rows:
        raise ReidError(f"--ivf: NLIST={ivf} cells but only {rows} images to index; use at most {rows} "
                        f"(about 4·sqrt(images) is usual)")
    if pq and not ivf:
        raise ReidError("--pq: product quantisation needs --ivf NLIST too")
    if pq < 0 or (pq and dim % pq):
        raise ReidError(f"--pq: expected M ≥ 1 dividing the embedding dimension {dim}, got {pq}")
    if pq and rows < 2 ** PQ_BITS:
        raise ReidError(f"--pq: needs at least {2 ** PQ_BITS} images to train its codes, got {rows}")
    if nprobe < 1:
        raise ReidError(f"--nprobe: expected a number of cells ≥ 1, got {nprobe}")


def _on_gpu(index):
    """A GPU copy of `index` when faiss-gpu sees a GPU, else None (also when the GPU rejects the index type)."""
    faiss = _faiss()
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() < 1:
        return None
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):  # e.g. an IVFPQ code size the GPU kernels lack: stay on the CPU
        return None


def build_faiss_index(features: np.ndarray, ivf: int = 0, pq: int = 0):
    """features: (n, D) float32, L2-normalised → an inner-product faiss index (on the CPU) whose row i is features[i].

    ivf=0: exact `IndexFlatIP`. ivf=NLIST: `IndexIVFFlat` with NLIST k-means cells trained on `features`;
    with pq=M every row is stored as M codes of PQ_BITS bits (`IndexIVFPQ`).
    """
    faiss = _faiss()
    features = np.ascontiguousarray(features, dtype=np.float32)
    n, d = features.shape
    check_index_options(n, d, ivf, pq)
    if not ivf:
        index = faiss.IndexFlatIP(d)
    else:
        quantizer = faiss.IndexFlatIP(d)
        index = (faiss.IndexIVFPQ(quantizer, d, ivf, pq, PQ_BITS, faiss.METRIC_INNER_PRODUCT) if pq
                 else faiss.IndexIVFFlat(quantizer, d, ivf, faiss.METRIC_INNER_PRODUCT))
        index.referenced_objects = [quantizer]  # keep the coarse quantizer alive as long as the index
    gpu = _on_gpu(index)
    target = gpu if gpu is not None else index
    if ivf:
        target.train(features)
    target.add(features)
    return faiss.index_gpu_to_cpu(gpu) if gpu is not None else index


def search_index(index, queries: np.ndarray, topk: int, nprobe: int = DEFAULT_NPROBE):
    """queries: (Q, D) float32, L2-normalised → (scores (Q, k) cosine, best first; ids (Q, k) int64 rows, -1 = none
    found), k = min(topk, rows). IVF indexes search the `nprobe` cells nearest each query."""
    faiss = _faiss()
    if queries.shape[1] != index.d:
        raise ReidError(f"search: the model embeds to {queries.shape[1]} dimensions but the index holds {index.d} "
                        f"(was it built with another checkpoint?)")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(int(nprobe), ivf.nlist)  # set before the GPU copy, which takes it over
    gpu = _on_gpu(index)
    return (gpu if gpu is not None else index).search(np.ascontiguousarray(queries, np.float32),
                                                        min(topk, index.ntotal))


# --- index folders ------------------------------------------------------------------------------------------------

class SearchIndex(NamedTuple):
    index: object      # faiss index, row i = paths[i]
    paths: list        # absolute image paths
    meta: dict         # checkpoint, transform, source, index type (see the module docstring)
    cameras: list | None  # camera name per row, None for a folder of images
    pids: list | None     # identity per row, -1 = unknown; None for a folder of images


def save_index(index_dir: str, index, paths: list[str], meta: dict, cameras=None, pids=None) -> None:
    if index.ntotal != len(paths):
        raise ReidError(f"search: index has {index.ntotal} rows but {len(paths)} paths were given")
    os.makedirs(index_dir, exist_ok=True)
    _faiss().write_index(index, os.path.join(index_dir, INDEX_FILE))
    with open(os.path.join(index_dir, PATHS_FILE), "w") as f:
        f.writelines(p + "\n" for p in paths)
    if cameras is not None:
        with open(os.path.join(index_dir, LABELS_FILE), "w") as f:
            f.write("camera\tpid\n")
            f.writelines(f"{c}\t{p}\n" for c, p in zip(cameras, pids))
    with open(os.path.join(index_dir, META_FILE), "w") as f:
        json.dump({"count": len(paths), "dim": index.d, **meta, "labels": cameras is not None}, f, indent=2)


def _read_labels(path: str, rows: int):
    try:
        with open(path) as f:
            lines = f.read().splitlines()[1:]
        cameras, pids = zip(*((c, int(p)) for c, p in (line.split("\t") for line in lines))) if lines else ((), ())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ReidError(f"--index: '{path}' cannot be read ({type(exc).__name__}); expected 'camera<TAB>pid' "
                        f"lines; rebuild with `reid search index`") from None
    if len(cameras) != rows:
        raise ReidError(f"--index: '{path}' has {len(cameras)} rows but the index has {rows}")
    return list(cameras), list(pids)


def load_index(index_dir: str) -> SearchIndex:
    files = [os.path.join(index_dir, name) for name in (INDEX_FILE, PATHS_FILE, META_FILE)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        names = ", ".join(map(os.path.basename, missing))
        raise ReidError(f"--index: '{index_dir}' is not a search index (missing {names}; "
                        f"build one with `reid search index`)")
    try:
        with open(files[2]) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ReidError(f"--index: '{files[2]}' cannot be read ({type(exc).__name__}); "
                        f"rebuild with `reid search index`") from None
    try:
        index = _faiss().read_index(files[0])
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ReidError(f"--index: '{files[0]}' cannot be read by faiss ({reason[:120]})") from None
    with open(files[1]) as f:
        paths = [line.rstrip("\n") for line in f if line.strip()]
    if len(paths) != index.ntotal:
        raise ReidError(f"--index: '{files[1]}' lists {len(paths)} images but the index has {index.ntotal} rows")
    labels = os.path.join(index_dir, LABELS_FILE)
    cameras, pids = _read_labels(labels, index.ntotal) if meta.get("labels") else (None, None)
    return SearchIndex(index, paths, meta, cameras, pids)


# --- answers ------------------------------------------------------------------------------------------------------

def ranked_hits(found: SearchIndex, query_paths: list[str], scores: np.ndarray, ids: np.ndarray) -> list[dict]:
    """→ [{"query", "camera"?, "pid"?, "hits": [{"rank", "path", "score", "camera"?, "pid"?}, ...]}, ...];
    camera/pid appear where the index knows them (a query knows them when it is itself an indexed image)."""
    row_of = {p: i for i, p in enumerate(found.paths)}

    def labels(row):
        out = {}
        if row is not None and found.cameras is not None:
            out["camera"] = found.cameras[row]
            if found.pids[row] >= 0:
                out["pid"] = found.pids[row]
        return out

    answers = []
    for q, row_scores, row_ids in zip(query_paths, scores, ids):
        hits = [{"rank": r, "path": found.paths[j], "score": round(float(s), 6), **labels(int(j))}
                for r, (s, j) in enumerate(((s, j) for s, j in zip(row_scores, row_ids) if j >= 0), 1)]
        answers.append({"query": q, **labels(row_of.get(q)), "hits": hits})
    return answers
