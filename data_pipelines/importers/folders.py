"""`folders`: one folder per subject, e.g. your own product photos or DreamBench.

    SRC/<subject>/*.jpg|png|webp                 a subject per folder
    SRC/<class>/<instance>/[images/]*.jpg        nested one level (MVImgNet: class_label/instance_id/images/)

Captions, in order: a sidecar `<image stem>.txt` (or `<image name>.txt`), a `metadata.jsonl` /
`captions.jsonl` in SRC or a subject's folders (`file_name` relative to it, `text`: the diffusers ImageFolder
convention), else `--caption` with {subject} (the folder name, '_' as spaces) and {class}. Each subject's
images are shuffled (seeded by --seed and the subject's path, so reruns agree) and cut into sets of
--set-size; the last set is topped up from the start, so every image is in a set. A subject with fewer
images gives one smaller set (at least 2). The plan is a directory listing; images are read per set.
EXIF orientation (phone photos) is applied here, since training does not read it.
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.importers.core import Piece, Skip, SourceError, decode, guarded, make_set

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_FILES = ("metadata.jsonl", "captions.jsonl")


def _images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def subjects(root: Path) -> list[tuple[str, str, list[Path]]]:
    """[(subject path relative to SRC, class, images)], sorted by path."""
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if imgs := _images(d):
            found.append((d.name, d.name, imgs))
            continue
        for e in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            imgs = _images(e) or (_images(e / "images") if (e / "images").is_dir() else [])
            if imgs:
                found.append((f"{d.name}/{e.name}", d.name, imgs))
    return found


def plan_sets(images: list[Path], set_size: int, seed: int, key: str) -> list[list[Path]]:
    if len(images) < 2:
        return []
    # seeded by the subject's path, not its position: adding a subject does not reshuffle the others
    order = [images[i] for i in np.random.default_rng([seed, zlib.crc32(key.encode())]).permutation(len(images))]
    if len(order) <= set_size:
        return [order]
    sets = [order[k:k + set_size] for k in range(0, len(order), set_size)]
    sets[-1] = sets[-1] + order[:set_size - len(sets[-1])]  # top up: all sets the same size, all images used
    return sets


class Folders:
    name = "folders"

    def __init__(self, src: str, set_size: int = 4, caption: str | None = None, seed: int = 0):
        root = Path(src)
        if not root.is_dir():
            raise SourceError(f"SRC {src} {'is not a directory' if root.exists() else 'does not exist'}; give a "
                              "folder with one subfolder of images per subject")
        if set_size < 2:
            raise SourceError(f"--set-size {set_size} is too small: a set needs 2 images of one subject")
        if caption is not None:
            try:
                caption.format(subject="x", **{"class": "y"})
            except (KeyError, IndexError, ValueError) as e:
                raise SourceError(f"--caption {caption!r} has an unknown placeholder ({e}); use {{subject}} "
                                  "and {class} only") from None
        self.root, self.set_size, self.template, self.seed = root, set_size, caption, seed
        self.sets: list[tuple[str, str, list[Path]]] = []
        for rel, cls, imgs in subjects(root):  # a lone image stays a record: it is counted as too_few_images
            self.sets += [(rel, cls, s) for s in plan_sets(imgs, set_size, seed, rel) or [imgs]]
        if not any(len(s) >= 2 for _, _, s in self.sets):
            raise SourceError(f"SRC {src} has no subject folder with 2 or more images (.jpg .jpeg .png .webp); "
                              "lay it out as SRC/<subject>/*.jpg (or SRC/<class>/<instance>/*.jpg)")
        self.jsonl = self._jsonl_captions()
        dirs = {f.parent for _, _, files in self.sets for f in files}  # sidecars listed once, not stat'ed per image
        self.sidecars = {p for d in dirs for p in d.iterdir() if p.suffix == ".txt"}

    def _jsonl_captions(self) -> dict[Path, str]:
        """Captions of every metadata.jsonl / captions.jsonl under SRC (text only: a few bytes per image)."""
        caps = {}
        for f in sorted(p for name in CAPTION_FILES for p in self.root.rglob(name)):
            for n, line in enumerate(f.read_text().splitlines(), 1):
                try:
                    row = json.loads(line) if line.strip() else {}
                except json.JSONDecodeError:
                    raise SourceError(f"{f} line {n} is not JSON; fix or remove it") from None
                if isinstance(row, dict) and row.get("file_name") and isinstance(row.get("text"), str):
                    caps[(f.parent / row["file_name"]).resolve()] = row["text"]
        return caps

    def settings(self) -> dict[str, Any]:
        return {"src": str(self.root.resolve()), "set_size": self.set_size, "caption": self.template,
                "seed": self.seed}

    def pieces(self) -> list[Piece]:
        return [Piece(".", len(self.sets))]

    def read(self, piece: Piece, ranges: Sequence[tuple[int, int]], counts) -> Iterator:
        return guarded(((i, *self.sets[i]) for lo, hi in ranges for i in range(lo, hi)), self._build, counts)

    def caption(self, path: Path, subject: str, cls: str) -> str | None:
        for side in (path.with_suffix(".txt"), path.with_name(path.name + ".txt")):
            if side in self.sidecars:
                return side.read_text(errors="replace").strip()
        if (text := self.jsonl.get(path.resolve())) is not None:
            return text
        if self.template is not None:
            return self.template.format(subject=subject.replace("_", " "), **{"class": cls.replace("_", " ")})
        return None

    def _build(self, rec: tuple[int, str, str, list[Path]]):
        i, rel, cls, files = rec
        name = rel.rsplit("/", 1)[-1]
        if len(files) < 2:
            raise Skip("too_few_images", f"{rel} has {len(files)} image")
        imgs, caps = [], []
        for f in files:
            if not f.is_file():
                raise Skip("missing_file", f"{f} is gone")
            imgs.append(decode(f.read_bytes(), str(f), exif=True, full=False))
            caps.append(self.caption(f, name, cls))
            if caps[-1] is None:
                raise Skip("missing_caption", f"{f}: no sidecar .txt, no metadata.jsonl entry, no --caption")
        meta = {"source": self.name, "source_id": rel, "subject": name, "class": cls,
                "files": [str(f.relative_to(self.root)) for f in files]}
        return make_set(f"{self.name}-{i:07d}", imgs, caps, meta)
