"""One picture of a personalization run: the references in the first row, the outputs below, one row
per prompt with the prompt written above it. PIL only (the training loop's validation and jedi-sample
both call it)."""
from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

REF_OUTLINE = (30, 120, 220)


def _cell(img: Image.Image, cell: int) -> Image.Image:
    img = img.convert("RGB")
    # small model outputs are upscaled with NEAREST so that pixels stay pixels
    return img.resize((cell, cell), Image.NEAREST if img.width < cell else Image.BICUBIC)


def make_grid(reference_images: Sequence[Image.Image], generated: Sequence[Image.Image],
              prompts: Sequence[str], cell: int = 128, pad: int = 6, label_lines: int = 2) -> Image.Image:
    """references (first row) + generated images, one row per prompt.

    len(generated) must be a multiple of len(prompts); generated is prompt-major (diffusers' order:
    all images of prompt 0, then prompt 1, ...).
    """
    if not prompts:
        raise ValueError("make_grid needs at least one prompt")
    if len(generated) % len(prompts):
        raise ValueError(f"{len(generated)} generated images do not split into rows for {len(prompts)} prompts")
    per_row = len(generated) // len(prompts)
    font = ImageFont.load_default()
    line_h, chars = 11, max(8, (max(per_row, len(reference_images), 1) * (cell + pad)) // 6)
    label_h = line_h * label_lines + 4
    rows = [("references", list(reference_images))] if reference_images else []
    rows += [(p, list(generated[i * per_row:(i + 1) * per_row])) for i, p in enumerate(prompts)]
    ncols = max(1, max(len(images) for _, images in rows))
    width = pad + ncols * (cell + pad)
    height = pad + len(rows) * (label_h + cell + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (label_h + cell + pad)
        for i, line in enumerate(textwrap.wrap(label, chars)[:label_lines]):
            draw.text((pad, y + i * line_h), line, fill=(20, 20, 20), font=font)
        y += label_h
        for c, img in enumerate(images):
            x = pad + c * (cell + pad)
            canvas.paste(_cell(img, cell), (x, y))
            if r == 0 and reference_images:
                draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=REF_OUTLINE, width=2)
    return canvas
