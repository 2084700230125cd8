"""`uno1m`: bytedance-research/UNO-1M as downloaded from the Hub.

SRC/images/split{N}.tar.gz (members split{N}/<name>_{W}x{H}.png, variable aspect) and SRC/labels/split{N}.json
(a list of records: img_path1, img_path2, caption {img_path1, img_path2, judgment, subject},
vlm_filter_cot {score_part, score_final}). A set = a record's two images with their captions; default
filter score_final >= 4.0 (the paper's). Images are read straight from the tar.gz in one streaming pass per
piece (no extraction); an already extracted images/split{N}/ folder works too. Sets come out in label
order: an image that arrives before its partner waits in memory, so memory stays at about one unit when
the archive follows the labels' order (as released), and at most the worker's share of one split.
"""
from __future__ import annotations

import json
import re
import tarfile
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from data_pipelines.importers.core import Piece, Skip, SourceError, decode, make_set, natural_key, slug
from data_pipelines.synth.writer import SetResult

SIZE_IN_NAME = re.compile(r"_(\d+)x(\d+)\.\w+$")


def load_labels(path: Path) -> list[dict]:
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:  # JSON lines
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise SourceError(f"{path} is neither JSON nor JSON lines ({e.msg}, line {e.lineno}); "
                              "re-download it") from None
    if not isinstance(data, list):
        raise SourceError(f"{path} is not a list of records; give UNO-1M's labels/split{{N}}.json")
    return data


class UNO1M:
    name = "uno1m"

    def __init__(self, src: str, min_quality: float | None = None):
        root = Path(src)
        if not root.is_dir():
            raise SourceError(f"SRC {src} {'is not a directory' if root.exists() else 'does not exist'}; give the "
                              "UNO-1M download (the folder with images/ and labels/)")
        labels = sorted((root / "labels").glob("*.json"), key=lambda p: natural_key(p.name))
        if not labels:
            raise SourceError(f"SRC {src} has no labels/*.json; give the UNO-1M download (images/split{{N}}.tar.gz "
                              "and labels/split{N}.json)")
        self.root, self.labels = root, labels
        for lab in labels:
            if self._images(lab) is None:
                raise SourceError(f"{lab} has no images/{lab.stem}.tar.gz (nor an extracted images/{lab.stem}/); "
                                  "download it, or move the labels file away to import the others")
        self.min_score = 4.0 if min_quality is None else float(min_quality)
        self._cache: tuple[Path, list] | None = None

    def _images(self, label: Path) -> Path | None:
        for p in (self.root / "images" / f"{label.stem}.tar.gz", self.root / "images" / label.stem):
            if p.exists():
                return p
        return None

    def _records(self, label: Path) -> list[dict]:
        if self._cache is None or self._cache[0] != label:  # pieces() then read(): parse each file once
            self._cache = (label, load_labels(label))
        return self._cache[1]

    def settings(self) -> dict[str, Any]:
        return {"src": str(self.root.resolve()), "min_quality": self.min_score}

    def pieces(self) -> list[Piece]:
        return [Piece(str(lab.relative_to(self.root)), len(self._records(lab))) for lab in self.labels]

    def _check(self, r: Any, where: str) -> tuple[str, str]:
        """The record's two image names, or Skip: everything that needs no pixels is checked first."""
        if not isinstance(r, dict):
            raise Skip("bad_record", f"{where}: not an object")
        try:
            score = float((r.get("vlm_filter_cot") or {}).get("score_final"))
        except (TypeError, ValueError):
            raise Skip("no_score", f"{where}: no vlm_filter_cot.score_final") from None
        if score < self.min_score:
            raise Skip("low_score_final", f"{where}: score_final {score} < {self.min_score}")
        cap = r.get("caption") if isinstance(r.get("caption"), dict) else {}
        for key in ("img_path1", "img_path2"):
            if not isinstance(r.get(key), str) or not r[key]:
                raise Skip("missing_file", f"{where}: no {key}")
            if not isinstance(cap.get(key), str) or not cap[key].strip():
                raise Skip("missing_caption", f"{where}: no caption.{key}")
        return Path(r["img_path1"]).name, Path(r["img_path2"]).name

    def _members(self, images: Path, wanted: dict) -> Iterator[tuple[str, bytes]]:
        if images.is_dir():
            for name in list(wanted):
                if (images / name).is_file():
                    yield name, (images / name).read_bytes()
            return
        with tarfile.open(images, mode="r|gz") as tf:  # streaming: no seeks, no index
            for m in tf:
                name = Path(m.name).name
                if m.isfile() and name in wanted:
                    yield name, tf.extractfile(m).read()

    def read(self, piece: Piece, ranges: Sequence[tuple[int, int]], counts) -> Iterator[SetResult]:
        label = self.root / piece.name
        records, images = self._records(label), self._images(label)
        order = [i for lo, hi in ranges for i in range(lo, hi)]
        early: dict[int, SetResult] = {}   # position -> reject known before any pixel
        names: dict[int, tuple[str, str]] = {}
        wanted: dict[str, int] = defaultdict(int)  # image name -> records still waiting for it
        for pos, i in enumerate(order):
            try:
                names[pos] = self._check(records[i], f"{piece.name} record {i}")
                for n in set(names[pos]):
                    wanted[n] += 1
            except Skip as e:
                counts.skip(e.reason, e.detail)
                early[pos] = SetResult(None, reject=e.reason)
        got: dict[str, bytes] = {}
        nxt = 0

        def ready(final: bool) -> Iterator[SetResult]:
            nonlocal nxt
            while nxt < len(order):
                if nxt in early:
                    yield early.pop(nxt)
                else:
                    pair = names.pop(nxt) if final or all(n in got for n in names[nxt]) else None
                    if pair is None:
                        return
                    yield self._build(piece, order[nxt], records[order[nxt]], pair, got, counts)
                    for n in set(pair):
                        wanted[n] -= 1
                        if wanted[n] == 0:
                            del wanted[n]
                            got.pop(n, None)
                nxt += 1

        self._missing = "missing_file"
        try:
            for name, data in self._members(images, wanted):
                if name not in got:
                    got[name] = data
                    yield from ready(False)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            # a truncated download: what was not read yet counts as unreadable, the rest still imports
            self._missing = "unreadable_archive"
            counts.skip("unreadable_archive", f"{images.name}: {e.__class__.__name__}: {e}")
        yield from ready(True)

    def _build(self, piece: Piece, i: int, r: dict, pair: tuple[str, str], got: dict, counts) -> SetResult:
        where = f"{piece.name} record {i}"
        try:
            imgs = []
            for name in pair:
                if name not in got:
                    raise Skip(self._missing, f"{where}: {name} is not in {self._images(self.root / piece.name).name}")
                img = decode(got[name], f"{where} {name}", full=False)
                m = SIZE_IN_NAME.search(name)
                if m and (int(m[1]), int(m[2])) != img.size:
                    raise Skip("bad_geometry", f"{where}: {name} is {img.size[0]}x{img.size[1]}")
                imgs.append(img)
            cap, cot = r["caption"], r.get("vlm_filter_cot") or {}
            meta = {"source": self.name, "source_id": f"{piece.name}:{i}", "subject": cap.get("subject"),
                    "judgment": cap.get("judgment"), "paths": [r["img_path1"], r["img_path2"]],
                    "scores": {"score_final": cot.get("score_final"), "score_part": cot.get("score_part")}}
            set_id = f"{self.name}-{slug(Path(piece.name).stem)}-{i:07d}"
            return make_set(set_id, imgs, [cap["img_path1"], cap["img_path2"]], meta)
        except Skip as e:
            counts.skip(e.reason, e.detail)
            return SetResult(None, reject=e.reason)
