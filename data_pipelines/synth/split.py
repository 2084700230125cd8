"""Stage 3, split: a collage image -> its panels; drop blank panels and near-duplicates.

Grid detection looks for seams: at a real panel border neighbouring pixel columns (rows) differ much
more than inside a panel. Each candidate grid is scored by the mean difference across its internal
borders relative to the median neighbour difference of the whole image; the best candidate wins if
it clearly stands out, else the configured fixed grid is used.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

CANDIDATE_GRIDS = ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (2, 3), (3, 2), (3, 3), (2, 4), (4, 2), (4, 4))


def _gray(img: Image.Image | np.ndarray) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32)
    return a.mean(axis=2) if a.ndim == 3 else a


def _seam_strength(diff: np.ndarray, n: int) -> float:
    """Mean jump across the n-1 internal borders of an axis split in n (diff: neighbour differences)."""
    size = diff.shape[0] + 1
    cuts = [round(size * k / n) - 1 for k in range(1, n)]
    return float(np.mean([diff[max(c - 1, 0):c + 2].max() for c in cuts]))


def detect_grid(img: Image.Image | np.ndarray, candidates: Sequence[tuple[int, int]] = CANDIDATE_GRIDS,
                min_score: float = 3.0) -> tuple[int, int] | None:
    """(rows, cols) of the collage, or None when no candidate has clear seams."""
    g = _gray(img)
    col_diff = np.abs(np.diff(g, axis=1)).mean(axis=0)  # one value per vertical boundary
    row_diff = np.abs(np.diff(g, axis=0)).mean(axis=1)
    base = float(np.median(np.concatenate([col_diff, row_diff]))) + 1e-3
    best, best_score = None, min_score
    for rows, cols in candidates:
        parts = []
        if cols > 1:
            parts.append(_seam_strength(col_diff, cols))
        if rows > 1:
            parts.append(_seam_strength(row_diff, rows))
        # the weakest axis decides: a 2x2 guess on a 1x2 collage has no horizontal seam
        score = min(parts) / base
        if score > best_score * 1.05:  # prefer the earlier (simpler) grid on ties
            best, best_score = (rows, cols), score
    return best


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
