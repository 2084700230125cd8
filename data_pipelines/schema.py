"""What one set sample is on disk. The single definition used by the writer, the stream and stats.

One WebDataset sample = one SET of same-subject images:

    <set_id>.0.jpg ... <set_id>.<N-1>.jpg   the images (jpg or png, RGB)
    <set_id>.json                           metadata, below

json fields (required): ``schema_version``, ``set_id``, ``num_images`` (N), ``image_ext``,
``captions`` (N strings, one per image). Optional: ``subject_id``, ``class``, ``scenes`` (N),
``generator``, ``seed``, ``subject`` (a generator-specific identity spec, e.g. the procedural
subject's colours, enough to re-render it), ``masks`` (true: every image i has a subject mask
``<set_id>.<i>.mask.png``, 8-bit gray, 255 = subject; the procedural generator knows them exactly).

The minimal form, for sets written by other tools: no bookkeeping fields. The images are the keys
``<i>.<ext>`` present (i = 0..N-1, each of jpg/jpeg/png/webp, mixed allowed), the set id is the
sample's ``__key__``, the captions are the json's ``captions`` (N strings) or one ``<i>.txt`` per
image. Caption count vs images present is still checked: a tar cut short loses images or captions.

Cached encodings (written by `jedi-data encode`, jedi_train/training/encode.py), beside the members above,
which stay unchanged: ``<set_id>.latents.safetensors`` (``mean`` and, for a VAE, ``logvar`` of the
posterior of each image i, rows in image order, (N, C, h, w): the centre crop at the model resolution),
``<set_id>.text.safetensors`` (each image's caption embedding: ``hidden`` (N, T, D) [+ ``pooled``
(N, P), ``time_ids`` (N, 6)], the fields of jedi_train/models/text.py TextEmbeddings) and
``<set_id>.cache.json`` (``fingerprint`` of the encoders, ``dtype``, ``resolution``, ``crop``).
"""
from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

SCHEMA_VERSION = 1
IMAGE_EXTS = ("jpg", "png")  # what encode_set writes
READ_EXTS = ("jpg", "jpeg", "png", "webp")  # what the minimal form may hold
REQUIRED_FIELDS = ("set_id", "num_images", "image_ext", "captions")
_MINIMAL_IMAGE = re.compile(r"(\d+)\.(" + "|".join(READ_EXTS) + ")")  # "3.jpg", not "3.mask.png"


def image_key(index: int, ext: str) -> str:
    return f"{index}.{ext}"


def mask_key(index: int) -> str:
    return f"{index}.mask.png"


def _encode_image(image: Image.Image | np.ndarray | bytes, ext: str, quality: int) -> bytes:
    if isinstance(image, bytes):  # already encoded as `ext`: jedi-data import passes source files through
        return image
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
    images: Sequence[Image.Image | np.ndarray | bytes],
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


class SkipSet(Exception):
    """A sample that is not a usable set; the message is the skip counter's key."""


def _minimal_image_keys(sample: Mapping[str, Any]) -> list[str]:
    """Keys of images 0..N-1 in a sample without bookkeeping fields, N from the images present."""
    found: dict[int, str] = {}
    for key in sample:
        m = _MINIMAL_IMAGE.fullmatch(key)
        if m:
            if int(m[1]) in found:
                raise SkipSet("duplicate_image")  # 0.jpg and 0.png: which one is image 0?
            found[int(m[1])] = key
    if not found or sorted(found) != list(range(len(found))):
        raise SkipSet("missing_image")  # a gap: the tar lost an image
    return [found[i] for i in range(len(found))]


def set_meta(sample: Mapping[str, Any]) -> dict[str, Any]:
    """The set's metadata with ``set_id``, ``num_images``, ``image_keys`` (sample key of each image) and
    ``captions`` (str per image from the json; raw bytes per image from .txt files) filled in, for the
    full and the minimal form alike. Raises SkipSet(reason) when the sample is not a usable set."""
    if "json" in sample:
        try:
            meta = parse_meta(sample["json"])
        except ValueError:
            raise SkipSet("bad_json") from None
    elif any(k.endswith(".txt") for k in sample):
        meta = {}  # minimal form with .txt captions: no json needed
    else:
        raise SkipSet("missing_json")
    meta.setdefault("set_id", str(sample.get("__key__", "")))
    if "num_images" in meta or "image_ext" in meta:  # the full form: the json announces its images
        for field in ("num_images", "image_ext", "captions"):
            if field not in meta:
                raise SkipSet("no_captions" if field == "captions" else f"json_missing_{field}")
        n = meta["num_images"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SkipSet("bad_num_images")
        meta["image_keys"] = [image_key(i, meta["image_ext"]) for i in range(n)]
        if not isinstance(meta["captions"], list) or len(meta["captions"]) != n:
            raise SkipSet("no_captions")
    else:
        meta["image_keys"] = keys = _minimal_image_keys(sample)
        meta["num_images"] = n = len(keys)
        if "captions" not in meta:
            meta["captions"] = [sample.get(f"{i}.txt") for i in range(n)]
            if any(c is None for c in meta["captions"]):
                raise SkipSet("no_captions")
        elif not isinstance(meta["captions"], list):
            raise SkipSet("no_captions")
        elif len(meta["captions"]) != n:  # more captions than images: images were lost (truncated tar)
            raise SkipSet("missing_image" if len(meta["captions"]) > n else "no_captions")
    if any(k not in sample for k in meta["image_keys"]):
        raise SkipSet("missing_image")
    if meta.get("masks") and any(mask_key(i) not in sample for i in range(n)):
        raise SkipSet("missing_mask")
    return meta


def validate_sample(sample: Mapping[str, Any]) -> str | None:
    """Check a raw (undecoded) sample has every key its json announces. Returns a skip reason or None.

    Runs BEFORE decoding: a truncated tar yields samples with only some keys.
    """
    try:
        set_meta(sample)
    except SkipSet as e:
        return str(e)
    return None


# -- cached encodings (jedi-data encode) ----------------------------------------------------------
CACHE_JSON, LATENTS, TEXT = "cache.json", "latents.safetensors", "text.safetensors"


def encode_cache(info: Mapping[str, Any], latents: Mapping[str, torch.Tensor], text: Mapping[str, torch.Tensor],
                 dtype: torch.dtype) -> dict[str, bytes]:
    """The cache members of one set: latents {"mean"[, "logvar"]} and text {"hidden"[, "pooled", "time_ids"]},
    rows in image order, stored in `dtype`."""
    from safetensors.torch import save

    def pack(d):
        return save({k: v.detach().to("cpu", dtype).contiguous() for k, v in d.items() if v is not None})

    return {CACHE_JSON: json.dumps(dict(info)).encode("utf-8"), LATENTS: pack(latents), TEXT: pack(text)}


def cache_info(sample: Mapping[str, Any]) -> dict[str, Any] | None:
    """The set's cache.json when all three cache members are there, else None (no usable cache)."""
    if not all(k in sample for k in (CACHE_JSON, LATENTS, TEXT)):
        return None
    try:
        return parse_meta(sample[CACHE_JSON])
    except ValueError:
        return None


def decode_cache(sample: Mapping[str, Any], indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """The cached rows of images `indices` (in that order): latent_mean, latent_logvar, text_hidden, ..."""
    from safetensors.torch import load

    idx = torch.as_tensor(list(indices), dtype=torch.long)
    out = {f"latent_{k}": v[idx] for k, v in load(bytes(sample[LATENTS])).items()}
    out.update({f"text_{k}": v[idx] for k, v in load(bytes(sample[TEXT])).items()})
    return out
