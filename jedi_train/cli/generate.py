"""jedi-generate PIPELINE_DIR --jobs JOBS.jsonl --out DIR [--check identity,prompt --min-identity X --best-of K ...]
jedi-generate calibrate --jobs JOBS.jsonl [--dino DIR | --clip SPEC] [--pass-fraction 0.9] [--out FILE]
jedi-generate report --out DIR

Many subjects x prompts from one trained pipeline, split over processes / SLURM array tasks, resumable, with
an optional quality gate. The jobs file format: jedi_train/generate/jobs.py. OUT receives <job>/PP_SS.png
(+ PP_SS.json, its record), <job>/references/, rejected/<job>/PP_SS.tryA.png, results.csv and report.html.
A bad job is one `jedi-generate: error:` line and the others go on (exit 1 at the end); bad options: one
line, exit 2, before the model loads. The library: jedi_train/generate/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from jedi_train.sampling import SCHEDULERS, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        print(f"jedi-generate: error: {message}; see jedi-generate --help", file=sys.stderr)
        sys.exit(2)


def _extractor_args(p) -> None:
    p.add_argument("--dino", default=None, metavar="DIR",
                   help="local transformers ViT/DINOv2 directory: identity = DINO (as jedi-eval dreambench)")
    p.add_argument("--clip", default=None, metavar="SPEC", help="local CLIPModel directory or open_clip "
                   "ARCH:CHECKPOINT: prompt = CLIP-T, and identity = CLIP-I without --dino")


def generate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jedi-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline_dir", help="pipeline directory written by jedi-export")
    p.add_argument("--jobs", required=True, metavar="JOBS.jsonl", help="one JSON job per line")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (a rerun skips finished images)")
    p.add_argument("--check", default=None, metavar="identity,prompt", help="score every image")
    p.add_argument("--min-identity", type=float, default=None, metavar="X", help="identity an image must reach")
    p.add_argument("--min-prompt", type=float, default=None, metavar="Y", help="CLIP-T an image must reach")
    p.add_argument("--best-of", type=int, default=1, metavar="K",
                   help="up to K candidates per image: the first that passes the thresholds is kept (without "
                        "thresholds: the best of K); images that never pass go to rejected/")
    _extractor_args(p)
    p.add_argument("--num-shards", type=int, default=None, help="split the jobs over N processes "
                   "(default: SLURM_ARRAY_TASK_COUNT or 1)")
    p.add_argument("--shard-index", type=int, default=None, help="this process's share, 0..N-1 "
                   "(default: SLURM_ARRAY_TASK_ID or 0)")
    p.add_argument("--images-per-call", type=int, default=8, metavar="N",
                   help="images per sampling call, across jobs of the same settings and reference count (default 8; "
                        "each image, or joint set, keeps its own sets and seeds: the same images as one call each)")
    p.add_argument("--explain", action="store_true",
                   help="write each image's reference attention overlays, <image stem>.attention.<k>.png (one "
                        "image or joint set per sampling call)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="as jedi-sample (default: the pipeline's)")
    p.add_argument("--no-cache", action="store_true", help="never use the reference key/value cache")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def calibrate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jedi-generate calibrate", description="The --min-identity that a chosen fraction of real "
                "photos passes: each job's 'held_out' photos scored against its references.")
    p.add_argument("--jobs", required=True, metavar="JOBS.jsonl")
    _extractor_args(p)
    p.add_argument("--pass-fraction", type=float, default=0.9, help="fraction of real photos that pass (default 0.9)")
    p.add_argument("--resolution", type=int, default=64,
                   help="procedural identity only (no extractor): the pipeline's resolution (default 64)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the calibration as JSON")
    p.add_argument("--device", default="cpu")
    return p


def report_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jedi-generate report", description="Rebuild results.csv and report.html (after all shards).")
    p.add_argument("--out", required=True, metavar="DIR")
    return p


def run_generate(argv) -> int:
    from jedi_train.generate.gate import parse_checks
    from jedi_train.generate.run import Options, Runner

    a = generate_parser().parse_args(argv)
    thresholds = {k: v for k, v in (("identity", a.min_identity), ("prompt", a.min_prompt)) if v is not None}
    opts = Options(a.pipeline_dir, a.jobs, a.out, parse_checks(a.check), thresholds, a.best_of, a.dino, a.clip,
                   a.num_shards, a.shard_index, a.device, a.scheduler, a.no_cache, a.images_per_call,
                   not a.no_progress, a.explain)
    s = Runner(opts).run()
    i, n = s.shard
    made = s.accepted + s.rejected
    rate = f" ({s.candidates / s.seconds:.2f} images/s)" if s.candidates and s.seconds else ""
    print(f"jedi-generate: shard {i}/{n}: {s.jobs_done} jobs done, {len(s.errors)} failed; {made} images made "
          f"({s.accepted} accepted, {s.rejected} rejected), {s.skipped} already done; {s.candidates} candidates "
          f"in {s.seconds:.1f} s{rate}; results {os.path.join(a.out, 'results.csv')}, report "
          f"{os.path.join(a.out, 'report.html')}")
    return 1 if s.errors else 0


def run_calibrate(argv) -> int:
    from jedi_common.atomic import atomic_write_text
    from jedi_train.generate import jobs as J
    from jedi_train.generate.gate import Scorer, calibrate

    a = calibrate_parser().parse_args(argv)
    entries = J.read_jobs(a.jobs)
    bad = [e for e in entries if isinstance(e, J.BadLine)]
    if bad:
        raise UsageError(f"--jobs {a.jobs} line {bad[0].line}: {bad[0].message}")
    result = calibrate(Scorer(["identity"], a.dino, a.clip, a.device, a.resolution), entries, a.pass_fraction)
    if a.out:
        atomic_write_text(a.out, json.dumps(result, indent=1) + "\n")
    print(f"jedi-generate calibrate: {result['n_photos']} held-out photos of {result['n_jobs']} jobs ({result['metric']}); "
          f"{100 * result['passing']:.0f}% pass --min-identity {result['min_identity']}")
    return 0


def run_report(argv) -> int:
    from jedi_train.generate.report import write_reports

    a = report_parser().parse_args(argv)
    if not os.path.isdir(a.out):
        raise UsageError(f"--out {a.out} is not a directory; give a jedi-generate output folder")
    records = write_reports(a.out)
    print(f"jedi-generate report: {len(records)} images; {os.path.join(a.out, 'results.csv')}, "
          f"{os.path.join(a.out, 'report.html')}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = {"calibrate": run_calibrate, "report": run_report}.get(argv[0] if argv else "", None)
    try:
        return command(argv[1:]) if command else run_generate(argv)
    except Exception as e:  # user errors and disk trouble: one line; anything else: the traceback
        from jedi_common.errors import report_error

        if not report_error(e, "jedi-generate", "--out", (UsageError, FileNotFoundError, ValueError)):
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
