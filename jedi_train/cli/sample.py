"""jedi-sample PIPELINE_DIR --ref PATH [--ref PATH ...] --prompt TEXT [--prompt TEXT ...] --num N [--seed S] --out DIR

Personalize with a trained JeDiPipeline: the photos given by --ref (files, or DreamBench-style subject
folders) become the references; N images are generated per prompt. --out receives
    NN_MM.png        output MM of prompt NN (one PNG per output)
    NN_MM.attention.K.png   with --explain: where output NN_MM took its subject from, over reference K
    references/      the references as the model saw them (resized, cropped)
    grid.png         references in the first row, one row of outputs per prompt (prompts as labels)
    settings.json    every setting, the files it wrote and the timing
The directory is written under a temporary name next to --out and renamed at the end, so a
crashed or interrupted run never leaves a --out that looks complete.
Bad input: one line on stderr naming the input and the fix, exit code 2.

The library behind it (shared with jedi-app and jedi-eval) is jedi_train/sampling.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from jedi_common.errors import missing
from jedi_train.sampling import (
    DEFAULTS,
    SCHEDULERS,
    SETTINGS,
    UsageError,
    check_pipeline_dir,
    generate,
    load_pipeline,
    make_scheduler,
    prepare_references,
    resolve_settings,
    settings_dict,
    settings_note,
    write_results,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        print(f"jedi-sample: error: {message}; see jedi-sample --help", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    d = DEFAULTS
    p = _Parser(prog="jedi-sample", description="Generate images of the subject in the reference "
                                "photos from prompts, with a JeDiPipeline (no finetuning).")
    p.add_argument("pipeline_dir", help="pipeline directory written by jedi-export (model_index.json inside)")
    p.add_argument("--ref", action="append", default=[], metavar="PATH",
                   help="reference image file or folder of images; repeatable")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="prompt; repeatable")
    p.add_argument("--num", type=int, required=True, help="images per prompt")
    p.add_argument("--seed", type=int, default=d["seed"],
                   help=f"random seed (default {d['seed']}; printed and kept in settings.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist, or --overwrite)")
    rec = "the export's recommended value (its sampling.json) if it has one, else"
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps (default: {rec} {d['steps']})")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"text guidance scale (default: {rec} {d['guidance']})")
    p.add_argument("--image-guidance", type=float, default=None,
                   help=f"image (reference) guidance scale; 0 = plain text-to-image (default: {rec} {d['image_guidance']})")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=d["scheduler"],
                   help="sampler: ddim or dpm (DPM-Solver++); default: the pipeline's own")
    p.add_argument("--no-cache", action="store_true", help="never use the reference key/value cache")
    p.add_argument("--explain", action="store_true",
                   help="write reference attention overlays next to each image (NN_MM.attention.K.png: where the "
                        "image took its subject from, per reference) and the attention shares in settings.json")
    p.add_argument("--max-set-size", type=int, default=d["max_set_size"],
                   help=f"images per set (references + targets; default {d['max_set_size']})")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once done)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Everything that can be checked before the model loads."""
    check_pipeline_dir(args.pipeline_dir)
    values, args.settings_from = resolve_settings(args.pipeline_dir, {k: getattr(args, k) for k in SETTINGS})
    for key, value in values.items():  # not given: the export's recommended settings, else the defaults
        setattr(args, key, value)
    for name, value, low in (("--num", args.num, 1), ("--steps", args.steps, 1), ("--max-set-size", args.max_set_size, 2)):
        if value < low:
            raise UsageError(f"{name} {value} is too small; use {name} {low} or more")
    if args.image_guidance < 0 or args.guidance < 0:
        raise UsageError("--guidance and --image-guidance must be >= 0")
    if not args.prompt:
        raise UsageError("no --prompt given; add --prompt TEXT (repeatable) for the images to generate")
    if not args.ref and args.image_guidance != 0:
        raise UsageError(f"no --ref given, but --image-guidance {args.image_guidance} needs reference photos; add "
                         "--ref PATH (a photo or a folder of photos), or --image-guidance 0 for plain text-to-image")
    for ref in args.ref:
        if not os.path.exists(ref):
            raise UsageError(f"--ref {ref} {missing(ref)}; give an image file or a folder of images")
    if any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt '' is empty; give each prompt some text")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {args.out} is a file; give a directory path")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise UsageError(f"--out {args.out} already exists and is not empty; choose a new directory or add --overwrite")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, "settings.json")):
        # --overwrite replaces a previous jedi-sample output only, never a folder it did not write
        raise UsageError(f"--out {args.out} is not a previous jedi-sample output (no settings.json), so --overwrite "
                         "will not replace it; choose a new directory")


def run(args) -> str:
    from jedi_common.atomic import staged_dir

    note = settings_note({k: getattr(args, k) for k in SETTINGS}, args.settings_from)
    if note:
        print(f"jedi-sample: {note}", file=sys.stderr)
    ref_files, warnings = prepare_references(args.ref)
    for w in warnings:
        print(f"jedi-sample: warning: {w}", file=sys.stderr)
    pipe = load_pipeline(args.pipeline_dir, args.device)
    pipe.scheduler = make_scheduler(pipe.scheduler, args.scheduler, pipe.family)
    result, seconds = generate(pipe, ref_files, args.prompt, args.num, args.seed, args.steps, args.guidance,
                               args.image_guidance, args.max_set_size, args.no_cache, args.explain)

    out = os.path.abspath(args.out)
    with staged_dir(out) as tmp:  # published whole, or not at all
        settings = settings_dict(pipe, args.pipeline_dir, ref_files, args.prompt, args.num, args.seed, args.steps,
                                 args.guidance, args.image_guidance, args.max_set_size, args.no_cache, seconds,
                                 ["jedi-sample", *sys.argv[1:]], args.settings_from, args.explain)
        write_results(tmp, result, settings)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        out = run(args)
    except Exception as e:  # user errors and disk trouble: one line; anything else: the traceback
        from jedi_common.errors import report_error

        if not report_error(e, "jedi-sample", "--out", (UsageError, FileNotFoundError, ValueError)):
            raise
        return 2
    print(f"wrote {out}: {len(args.prompt) * args.num} images (seed {args.seed}), grid {os.path.join(out, 'grid.png')}, "
          f"settings {os.path.join(out, 'settings.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
