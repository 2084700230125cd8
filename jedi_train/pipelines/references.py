"""Reference photos -> (K, 3, R, R) tensors in [-1, 1], prepared the way training prepared its images.

Accepted per reference: a path (an image file, or a DreamBench-style subject folder of images),
a PIL image, a numpy array (H, W[, C]; uint8 0-255 or float 0-1) or a torch tensor ((C, H, W) or
(H, W, C), float 0-1, diffusers' convention; uint8 0-255). Everything goes through PIL so that every
kind of input meets the same steps as training (data_pipelines/images.py, crop="center"): EXIF
orientation (a phone photo is upright), alpha composited on white, 16-bit/gray/palette -> RGB,
shorter side resized to R (bicubic; JPEG files decoded at a reduced scale first, as training does),
center crop.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from data_pipelines.images import crop_square, open_pil, resize_short_side, to_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def expand_reference_paths(items) -> list:
    """A single item or a list; folders become their image files (sorted, as DreamBench numbers them)."""
    if isinstance(items, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
        items = [items]
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            if not os.path.exists(path):
                why = "is a broken symlink or a symlink loop" if os.path.islink(path) else "does not exist"
                raise FileNotFoundError(f"reference {path} {why}; give an image file or a folder of images")
            if os.path.isdir(path):
                files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS)
                               and not f.startswith("."))
                if not files:
                    raise ValueError(f"reference folder {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
                out.extend(os.path.join(path, f) for f in files)
                continue
        out.append(item)
    return out


def _open(item, resolution: int) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        try:
            img = open_pil(path, resolution)
        except Image.DecompressionBombError:  # not an OSError: PIL refuses to decode it at all
            raise ValueError(f"reference {path} has too many pixels for PIL to decode safely (a possible "
                             "decompression bomb); give a smaller photo, e.g. scaled to 4096 px or less") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"reference {path} is not a readable image ({type(e).__name__}); "
                             "give a JPEG/PNG/WebP file") from None
        return img
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu()
        if item.dim() == 3 and item.shape[0] in (1, 3, 4) and item.shape[-1] not in (1, 3, 4):
            item = item.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        item = item.numpy()
    if isinstance(item, np.ndarray):
        a = item
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
            raise ValueError(f"reference array of shape {a.shape} is not an image; use (H, W), (H, W, 3|4) "
                             "or a (3, H, W) tensor")
        if a.dtype != np.uint8:
            a = (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(a)
    raise ValueError(f"reference of type {type(item).__name__} is not supported; give a path, PIL image, "
                     "numpy array or torch tensor")


def prepare_reference(item, resolution: int) -> Image.Image:
    """One reference -> an upright RGB PIL image of resolution x resolution."""
    img = _open(item, resolution)
    img = ImageOps.exif_transpose(img)  # no-op without EXIF orientation
    arr = resize_short_side(np.asarray(to_rgb(img)), resolution)
    return Image.fromarray(np.ascontiguousarray(crop_square(arr, resolution)))


def load_references(items: Sequence, resolution: int) -> tuple[torch.Tensor, list[Image.Image]]:
    """References -> ((K, 3, R, R) float tensor in [-1, 1], the prepared PIL images)."""
    pils = [prepare_reference(item, resolution) for item in expand_reference_paths(items)]
    if not pils:
        return torch.zeros(0, 3, resolution, resolution), []
    arr = np.stack([np.asarray(p, dtype=np.uint8) for p in pils])
    pixels = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, pils
