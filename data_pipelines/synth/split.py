"""Stage 3, split: a collage image -> its panels; drop blank panels and near-duplicates.

Grid detection looks for seams: at a real panel border neighbouring pixel columns (rows) differ much
more than inside a panel (relative to the median neighbour difference of the whole image). Each axis
is split independently; with no clear seam the configured fixed grid is used.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

MAX_PANELS_PER_AXIS = 4


def _gray(img: Image.Image | np.ndarray) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32)
    return a.mean(axis=2) if a.ndim == 3 else a


def _axis_count(diff: np.ndarray, base: float, min_score: float, max_n: int) -> int:
    """Panels along one axis: the largest n whose EVERY internal cut is a seam (so a 2-panel image is
    not read as 4, while a 4-panel one, whose halves are also seams, is)."""
    size = diff.shape[0] + 1
    best = 1
    for n in range(2, max_n + 1):
        cuts = [round(size * k / n) - 1 for k in range(1, n)]
        weakest = min(float(diff[max(c - 1, 0):c + 2].max()) for c in cuts)
        if weakest / base >= min_score:
            best = n
    return best


def detect_grid(img: Image.Image | np.ndarray, max_n: int = MAX_PANELS_PER_AXIS,
                min_score: float = 3.0) -> tuple[int, int] | None:
    """(rows, cols) of the collage, or None when it shows no clear seams."""
    g = _gray(img)
    col_diff = np.abs(np.diff(g, axis=1)).mean(axis=0)  # one value per vertical boundary
    row_diff = np.abs(np.diff(g, axis=0)).mean(axis=1)
    base = float(np.median(np.concatenate([col_diff, row_diff]))) + 1e-3
    grid = (_axis_count(row_diff, base, min_score, max_n), _axis_count(col_diff, base, min_score, max_n))
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
