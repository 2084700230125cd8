"""Pictures people would rather look at than numbers: sample grids and the loss curve."""
from __future__ import annotations

import os
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB."""
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def _label(draw, xy, text, width_px, font):
    lines = textwrap.wrap(text, max(8, width_px // 6))[:3]
    for i, line in enumerate(lines):
        draw.text((xy[0], xy[1] + 11 * i), line, fill=(20, 20, 20), font=font)


def sample_grid(rows, cell: int = 128, pad: int = 6, label_h: int = 36) -> Image.Image:
    """rows: [(refs, generated, real_targets, prompts)]. One row per set:
    references | generated (prompt below each) || the real target images, for comparison."""
    font = ImageFont.load_default()
    ncols = max(len(r) + len(g) + len(t) for r, g, t, _ in rows) + 1  # +1: a gap column
    header = 18
    w = pad + ncols * (cell + pad)
    h = header + len(rows) * (cell + label_h + pad) + pad
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 3), "references  |  generated (prompt)  |  real images of those prompts", fill=(0, 0, 0), font=font)
    for r, (refs, gen, truth, prompts) in enumerate(rows):
        y = header + r * (cell + label_h + pad)
        col = 0
        for kind, images, labels in (("ref", refs, ["reference"] * len(refs)), ("gen", gen, prompts), ("gap", [], []),
                                     ("real", truth, ["real"] * len(truth))):
            if kind == "gap":
                col += 1
                continue
            for img, text in zip(images, labels):
                x = pad + col * (cell + pad)
                canvas.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST if img.width < cell else
                                                       Image.BICUBIC), (x, y))
                if kind == "ref":
                    draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=(30, 120, 220), width=2)
                _label(draw, (x, y + cell + 2), text, cell, font)
                col += 1
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
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
