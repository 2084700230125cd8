"""jedi-sample PIPELINE_DIR --ref PATH [--ref PATH ...] --prompt TEXT [--prompt TEXT ...] --num N [--seed S] --out DIR

Personalize with a trained JeDiPipeline: the photos given by --ref (files, or DreamBench-style subject
folders) become the references; N images are generated per prompt. --out receives
    NN_MM.png        output MM of prompt NN (one PNG per output)
    references/      the references as the model saw them (resized, cropped)
    grid.png         references in the first row, one row of outputs per prompt (prompts as labels)
    settings.json    every setting, the files it wrote and the timing
The directory is written under a temporary name next to --out and renamed at the end, so a
crashed or interrupted run never leaves a --out that looks complete.
Bad input: one line on stderr naming the input and the fix, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

SCHEDULERS = ("ddim", "dpm")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        print(f"jedi-sample: error: {message}; see jedi-sample --help", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    p = _Parser(prog="jedi-sample", description="Generate images of the subject in the reference "
                                "photos from prompts, with a JeDiPipeline (no finetuning).")
    p.add_argument("pipeline_dir", help="pipeline directory written by jedi-export (model_index.json inside)")
    p.add_argument("--ref", action="append", default=[], metavar="PATH",
                   help="reference image file or folder of images; repeatable")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="prompt; repeatable")
    p.add_argument("--num", type=int, required=True, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0; printed and kept in settings.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist, or --overwrite)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    p.add_argument("--guidance", type=float, default=7.5, help="text guidance scale (default 7.5)")
    p.add_argument("--image-guidance", type=float, default=1.5,
                   help="image (reference) guidance scale; 0 = plain text-to-image (default 1.5)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="sampler: ddim or dpm (DPM-Solver++); default: the pipeline's own")
    p.add_argument("--no-cache", action="store_true", help="never use the reference key/value cache")
    p.add_argument("--max-set-size", type=int, default=8, help="images per set (references + targets; default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once done)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Everything that can be checked before the model loads."""
    if not os.path.isdir(args.pipeline_dir):
        raise UsageError(f"pipeline directory {args.pipeline_dir} does not exist; give the folder jedi-export wrote")
    if not os.path.isfile(os.path.join(args.pipeline_dir, "model_index.json")):
        raise UsageError(f"pipeline directory {args.pipeline_dir} has no model_index.json, so it is not a saved "
                         "pipeline; export one with jedi-export CHECKPOINT OUT_DIR")
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
            raise UsageError(f"--ref {ref} does not exist; give an image file or a folder of images")
    if any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt '' is empty; give each prompt some text")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {args.out} is a file; give a directory path")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise UsageError(f"--out {args.out} already exists and is not empty; choose a new directory or add --overwrite")


def check_reference_sizes(files) -> None:
    """Refuse photos PIL will not decode (decompression bombs), warn about tiny ones; header reads only."""
    from PIL import Image, UnidentifiedImageError

    from data_pipelines.sets import SetOptions

    min_size = SetOptions.min_image_size  # training drops images smaller than this
    for path in files:
        try:
            with Image.open(path) as img:
                w, h = img.size
        except Image.DecompressionBombError:
            raise UsageError(f"reference {path} has too many pixels for PIL to decode safely (a possible "
                             "decompression bomb); give a smaller photo, e.g. scaled to 4096 px or less") from None
        except (UnidentifiedImageError, OSError):
            continue  # load_references names it
        if min(w, h) < min_size:
            print(f"jedi-sample: warning: reference {path} is only {w}x{h} pixels (training drops images under "
                  f"{min_size} px); it is upscaled and shows little of the subject", file=sys.stderr)


def run(args) -> str:
    import torch

    from jedi_train.export import publish_dir
    from jedi_train.pipeline import JeDiPipeline
    from jedi_train.references import expand_reference_paths, load_references
    from jedi_train.viz import make_grid

    ref_files = [os.path.abspath(p) for p in expand_reference_paths(args.ref)]
    check_reference_sizes(ref_files)
    load_references(ref_files, 8)  # unreadable files fail here, before the model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = JeDiPipeline.from_pretrained(args.pipeline_dir).to(device)
    if args.scheduler == "ddim":
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif args.scheduler == "dpm":
        from diffusers import DPMSolverMultistepScheduler

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    use_cache = False if args.no_cache else None  # None: used when the model was trained for it

    t0 = time.perf_counter()
    result = pipe(reference_images=ref_files, prompt=args.prompt, num_images_per_prompt=args.num,
                  num_inference_steps=args.steps, guidance_scale=args.guidance,
                  image_guidance_scale=args.image_guidance, max_set_size=args.max_set_size,
                  generator=torch.Generator(device="cpu").manual_seed(args.seed), output_type="pil",
                  use_reference_cache=use_cache)
    seconds = time.perf_counter() - t0

    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        outputs = []
        for i, img in enumerate(result.images):
            name = f"{i // args.num:02d}_{i % args.num:02d}.png"
            img.save(os.path.join(tmp, name))
            outputs.append({"file": name, "prompt": args.prompt[i // args.num], "index": i % args.num})
        os.makedirs(os.path.join(tmp, "references"))
        for i, img in enumerate(result.reference_images):
            img.save(os.path.join(tmp, "references", f"{i:02d}.png"))
        make_grid(result.reference_images, result.images, args.prompt).save(os.path.join(tmp, "grid.png"))
        settings = {
            "pipeline_dir": os.path.abspath(args.pipeline_dir), "references": ref_files, "prompts": args.prompt,
            "num_images_per_prompt": args.num, "seed": args.seed, "steps": args.steps,
            "guidance_scale": args.guidance, "image_guidance_scale": args.image_guidance,
            "scheduler": type(pipe.scheduler).__name__, "scheduler_config": dict(pipe.scheduler.config),
            "reference_cache": bool(not args.no_cache and pipe.reference_cache_supported()
                                    and args.image_guidance != 0),
            "max_set_size": args.max_set_size, "resolution": pipe.resolution, "device": device,
            "jedi": dict(pipe.unet.jedi), "outputs": outputs, "grid": "grid.png",
            "sampling_seconds": round(seconds, 3), "command": ["jedi-sample", *sys.argv[1:]],
        }
        with open(os.path.join(tmp, "settings.json"), "w") as f:
            json.dump(settings, f, indent=2, default=str)  # default=str: tuples/dtypes in scheduler configs
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        out = run(args)
    except (UsageError, FileNotFoundError, ValueError) as e:
        msg = " ".join(str(e).split())  # one line, whatever the source wrapped
        print(f"jedi-sample: error: {msg}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(args.prompt) * args.num} images (seed {args.seed}), grid {os.path.join(out, 'grid.png')}, "
          f"settings {os.path.join(out, 'settings.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
