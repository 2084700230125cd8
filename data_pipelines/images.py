"""Encoded image -> RGB uint8 array, shorter side at the training resolution. One implementation for
the training stream (sets.py) and the pipeline's reference photos (jedi_train/pipelines/references.py).

JPEGs are decoded at a reduced DCT scale when they are at least twice the resolution (far cheaper
than decoding full size and resizing). Plain 3-channel JPEGs, the bulk of any image dataset, go
through simplejpeg (libjpeg-turbo, ~2x faster than PIL's open + decode, bit-identical output,
same DCT scale as PIL's `draft`); everything else - PNG, WebP, gray or CMYK JPEGs, 16-bit, alpha -
goes through PIL and is repaired to RGB by `to_rgb`.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

try:  # optional where this file ships inside an exported pipeline (bundle.py): PIL decodes everything
    import simplejpeg
except ImportError:
    simplejpeg = None

# our own max_pixels check replaces PIL's warning (PIL still raises past twice its limit)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class Unusable(Exception):
    """An image to drop: `reason` is the skip counter's key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def draft_request(w: int, h: int, resolution: int) -> tuple[int, int] | None:
    """The size to ask PIL's JPEG `draft` for (shorter side at `resolution`), or None: not worth it."""
    s = min(w, h)
    if s < 2 * resolution:
        return None
    return -(-w * resolution // s), -(-h * resolution // s)


def _draft_size(w: int, h: int, request: tuple[int, int]) -> tuple[int, int]:
    """The size PIL's `draft(None, request)` decodes to: the largest 1/8, 1/4, 1/2 scale that fits."""
    scale = min(w // request[0], h // request[1])
    s = next(f for f in (8, 4, 2, 1) if scale >= f)
    return -(-w // s), -(-h // s)


def open_pil(fp, resolution: int, max_pixels: int | None = None, min_size: int = 0) -> Image.Image:
    """Image.open + size check (before decoding: decompression bombs) + DCT-scaled decode for large
    JPEGs + load. Raises `Unusable` or what PIL raises."""
    img = Image.open(fp)
    if max_pixels is not None:
        _check_size(*img.size, max_pixels, min_size)
    request = draft_request(*img.size, resolution) if img.format == "JPEG" else None
    if request:
        img.draft(None, request)
    img.load()
    return img


def to_rgb(img: Image.Image, counts=None) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit gray rescaled (convert() would clip), alpha composited on white
    (transparent pixels become white, not whatever RGB they hide), the rest convert('RGB')."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if a.max(initial=0) > 255 else 255.0
        reason, img = "image_16bit", Image.fromarray((a.clip(0, hi) * (255.0 / hi)).round().astype(np.uint8))
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        reason, img = "image_alpha", Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba)
    else:
        reason = f"image_mode_{mode}"
    if counts is not None:
        counts.repair(reason)
    return img.convert("RGB")


def _fast_jpeg(data: bytes, resolution: int, max_pixels: int, min_size: int) -> np.ndarray | None:
    """simplejpeg for a 3-channel JPEG; None: not one (or corrupt), PIL takes it from here."""
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    _check_size(w, h, max_pixels, min_size)
    if colorspace not in ("YCbCr", "RGB"):
        return None  # gray / CMYK: PIL, so the repair is counted
    request = draft_request(w, h, resolution)
    dw, dh = _draft_size(w, h, request) if request else (w, h)
    try:
        arr = simplejpeg.decode_jpeg(data, "RGB", min_width=dw, min_height=dh)
    except ValueError:  # truncated or corrupt: PIL decides whether it is usable
        return None
    return arr if arr.shape[:2] == (dh, dw) else None


def _check_size(w: int, h: int, max_pixels: int, min_size: int) -> None:
    if w * h > max_pixels:
        raise Unusable("image_too_large", f"{w}x{h}")
    if min(w, h) < min_size:
        raise Unusable("image_too_small", f"{w}x{h}")


def decode_rgb(data: bytes, resolution: int, max_pixels: int, min_size: int, counts=None) -> np.ndarray:
    """Encoded bytes -> RGB uint8 (H, W, 3), JPEGs DCT-scaled toward `resolution`. Raises `Unusable`."""
    arr = _fast_jpeg(data, resolution, max_pixels, min_size)
    if arr is not None:
        return arr
    try:
        img = open_pil(io.BytesIO(data), resolution, max_pixels, min_size)
    except Unusable:
        raise
    except Image.DecompressionBombError as e:
        raise Unusable("image_too_large", repr(e)) from None
    except Exception as e:  # noqa: BLE001 - any undecodable image is dropped, never fatal
        raise Unusable("image_undecodable", repr(e)) from None
    return np.asarray(to_rgb(img, counts))


def resize_short_side(arr: np.ndarray, resolution: int) -> np.ndarray:
    """Shorter side -> resolution (PIL bicubic, antialiased when shrinking); no-op when it already is."""
    h, w = arr.shape[:2]
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size == (w, h):
        return arr
    img = Image.fromarray(arr).resize(size, Image.BICUBIC, reducing_gap=None if scale >= 1 else 3.0)
    return np.asarray(img)


def crop_offset(shape: tuple[int, ...], resolution: int, rng: np.random.Generator | None = None) -> tuple[int, int]:
    """(top, left) of the resolution x resolution square in an image of `shape`: centred, or drawn from `rng`."""
    dy, dx = shape[0] - resolution, shape[1] - resolution
    if rng is not None:
        x, y = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
        return y, x
    return dy // 2, dx // 2


def crop_square(arr: np.ndarray, resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The resolution x resolution square: centred, or at a random offset drawn from `rng`."""
    y, x = crop_offset(arr.shape, resolution, rng)
    return arr[y:y + resolution, x:x + resolution]


def header_size(data: bytes) -> tuple[int, int]:
    """(height, width) of an encoded image from its header (nothing is decoded)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size[1], img.size[0]
