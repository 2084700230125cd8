"""What every importer shares: the unit plan, resumable writing, bad-row skips and image packing.

An importer turns SRC into PIECES (a parquet file, a label file, a metadata file, the folder tree), each an
ordered list of `count` records, one record = one candidate set. Unit k = up to `sets_per_shard`
consecutive records of one piece, shard `<prefix>-<k:06d>.tar`; units never span pieces, so a reader goes
through a piece once for all of one worker's units in it (a tar.gz cannot seek). The plan depends on SRC
and the settings alone, so any split across processes writes the same bytes as one run. Writing, resume
(complete shards are skipped, a shard appears only when whole) and the manifest are jedi-synth's
(synth/writer.py ShardOutput); every record gives exactly one SetResult: a set, or a reject reason.
"""
from __future__ import annotations

import io
import itertools
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image, ImageOps

from data_pipelines.schema import encode_set
from data_pipelines.skips import Counts
from data_pipelines.synth.writer import SetResult, ShardOutput, Unit, worker_units

STATE_DIR = ".jedi-data-import"
TOOL = "jedi-data import"


class SourceError(ValueError):
    """SRC (or an option) is unusable: the CLI prints it as one line and exits 2."""


class Skip(Exception):
    """A bad record: `reason` is the manifest's counter key, `detail` says which row and why (logged)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Piece:
    name: str   # where the records come from, relative to SRC
    count: int  # records in it


class Importer(Protocol):
    name: str

    def pieces(self) -> list[Piece]: ...

    def read(self, piece: Piece, ranges: Sequence[tuple[int, int]], counts: Counts) -> Iterator[SetResult]:
        """One SetResult per record of each [lo, hi) range of the piece, in order."""

    def settings(self) -> dict[str, Any]:
        """Everything the written sets depend on (the resume guard's fingerprint)."""


def plan(pieces: Sequence[Piece], sets_per_shard: int, limit: int | None = None) -> list[tuple[Unit, int, int, int]]:
    """[(unit, piece index, lo, hi)]: unit.start/stop are global record numbers (what resume compares)."""
    out, offset, left = [], 0, limit if limit is not None else float("inf")
    for p_idx, piece in enumerate(pieces):
        n = int(min(piece.count, left))
        for lo in range(0, n, sets_per_shard):
            hi = min(lo + sets_per_shard, n)
            out.append((Unit(len(out), offset + lo, offset + hi), p_idx, lo, hi))
        offset, left = offset + piece.count, left - n
        if left <= 0:
            break
    return out


def run(importer: Importer, out_dir: str, sets_per_shard: int = 500,
        num_workers: int = 1, worker: int = 0, limit: int | None = None, prefix: str = "sets",
        progress: bool = False) -> dict[str, Any]:
    """Write this worker's share of the import; returns the summary (the manifest is rewritten too)."""
    from tqdm import tqdm

    pieces = importer.pieces()
    planned = plan(pieces, sets_per_shard, limit)
    if not planned:
        raise SourceError(f"{importer.name}: SRC holds no records to import; check SRC")
    out = ShardOutput(out_dir, prefix)
    out.state, out.tool = out.dir / STATE_DIR, TOOL
    out.prepare({"format": importer.name, "sets_per_shard": sets_per_shard, "prefix": prefix,
                 **importer.settings()})  # refuses an OUT_DIR imported with other settings
    units = [u for u, *_ in planned]
    mine = {u.index for u in worker_units(units, num_workers, worker)}
    todo = [(u, p, lo, hi) for u, p, lo, hi in planned if u.index in mine and not out.is_complete(u)]
    counts, t0 = Counts(log_every_s=float("inf"), where=f"{TOOL} {importer.name}: "), time.perf_counter()
    written: dict[str, Any] = {"sets": 0, "images": 0, "skipped": Counter()}
    with tqdm(total=sum(u.stop - u.start for u, *_ in todo), unit="row", disable=not progress,
              desc=f"{TOOL} {importer.name} {worker}/{num_workers}", dynamic_ncols=True) as bar:
        for p_idx, group in itertools.groupby(todo, key=lambda t: t[1]):
            group = list(group)
            results = importer.read(pieces[p_idx], [(lo, hi) for _, _, lo, hi in group], counts)
            for unit, _, lo, hi in group:
                stats = out.write_unit(unit, _ticking(itertools.islice(results, hi - lo), bar))
                if stats["sets"] + sum(stats["rejects"].values()) != hi - lo:
                    raise RuntimeError(f"{importer.name} reader gave the wrong number of results for {unit}")
                written["sets"] += stats["sets"]
                written["images"] += stats["images"]
                written["skipped"].update(stats["rejects"])
            results.close()
    manifest = out.write_manifest(units, {"format": importer.name, "sets_per_shard": sets_per_shard,
                                          "prefix": prefix, "limit": limit, **importer.settings()})
    return {"format": importer.name, "out_dir": str(out.dir), "worker": f"{worker}/{num_workers}",
            "written": len(todo), "skipped_complete": len(mine) - len(todo), "sets": written["sets"],
            "images": written["images"],
            "skipped": dict(sorted(written.pop("skipped").items())), "seconds": round(time.perf_counter() - t0, 2),
            "manifest_sets": manifest["sets"], "manifest_rejects": manifest["rejects"],
            "complete": manifest["complete"]}


def _ticking(results, bar):
    for r in results:
        bar.update(1)
        yield r


def guarded(records: Iterator[Any], build, counts: Counts) -> Iterator[SetResult]:
    """build(record) -> SetResult for each record; a Skip becomes a counted reject, never an error."""
    for rec in records:
        try:
            yield build(rec)
        except Skip as e:
            counts.skip(e.reason, e.detail)
            yield SetResult(None, reject=e.reason)


# -- images -----------------------------------------------------------------------------------------
@dataclass
class Img:
    """One checked source image: its file bytes (passed through when possible) and its pixels."""
    data: bytes | None
    image: Image.Image  # at `size`, unless `full` is False (a JPEG checked at 1/8 scale)
    fmt: str            # PIL format: JPEG, PNG, WEBP, ...
    size: tuple[int, int]
    full: bool = True

    def pixels(self) -> Image.Image:
        return self.image if self.full else Image.open(io.BytesIO(self.data))


def decode(data: bytes, where: str, exif: bool = False, full: bool = True) -> Img:
    """Decode it all (a truncated file fails here, not in training). full=False: a JPEG that may pass through
    is decoded at 1/8 scale (DCT scaling still reads every coefficient, so a truncated or corrupt file fails
    the same; only the inverse DCT is cheaper). exif: apply the EXIF orientation (phone photos), which the
    training stream does not; the rotated image is then re-encoded."""
    try:
        img = Image.open(io.BytesIO(data))
        size, fmt = img.size, img.format or "?"
        rotate = exif and img.getexif().get(0x0112, 1) != 1
        full = full or rotate or fmt != "JPEG"
        if not full:
            img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        img.load()
    except Exception as e:  # noqa: BLE001 - any undecodable image is a skipped row
        raise Skip("undecodable_image", f"{where}: {e.__class__.__name__}: {e}") from None
    if rotate:
        img, data = ImageOps.exif_transpose(img), None
        size = img.size
    return Img(data, img, fmt, size, full)


def pack(images: Sequence[Img]) -> tuple[str, list[Image.Image | bytes]]:
    """(image_ext, what encode_set writes): files already JPEG / PNG pass through unchanged (no second
    lossy encoding, and fast); others (crops, WEBP, rotated photos) are encoded: PNG if every source was
    PNG (lossless stays lossless), else JPEG."""
    ext = "png" if all(i.fmt == "PNG" for i in images) else "jpg"
    want = "PNG" if ext == "png" else "JPEG"
    return ext, [i.data if i.data is not None and i.fmt == want else i.pixels() for i in images]


def make_set(set_id: str, images: Sequence[Img], captions: Sequence[Any], meta: dict[str, Any],
             masks=None) -> SetResult:
    caps = []
    for i, c in enumerate(captions):
        if not isinstance(c, str) or not c.strip():
            raise Skip("missing_caption", f"{set_id}: image {i} has no caption")
        caps.append(" ".join(c.split()))
    ext, encoded = pack(images)
    return SetResult(encode_set(set_id, encoded, caps, meta, ext=ext, masks=masks), num_images=len(images))


def slug(text: str) -> str:
    """A set-id part: '.' splits WebDataset keys, so only [A-Za-z0-9_-] are kept."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def natural_key(text: str) -> list[Any]:
    """split2 before split10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]
