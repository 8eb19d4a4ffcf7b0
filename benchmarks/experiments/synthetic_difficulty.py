"""How hard is the synthetic dataset for features that learned nothing? (DESIGN §6, issue 4)

Generates the default synthetic dataset (or reads --root), then scores query -> gallery retrieval with
  - random features (chance level),
  - raw pixels (cosine of the flattened, per-image mean-centred RGB),
  - an untrained torchvision ResNet-18 (random init, fc removed, eval mode, ImageNet normalisation),
in three settings:
  - cross-camera: the standard VeRi rule, gallery images of the query's identity and camera are ignored;
  - same-camera:  gallery limited to the query's camera, minus the query image itself; the positives are the
                  other frames of the query's own passage (queries whose passage has one frame are skipped);
  - cross-camera, same view / other view: the cross-camera positives split by whether the other camera
                  looks at the vehicle from the same side (side/front/rear) as the query's camera.
The generator should make untrained features score a few % mAP cross-camera and same-camera retrieval much
easier than cross-camera (the camera domain gap). The mAP here is a small numpy version written for this
script; the project's own is reid.evaluation.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/experiments/synthetic_difficulty.py [--root DIR] [--json [PATH]]
Prints a table; --json also writes it (without PATH to benchmarks/results/synthetic_difficulty.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.common
from benchmarks.common import add_json_flag, write_json  # noqa: E402
from reid.data.synthetic import NAME, SynthConfig, camera_views, generate  # noqa: E402


def load_split(folder: str):
    names = sorted(n for n in os.listdir(folder) if NAME.match(n))
    pids = np.array([int(NAME.match(n).group(1)) for n in names])
    cams = np.array([int(NAME.match(n).group(2)) for n in names])
    images = np.stack([np.asarray(Image.open(os.path.join(folder, n)).convert("RGB")) for n in names])
    return names, images, pids, cams


def average_precision(scores: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """AP and rank-1 hit of one query. scores (G,), higher = closer; positive (G,) bool."""
    order = np.argsort(-scores, kind="stable")
    hits = positive[order]
    ranks = np.flatnonzero(hits) + 1
    precision = np.arange(1, len(ranks) + 1) / ranks
    return float(precision.mean()), float(hits[0])


def retrieval(q, g, qp, gp, qc, gc, q_names, g_names, keep=None) -> dict:
    """mAP / rank-1 over queries; `keep(i) -> (gallery mask, positive mask)` picks the setting."""
    sims = q @ g.T
    aps, r1 = [], []
    for i in range(len(q)):
        valid, pos = keep(i)
        if not (pos & valid).any():
            continue
        ap, hit = average_precision(sims[i][valid], pos[valid])
        aps.append(ap)
        r1.append(hit)
    return {"mAP": 100 * float(np.mean(aps)), "rank1": 100 * float(np.mean(r1)), "queries": len(aps)}


def settings(qp, gp, qc, gc, q_names, g_names, views):
    same_id = qp[:, None] == gp[None, :]
    same_cam = qc[:, None] == gc[None, :]
    same_img = np.array(q_names)[:, None] == np.array(g_names)[None, :]
    same_view = views[qc][:, None] == views[gc][None, :]
    cross = lambda i: (~(same_id[i] & same_cam[i]), same_id[i])  # noqa: E731 - VeRi rule
    return {
        "cross-camera": cross,
        "same-camera": lambda i: (same_cam[i] & ~same_img[i], same_id[i]),
        "cross, same view": lambda i: (~(same_id[i] & same_cam[i]) & ~(same_id[i] & ~same_view[i]), same_id[i]),
        "cross, other view": lambda i: (~(same_id[i] & same_cam[i]) & ~(same_id[i] & same_view[i]), same_id[i]),
    }


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def resnet18_features(images: np.ndarray, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    net.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for s in range(0, len(images), 128):
            x = torch.from_numpy(images[s:s + 128]).permute(0, 3, 1, 2).float() / 255
            out.append(net((x - mean) / std).numpy())
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", help="an existing synthetic dataset (default: generate the default config)")
    p.add_argument("--seed", type=int, default=0)
    add_json_flag(p, "synthetic_difficulty")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = SynthConfig(seed=args.seed)
    gen_seconds = None
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        if args.root:
            with open(os.path.join(root, "synth.json")) as f:
                cfg = SynthConfig(**json.load(f)["config"])
        else:
            t0 = time.perf_counter()
            counts = generate(root, cfg)
            gen_seconds = time.perf_counter() - t0
        q_names, q_img, qp, qc = load_split(os.path.join(root, "image_query"))
        g_names, g_img, gp, gc = load_split(os.path.join(root, "image_test"))
        n_train = len(os.listdir(os.path.join(root, "image_train")))
    views = np.array(["none"] + list(camera_views(cfg).values()))  # indexed by camera number
    rng = np.random.default_rng(args.seed)
    feats = {"random features": (rng.normal(size=(len(q_img), 64)), rng.normal(size=(len(g_img), 64)))}
    pix = lambda a: a.reshape(len(a), -1).astype(np.float32) - a.reshape(len(a), -1).mean(1, keepdims=True)  # noqa
    feats["raw pixels"] = (pix(q_img), pix(g_img))
    t0 = time.perf_counter()
    feats["untrained ResNet-18"] = (resnet18_features(q_img, args.seed), resnet18_features(g_img, args.seed))
    embed_seconds = time.perf_counter() - t0
    rows = {}
    for name, (q, g) in feats.items():
        q, g = normalise(q.astype(np.float64)), normalise(g.astype(np.float64))
        rows[name] = {s: retrieval(q, g, qp, gp, qc, gc, q_names, g_names, keep)
                      for s, keep in settings(qp, gp, qc, gc, q_names, g_names, views).items()}
    cols = list(next(iter(rows.values())))
    print(f"synthetic dataset: {n_train} train, {len(q_img)} query, {len(g_img)} gallery images, "
          f"{cfg.cameras} cameras ({', '.join(f'c{c}={v}' for c, v in enumerate(views) if c)})")
    if gen_seconds is not None:
        print(f"generation: {gen_seconds:.1f} s on 1 process ({counts})")
    print(f"{'features':22s}" + "".join(f"{c:>24s}" for c in cols))
    print(f"{'':22s}" + "".join(f"{'mAP / R1 (%)':>24s}" for _ in cols))
    for name, r in rows.items():
        print(f"{name:22s}" + "".join(f"{r[c]['mAP']:>15.1f} / {r[c]['rank1']:5.1f}" for c in cols))
    result = {"config": dataclasses.asdict(cfg), "train_images": n_train, "query_images": len(q_img),
              "gallery_images": len(g_img), "generation_seconds": gen_seconds, "embed_seconds": embed_seconds,
              "camera_views": {f"c{c:03d}": v for c, v in enumerate(views) if c}, "results": rows,
              "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "cpu": platform.processor()
                          or platform.machine(), "threads": torch.get_num_threads()}}
    write_json(args.json, result)


if __name__ == "__main__":
    main()
