"""What a run tells people: evaluation points, identity-based diagnostics, the summary table, metrics.json and
the retrieval picture. Identities (`pid`) are read here and only here on the training side — never by the loss."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from reid import dist
from reid.data.images import eval_transform
from reid.evaluation import evaluate, rank1_same_vs_cross_camera, top_matches
from reid.features import extract_features
from reid.video import evaluation_level, pool_tracklets, tracklet_items
from reid.visualize import save_camera_map_chart, save_retrieval_grid

TABLE_ROWS = (("untrained", "untrained model"), ("warmup", "end of warm-up"), ("final", "final"))


def embed_paths(model, paths: list, cfg, device) -> torch.Tensor:
    """Every rank embeds 1/R of `paths` (bf16 autocast on CUDA with train.amp) and receives all of them, in order."""
    return extract_features(model, paths, eval_transform(cfg.data.height, cfg.data.width),
                            batch_size=cfg.eval.batch_size, device=device, workers=cfg.data.workers,
                            flip=cfg.eval.flip, skip_corrupt=cfg.data.skip_corrupt,
                            progress="embed" if dist.is_main() else None, split_over_ranks=True, amp=cfg.train.amp)


def embed_items(model, split, cfg, device) -> tuple[torch.Tensor, list, np.ndarray, np.ndarray]:
    """A query or gallery split as evaluation items: images (eval.level=image) or tracklets (the video protocol,
    reid.video). Returns (features (items, D), a path per item, pids, cams)."""
    if evaluation_level(cfg.eval.level, cfg.data.format) == "image":
        return embed_paths(model, split.paths, cfg, device), split.paths, split.pids, split.cams
    items = tracklet_items(split, cfg.eval.frames)
    rows = np.concatenate(items.frames) if len(items) else np.zeros(0, dtype=np.int64)
    frames = embed_paths(model, [split.paths[i] for i in rows], cfg, device)
    return pool_tracklets(frames, items), items.paths, items.pids, items.cams


def embed_for_evaluation(model, dataset, cfg, device) -> dict:
    """Query and gallery item embeddings and their (paths, pids, cams); with several ranks every rank must call
    it (each embeds a share, all receive everything)."""
    qf, q_paths, q_pids, q_cams = embed_items(model, dataset.query, cfg, device)
    gf, g_paths, g_pids, g_cams = embed_items(model, dataset.gallery, cfg, device)
    return {"query": qf, "gallery": gf, "query_items": (q_paths, q_pids, q_cams),
            "gallery_items": (g_paths, g_pids, g_cams)}


def score(features: dict, cfg) -> dict:
    """mAP / CMC / mINP of the embedded query→gallery items, plus same- vs cross-camera Rank-1 (a camera-gap
    diagnostic, eval.diagnostics)."""
    (q_paths, q_pids, q_cams), (g_paths, g_pids, g_cams) = features["query_items"], features["gallery_items"]
    qf, gf = features["query"], features["gallery"]
    result = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams)
    out = {k: float(v) for k, v in result.items()}
    if cfg.eval.diagnostics:
        # VeRi-style galleries contain the query images themselves: exclude each query's own copy.
        where = {os.path.basename(p): i for i, p in enumerate(g_paths)}
        own = np.array([where.get(os.path.basename(p), -1) for p in q_paths])
        gap = rank1_same_vs_cross_camera(qf, gf, q_pids, g_pids, q_cams, g_cams, query_gallery_index=own)
        out.update({k: float(v) for k, v in gap.items()})
    return out


def evaluate_model(model, dataset, cfg, device, features: dict | None = None) -> dict:
    """Embed (``embed_for_evaluation``) and ``score``: one process, or every rank of a group (each returns the
    result). Pass a dict as `features` to receive the embeddings for reuse."""
    embedded = embed_for_evaluation(model, dataset, cfg, device)
    if features is not None:
        features.update(embedded)
    return score(embedded, cfg)


VERIWILD_PROTOCOLS = ("small", "medium", "large")


def evaluate_veriwild_protocols(model, cfg, device) -> dict | None:
    """``data.protocol=all``: the union of VeRi-Wild's three test lists embedded once (shared by all ranks), then
    small / medium / large scored on their own query and gallery lists. Returns {protocol: result} on rank 0,
    None on the other ranks."""
    from reid.data.readers import load_dataset

    datasets = {p: load_dataset("veriwild", cfg.data.root, p, check_images=cfg.data.check_images)
                for p in VERIWILD_PROTOCOLS}
    paths = sorted({path for ds in datasets.values() for split in (ds.query, ds.gallery) for path in split.paths})
    embedded = embed_paths(model, paths, cfg, device)
    row = {path: i for i, path in enumerate(paths)}
    if not dist.is_main():
        return None
    results = {}
    for name, ds in datasets.items():
        q, g = ([row[path] for path in split.paths] for split in (ds.query, ds.gallery))
        features = {"query": embedded[q], "gallery": embedded[g],
                    "query_items": (ds.query.paths, ds.query.pids, ds.query.cams),
                    "gallery_items": (ds.gallery.paths, ds.gallery.pids, ds.gallery.cams)}
        results[name] = score(features, cfg)
    return results


def format_protocol_table(results: dict) -> str:
    lines = [f"{'protocol':<10} {'queries':>8} {'mAP':>6} {'R1':>6} {'R5':>6} {'R10':>6}"]
    for name, m in results.items():
        lines.append(f"{name:<10} {int(m.get('valid_queries', 0)):>8} {100 * m['mAP']:6.1f} {100 * m['rank1']:6.1f} "
                     f"{100 * m['rank5']:6.1f} {100 * m['rank10']:6.1f}")
    return "\n".join(lines)


def save_retrieval_picture(features: dict, cfg, path: str) -> str:
    """The retrieval grid of ``eval.picture_queries`` evenly spread queries (features from ``embed_for_evaluation``)."""
    (q_paths, q_pids, q_cams), (g_paths, g_pids, g_cams) = features["query_items"], features["gallery_items"]
    picked = np.linspace(0, len(q_paths) - 1, num=min(cfg.eval.picture_queries, len(q_paths))).astype(int)
    order = top_matches(features["query"][picked], features["gallery"], k=10).cpu().numpy()  # junk shown grey
    return save_retrieval_grid(path, [q_paths[i] for i in picked], g_paths, order, q_pids[picked], g_pids,
                               q_cams[picked], g_cams)


def per_camera_map(features: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mAP of each query camera's queries against the whole gallery: (cameras, mAP (NaN = no valid query),
    valid queries)."""
    (_, q_pids, q_cams), (_, g_pids, g_cams) = features["query_items"], features["gallery_items"]
    cameras = np.unique(q_cams)
    maps, counts = np.full(len(cameras), np.nan), np.zeros(len(cameras), dtype=np.int64)
    for k, cam in enumerate(cameras):
        mine = np.flatnonzero(q_cams == cam)
        result = evaluate(features["query"][torch.as_tensor(mine, device=features["query"].device)],
                          features["gallery"], q_pids[mine], g_pids, q_cams[mine], g_cams)
        counts[k] = int(result["valid_queries"])
        if counts[k]:
            maps[k] = float(result["mAP"])
    return cameras, maps, counts


def save_evaluation_pictures(features: dict, dataset, cfg, name: str) -> tuple[dict, dict]:
    """An evaluation point's pictures under ``output_dir/pictures``: the retrieval grid and the per-camera mAP
    chart. Returns ({kind: path}, {camera name: mAP})."""
    folder = os.path.join(cfg.output_dir, "pictures")
    cameras, maps, counts = per_camera_map(features)
    names = [dataset.camera_names[c] for c in cameras]
    paths = {"retrieval": save_retrieval_picture(features, cfg, os.path.join(folder, f"{name}_retrieval.png")),
             "camera_mAP": save_camera_map_chart(os.path.join(folder, f"{name}_camera_mAP.png"), names, maps,
                                                 counts)}
    return paths, {n: (None if m != m else float(m)) for n, m in zip(names, maps)}


def _finite(value):
    """NaN (e.g. a diagnostic with no qualifying query) → null, so metrics.json stays valid JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def format_table(metrics: dict) -> str:
    lines = [f"{'model':<18} {'mAP':>6} {'R1':>6} {'R5':>6} {'R10':>6}"]
    for key, label in TABLE_ROWS:
        if key in metrics:
            m = metrics[key]
            lines.append(f"{label:<18} {100 * m['mAP']:6.1f} {100 * m['rank1']:6.1f} "
                         f"{100 * m.get('rank5', float('nan')):6.1f} {100 * m.get('rank10', float('nan')):6.1f}")
    return "\n".join(lines)


def write_report(model, cfg, metrics: dict, features: dict) -> None:
    """Print the summary table; write metrics.json, the final model and the retrieval picture (of `features`, from
    ``embed_for_evaluation``) under output_dir."""
    out = cfg.output_dir
    print("\n" + format_table(metrics), flush=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(_finite(metrics), f, indent=2)
    from reid.config import config_to_dict

    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "metrics": metrics},
               os.path.join(out, "final_model.pt"))
    path = save_retrieval_picture(features, cfg, os.path.join(out, "retrieval.png"))
    print(f"wrote {os.path.join(out, 'metrics.json')}, {path}, TensorBoard logs in {os.path.join(out, 'tb')}",
          flush=True)
