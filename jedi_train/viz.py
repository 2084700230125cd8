"""Pictures people would rather look at than numbers: sample grids and the loss curve."""
from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from jedi_common.atomic import atomic_path


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB."""
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


REF_OUTLINE = (30, 120, 220)  # references are framed in blue in every grid


def _cell(img: Image.Image, cell: int) -> Image.Image:
    img = img.convert("RGB")  # small model outputs are upscaled with NEAREST so that pixels stay pixels
    return img.resize((cell, cell), Image.NEAREST if img.width < cell else Image.BICUBIC)


def _label(draw, xy, text, width_px, font, max_lines: int = 3):
    for i, line in enumerate(textwrap.wrap(text, max(8, width_px // 6))[:max_lines]):
        draw.text((xy[0], xy[1] + 11 * i), line, fill=(20, 20, 20), font=font)


def _paste(canvas, draw, img, x, y, cell, is_ref):
    canvas.paste(_cell(img, cell), (x, y))
    if is_ref:
        draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=REF_OUTLINE, width=2)


def sample_grid(rows, cell: int = 128, pad: int = 6, label_h: int = 36, note: str = "") -> Image.Image:
    """rows: [(refs, generated, real_targets, prompts)]. One row per set, in aligned column blocks:
    references | generated (prompt below each) || the real images of those prompts, for comparison.
    `note` goes after the header line (a figure measured on the grid)."""
    font = ImageFont.load_default()
    n_ref = max(len(r) for r, _, _, _ in rows)
    n_gen = max(len(g) for _, g, _, _ in rows)
    n_real = max(len(t) for _, _, t, _ in rows)
    header = 18 + (13 if note else 0)
    w = pad + (n_ref + n_gen + 1 + n_real) * (cell + pad)  # +1: a gap column before the real images
    h = header + len(rows) * (cell + label_h + pad) + pad
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 3), "references  |  generated (prompt)  |  real images of those prompts", fill=(0, 0, 0), font=font)
    if note:
        draw.text((pad, 16), note, fill=(0, 0, 0), font=font)
    for r, (refs, gen, truth, prompts) in enumerate(rows):
        y = header + r * (cell + label_h + pad)
        blocks = ((0, refs, ["reference"] * len(refs)), (n_ref, gen, prompts),
                  (n_ref + n_gen + 1, truth, ["real"] * len(truth)))
        for first_col, images, labels in blocks:
            for c, (img, text) in enumerate(zip(images, labels)):
                x = pad + (first_col + c) * (cell + pad)
                _paste(canvas, draw, img, x, y, cell, is_ref=first_col == 0)
                _label(draw, (x, y + cell + 2), text, cell, font)
    return canvas


def make_grid(reference_images, generated, prompts, cell: int = 128, pad: int = 6,
              label_lines: int = 2) -> Image.Image:
    """jedi-sample's picture: references (first row) + generated images, one row per prompt, the prompt
    written above its row. `generated` is prompt-major (diffusers' order), a multiple of len(prompts)."""
    if not prompts:
        raise ValueError("make_grid needs at least one prompt")
    if len(generated) % len(prompts):
        raise ValueError(f"{len(generated)} generated images do not split into rows for {len(prompts)} prompts")
    per_row = len(generated) // len(prompts)
    font = ImageFont.load_default()
    label_h = 11 * label_lines + 4
    rows = [("references", list(reference_images))] if reference_images else []
    rows += [(p, list(generated[i * per_row:(i + 1) * per_row])) for i, p in enumerate(prompts)]
    ncols = max(1, max(len(images) for _, images in rows))
    width = pad + ncols * (cell + pad)
    canvas = Image.new("RGB", (width, pad + len(rows) * (label_h + cell + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (label_h + cell + pad)
        _label(draw, (pad, y), label, width - 2 * pad, font, label_lines)
        for c, img in enumerate(images):
            _paste(canvas, draw, img, pad + c * (cell + pad), y + label_h, cell, is_ref=r == 0 and bool(reference_images))
    return canvas


def plot_loss_curve(history, path: str, smooth: int = 25) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([s for s, _ in history])
    loss = np.array([v for _, v in history])
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(steps, loss, color="#bbb", lw=0.8, label="per step")
    if len(loss) >= smooth:
        k = np.ones(smooth) / smooth
        ax.plot(steps[smooth - 1:], np.convolve(loss, k, mode="valid"), color="#1f77b4", lw=2,
                label=f"mean of {smooth}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (targets only)")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path
