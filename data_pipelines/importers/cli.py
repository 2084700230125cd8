"""The `jedi-data import` subcommand (registered by data_pipelines/stats.py next to `encode`).

    jedi-data import FORMAT SRC OUT_DIR [--min-quality Q] [--sets-per-shard 500]
                     [--num-shards N --shard-index I] [--limit N] [format options]

A bad SRC or option: one line on stderr, exit 2, nothing written. Bad rows are skipped and counted by
reason in OUT_DIR/manifest.json and on the one summary line.
"""
from __future__ import annotations

import logging

from data_pipelines.importers import FORMATS

PROG = "jedi-data import"


def add_parser(sub) -> None:
    p = sub.add_parser("import", help="convert Subjects200K / UNO-1M / SynCD / photo folders into set shards")
    p.add_argument("format", metavar="FORMAT", help=" | ".join(FORMATS))
    p.add_argument("src", metavar="SRC", help="the dataset as downloaded (or your folder of subject folders)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where the shards and manifest.json go")
    p.add_argument("--min-quality", type=float, default=None,
                   help="subjects200k: every quality score >= Q (default 5); uno1m: score_final >= Q (default 4.0); "
                        "syncd: aesthetics score >= Q (default: no filter)")
    p.add_argument("--keep-invalid-descriptions", action="store_true",
                   help="subjects200k: keep rows with description_valid false")
    p.add_argument("--view-size", type=int, default=None,
                   help="subjects200k: require views of this size (512; collection 3: 1024)")
    p.add_argument("--min-dino", type=float, default=None, help="syncd: keep images in a pair with DINO >= D")
    p.add_argument("--set-size", type=int, default=4, help="folders: images per set")
    p.add_argument("--caption", default=None,
                   help="folders: caption template where no .txt / metadata.jsonl caption exists, "
                        "e.g. 'a photo of a {subject}' ({class} too)")
    p.add_argument("--seed", type=int, default=0, help="folders: how images are drawn into sets")
    p.add_argument("--sets-per-shard", type=int, default=500, help="input records per shard")
    p.add_argument("--num-shards", type=int, default=None,
                   help="split the work over N processes (default: SLURM_ARRAY_TASK_COUNT or 1)")
    p.add_argument("--shard-index", type=int, default=None,
                   help="this process's share, 0..N-1 (default: SLURM_ARRAY_TASK_ID or 0)")
    p.add_argument("--limit", type=int, default=None, help="import only the first N records (a trial run)")
    p.add_argument("--prefix", default="sets", help="shard names: PREFIX-000000.tar, ...")
    p.add_argument("--verbose", action="store_true", help="log the first bad row of each kind")
    p.add_argument("--no-progress", action="store_true")


def build(args):
    """The importer for args.format; refuses a bad SRC (SourceError) before anything is written."""
    from data_pipelines.importers.core import SourceError

    fmt = args.format
    if fmt not in FORMATS:
        raise SourceError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "subjects200k":
        from data_pipelines.importers.subjects200k import Subjects200K
        return Subjects200K(args.src, args.min_quality, args.keep_invalid_descriptions, args.view_size)
    if fmt == "uno1m":
        from data_pipelines.importers.uno1m import UNO1M
        return UNO1M(args.src, args.min_quality)
    if fmt == "syncd":
        from data_pipelines.importers.syncd import SynCD
        return SynCD(args.src, args.min_quality, args.min_dino)
    from data_pipelines.importers.folders import Folders
    return Folders(args.src, args.set_size, args.caption, args.seed)


def main(args) -> int:
    from data_pipelines.importers.core import SourceError, run
    from data_pipelines.synth.writer import SynthError, shard_slice
    from jedi_common.errors import report_error

    logging.getLogger("data_pipelines.stream").setLevel(logging.WARNING if args.verbose else logging.ERROR)
    try:
        if args.sets_per_shard < 1:
            raise SourceError(f"--sets-per-shard {args.sets_per_shard} must be >= 1")
        if args.limit is not None and args.limit < 1:
            raise SourceError(f"--limit {args.limit} must be >= 1")
        n, i = shard_slice(args.num_shards, args.shard_index)
        s = run(build(args), args.out_dir, args.sets_per_shard, n, i, args.limit, args.prefix,
                progress=not args.no_progress)
    except Exception as e:
        if not report_error(e, PROG, "OUT_DIR", (SourceError, SynthError)):
            raise
        return 2
    skipped = ", ".join(f"{k}={v}" for k, v in s["skipped"].items()) or "none"
    print(f"{PROG} {s['format']}: {s['written']} shard(s) written, {s['skipped_complete']} already complete "
          f"(worker {s['worker']}); {s['sets']} sets / {s['images']} images in {s['seconds']} s; "
          f"skipped: {skipped}; OUT_DIR holds {s['manifest_sets']} sets -> {s['out_dir']}"
          f"{'' if s['complete'] else ' (other shards pending)'}")
    return 0


