"""Reference attention maps as pictures: `save_attention_overlays` writes, next to a generated image, one PNG per
reference (`<image stem>.attention.<k>.png`): the reference as the model saw it, with the image's attention
heatmap on it (upsampled from the reference's token grid; the maps: jedi_train/pipelines/attention_maps.py).
Used by jedi-sample --explain and jedi-app (through sampling.py) and by jedi-generate --explain."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from jedi_common.atomic import atomic_path

# colour ramp of the heat: dark blue (at or below the reference's mean) -> red -> yellow (the peak)
RAMP = np.array([[0, 0, 80], [200, 0, 40], [255, 220, 0]], dtype=np.float32)


def overlay_path(image_path: str, k: int) -> str:
    stem, _ = os.path.splitext(image_path)
    return f"{stem}.attention.{k}.png"


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) RGB from RAMP."""
    x = np.clip(heat, 0, 1) * (len(RAMP) - 1)
    lo = np.minimum(np.floor(x).astype(int), len(RAMP) - 2)
    f = (x - lo)[..., None]
    return RAMP[lo] * (1 - f) + RAMP[lo + 1] * f


def overlay(heatmap: torch.Tensor, reference: Image.Image, alpha: float = 0.6) -> Image.Image:
    """The reference with its heatmap blended over it (bilinearly upsampled). Colour = mass relative to the
    reference's mean: a uniform map leaves the photo under a faint blue tint, only tokens above the mean light
    up (up to yellow at the peak, or at 1.5x the mean when the peak is lower: small ripples stay faint)."""
    ref = np.asarray(reference.convert("RGB"), dtype=np.float32)
    h = heatmap.float()[None, None]
    up = F.interpolate(h, size=ref.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
    rel = up / up.mean() if up.mean() > 0 else np.zeros_like(up)
    v = np.clip((rel - 1) / max(float(rel.max()) - 1, 0.5), 0, 1)
    a = (0.15 + (alpha - 0.15) * v)[..., None]
    out = ref * (1 - a) + heat_colours(v) * a
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def save_attention_overlays(maps, reference_images, image_path: str) -> list[str]:
    """One generated image's AttentionMap + the references the model saw (JeDiPipelineOutput.reference_images)
    -> the overlay PNGs written (atomically) beside image_path, one per reference, in reference order."""
    heat = maps.heatmaps
    if len(reference_images) != heat.shape[0]:
        raise ValueError(f"the attention maps cover {heat.shape[0]} references but {len(reference_images)} reference "
                         "images were given; pass the output's reference_images")
    paths = []
    for k, ref in enumerate(reference_images):
        path = overlay_path(os.fspath(image_path), k)
        with atomic_path(path) as tmp:
            overlay(heat[k], ref).save(tmp)
        paths.append(path)
    return paths
