"""Search (DESIGN §5): embed images into a faiss index once, then answer image queries with nothing but the index.

    reid search index --checkpoint CKPT --images DIR --out INDEX
    reid search index --checkpoint CKPT --dataset FORMAT ROOT [SPLIT] --out INDEX [--ivf NLIST [--pq M]] [--nprobe N]
    reid search query --index INDEX IMAGE... [--topk 10] [--nprobe N] [--json] [--picture out.png]

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

import argparse
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
        raise ReidError(f"--index: '{index_dir}' is not a search index (missing {', '.join(map(os.path.basename, missing))}; "
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


def _print_answers(answers: list[dict]) -> None:
    for i, answer in enumerate(answers):
        known = "".join(f"  {k} {answer[k]}" for k in ("camera", "pid") if k in answer)
        print(f"query {i + 1}/{len(answers)}: {answer['query']}{known}")
        for hit in answer["hits"]:
            label = "".join(f"{hit.get(k, '-')!s:>8}" for k in ("camera", "pid") if "camera" in hit)
            print(f"  {hit['rank']:>3}  {hit['score']:.4f}{label}  {hit['path']}")


# --- command line -------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors (bad int, missing flag) as one-line ReidErrors too
        raise ReidError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="reid search", description="embed images into a faiss index and query it")
    sub = p.add_subparsers(dest="action", required=True)
    common = _Parser(add_help=False)
    common.add_argument("--batch-size", type=int, default=64)
    common.add_argument("--device", default="auto", help="auto / cpu / cuda / cuda:N")
    common.add_argument("--nprobe", type=int, help=f"IVF cells searched per query (default {DEFAULT_NPROBE})")
    build = sub.add_parser("index", parents=[common], help="embed a folder or a dataset split into an index")
    build.add_argument("--checkpoint", required=True, help="training checkpoint (model + config)")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of gallery images (searched recursively)")
    source.add_argument("--dataset", nargs="+", metavar=("FORMAT ROOT", "SPLIT"),
                        help=f"a dataset split: FORMAT ({'/'.join(DATASET_FORMATS)}) ROOT [SPLIT, default gallery]")
    build.add_argument("--protocol", default="small", choices=["small", "medium", "large"],
                       help="VeRi-Wild test protocol")
    build.add_argument("--out", required=True, help="index folder to write")
    build.add_argument("--ivf", type=int, default=0, metavar="NLIST", help="approximate: NLIST k-means cells")
    build.add_argument("--pq", type=int, default=0, metavar="M", help="with --ivf: compress rows to M bytes")
    ask = sub.add_parser("query", parents=[common], help="rank the indexed images for each query image")
    ask.add_argument("--index", required=True, help="folder written by `reid search index`")
    ask.add_argument("queries", nargs="*", metavar="IMAGE", help="query image files or folders")
    ask.add_argument("--images", nargs="+", default=[], help=argparse.SUPPRESS)  # the older spelling
    ask.add_argument("--checkpoint", help="embed queries with this checkpoint instead of the index's")
    ask.add_argument("--topk", type=int, default=10)
    ask.add_argument("--json", action="store_true", help="print the ranked hits as JSON")
    ask.add_argument("--picture", help="write a PNG of the queries and their top matches here")
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ReidError(f"--device: expected auto, cpu, cuda or cuda:N, got '{name}'") from None


def _index_command(args, device) -> int:
    cameras = pids = None
    if args.images:
        paths, source = list_images(args.images), {"images": os.path.abspath(args.images)}
    else:
        if len(args.dataset) not in (2, 3):
            raise ReidError(f"--dataset: expected FORMAT ROOT [SPLIT], got {len(args.dataset)} values")
        fmt, root, split = (*args.dataset, "gallery")[:3]
        paths, cameras, pids = dataset_rows(fmt, root, split, args.protocol)
        source = {"dataset": {"format": fmt, "root": os.path.abspath(root), "split": split, "protocol": args.protocol}}
    nprobe = DEFAULT_NPROBE if args.nprobe is None else args.nprobe
    # Options checked before the (long) embedding pass; the dimension is known only after it, checked again then.
    check_index_options(len(paths), args.pq or 1, args.ivf, args.pq, nprobe)
    model, settings = load_embedder(args.checkpoint, device)
    index = build_faiss_index(embed_images(model, paths, settings, args.batch_size, device), args.ivf, args.pq)
    kind = "ivfpq" if args.pq else "ivf" if args.ivf else "flat"
    save_index(args.out, index, paths, {
        "checkpoint": os.path.abspath(args.checkpoint), "transform": settings, "source": source,
        "index": {"type": kind, "metric": "inner_product", "nlist": args.ivf, "pq": args.pq, "nprobe": nprobe}},
        cameras, pids)
    print(f"indexed {len(paths)} images ({index.d}-d, {kind}) into {args.out}")
    return 0


def _query_command(args, device) -> int:
    queries = []
    for q in args.queries + args.images:
        if os.path.isdir(q):
            queries += list_images(q, "IMAGE")
        elif os.path.isfile(q):
            queries.append(os.path.abspath(q))
        else:
            raise ReidError(f"IMAGE: query image '{q}' not found")
    if not queries:
        raise ReidError("reid search query: give at least one query IMAGE after --index INDEX")
    if args.nprobe is not None and args.nprobe < 1:
        raise ReidError(f"--nprobe: expected a number of cells ≥ 1, got {args.nprobe}")
    found = load_index(args.index)
    meta_file = os.path.join(args.index, META_FILE)
    checkpoint = args.checkpoint or found.meta.get("checkpoint")
    if not checkpoint or not os.path.isfile(checkpoint):
        raise ReidError(f"--index: checkpoint '{checkpoint}' recorded in '{meta_file}' not found "
                        f"(moved? pass --checkpoint PATH)" if not args.checkpoint
                        else f"--checkpoint: '{checkpoint}' not found")
    model, settings = load_embedder(checkpoint, device)
    settings = found.meta.get("transform") or {**settings, "flip": False}  # the index's settings (older: no flip)
    nprobe = args.nprobe or found.meta.get("index", {}).get("nprobe", DEFAULT_NPROBE)
    scores, ids = search_index(found.index, embed_images(model, queries, settings, args.batch_size, device),
                               args.topk, nprobe)
    answers = ranked_hits(found, queries, scores, ids)
    if args.json:
        print(json.dumps(answers, indent=2))
    else:
        _print_answers(answers)
    if args.picture:
        from reid.visualize import save_retrieval_grid

        query_pids = [a.get("pid", -1) for a in answers]
        labelled = found.pids is not None and min(query_pids) >= 0  # green/red frames only when every query is known
        save_retrieval_grid(args.picture, queries, found.paths, ids, query_pids if labelled else None,
                            found.pids if labelled else None, topk=args.topk, scores=scores)
        if not args.json:
            print(f"picture: {args.picture}")
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        raise ReidError(f"--batch-size: expected ≥ 1, got {args.batch_size}")
    if getattr(args, "topk", 1) < 1:
        raise ReidError(f"--topk: expected ≥ 1, got {args.topk}")
    device = _device(args.device)
    return _index_command(args, device) if args.action == "index" else _query_command(args, device)
