"""Stage 3, split: a collage image -> its panels; drop blank panels and near-duplicates.

Grid detection looks for seams: at a real panel border the pixels across the border differ much more
than the pixels just beside it (a step, see _seam_profile). Each axis is split independently; with no
clear seam the configured fixed grid is used. On procedural collages it finds ~92% of grids and
reads ~3% of single images as collages (tests/test_synth_stages.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

MAX_PANELS_PER_AXIS = 4


def _seam_profile(a: np.ndarray, axis: int, eps: float = 4.0) -> np.ndarray:
    """One score per boundary between neighbouring pixel lines along `axis`: the median over the line
    of |difference across the boundary| / (the larger difference across the two lines next to it).
    A panel border is a step: big across it, small beside it (score >> 1). Inside a picture the
    differences are locally alike (score ~ 1), and the median ignores where an object crosses the line."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 2:
        a = a[..., None]
    d = np.abs(np.diff(a, axis=axis)).sum(-1)  # colour, not grey: two panels may be equally bright
    d = d if axis == 0 else d.T  # (boundaries, pixels along the line)
    pad = np.pad(d, ((1, 1), (0, 0)), mode="edge")
    return np.median(d / (np.maximum(pad[:-2], pad[2:]) + eps), axis=1)


def _axis_count(score: np.ndarray, min_score: float, max_n: int) -> int:
    """Panels along one axis: the largest n whose EVERY internal cut is a seam (so a 2-panel image is
    not read as 4, while a 4-panel one, whose halves are also seams, is)."""
    size = score.shape[0] + 1
    best = 1
    for n in range(2, max_n + 1):
        cuts = [round(size * k / n) - 1 for k in range(1, n)]
        if min(float(score[max(c - 1, 0):c + 2].max()) for c in cuts) >= min_score:
            best = n
    return best


def detect_grid(img: Image.Image | np.ndarray, max_n: int = MAX_PANELS_PER_AXIS,
                min_score: float = 1.5) -> tuple[int, int] | None:
    """(rows, cols) of the collage, or None when it shows no clear seams."""
    a = np.asarray(img)
    grid = (_axis_count(_seam_profile(a, 0), min_score, max_n), _axis_count(_seam_profile(a, 1), min_score, max_n))
    return None if grid == (1, 1) else grid


def split_grid(img: Image.Image | np.ndarray, rows: int, cols: int) -> list[np.ndarray]:
    """Panels in reading order (row-major), as uint8 arrays."""
    a = np.asarray(img)
    H, W = a.shape[:2]
    ys = [round(H * k / rows) for k in range(rows + 1)]
    xs = [round(W * k / cols) for k in range(cols + 1)]
    return [a[ys[r]:ys[r + 1], xs[c]:xs[c + 1]].copy() for r in range(rows) for c in range(cols)]


def _thumb(a: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(a).convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float32)


def clean_panels(panels: Sequence[np.ndarray], blank_std: float = 4.0,
                 duplicate_mad: float = 3.0) -> tuple[list[int], dict[int, str]]:
    """Indices of the panels to keep, and a drop reason for the others ('blank' or 'duplicate')."""
    keep, dropped, thumbs = [], {}, []
    for i, p in enumerate(panels):
        if float(np.asarray(p, np.float32).std()) < blank_std:
            dropped[i] = "blank"
            continue
        t = _thumb(p)
        if any(float(np.abs(t - u).mean()) < duplicate_mad for u in thumbs):
            dropped[i] = "duplicate"
            continue
        keep.append(i)
        thumbs.append(t)
    return keep, dropped


def split_collage(img: Image.Image | np.ndarray, rows: int, cols: int, auto: bool = True,
                  **clean_kw) -> tuple[list[np.ndarray], list[int], dict[int, str], tuple[int, int]]:
    """Split (detected grid if `auto` finds one, else rows x cols) and clean.
    Returns (all panels, kept indices, drop reasons, grid used)."""
    grid = (detect_grid(img) if auto else None) or (rows, cols)
    panels = split_grid(img, *grid)
    keep, dropped = clean_panels(panels, **clean_kw)
    return panels, keep, dropped, grid
