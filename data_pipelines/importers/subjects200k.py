"""`subjects200k`: Yuanshi/Subjects200K (and Subjects200K_collection3) as downloaded from the Hub.

SRC holds parquet files (data/train-*.parquet); one row = one set of two views of one subject, side by side
with padding p: left (p, p, s+p, s+p), right (s+2p, p, 2s+2p, s+p) (OminiControl src/train/data.py), so
W = 2s + 3p and H = s + 2p give s and p. Columns: `image` (the datasets Image feature {bytes, path}),
`collection`, `quality_assessment` {compositeStructure, objectConsistency, imageQuality} and `description`
{item, description_0, description_1, category, description_valid}. Default filter as OminiControl trains:
all three scores >= 5 and description_valid. Read by row group in small batches: memory stays flat.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from data_pipelines.importers.core import Img, Piece, Skip, SourceError, decode, guarded, make_set, slug

SCORES = ("compositeStructure", "objectConsistency", "imageQuality")
COLUMNS = ("image", "quality_assessment", "description")
BATCH = 16  # rows decoded at a time


def views(w: int, h: int, view_size: int | None) -> tuple[int, int]:
    """(s, p) from the image size, or Skip("bad_geometry")."""
    p = 2 * h - w
    s = h - 2 * p
    if p < 0 or s < 8 or p > s // 4 or (view_size and s != view_size):
        want = f"{view_size} px views" if view_size else "two square views side by side (W = 2s + 3p, H = s + 2p)"
        raise Skip("bad_geometry", f"{w}x{h} is not {want}")
    return s, p


class Subjects200K:
    name = "subjects200k"

    def __init__(self, src: str, min_quality: float | None = None, keep_invalid: bool = False,
                 view_size: int | None = None):
        import pyarrow.parquet as pq

        root = Path(src)
        if not root.exists():
            raise SourceError(f"SRC {src} does not exist; give the Subjects200K download (the folder with data/)")
        self.root = root if root.is_dir() else root.parent
        self.files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
        if not self.files:
            raise SourceError(f"SRC {src} holds no .parquet file; give the Subjects200K download "
                              "(data/train-*.parquet, e.g. `huggingface-cli download Yuanshi/Subjects200K "
                              "--repo-type dataset --local-dir DIR`)")
        self._counts = {}
        for f in self.files:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # noqa: BLE001 - not a parquet file at all
                raise SourceError(f"{f} is not a readable parquet file ({e}); re-download it") from None
            missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise SourceError(f"{f} has no column(s) {missing}: not Subjects200K (columns: "
                                  f"{pf.schema_arrow.names}); use format folders or another format")
            self._counts[f] = pf.metadata.num_rows
        self.min_quality = 5.0 if min_quality is None else float(min_quality)
        self.keep_invalid, self.view_size = keep_invalid, view_size

    def settings(self) -> dict[str, Any]:
        return {"src": str(self.root.resolve()), "min_quality": self.min_quality,
                "keep_invalid_descriptions": self.keep_invalid, "view_size": self.view_size}

    def pieces(self) -> list[Piece]:
        return [Piece(str(f.relative_to(self.root)), self._counts[f]) for f in self.files]

    def read(self, piece: Piece, ranges: Sequence[tuple[int, int]], counts) -> Iterator:
        return guarded(self._rows(piece, ranges), self._build, counts)

    def _rows(self, piece: Piece, ranges) -> Iterator[tuple[str, int, dict]]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.root / piece.name)
        cols = [c for c in (*COLUMNS, "collection") if c in pf.schema_arrow.names]
        starts = [0]
        for g in range(pf.metadata.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        for lo, hi in ranges:
            groups = [g for g in range(len(starts) - 1) if starts[g] < hi and starts[g + 1] > lo]
            row = starts[groups[0]] if groups else lo
            for batch in pf.iter_batches(batch_size=BATCH, row_groups=groups, columns=cols):
                for rec in batch.to_pylist():
                    if lo <= row < hi:
                        yield piece.name, row, rec
                    row += 1
                if row >= hi:
                    break

    def _image_bytes(self, cell: Any, where: str) -> bytes:
        if isinstance(cell, dict) and cell.get("bytes"):
            return cell["bytes"]
        path = cell.get("path") if isinstance(cell, dict) else None
        if path and (self.root / path).is_file():  # the Image feature may keep a path instead of bytes
            return (self.root / path).read_bytes()
        raise Skip("missing_file", f"{where}: no image bytes{f' and {path} not found' if path else ''}")

    def _build(self, rec: tuple[str, int, dict]):
        file, row, r = rec
        where = f"{file} row {row}"
        qa, desc = r.get("quality_assessment") or {}, r.get("description") or {}
        for key in SCORES:
            score = qa.get(key)
            if not isinstance(score, (int, float)) or score < self.min_quality:
                raise Skip(f"low_{key}", f"{where}: {key}={score!r} < {self.min_quality}")
        if not desc.get("description_valid") and not self.keep_invalid:
            raise Skip("invalid_description", f"{where}: description_valid is false")
        src = decode(self._image_bytes(r.get("image"), where), where)
        s, p = views(*src.size, self.view_size)
        halves = [Img(None, src.image.crop(box), src.fmt, (s, s)) for box in ((p, p, s + p, s + p),
                                                                     (s + 2 * p, p, 2 * s + 2 * p, s + p))]
        meta = {"source": self.name, "source_id": f"{file}:{row}", "subject": desc.get("item"),
                "class": desc.get("category"), "collection": r.get("collection"),
                "quality_assessment": {k: qa.get(k) for k in SCORES}, "view_size": s, "padding": p}
        set_id = f"{self.name}-{slug(str(Path(file).with_suffix('')))}-{row:07d}"
        return make_set(set_id, halves, [desc.get("description_0"), desc.get("description_1")], meta)
