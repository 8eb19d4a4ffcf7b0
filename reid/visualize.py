"""Retrieval picture: one row per query, the query then its top gallery images (PIL only).

Frames: green = same identity (a true match), red = another identity, grey = junk under the evaluation
rule (the query's identity seen by the query's camera: shown where it ranks, labelled "junk", ignored by
`evaluate`) or unknown (no identities given, e.g. `reid search query`). Also a per-camera mAP bar chart.
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
            junk = same_id and qc is not None and gc is not None and gc[g] == qc[i]
            colour = GREY if not labelled or junk else (GREEN if same_id else RED)
            if scores is not None:
                label = f"{scores[i, j]:.3f}"
            elif junk:
                label = f"junk c{gc[g]}"
            else:
                label = (f"id {gp[g]}" if labelled else f"#{shown + 1}") + (f" c{gc[g]}" if gc is not None else "")
            put(pitch_w * (shown + 1) + gap, i, gallery_paths[g], colour, label)
            shown += 1
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def save_camera_map_chart(path: str, camera_names, maps, queries) -> str:
    """Write a PNG bar chart of mAP per query camera to `path` and return `path` (PIL only).

    camera_names: C labels; maps: C values in [0, 1] (NaN = no valid query, drawn as an empty slot);
    queries: C counts of valid queries, printed under each bar.
    """
    maps, queries = np.asarray(maps, dtype=float), np.asarray(queries)
    if not len(camera_names) == len(maps) == len(queries):
        raise ReidError(f"camera chart: {len(camera_names)} names, {len(maps)} values and {len(queries)} counts, "
                        "expected one of each per camera")
    bar, gap, height, top, bottom, left = 28, 10, 200, 24, 34, 34
    canvas = Image.new("RGB", (left + max(1, len(maps)) * (bar + gap) + gap, top + height + bottom), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):  # axis ticks
        y = top + height - int(frac * height)
        draw.line([left - 4, y, canvas.width - gap, y], fill=(225, 225, 225))
        draw.text((2, y - 6), f"{100 * frac:.0f}", fill=(0, 0, 0), font=font)
    draw.text((left, 4), "mAP (%) per query camera", fill=(0, 0, 0), font=font)
    for k, (name, value, count) in enumerate(zip(camera_names, maps, queries)):
        x = left + gap + k * (bar + gap)
        if value == value:  # not NaN
            y = top + height - int(round(value * height))
            if y < top + height:  # a bar of round(value·height) pixel rows
                draw.rectangle([x, y, x + bar, top + height - 1], fill=QUERY_BLUE)
            draw.text((x, y - 12), f"{100 * value:.0f}", fill=(0, 0, 0), font=font)
        draw.text((x, top + height + 3), str(name)[:5], fill=(0, 0, 0), font=font)
        draw.text((x, top + height + 17), f"n{int(count)}", fill=(90, 90, 90), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path, format="PNG")
    return path
