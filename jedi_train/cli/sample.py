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

The steps shared with jedi-app (the web demo, app/): DEFAULTS, prepare_references, load_pipeline,
generate, settings_dict and write_results.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jedi_common.errors import missing

SCHEDULERS = ("ddim", "dpm")
# sampling defaults of jedi-sample and jedi-app alike (scheduler None: the pipeline's own)
DEFAULTS = {"seed": 0, "steps": 30, "guidance": 7.5, "image_guidance": 1.5, "scheduler": None, "max_set_size": 8}


class UsageError(Exception):
    pass


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
    p.add_argument("--steps", type=int, default=d["steps"], help=f"sampling steps (default {d['steps']})")
    p.add_argument("--guidance", type=float, default=d["guidance"],
                   help=f"text guidance scale (default {d['guidance']})")
    p.add_argument("--image-guidance", type=float, default=d["image_guidance"],
                   help=f"image (reference) guidance scale; 0 = plain text-to-image (default {d['image_guidance']})")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=d["scheduler"],
                   help="sampler: ddim or dpm (DPM-Solver++); default: the pipeline's own")
    p.add_argument("--no-cache", action="store_true", help="never use the reference key/value cache")
    p.add_argument("--max-set-size", type=int, default=d["max_set_size"],
                   help=f"images per set (references + targets; default {d['max_set_size']})")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once done)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return p.parse_args(argv)


def check_pipeline_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise UsageError(f"pipeline directory {path} {missing(path)}; give the folder jedi-export wrote")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise UsageError(f"pipeline directory {path} has no model_index.json, so it is not a saved "
                         "pipeline; export one with jedi-export CHECKPOINT OUT_DIR")


def check_args(args) -> None:
    """Everything that can be checked before the model loads."""
    check_pipeline_dir(args.pipeline_dir)
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


def check_reference_sizes(files, max_pixels: int | None = None) -> list[str]:
    """Refuse photos PIL will not decode (decompression bombs) or over max_pixels; header reads only.
    Returns warnings: tiny photos, CMYK (converted to RGB), animations (first frame used)."""
    from PIL import Image, UnidentifiedImageError

    from data_pipelines.sets import SetOptions

    min_size = SetOptions.min_image_size  # training drops images smaller than this
    warnings = []
    for path in files:
        try:
            with Image.open(path) as img:
                (w, h), mode, frames = img.size, img.mode, getattr(img, "n_frames", 1)
        except Image.DecompressionBombError:
            raise UsageError(f"reference {path} has too many pixels for PIL to decode safely (a possible "
                             "decompression bomb); give a smaller photo, e.g. scaled to 4096 px or less") from None
        except (UnidentifiedImageError, OSError):
            continue  # load_references names it
        if max_pixels is not None and w * h > max_pixels:
            raise UsageError(f"reference {path} is {w}x{h} pixels, over the limit of {max_pixels / 1e6:.0f} M "
                             "pixels; give a smaller photo, e.g. scaled to 4096 px or less")
        if min(w, h) < min_size:
            warnings.append(f"reference {path} is only {w}x{h} pixels (training drops images under {min_size} px); "
                            "it is upscaled and shows little of the subject")
        if mode == "CMYK":
            warnings.append(f"reference {path} is CMYK; it was converted to RGB (colours may shift: save it as "
                            "RGB for exact colours)")
        if frames > 1:
            warnings.append(f"reference {path} is animated ({frames} frames); only its first frame is used")
    return warnings


def prepare_references(refs, max_pixels: int | None = None) -> tuple[list[str], list[str]]:
    """--ref items (files, folders) -> (absolute image files, warnings). Raises UsageError / ValueError
    (unreadable image) / FileNotFoundError: all before the model runs."""
    from jedi_train.pipelines.references import expand_reference_paths, load_references

    ref_files = [os.path.abspath(p) for p in expand_reference_paths(list(refs))]
    warnings = check_reference_sizes(ref_files, max_pixels)
    load_references(ref_files, 8)  # unreadable files fail here, before the model loads
    return ref_files, warnings


def load_pipeline(pipeline_dir: str, device: str | None = None):
    """The JeDiPipeline on `device` (default: cuda if available, else cpu)."""
    import torch

    from jedi_train.pipelines.pipeline_jedi import JeDiPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return JeDiPipeline.from_pretrained(pipeline_dir).to(device)


def make_scheduler(base, name: str | None):
    """`base` (the pipeline's own scheduler) for None, else a DDIM / DPM-Solver++ from its config."""
    if name is None:
        return base
    if "FlowMatch" in type(base).__name__:  # FLUX: the DDPM-family samplers do not apply
        raise UsageError(f"--scheduler {name} is for DDPM-family models (SD, SDXL); this FLUX pipeline samples with "
                         f"its flow-matching {type(base).__name__}: leave --scheduler out")
    if name == "ddim":
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(base.config)
    if name == "dpm":
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(base.config, algorithm_type="dpmsolver++")
    raise UsageError(f"scheduler {name!r} is unknown; use one of {', '.join(SCHEDULERS)}")


def generate(pipe, ref_files, prompts, num: int, seed: int, steps: int, guidance: float, image_guidance: float,
             max_set_size: int, no_cache: bool = False):
    """One sampling call with pipe's current scheduler -> (JeDiPipelineOutput, seconds)."""
    import torch

    t0 = time.perf_counter()
    result = pipe(reference_images=ref_files, prompt=list(prompts), num_images_per_prompt=num,
                  num_inference_steps=steps, guidance_scale=guidance, image_guidance_scale=image_guidance,
                  max_set_size=max_set_size, generator=torch.Generator(device="cpu").manual_seed(seed),
                  output_type="pil", use_reference_cache=False if no_cache else None)  # None: when trained for it
    return result, time.perf_counter() - t0


def output_names(prompts, num: int) -> list[dict]:
    return [{"file": f"{i // num:02d}_{i % num:02d}.png", "prompt": prompts[i // num], "index": i % num}
            for i in range(len(prompts) * num)]


def settings_dict(pipe, pipeline_dir, ref_files, prompts, num, seed, steps, guidance, image_guidance,
                  max_set_size, no_cache, seconds, command) -> dict:
    """What settings.json holds: every setting, the files written, the timing."""
    return {
        "pipeline_dir": os.path.abspath(pipeline_dir), "references": list(ref_files), "prompts": list(prompts),
        "num_images_per_prompt": num, "seed": seed, "steps": steps,
        "guidance_scale": guidance, "image_guidance_scale": image_guidance,
        "scheduler": type(pipe.scheduler).__name__, "scheduler_config": dict(pipe.scheduler.config),
        "reference_cache": bool(not no_cache and pipe.reference_cache_supported() and image_guidance != 0),
        "max_set_size": max_set_size, "resolution": pipe.resolution, "device": str(pipe.device),
        "jedi": pipe.denoiser.jedi.to_dict(), "outputs": output_names(prompts, num), "grid": "grid.png",
        "sampling_seconds": round(seconds, 3), "command": list(command),
    }


def write_results(out_dir: str, result, settings: dict) -> None:
    """The outputs, references/, grid.png and settings.json into an existing directory."""
    from jedi_train.viz import make_grid

    for img, o in zip(result.images, settings["outputs"]):
        img.save(os.path.join(out_dir, o["file"]))
    os.makedirs(os.path.join(out_dir, "references"), exist_ok=True)
    for i, img in enumerate(result.reference_images):
        img.save(os.path.join(out_dir, "references", f"{i:02d}.png"))
    make_grid(result.reference_images, result.images, settings["prompts"]).save(os.path.join(out_dir, "grid.png"))
    with open(os.path.join(out_dir, "settings.json"), "w") as f:
        json.dump(settings, f, indent=2, default=str)  # default=str: tuples/dtypes in scheduler configs


def run(args) -> str:
    from jedi_common.atomic import staged_dir

    ref_files, warnings = prepare_references(args.ref)
    for w in warnings:
        print(f"jedi-sample: warning: {w}", file=sys.stderr)
    pipe = load_pipeline(args.pipeline_dir, args.device)
    pipe.scheduler = make_scheduler(pipe.scheduler, args.scheduler)
    result, seconds = generate(pipe, ref_files, args.prompt, args.num, args.seed, args.steps, args.guidance,
                               args.image_guidance, args.max_set_size, args.no_cache)

    out = os.path.abspath(args.out)
    with staged_dir(out) as tmp:  # published whole, or not at all
        settings = settings_dict(pipe, args.pipeline_dir, ref_files, args.prompt, args.num, args.seed, args.steps,
                                 args.guidance, args.image_guidance, args.max_set_size, args.no_cache, seconds,
                                 ["jedi-sample", *sys.argv[1:]])
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
