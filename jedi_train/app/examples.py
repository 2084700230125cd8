"""Example subjects the page offers without uploads: procedural renders (always; the demo model was trained
on such subjects) and a few DreamBench photos when ../shared/dreambench sits beside the repository."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

DREAMBENCH = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "dreambench")
DREAMBENCH_SUBJECTS = (("can", "can"), ("dog2", "dog"))
PROCEDURAL = (("mug", 3), ("robot toy", 5), ("vase", 11))  # (family, seed)
SCENES = ("on the beach", "in the snow")
PHOTOS_PER_SUBJECT = 3


@dataclass(frozen=True)
class Example:
    name: str
    files: tuple[str, ...]
    prompts: str  # one per line


def _procedural(out_dir: str, family: str, seed: int) -> Example:
    from data_pipelines.synth.procedural import render_subject, sample_subject

    subject = sample_subject(np.random.default_rng(seed), family)
    files = []
    for i, scene in enumerate(("on a wooden floor", "in a kitchen", "on the grass")[:PHOTOS_PER_SUBJECT]):
        path = os.path.join(out_dir, f"{family.replace(' ', '_')}-{seed}-{i}.png")
        Image.fromarray(render_subject(subject, scene, seed=seed * 10 + i, resolution=128, layout="centered")).save(path)
        files.append(path)
    prompts = "\n".join(f"a photo of a {family} {s}" for s in SCENES)
    return Example(f"procedural {family} (seed {seed})", tuple(files), prompts)


def build_examples(out_dir: str, dreambench: str = DREAMBENCH) -> dict[str, Example]:
    """name -> Example; procedural renders are written into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    examples = [_procedural(out_dir, family, seed) for family, seed in PROCEDURAL]
    for folder, noun in DREAMBENCH_SUBJECTS:
        path = os.path.join(dreambench, folder)
        if not os.path.isdir(path):
            continue
        photos = sorted(f for f in os.listdir(path) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        if photos:
            files = tuple(os.path.abspath(os.path.join(path, f)) for f in photos[:PHOTOS_PER_SUBJECT])
            examples.append(Example(f"DreamBench {folder}", files, "\n".join(f"a photo of a {noun} {s}" for s in SCENES)))
    return {e.name: e for e in examples}
