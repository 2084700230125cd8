"""Stage 5, caption: the text for each image of a set.

- prompt: the caption the generator drew the image with (class + scene, e.g. "a photo of a mug on
  the beach"); the default, and the only choice that keeps identity details out of captions by
  construction.
- model:  a local image-captioning model directory (transformers, e.g. BLIP) captions each image;
  `prefix` is prepended (e.g. "a photo of").
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines.synth.writer import SynthError, require_dir


class ModelCaptioner:
    def __init__(self, model_dir: str, max_new_tokens: int = 30, device: str = "cpu", prefix: str = ""):
        require_dir("caption.model_dir", model_dir,
                    "local image-captioning model directory (e.g. a BLIP download), or use caption=prompt")
        import torch
        import transformers as tf

        self.torch = torch
        self.processor = tf.AutoProcessor.from_pretrained(model_dir)
        auto = getattr(tf, "AutoModelForImageTextToText", None) or tf.AutoModelForVision2Seq
        self.model = auto.from_pretrained(model_dir).to(device).eval()
        self.device, self.max_new_tokens, self.prefix = device, max_new_tokens, prefix

    def __call__(self, images: Sequence[Image.Image | np.ndarray]) -> list[str]:
        pil = [Image.fromarray(im) if isinstance(im, np.ndarray) else im for im in images]
        inputs = self.processor(images=pil, return_tensors="pt").to(self.device)
        with self.torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(f"{self.prefix} {t}".split()) for t in texts]


def build_captioner(cfg: Any) -> ModelCaptioner | None:
    """None means: keep the generator's prompt captions."""
    kind = (cfg or {}).get("mode", "prompt")
    if kind == "prompt":
        return None
    if kind == "model":
        return ModelCaptioner(cfg.get("model_dir"), cfg.get("max_new_tokens", 30), cfg.get("device", "cpu"),
                              cfg.get("prefix", ""))
    raise SynthError(f"caption.mode={kind!r} is unknown; use caption=prompt or caption=model")
