"""`syncd`: nupurkmr9/syncd after its unzip.sh.

Directories (SRC itself or its subfolders, e.g. rigid/ and deformable/) with `*metadata.json` or
`*metadata_with_scores.json` (preferred where present: the same records plus scores). Each record is one
set: `filenames` (relative to the metadata's folder), `prompts`, optional `dino_scores` (N x N) and
`aesthetics_scores` ({image stem: score}). Subject masks at <image folder>/masks/<stem>.jpg (SynCD
method/data/data.py) go into the shards as the project's masks (255 = subject, the image's size).
Optional filters, as SynCD's loader applies them: an image stays if its aesthetics score >= --min-quality
and it is in a pair with --min-dino <= DINO <= 0.98 (higher: near duplicates); a set needs 2 images left.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines.importers.core import Piece, Skip, SourceError, decode, guarded, make_set, slug

DUPLICATE_DINO = 0.98  # SynCD's upper bound: pairs above it are the same picture twice


def metadata_files(root: Path) -> list[Path]:
    found = []
    for d in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        scored = sorted(d.glob("*metadata_with_scores.json"))
        found += scored or sorted(d.glob("*metadata.json"))
    return found


class SynCD:
    name = "syncd"

    def __init__(self, src: str, min_quality: float | None = None, min_dino: float | None = None):
        root = Path(src)
        if not root.is_dir():
            raise SourceError(f"SRC {src} {'is not a directory' if root.exists() else 'does not exist'}; give the "
                              "SynCD folder after its unzip.sh (folders with *metadata.json and masks/)")
        self.root, self.files = root, metadata_files(root)
        if not self.files:
            raise SourceError(f"SRC {src} has no *metadata.json (in it or its subfolders); give the SynCD folder "
                              "after running its unzip.sh")
        self.min_aesthetics, self.min_dino = min_quality, min_dino
        self._cache: tuple[Path, list] | None = None

    def settings(self) -> dict[str, Any]:
        return {"src": str(self.root.resolve()), "min_quality": self.min_aesthetics, "min_dino": self.min_dino}

    def _records(self, path: Path) -> list:
        if self._cache is None or self._cache[0] != path:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise SourceError(f"{path} is not readable JSON ({e}); re-run SynCD's unzip.sh") from None
            if not isinstance(data, list):
                raise SourceError(f"{path} is not a list of records; give SynCD's metadata files")
            self._cache = (path, data)
        return self._cache[1]

    def pieces(self) -> list[Piece]:
        return [Piece(str(f.relative_to(self.root)), len(self._records(f))) for f in self.files]

    def read(self, piece: Piece, ranges: Sequence[tuple[int, int]], counts) -> Iterator:
        path = self.root / piece.name
        records = self._records(path)
        rows = ((path, i, records[i]) for lo, hi in ranges for i in range(lo, hi))
        return guarded(rows, self._build, counts)

    def _keep(self, r: dict, n: int, where: str) -> list[int]:
        """Indices that pass the score filters (all of them without filters)."""
        keep = list(range(n))
        if self.min_aesthetics is not None:
            scores = r.get("aesthetics_scores")
            if not isinstance(scores, dict):
                raise Skip("no_scores", f"{where}: no aesthetics_scores (use *metadata_with_scores.json)")
            keep = [i for i in keep if (scores.get(Path(r["filenames"][i]).stem) or 0) >= self.min_aesthetics]
            if len(keep) < 2:
                raise Skip("low_aesthetics", f"{where}: {len(keep)} image(s) >= {self.min_aesthetics}")
        if self.min_dino is not None:
            try:
                dino = np.asarray(r["dino_scores"], dtype=float).reshape(n, n)
            except (KeyError, TypeError, ValueError):
                raise Skip("no_scores", f"{where}: no {n}x{n} dino_scores (use *metadata_with_scores.json)") from None
            ok = (dino >= self.min_dino) & (dino <= DUPLICATE_DINO)
            np.fill_diagonal(ok, False)
            rows, cols = np.nonzero(ok)  # as SynCD: in a good pair with any image of the record
            paired = set(rows.tolist()) | set(cols.tolist())
            keep = [k for k in keep if k in paired]
            if len(keep) < 2:
                raise Skip("low_dino", f"{where}: {len(keep)} image(s) in a pair with DINO >= {self.min_dino}")
        return keep

    def _build(self, rec: tuple[Path, int, Any]):
        path, i, r = rec
        where = f"{path.relative_to(self.root)} record {i}"
        files, prompts = (r.get("filenames"), r.get("prompts")) if isinstance(r, dict) else (None, None)
        if not isinstance(files, list) or len(files) < 2:
            raise Skip("bad_record", f"{where}: fewer than 2 filenames")
        if not isinstance(prompts, list) or len(prompts) != len(files):
            raise Skip("missing_caption", f"{where}: {len(files)} filenames but prompts {prompts!r:.80}")
        keep = self._keep(r, len(files), where)
        imgs, masks = [], []
        for k in keep:
            f = path.parent / files[k]
            mask_path = f.parent / "masks" / f"{Path(files[k]).stem}.jpg"
            if not f.is_file():
                raise Skip("missing_file", f"{where}: {f} not found")
            if not mask_path.is_file():
                raise Skip("missing_mask", f"{where}: {mask_path} not found")
            img = decode(f.read_bytes(), str(f), full=False)
            m = decode(mask_path.read_bytes(), str(mask_path)).image.convert("L")
            # binarised like SynCD's loader, at the image's size; > 127, not > 0: JPEG ringing is not subject
            m = np.asarray(m.resize(img.size, Image.NEAREST) if m.size != img.size else m) > 127
            imgs.append(img)
            masks.append(m.astype(np.uint8) * 255)
        meta = {"source": self.name, "source_id": f"{path.relative_to(self.root)}:{i}",
                "filenames": [files[k] for k in keep]}
        if isinstance(r.get("aesthetics_scores"), dict):
            meta["aesthetics_scores"] = [r["aesthetics_scores"].get(Path(files[k]).stem) for k in keep]
        if r.get("dino_scores") is not None:
            try:
                meta["dino_scores"] = np.asarray(r["dino_scores"], dtype=float)[np.ix_(keep, keep)].round(4).tolist()
            except (TypeError, ValueError, IndexError):
                pass  # a malformed score matrix is not worth dropping a set the filters did not need it for
        set_id = f"{self.name}-{slug(str(Path(path.relative_to(self.root)).with_suffix('')))}-{i:07d}"
        return make_set(set_id, imgs, [prompts[k] for k in keep], meta, masks=masks)
