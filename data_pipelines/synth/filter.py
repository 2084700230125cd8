"""Stage 4, filter: keep a set only if its images show one subject.

Images are embedded (open_clip, a timm model such as DINO, or a transformers vision model such as
DINOv2, all from local files; or a weight-free colour histogram), and the set's pairwise cosine similarities are compared with
thresholds: below `min_similarity` -> "inconsistent_subject"; above `max_similarity` -> "near_duplicate"
(the generator repeated one image). `reduce` picks which pair decides: "min" (the least similar
pair, strict) or "mean" (each image's mean similarity to the others, its minimum over images).
Every decision returns its numbers, so rejections are explainable.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines.synth.writer import SynthError, require_dir


def _need_file(key: str, path: str | None, what: str) -> None:
    if path and not Path(path).exists():
        raise SynthError(f"{key}={path} does not exist; give a local {what} (or null for random weights, tests only)")


class Embedder:
    """images -> L2-normalised float32 (N, D)."""

    def __init__(self, model: Any, preprocess: Callable, forward: Callable, device: str = "cpu"):
        import torch

        self.torch, self.model, self.preprocess, self.forward, self.device = torch, model.eval(), preprocess, forward, device

    def __call__(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        pil = [Image.fromarray(im) if isinstance(im, np.ndarray) else im for im in images]
        x = self.torch.stack([self.preprocess(im.convert("RGB")) for im in pil]).to(self.device)
        with self.torch.no_grad():
            e = self.forward(x).float()
        e = e.reshape(len(pil), -1)
        return (e / e.norm(dim=-1, keepdim=True).clamp_min(1e-8)).cpu().numpy()


class ColorHistogram:
    """Weight-free embedding of the central `crop` of each image: a hue x saturation histogram (hue bins
    soft-assigned, so a hue near a bin edge does not flip bins) plus dark and pale-grey counts, square-rooted
    so cosine is the Bhattacharyya coefficient. Hue and saturation ignore most of the lighting changes
    between views. It matches subjects by colour only: a cheap pre-filter and a model-free check, not a
    substitute for DINO/CLIP."""

    def __init__(self, crop: float = 0.6, hue_bins: int = 12, sat_bins: int = 3):
        self.crop, self.hb, self.sb = crop, hue_bins, sat_bins

    def one(self, im: Image.Image | np.ndarray) -> np.ndarray:
        im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
        W, H = im.size
        m, n = int(H * (1 - self.crop) / 2), int(W * (1 - self.crop) / 2)
        hsv = np.asarray(im.convert("RGB").crop((n, m, W - n, H - m)).convert("HSV"), np.float32).reshape(-1, 3) / 256
        hue = hsv[:, 0] * self.hb - 0.5
        h0 = np.floor(hue)
        frac, h0 = hue - h0, h0.astype(np.int64) % self.hb
        sat = np.minimum(hsv[:, 1] * self.sb, self.sb - 1).astype(np.int64)
        hist = np.bincount(h0 * self.sb + sat, 1 - frac, self.hb * self.sb)
        hist += np.bincount((h0 + 1) % self.hb * self.sb + sat, frac, self.hb * self.sb)
        dark, pale = hsv[:, 2] < 0.25, (hsv[:, 2] > 0.85) & (hsv[:, 1] < 0.2)
        h = np.sqrt(np.concatenate([hist, [dark.sum(), pale.sum()]]).astype(np.float32))
        return h / max(float(np.linalg.norm(h)), 1e-8)

    def __call__(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        return np.stack([self.one(im) for im in images])


def build_embedder(cfg: Any) -> Embedder | ColorHistogram:
    kind, device = cfg.get("embedder"), cfg.get("device", "cpu")
    if kind == "color_histogram":
        return ColorHistogram(float(cfg.get("crop", 0.6)))
    if kind == "open_clip":
        import open_clip

        _need_file("filter.model_config", cfg.get("model_config"), "open_clip model config JSON")
        _need_file("filter.pretrained", cfg.get("pretrained"), "open_clip checkpoint file")
        if cfg.get("model_config"):
            open_clip.add_model_config(cfg["model_config"])
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(cfg["model"], pretrained=cfg.get("pretrained"),
                                                                         device=device)
        except RuntimeError as e:
            raise SynthError(f"filter: open_clip could not load {cfg['model']!r} ({str(e).splitlines()[0]}); set "
                             "filter.pretrained to a local checkpoint file") from None
        return Embedder(model, preprocess, model.encode_image, device)
    if kind == "timm":
        import timm
        import torch

        ckpt = cfg.get("pretrained")
        _need_file("filter.pretrained", ckpt, "timm checkpoint file")
        model = timm.create_model(cfg["model"], pretrained=False, num_classes=0)
        if ckpt:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state, strict=False)
        dcfg = timm.data.resolve_data_config({}, model=model)
        return Embedder(model.to(device), timm.data.create_transform(**dcfg), model, device)
    if kind == "hf":
        from transformers import AutoImageProcessor, AutoModel

        d = cfg.get("model_dir")
        require_dir("filter.model_dir", d,
                    "local transformers vision model directory (e.g. a DINOv2 download)")
        proc, model = AutoImageProcessor.from_pretrained(d), AutoModel.from_pretrained(d).to(device)
        pre = lambda im: proc(images=im, return_tensors="pt")["pixel_values"][0]
        fwd = lambda x: model(pixel_values=x).last_hidden_state[:, 0]
        return Embedder(model, pre, fwd, device)
    raise SynthError(f"filter.embedder={kind!r} is unknown; use open_clip, timm, hf or color_histogram "
                     "(or filter=none)")


def similarity_stats(emb: np.ndarray) -> dict[str, float]:
    sim = emb @ emb.T
    n = len(emb)
    off = sim[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    return {"min": float(off.min()), "max": float(off.max()), "mean": float(off.mean()),
            "min_image_mean": float(off.mean(axis=1).min())}


class ConsistencyFilter:
    def __init__(self, embed: Callable[[Sequence], np.ndarray], min_similarity: float = 0.75,
                 max_similarity: float = 0.995, reduce: str = "min"):
        if reduce not in ("min", "mean"):
            raise SynthError(f"filter.reduce={reduce!r} is unknown; use min or mean")
        self.embed, self.lo, self.hi, self.reduce = embed, min_similarity, max_similarity, reduce

    def check(self, images: Sequence) -> tuple[str | None, dict[str, float]]:
        """(None or the rejection reason, similarity numbers)."""
        if len(images) < 2:
            return "too_few_images", {}
        stats = similarity_stats(self.embed(images))
        score = stats["min"] if self.reduce == "min" else stats["min_image_mean"]
        if score < self.lo:
            return "inconsistent_subject", stats
        if stats["max"] > self.hi:
            return "near_duplicate", stats
        return None, stats


def build_filter(cfg: Any) -> ConsistencyFilter | None:
    if cfg is None or cfg.get("embedder") in (None, "none"):
        return None
    return ConsistencyFilter(build_embedder(cfg), cfg.get("min_similarity", 0.75), cfg.get("max_similarity", 0.995),
                             cfg.get("reduce", "min"))
