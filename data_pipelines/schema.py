"""What one set sample is on disk. The single definition used by the writer, the stream and stats.

One WebDataset sample = one SET of same-subject images:

    <set_id>.0.jpg ... <set_id>.<N-1>.jpg   the images (jpg or png, RGB)
    <set_id>.json                           metadata, below

json fields (required): ``schema_version``, ``set_id``, ``num_images`` (N), ``image_ext``,
``captions`` (N strings, one per image). Optional: ``subject_id``, ``class``, ``scenes`` (N),
``generator``, ``seed``, ``subject`` (a generator-specific identity spec, e.g. the procedural
subject's colours, enough to re-render it), ``masks`` (true: every image i has a subject mask
``<set_id>.<i>.mask.png``, 8-bit gray, 255 = subject; the procedural generator knows them exactly).
"""
from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

SCHEMA_VERSION = 1
IMAGE_EXTS = ("jpg", "png")
REQUIRED_FIELDS = ("set_id", "num_images", "image_ext", "captions")


def image_key(index: int, ext: str) -> str:
    return f"{index}.{ext}"


def mask_key(index: int) -> str:
    return f"{index}.mask.png"


def _encode_image(image: Image.Image | np.ndarray, ext: str, quality: int) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    if ext == "jpg":  # 4:4:4: chroma subsampling would blur exactly the colours that carry identity
        image.convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def encode_set(
    set_id: str,
    images: Sequence[Image.Image | np.ndarray],
    captions: Sequence[str],
    meta: Mapping[str, Any] | None = None,
    ext: str = "jpg",
    quality: int = 95,
    masks: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    """One set -> a dict ready for ``webdataset.ShardWriter.write``. masks: optional uint8 (H, W) per image."""
    if ext not in IMAGE_EXTS:
        raise ValueError(f"image_ext {ext!r} is not supported; use one of {IMAGE_EXTS}")
    if len(images) != len(captions):
        raise ValueError(f"set {set_id}: {len(images)} images but {len(captions)} captions; give one caption per image")
    if "." in set_id:
        raise ValueError(f"set_id {set_id!r} contains '.', which WebDataset uses to split keys; use '-' or '_'")
    info = dict(meta or {})
    if masks is not None and len(masks) != len(images):
        raise ValueError(f"set {set_id}: {len(images)} images but {len(masks)} masks; give one mask per image")
    info.update(schema_version=SCHEMA_VERSION, set_id=set_id, num_images=len(images),
                image_ext=ext, captions=list(captions))
    if masks is not None:
        info["masks"] = True
    sample: dict[str, Any] = {"__key__": set_id, "json": json.dumps(info).encode("utf-8")}
    for i, img in enumerate(images):
        sample[image_key(i, ext)] = _encode_image(img, ext, quality)
    for i, m in enumerate(masks or []):
        sample[mask_key(i)] = _encode_image(np.asarray(m, dtype=np.uint8), "png", quality)
    return sample


def parse_meta(raw: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    """The json field as a dict. Raises ValueError naming what is wrong (undecodable, not an object)."""
    if isinstance(raw, Mapping):
        return dict(raw)
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"json is not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict):
        raise ValueError("json is not an object")  # noqa: TRY004 -- a data error, counted like the others
    return meta


def validate_sample(sample: Mapping[str, Any]) -> str | None:
    """Check a raw (undecoded) sample has every key its json announces. Returns a skip reason or None.

    Runs BEFORE decoding: a truncated tar yields samples with only some keys.
    """
    if "json" not in sample:
        return "missing_json"
    try:
        meta = parse_meta(sample["json"])
    except ValueError:
        return "bad_json"
    for field in REQUIRED_FIELDS:
        if field not in meta:
            return "no_captions" if field == "captions" else f"json_missing_{field}"
    n, ext, caps = meta["num_images"], meta["image_ext"], meta["captions"]
    if not isinstance(n, int) or n < 1:
        return "bad_num_images"
    if not isinstance(caps, list) or len(caps) != n:
        return "no_captions"
    if any(image_key(i, ext) not in sample for i in range(n)):
        return "missing_image"
    if meta.get("masks") and any(mask_key(i) not in sample for i in range(n)):
        return "missing_mask"
    return None
