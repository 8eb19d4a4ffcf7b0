"""Search (DESIGN §5): embed a folder of images into a faiss index, then answer image queries.

    reid search index --checkpoint CKPT --images DIR --out INDEX_DIR
    reid search query --index INDEX_DIR --checkpoint CKPT --images Q1.jpg ... [--topk 10] [--picture out.png]

The index is an exact `IndexFlatIP` over L2-normalised embeddings (inner product = cosine), saved
as `INDEX_DIR/index.faiss` + `paths.txt` (one absolute image path per row) + `meta.json`.
Library functions first (`embed_images`, `build_index`, `save_index`, `load_index`, `query_index`),
a thin `main(argv)` last; `reid.cli` calls `main` for `reid search ...`.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from reid.errors import ReidError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
INDEX_FILE, PATHS_FILE, META_FILE = "index.faiss", "paths.txt", "meta.json"


def _faiss():
    import faiss  # imported lazily: it brings its own OpenMP runtime, only load it when searching

    return faiss


def list_images(folder: str) -> list[str]:
    """All images under `folder` (recursive), absolute paths in sorted order."""
    if not os.path.isdir(folder):
        raise ReidError(f"--images: '{folder}' is not a folder")
    found = [os.path.abspath(os.path.join(root, name))
             for root, _, names in os.walk(folder) for name in names if name.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise ReidError(f"--images: no images ({', '.join(IMAGE_EXTENSIONS)}) under '{folder}'")
    return sorted(found)


def _load(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ReidError(f"image '{path}': cannot be read ({type(exc).__name__})") from None


@torch.no_grad()
def embed_images(model: torch.nn.Module, paths: list[str], transform, batch_size: int = 64,
                 device: torch.device | str = "cpu") -> np.ndarray:
    """paths → (n, D) float32 numpy, L2-normalised. `transform`: PIL image → (3, H, W) tensor.

    Loads in this process (no DataLoader workers): a process holding faiss's OpenMP pool must not fork.
    """
    was_training = model.training
    model.eval()
    chunks = []
    for lo in range(0, len(paths), batch_size):
        batch = torch.stack([transform(_load(p)) for p in paths[lo:lo + batch_size]]).to(device)
        chunks.append(F.normalize(model(batch).float(), dim=1).cpu())
    model.train(was_training)
    if not chunks:
        raise ReidError("search: no images to embed")
    return np.ascontiguousarray(torch.cat(chunks).numpy(), dtype=np.float32)


def build_index(model: torch.nn.Module, paths: list[str], transform, batch_size: int = 64,
                device: torch.device | str = "cpu"):
    """Embed `paths` → a faiss `IndexFlatIP` whose row i is paths[i]."""
    feats = embed_images(model, paths, transform, batch_size, device)
    index = _faiss().IndexFlatIP(feats.shape[1])
    index.add(feats)
    return index


def save_index(index_dir: str, index, paths: list[str], meta: dict | None = None) -> None:
    if index.ntotal != len(paths):
        raise ReidError(f"search: index has {index.ntotal} rows but {len(paths)} paths were given")
    os.makedirs(index_dir, exist_ok=True)
    _faiss().write_index(index, os.path.join(index_dir, INDEX_FILE))
    with open(os.path.join(index_dir, PATHS_FILE), "w") as f:
        f.writelines(p + "\n" for p in paths)
    with open(os.path.join(index_dir, META_FILE), "w") as f:
        json.dump({"count": len(paths), "dim": index.d, **(meta or {})}, f, indent=2)


def load_index(index_dir: str):
    """→ (faiss index, paths, meta dict)."""
    files = [os.path.join(index_dir, name) for name in (INDEX_FILE, PATHS_FILE, META_FILE)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ReidError(f"--index: '{index_dir}' is not a search index (missing {', '.join(map(os.path.basename, missing))}; "
                        f"build one with `reid search index`)")
    index = _faiss().read_index(files[0])
    with open(files[1]) as f:
        paths = [line.rstrip("\n") for line in f if line.strip()]
    with open(files[2]) as f:
        meta = json.load(f)
    if len(paths) != index.ntotal:
        raise ReidError(f"--index: '{files[1]}' lists {len(paths)} images but the index has {index.ntotal} rows")
    return index, paths, meta


def query_index(index, model: torch.nn.Module, query_paths: list[str], transform, topk: int = 10,
                batch_size: int = 64, device: torch.device | str = "cpu"):
    """→ (scores (Q, k) float32 cosine, best first; ids (Q, k) int64 rows of the index), k = min(topk, ntotal)."""
    feats = embed_images(model, query_paths, transform, batch_size, device)
    if feats.shape[1] != index.d:
        raise ReidError(f"search: the model embeds to {feats.shape[1]} dimensions but the index holds {index.d} "
                        f"(was it built with another checkpoint?)")
    return index.search(feats, min(topk, index.ntotal))


def load_embedder(checkpoint: str, device: torch.device | str):
    """Checkpoint → (model in eval mode, eval transform at the training image size)."""
    from reid.data.images import eval_transform
    from reid.model import load_model_from_checkpoint

    model, cfg = load_model_from_checkpoint(checkpoint, device)
    data = cfg.get("data", {}) if isinstance(cfg, dict) else {}
    return model, eval_transform(int(data.get("height", 256)), int(data.get("width", 128)))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reid search", description="embed a folder into a faiss index and query it")
    sub = p.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="training checkpoint (model + config)")
    common.add_argument("--batch-size", type=int, default=64)
    common.add_argument("--device", default="auto", help="auto / cpu / cuda / cuda:N")
    build = sub.add_parser("index", parents=[common], help="embed every image under a folder")
    build.add_argument("--images", required=True, help="folder of gallery images (searched recursively)")
    build.add_argument("--out", required=True, help="index folder to write")
    ask = sub.add_parser("query", parents=[common], help="rank the indexed images for each query image")
    ask.add_argument("--index", required=True, help="folder written by `reid search index`")
    ask.add_argument("--images", required=True, nargs="+", help="query image files")
    ask.add_argument("--topk", type=int, default=10)
    ask.add_argument("--picture", help="write a PNG of the queries and their top matches here")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.batch_size < 1 or getattr(args, "topk", 1) < 1:
        raise ReidError("--batch-size and --topk must be at least 1")
    device = _device(args.device)
    if args.action == "index":
        paths = list_images(args.images)
        model, transform = load_embedder(args.checkpoint, device)
        index = build_index(model, paths, transform, args.batch_size, device)
        save_index(args.out, index, paths, {"checkpoint": os.path.abspath(args.checkpoint),
                                            "images": os.path.abspath(args.images)})
        print(f"indexed {len(paths)} images ({index.d}-d) into {args.out}")
        return 0
    index, paths, _ = load_index(args.index)
    for q in args.images:
        if not os.path.isfile(q):
            raise ReidError(f"--images: query image '{q}' not found")
    model, transform = load_embedder(args.checkpoint, device)
    scores, ids = query_index(index, model, args.images, transform, args.topk, args.batch_size, device)
    for i, q in enumerate(args.images):
        print(f"query {i + 1}/{len(args.images)}: {q}")
        for r, (s, j) in enumerate(zip(scores[i], ids[i]), 1):
            print(f"  {r:>3}  {s:.4f}  {paths[j]}")
    if args.picture:
        from reid.visualize import save_retrieval_grid

        save_retrieval_grid(args.picture, [os.path.abspath(q) for q in args.images], paths, ids,
                            topk=args.topk, scores=scores)
        print(f"picture: {args.picture}")
    return 0
