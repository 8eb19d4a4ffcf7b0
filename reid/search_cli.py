"""`reid search` on the command line (the index and query machinery is ``reid.search``).

    reid search index --checkpoint CKPT --images DIR --out INDEX
    reid search index --checkpoint CKPT --dataset FORMAT ROOT [SPLIT] --out INDEX [--ivf NLIST [--pq M]] [--nprobe N]
    reid search query --index INDEX IMAGE... [--topk 10] [--nprobe N] [--json] [--picture out.png]
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from reid.errors import ReidError
from reid.search import (DATASET_FORMATS, DEFAULT_NPROBE, META_FILE, build_faiss_index, check_index_options,
                         dataset_rows, embed_images, list_images, load_embedder, load_index, ranked_hits, save_index,
                         search_index)


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
