"""One raw set -> decoded, cropped, subsampled set with its references chosen. Pure functions.

Odd images are repaired when that is safe (grayscale, palette, CMYK, 16-bit, alpha -> RGB) and
dropped when not (undecodable, too small, too many pixels); a set survives as long as it keeps
`min_set` decodable images. Everything is counted in `Counts` by reason.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from data_pipelines.images import Unusable, crop_offset, decode_rgb, header_size, resize_short_side
from data_pipelines.schema import cache_info, decode_cache, mask_key, set_meta
from data_pipelines.skips import Counts


@dataclass
class SetOptions:
    resolution: int = 32
    min_set: int = 2
    max_set: int = 4
    crop: str = "random"            # random | center (after resizing the shorter side to `resolution`)
    flip_prob: float = 0.0          # per image; off by default: captions may say "left"/"right"
    ref_count_probs: Sequence[float] = (0.1, 0.45, 0.35, 0.1)  # P(k references), k = 0, 1, 2, ...
    min_image_size: int = 16        # shorter side below this: dropped (upscaling garbage)
    max_image_pixels: int = 100_000_000  # above this: dropped before decoding (decompression bombs)
    # the trained model's encoder fingerprint (jedi_train/training/encode.py): sets cached for it bring their
    # latents + text embeddings; None: every set is encoded on the fly
    cache_fingerprint: str | None = None


def load_image(data: bytes, opt: SetOptions, rng: np.random.Generator, counts: Counts,
               mask: bytes | None = None, geometry: list | None = None) -> np.ndarray | None:
    """Encoded bytes -> uint8 (res, res, 3), or None (counted) when the image cannot be used.
    With `mask` (an encoded subject mask): (res, res, 4), the mask as a 4th channel, cropped and
    flipped with the image. `geometry`: gets (original height, width, crop top, left) appended, the crop
    in resized coordinates (SDXL's size and crop micro-conditioning)."""
    try:
        arr = resize_short_side(decode_rgb(data, opt.resolution, opt.max_image_pixels, opt.min_image_size, counts),
                                opt.resolution)
        if mask is not None:
            m = decode_rgb(mask, opt.resolution, opt.max_image_pixels, opt.min_image_size)[..., :1]
            m = resize_short_side(np.repeat(m, 3, axis=2), opt.resolution)[..., :1]
            if m.shape[:2] != arr.shape[:2]:
                raise Unusable("mask_size_mismatch", f"mask {m.shape[:2]} vs image {arr.shape[:2]}")
            arr = np.concatenate([arr, m], axis=2)
    except Unusable as e:
        counts.skip(e.reason, str(e))
        return None
    top, left = crop_offset(arr.shape, opt.resolution, rng if opt.crop == "random" else None)
    if geometry is not None:
        geometry.append((*header_size(data), top, left))
    arr = arr[top:top + opt.resolution, left:left + opt.resolution]
    if opt.flip_prob and rng.random() < opt.flip_prob:
        arr = arr[:, ::-1]
    return arr


def read_captions(raw_json: Any, meta: dict, counts: Counts) -> list[str]:
    """meta["captions"] (as set_meta filled it in) -> one str per image, repairs counted."""
    if isinstance(raw_json, bytes):
        try:
            raw_json.decode("utf-8")
        except UnicodeDecodeError:
            counts.repair("caption_not_utf8")  # parse_meta decoded it with replacement characters
    caps = []
    for c in meta["captions"]:
        if isinstance(c, bytes):  # a <i>.txt caption (minimal form)
            try:
                c = c.decode("utf-8")
            except UnicodeDecodeError:
                counts.repair("caption_not_utf8")
                c = c.decode("utf-8", errors="replace")
            c = c.strip()
        elif not isinstance(c, str):
            counts.repair("caption_not_string")
            c = "" if c is None else str(c)
        caps.append(c)
    return caps


def choose_ref_count(n: int, probs: Sequence[float], rng: np.random.Generator) -> int:
    """k references for a set of n: k ~ probs, capped at n - 1 so that every set keeps a target."""
    cdf = np.cumsum(probs, dtype=np.float64)
    k = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")) if cdf[-1] > 0 else 0
    return min(k, len(cdf) - 1, n - 1)


def load_set(sample: dict, opt: SetOptions, rng: np.random.Generator, counts: Counts) -> dict | None:
    """A validated raw sample -> {set_id, images: n uint8 (res,res,3) arrays, captions, is_ref[, masks]},
    or None. masks (uint8 (res, res) per image) when the set has subject masks; cache (decode_cache's
    tensors for the chosen images) when the set holds encodings for opt.cache_fingerprint."""
    meta = set_meta(sample)
    has_masks = bool(meta.get("masks"))
    n, keys = meta["num_images"], meta["image_keys"]
    if n < opt.min_set:
        counts.skip("too_few_images", f"{meta['set_id']}: {n} < min_set {opt.min_set}")
        return None
    captions = read_captions(sample.get("json"), meta, counts)
    size = int(rng.integers(opt.min_set, min(n, opt.max_set) + 1))
    images, caps, picked, geometry = [], [], [], []
    for i in rng.permutation(n):  # decode only what the set needs; a bad image is replaced by the next
        if len(images) == size:
            break
        arr = load_image(sample[keys[i]], opt, rng, counts,
                         sample[mask_key(int(i))] if has_masks else None, geometry)
        if arr is not None:
            images.append(arr)
            caps.append(captions[i])
            picked.append(int(i))
    if len(images) < opt.min_set:
        counts.skip("too_few_decodable_images", str(meta["set_id"]))
        return None
    is_ref = np.zeros(len(images), dtype=bool)
    is_ref[rng.choice(len(images), choose_ref_count(len(images), opt.ref_count_probs, rng), replace=False)] = True
    out = {"set_id": str(meta["set_id"]), "images": [a[..., :3] for a in images], "captions": caps, "is_ref": is_ref,
           "size_crop": np.array(geometry, dtype=np.int64).reshape(-1, 4)}  # one row per kept image
    if has_masks:
        out["masks"] = [a[..., 3] for a in images]
    info = cache_info(sample) if opt.cache_fingerprint else None
    if info is not None:
        if info.get("fingerprint") != opt.cache_fingerprint:  # the datamodule refused this up front for
            counts.skip("cache_mismatch", str(meta["set_id"]))  # the first set; a stray one is skipped
            return None
        out["cache"] = decode_cache(sample, picked)
    return out


def _shared_empty(shape: tuple[int, ...]) -> torch.Tensor:
    numel = int(np.prod(shape))
    storage = torch.empty(0)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0).new(storage).view(shape)


def _collate_cache(sets: list[dict], n: int, empty: dict[str, torch.Tensor]) -> dict:
    """Cached rows -> (B, N, ...) per key, padded with zeros (latents) or the empty caption (text), as the
    on-the-fly path pads with black images and "" captions; plus the empty caption itself (caption dropout)."""
    out = {}
    for key, first in sets[0]["cache"].items():
        shape = (len(sets), n, *first.shape[1:])
        fill = empty.get(key)
        t = torch.zeros(shape, dtype=first.dtype) if fill is None else fill.to(first.dtype).expand(shape).clone()
        for i, s in enumerate(sets):
            t[i, :len(s["cache"][key])] = s["cache"][key]
        out[key] = t
    out.update({"text_empty_" + k.removeprefix("text_"): v for k, v in empty.items()})
    return out


def collate_sets(sets: list[dict], tokenize: Callable[[list[str]], torch.Tensor] | None,
                 empty_text: dict[str, torch.Tensor] | None = None) -> dict:
    """Sets of unequal size -> one padded batch; N is the largest set. Padding: zeros, "" captions.
    subject_mask (B, N, 1, H, W) in [0, 1] when every set of the batch has masks. Cached encodings
    (latent_*, text_*, text_empty_*; jedi_train/models/objective.py) when every set has them and
    `empty_text` (the cache's "" embedding: {"text_hidden": (1, T, D), ...}) is given; else none."""
    b, n = len(sets), max(len(s["captions"]) for s in sets)
    res = sets[0]["images"][0].shape[0]
    u8 = np.zeros((b, n, 3, res, res), dtype=np.uint8)
    is_ref = torch.zeros(b, n, dtype=torch.bool)
    valid = torch.zeros(b, n, dtype=torch.bool)
    for i, s in enumerate(sets):
        k = len(s["captions"])
        for j, img in enumerate(s["images"]):
            u8[i, j] = img.transpose(2, 0, 1)  # HWC -> CHW here, per image, while it is in cache
        is_ref[i, :k] = torch.from_numpy(s["is_ref"])
        valid[i, :k] = True
    # one conversion for the whole batch, written straight into shared memory when in a DataLoader
    # worker (as torch's default_collate does): the batch then crosses to the main process uncopied
    pixels = _shared_empty((b, n, 3, res, res)) if get_worker_info() is not None else torch.empty(b, n, 3, res, res)
    pixels.copy_(torch.from_numpy(u8)).div_(127.5).sub_(1.0)
    if not valid.all():
        pixels[~valid] = 0.0
    size_crop = torch.tensor([res, res, 0, 0]).repeat(b, n, 1)  # padding: as an uncropped image of that size
    for i, s in enumerate(sets):
        if "size_crop" in s:
            size_crop[i, :len(s["size_crop"])] = torch.from_numpy(s["size_crop"])
    batch = {"pixel_values": pixels, "is_ref": is_ref, "valid": valid, "size_crop": size_crop,
             "set_id": [s["set_id"] for s in sets], "captions": [list(s["captions"]) for s in sets]}
    if all("masks" in s for s in sets):
        m8 = np.zeros((b, n, 1, res, res), dtype=np.uint8)
        for i, s in enumerate(sets):
            for j, m in enumerate(s["masks"]):
                m8[i, j, 0] = m
        batch["subject_mask"] = torch.from_numpy(m8).float().div_(255.0)
    if empty_text is not None and all("cache" in s for s in sets):
        batch.update(_collate_cache(sets, n, empty_text))
    if tokenize is not None:
        batch["input_ids"] = torch.stack([tokenize(s["captions"] + [""] * (n - len(s["captions"]))) for s in sets])
    return batch
