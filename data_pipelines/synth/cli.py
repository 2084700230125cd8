"""`jedi-synth`: the Hydra entry point (primary config conf/synth.yaml).

    jedi-synth generator=procedural num_sets=64 set_size=4 resolution=64 out_dir=DIR \
        [num_workers_total=N worker_index=I]

Order: check the input (nothing is created before that) -> load the stages -> plan shard units ->
skip complete ones -> write this worker's others (progress bar in sets/s) -> manifest -> summary.
A problem the user can fix is one line on stderr and exit code 2.
"""
from __future__ import annotations

import sys
import time
from typing import Any

from jedi_common.hydra_args import CONF_DIR  # the config dir (a Path), found once for jedi-synth and jedi-train

# keys that may change between runs into the same out_dir without changing any set
RUN_ONLY_KEYS = ("out_dir", "num_sets", "num_workers_total", "worker_index", "progress")


def _error(msg: str) -> None:
    print(f"jedi-synth: error: {msg}", file=sys.stderr)


def validate(cfg: Any) -> tuple[int, int]:
    """Plain-value checks; returns (num_workers_total, worker_index)."""
    from data_pipelines.synth.writer import SynthError

    def as_int(key: str) -> int:
        try:
            return int(cfg[key])
        except (TypeError, ValueError):
            raise SynthError(f"{key}={cfg[key]!r} is not an integer; give e.g. {key}=4") from None

    if as_int("set_size") < 2:
        raise SynthError(f"set_size={cfg.set_size} is too small: a set needs at least 2 images of one subject; "
                         "use set_size=2 or more")
    res = as_int("resolution")
    if res < 8 or res % 8:
        raise SynthError(f"resolution={cfg.resolution} is not a positive multiple of 8; use e.g. "
                         f"resolution={max(8, round(res / 8) * 8)}")
    if as_int("num_sets") < 1:
        raise SynthError(f"num_sets={cfg.num_sets} must be >= 1")
    if as_int("sets_per_shard") < 1:
        raise SynthError(f"sets_per_shard={cfg.sets_per_shard} must be >= 1")
    as_int("seed")
    if cfg.image_ext not in ("jpg", "png"):
        raise SynthError(f"image_ext={cfg.image_ext} is not supported; use image_ext=jpg or image_ext=png")
    if not cfg.out_dir:
        raise SynthError("out_dir is not set; give out_dir=<directory for the shards>")
    n, i = as_int("num_workers_total"), as_int("worker_index")
    if n < 1 or not 0 <= i < n:
        raise SynthError(f"worker_index={i} is outside 0..{n - 1} (num_workers_total={n}); "
                         "give 0 <= worker_index < num_workers_total")
    return n, i


def run(cfg: Any) -> dict[str, Any]:
    """Build this worker's share of the sets described by `cfg` (a composed synth config)."""
    from omegaconf import OmegaConf
    from tqdm import tqdm

    from data_pipelines.synth.stages import SynthStages
    from data_pipelines.synth.writer import ShardOutput, plan_units, worker_units

    num_workers, worker = validate(cfg)
    stages = SynthStages(cfg)  # loads models: a bad model directory fails here, before out_dir exists
    config = OmegaConf.to_container(cfg, resolve=True)
    config = {k: v for k, v in config.items() if k not in ("num_workers_total", "worker_index", "progress")}
    fingerprint = {k: v for k, v in config.items() if k not in RUN_ONLY_KEYS}
    out = ShardOutput(cfg.out_dir, cfg.shard_prefix)
    out.prepare(fingerprint)

    units = plan_units(int(cfg.num_sets), int(cfg.sets_per_shard))
    mine = worker_units(units, num_workers, worker)
    todo = [u for u in mine if not out.is_complete(u)]
    t0 = time.perf_counter()
    written = {"sets": 0, "images": 0, "rejects": {}}
    with tqdm(total=sum(u.stop - u.start for u in todo), unit="set", desc=f"jedi-synth w{worker}/{num_workers}",
              disable=not cfg.progress, dynamic_ncols=True) as bar:
        for unit in todo:
            stats = out.write_unit(unit, _ticking(stages.unit_results(unit), bar))
            written["sets"] += stats["sets"]
            written["images"] += stats["images"]
            for k, v in stats["rejects"].items():
                written["rejects"][k] = written["rejects"].get(k, 0) + v
    elapsed = time.perf_counter() - t0
    manifest = out.write_manifest(units, config)
    summary = {"out_dir": str(out.dir), "worker": f"{worker}/{num_workers}", "units_mine": len(mine),
               "units_skipped": len(mine) - len(todo), "units_written": len(todo), **written,
               "seconds": round(elapsed, 2), "sets_per_s": round(written["sets"] / elapsed, 1) if elapsed > 0 else 0.0,
               "manifest_sets": manifest["sets"], "manifest_complete": manifest["complete"],
               "stray_shards": manifest["stray_shards"]}
    return summary


def _ticking(results, bar):
    for r in results:
        bar.update(1)
        yield r


def print_summary(s: dict[str, Any]) -> None:
    rows = [("out_dir", s["out_dir"]), ("worker", s["worker"]),
            ("shards (this worker)", f"{s['units_written']} written, {s['units_skipped']} already complete"),
            ("sets written", s["sets"]), ("images written", s["images"]),
            ("rejected", ", ".join(f"{k}={v}" for k, v in s["rejects"].items()) or "none"),
            ("time", f"{s['seconds']} s ({s['sets_per_s']} sets/s)"),
            ("manifest", f"{s['manifest_sets']} sets, {'complete' if s['manifest_complete'] else 'other units pending'}")]
    if s["stray_shards"]:
        rows.append(("warning", (f"{len(s['stray_shards'])} shard(s) in out_dir are not in this plan "
                                "(an earlier run with more sets?)")))
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="jedi-synth", show_header=False)
        for k, v in rows:
            table.add_row(k, str(v))
        Console(stderr=True).print(table)
    except ImportError:
        for k, v in rows:
            print(f"{k:22s} {v}", file=sys.stderr)


def _hydra_entry() -> None:
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name="synth", version_base="1.3")
    def _main(cfg) -> None:
        from omegaconf.errors import MissingMandatoryValue

        from jedi_common.errors import cli_errors
        from data_pipelines.synth.writer import SynthError

        def explain(e: BaseException) -> str | None:  # before the disk: a SynthError says it all
            if isinstance(e, SynthError):
                return str(e)
            if isinstance(e, MissingMandatoryValue):
                return f"{e.full_key} is required; give {e.full_key}=<value> on the command line"
            return None

        with cli_errors("jedi-synth", "out_dir", explain=explain):  # and a full/read-only disk: one line, exit 2
            print_summary(run(cfg))

    _main()


def main() -> int:
    from jedi_common.hydra_args import config_error, writable_error

    error = (config_error(CONF_DIR, "synth", sys.argv[1:])  # bad keys/groups/sweeps: one line, exit 2
             or writable_error(CONF_DIR, "synth", sys.argv[1:], "out_dir"))
    if error:
        _error(error)
        return 2
    _hydra_entry()
    return 0


if __name__ == "__main__":
    sys.exit(main())
