"""Retrieval picture: one row per query, the query then its top gallery images (PIL only).

Frames: green = same identity (a true match), red = another identity, grey = unknown (no
identities given, e.g. `reid search query`). Gallery images of the query's identity *and*
camera are junk under the evaluation rule and are skipped, so a row shows what `evaluate` scores.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from reid.errors import ReidError

GREEN, RED, GREY, QUERY_BLUE = (40, 170, 60), (210, 40, 40), (150, 150, 150), (40, 90, 200)
BACKGROUND = (255, 255, 255)


def _thumbnail(path: str, size: tuple[int, int]) -> Image.Image:
    """Image fitted inside `size` (w, h), aspect kept, centred on white."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail(size)
    except (OSError, ValueError) as exc:
        raise ReidError(f"retrieval picture: cannot read image '{path}' ({type(exc).__name__})") from None
    cell = Image.new("RGB", size, BACKGROUND)
    cell.paste(img, ((size[0] - img.width) // 2, (size[1] - img.height) // 2))
    return cell


def _column(x, name: str, n: int | None):
    if x is None:
        return None
    arr = np.asarray(x.cpu() if hasattr(x, "cpu") else x).reshape(-1)
    if n is not None and len(arr) != n:
        raise ReidError(f"retrieval picture: '{name}' has {len(arr)} entries, expected {n}")
    return arr


def save_retrieval_grid(path: str, query_paths, gallery_paths, ranked_gallery_idx, query_pids=None,
                        gallery_pids=None, query_cams=None, gallery_cams=None, *, topk: int = 10,
                        cell: tuple[int, int] = (96, 96), border: int = 4, scores=None) -> str:
    """Write a PNG grid to `path` and return `path`.

    query_paths: Q image paths; gallery_paths: G image paths.
    ranked_gallery_idx: (Q, K) gallery indices, best first (K ≥ topk leaves room for skipped junk;
      -1 entries are ignored), e.g. from `reid.evaluation.top_matches`.
    query_pids/gallery_pids: identities for the green/red frames (None: grey frames).
    query_cams/gallery_cams: cameras for the junk rule (None: nothing is skipped).
    scores: optional (Q, K) similarities printed under each gallery image.
    """
    ranked = np.asarray(ranked_gallery_idx.cpu() if hasattr(ranked_gallery_idx, "cpu") else ranked_gallery_idx)
    if ranked.ndim != 2 or len(ranked) != len(query_paths):
        raise ReidError(f"retrieval picture: ranked_gallery_idx must be (Q={len(query_paths)}, K), "
                        f"got shape {ranked.shape}")
    if scores is not None:
        scores = np.asarray(scores.cpu() if hasattr(scores, "cpu") else scores)
    qp, gp = _column(query_pids, "query_pids", len(query_paths)), _column(gallery_pids, "gallery_pids", len(gallery_paths))
    qc, gc = _column(query_cams, "query_cams", len(query_paths)), _column(gallery_cams, "gallery_cams", len(gallery_paths))
    labelled = qp is not None and gp is not None
    w, h = cell
    label_h = 14
    pitch_w, pitch_h = w + 2 * border + 4, h + 2 * border + label_h + 4
    gap = 12  # separates the query column from its results
    canvas = Image.new("RGB", (pitch_w * (topk + 1) + gap, max(1, len(query_paths)) * pitch_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    def put(col_x: int, row: int, image_path: str, colour, label: str):
        x0, y0 = col_x + 2, row * pitch_h + 2
        draw.rectangle([x0, y0, x0 + w + 2 * border - 1, y0 + h + 2 * border - 1], fill=colour)
        canvas.paste(_thumbnail(image_path, cell), (x0 + border, y0 + border))
        draw.text((x0, y0 + h + 2 * border + 1), label, fill=(0, 0, 0), font=font)

    for i, qpath in enumerate(query_paths):
        put(0, i, qpath, QUERY_BLUE, (f"q id {qp[i]}" if labelled else "query") + (f" c{qc[i]}" if qc is not None else ""))
        shown = 0
        for j, g in enumerate(int(v) for v in ranked[i]):
            if shown == topk:
                break
            if g < 0:
                continue
            if g >= len(gallery_paths):
                raise ReidError(f"retrieval picture: gallery index {g} out of range (G={len(gallery_paths)})")
            same_id = labelled and gp[g] == qp[i]
            if same_id and qc is not None and gc is not None and gc[g] == qc[i]:
                continue  # junk under the evaluation rule
            colour = GREY if not labelled else (GREEN if same_id else RED)
            if scores is not None:
                label = f"{scores[i, j]:.3f}"
            else:
                label = (f"id {gp[g]}" if labelled else f"#{shown + 1}") + (f" c{gc[g]}" if gc is not None else "")
            put(pitch_w * (shown + 1) + gap, i, gallery_paths[g], colour, label)
            shown += 1
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path, format="PNG")
    return path
