"""Shard units: the resumable, parallel unit of work of jedi-synth, and the per-directory manifest.

The run's sets 0..num_sets-1 are cut into units of `sets_per_shard` consecutive sets; unit k is the
shard `<prefix>-<k:06d>.tar`. Set i is generated from (seed, i) alone, so a unit's content does not
depend on which process builds it. Worker w of N takes units w, w+N, w+2N, ... (no overlap, no
coordination needed: many processes or a SLURM array can share one out_dir).

A unit is COMPLETE once its tar exists under the final name: it is written to a hidden
`.<prefix>-<k>.tar.partial` with webdataset.ShardWriter, fsynced, its stats are saved, and only then
renamed (os.replace is atomic). A crash leaves at most a .partial file, which the rerun redoes.
Bookkeeping lives in `<out_dir>/.jedi-synth/`: config.json (what the sets were built with; a rerun
with a different config is refused instead of mixing) and units/<shard>.json (sets, images, rejects).
manifest.json is rebuilt from those after every run, atomically, and only rewritten if it changed.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from data_pipelines.schema import SCHEMA_VERSION
from jedi_common.atomic import atomic_write_text

STATE_DIR = ".jedi-synth"


class SynthError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""


def require_dir(key: str, path: str | None, what: str) -> None:
    """A model directory option must be given and exist (checked before anything is written)."""
    if not path:
        raise SynthError(f"{key} is required; give {key}=<{what}>")
    if not Path(path).is_dir():
        raise SynthError(f"{key}={path} does not exist; set {key} to a {what}")


@dataclass(frozen=True)
class Unit:
    index: int
    start: int  # first set index
    stop: int   # one past the last


def plan_units(num_sets: int, sets_per_shard: int) -> list[Unit]:
    return [Unit(k, s, min(s + sets_per_shard, num_sets))
            for k, s in enumerate(range(0, num_sets, sets_per_shard))]


def worker_units(units: list[Unit], num_workers_total: int, worker_index: int) -> list[Unit]:
    """This worker's slice: round robin, so every worker gets a similar share of a short run too."""
    if num_workers_total < 1:
        raise SynthError(f"num_workers_total={num_workers_total} must be >= 1")
    if not 0 <= worker_index < num_workers_total:
        raise SynthError(f"worker_index={worker_index} is outside 0..{num_workers_total - 1}; "
                         f"give worker_index in [0, num_workers_total)")
    return units[worker_index::num_workers_total]


def shard_slice(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """(N, I) of a --num-shards / --shard-index CLI (jedi-data import, jedi-data encode), else the SLURM array,
    else (1, 0)."""
    n = num_shards if num_shards is not None else int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
    i = shard_index if shard_index is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    if n < 1 or not 0 <= i < n:
        raise SynthError(f"--shard-index {i} is outside 0..{n - 1} (--num-shards {n}); give 0 <= I < N")
    return n, i


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


@dataclass
class SetResult:
    """What the pipeline hands the writer for one set: an encoded sample, or why it was dropped."""
    sample: dict[str, Any] | None
    num_images: int = 0
    reject: str | None = None


class ShardOutput:
    """One output directory: shard paths, completeness, unit writing, config guard, manifest."""

    tool = "jedi-synth"  # the manifest's "tool" (jedi-data import reuses this writer)

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "sets"):
        self.dir = Path(out_dir)
        self.prefix = prefix
        self.state = self.dir / STATE_DIR

    def name(self, unit: Unit) -> str:
        return f"{self.prefix}-{unit.index:06d}.tar"

    def shard_path(self, unit: Unit) -> Path:
        return self.dir / self.name(unit)

    def partial_path(self, unit: Unit) -> Path:
        return self.dir / f".{self.name(unit)}.partial"

    def stats_path(self, unit: Unit) -> Path:
        return self.state / "units" / f"{self.name(unit)}.json"

    def unit_stats(self, unit: Unit) -> dict[str, Any] | None:
        """The unit's stats if it is complete (tar in place, stats for the same set range), else None."""
        try:
            stats = json.loads(self.stats_path(unit).read_text())
        except (OSError, ValueError):
            return None
        if not self.shard_path(unit).is_file() or (stats.get("start"), stats.get("stop")) != (unit.start, unit.stop):
            return None
        return stats

    def is_complete(self, unit: Unit) -> bool:
        return self.unit_stats(unit) is not None

    def prepare(self, fingerprint: dict[str, Any]) -> None:
        """Create the directory; refuse it if it holds sets built with another config."""
        path = self.state / "config.json"
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                old = None
            if old is not None and old != fingerprint:
                a, b = _flatten(old), _flatten(fingerprint)
                diff = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                                 if a.get(k) != b.get(k))
                raise SynthError(f"out_dir {self.dir} holds sets built with a different config ({diff}); "
                                 f"use another out_dir, or delete {self.dir} to rebuild")
        (self.state / "units").mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")

    def write_unit(self, unit: Unit, results: Iterable[SetResult]) -> dict[str, Any]:
        """Write one shard from the unit's set results; it appears under its final name only when whole."""
        partial = self.partial_path(unit)
        pattern = os.path.join(str(self.dir).replace("%", "%%"), f".{self.prefix.replace('%', '%%')}-%06d.tar.partial")
        sets = images = 0
        rejects: Counter = Counter()
        # mtime fixed: the same sets give byte-identical shards, whichever worker wrote them
        with wds.ShardWriter(pattern, maxcount=1 << 40, maxsize=1e18, start_shard=unit.index, verbose=0,
                             mtime=0.0) as sink:
            for r in results:
                if r.sample is None:
                    rejects[r.reject or "rejected"] += 1
                    continue
                sink.write(r.sample)
                sets, images = sets + 1, images + r.num_images
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        stats = {"file": self.name(unit), "unit": unit.index, "start": unit.start, "stop": unit.stop,
                 "sets": sets, "images": images, "rejects": dict(sorted(rejects.items())),
                 "bytes": partial.stat().st_size}
        atomic_write_text(self.stats_path(unit), json.dumps(stats, sort_keys=True) + "\n")
        os.replace(partial, self.shard_path(unit))
        return stats

    def write_manifest(self, units: list[Unit], config: dict[str, Any]) -> dict[str, Any]:
        """Summarise every complete unit of the plan (any worker's). Rewritten only when it changed."""
        shards, rejects = [], Counter()
        for unit in units:
            stats = self.unit_stats(unit)
            if stats is not None:
                shards.append({k: stats[k] for k in ("file", "sets", "images", "bytes", "rejects")})
                rejects.update(stats["rejects"])
        planned = {self.name(u) for u in units}
        stray = sorted(p.name for p in self.dir.glob(f"{self.prefix}-*.tar") if p.name not in planned)
        manifest = {
            "tool": self.tool, "schema_version": SCHEMA_VERSION,
            "complete": len(shards) == len(units), "units_planned": len(units), "units_done": len(shards),
            "shards": shards, "sets": sum(s["sets"] for s in shards), "images": sum(s["images"] for s in shards),
            "rejects": dict(sorted(rejects.items())), "stray_shards": stray, "config": config,
        }
        atomic_write_text(self.dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        return manifest
