"""The one sampling library behind jedi-sample, jedi-app and jedi-eval: load a saved pipeline (any family, through
JeDiAutoPipeline), check reference photos before the model runs, pick a sampler, generate, and write the
outputs, references, grid and settings.json (with explain: each output's reference attention overlays, explain.py).
The command lines are thin over it (cli/sample.py, app/)."""
from __future__ import annotations

import json
import os
import time

from jedi_common.errors import missing

SCHEDULERS = ("ddim", "dpm")
# sampling defaults of jedi-sample and jedi-app alike (scheduler None: the pipeline's own)
DEFAULTS = {"seed": 0, "steps": 30, "guidance": 7.5, "image_guidance": 1.5, "scheduler": None, "max_set_size": 8}


RECOMMENDED_FILE = "sampling.json"  # in an export: the sampling settings its training run recommends
# setting -> (its name in sampling.json / settings.json, its flag, words for messages)
SETTINGS = {"guidance": ("guidance_scale", "--guidance", "text guidance"),
            "image_guidance": ("image_guidance_scale", "--image-guidance", "image guidance"),
            "steps": ("num_inference_steps", "--steps", "steps")}


def recommended_settings(pipeline_dir: str) -> dict:
    """{guidance, image_guidance, steps} (those present) from the export's sampling.json; {} without one."""
    try:
        with open(os.path.join(pipeline_dir, RECOMMENDED_FILE)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    out = {}
    for key, (name, _, _) in SETTINGS.items():
        value = saved.get(name) if isinstance(saved, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            out[key] = int(value) if key == "steps" else float(value)
    return out


def resolve_settings(pipeline_dir: str, given: dict) -> tuple[dict, dict]:
    """The sampling settings to use: the user's where given (not None), else the export's recommended ones
    (sampling.json), else DEFAULTS. -> (values, where each came from: 'given' | 'export' | 'default')."""
    rec = recommended_settings(pipeline_dir)
    values, source = {}, {}
    for key in SETTINGS:
        if given.get(key) is not None:
            values[key], source[key] = given[key], "given"
        elif key in rec:
            values[key], source[key] = rec[key], "export"
        else:
            values[key], source[key] = DEFAULTS[key], "default"
    return values, source


def settings_note(values: dict, source: dict) -> str | None:
    """One line saying which settings were not given and where they came from (None: all given)."""
    def words(kind):
        return ", ".join(f"{SETTINGS[k][2]} {values[k]:g}" for k in SETTINGS if source[k] == kind)

    parts = []
    if words("export"):
        parts.append(f"the export's recommended {words('export')} ({RECOMMENDED_FILE}, from its training run)")
    if words("default"):
        parts.append(f"the default {words('default')}")
    if not parts:
        return None
    flags = "/".join(SETTINGS[k][1] for k in SETTINGS if source[k] != "given")
    return f"using {' and '.join(parts)}; give {flags} to change them"


class UsageError(Exception):
    """Bad input: one line, exit 2."""


def check_pipeline_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise UsageError(f"pipeline directory {path} {missing(path)}; give the folder jedi-export wrote")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise UsageError(f"pipeline directory {path} has no model_index.json, so it is not a saved "
                         "pipeline; export one with jedi-export CHECKPOINT OUT_DIR")


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


def load_pipeline(pipeline_dir: str, device: str | None = None, progress: bool = True):
    """The saved pipeline (its own family's class) on `device` (default: cuda if available, else cpu).
    A path that is not a saved pipeline: UsageError naming the fix."""
    import torch

    from jedi_train.pipelines.auto import JeDiAutoPipeline

    check_pipeline_dir(pipeline_dir)
    try:
        cls = JeDiAutoPipeline.pipeline_class(pipeline_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = cls.from_pretrained(pipeline_dir).to(device)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def make_scheduler(base, name: str | None, family=None):
    """`base` (the pipeline's own scheduler) for None, else a DDIM / DPM-Solver++ from its config.
    family: the pipeline's row of the family table (flow-matching families keep their own sampler)."""
    if name is None:
        return base
    if family is not None and family.flow_matching:  # the DDPM-family samplers do not apply
        raise UsageError(f"--scheduler {name} is for DDPM-family models (SD, SDXL); this {family.title} pipeline "
                         f"samples with its flow-matching {type(base).__name__}: leave --scheduler out")
    if name == "ddim":
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(base.config)
    if name == "dpm":
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(base.config, algorithm_type="dpmsolver++")
    raise UsageError(f"scheduler {name!r} is unknown; use one of {', '.join(SCHEDULERS)}")


def generate(pipe, ref_files, prompts, num: int, seed: int | list[int], steps: int, guidance: float,
             image_guidance: float, max_set_size: int, no_cache: bool = False, explain: bool = False):
    """One sampling call with pipe's current scheduler -> (JeDiPipelineOutput, seconds).
    seed: one seed for the call, or one per output image (each image's noise from its own generator, so an
    image does not depend on which others share the call: what jedi-generate's resume relies on).
    explain: with each image's reference attention maps (result.attention_maps)."""
    import torch

    if isinstance(seed, (list, tuple)):
        generator = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seed]
    else:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    t0 = time.perf_counter()
    result = pipe(reference_images=ref_files, prompt=list(prompts), num_images_per_prompt=num,
                  num_inference_steps=steps, guidance_scale=guidance, image_guidance_scale=image_guidance,
                  max_set_size=max_set_size, generator=generator,
                  output_type="pil", use_reference_cache=False if no_cache else None,  # None: when trained for it
                  return_attention_maps=explain)
    return result, time.perf_counter() - t0


def generate_subjects(pipe, subjects: list[tuple[list, list[str], list[int]]], steps: int, guidance: float,
                      image_guidance: float, max_set_size: int, no_cache: bool = False):
    """Several subjects in one sampling call (one denoiser call per step for all): subjects = [(reference files,
    prompts, one seed per prompt)], the same number of references each. Each image is the one `generate` gives
    with its seed. -> (JeDiPipelineOutput with one list of images / references per subject, seconds)."""
    import torch

    t0 = time.perf_counter()
    result = pipe(reference_images=[refs for refs, _, _ in subjects], prompt=[list(p) for _, p, _ in subjects],
                  num_inference_steps=steps, guidance_scale=guidance, image_guidance_scale=image_guidance,
                  max_set_size=max_set_size, output_type="pil", use_reference_cache=False if no_cache else None,
                  generator=[[torch.Generator(device="cpu").manual_seed(int(x)) for x in seeds]
                             for _, _, seeds in subjects])
    return result, time.perf_counter() - t0


def output_names(prompts, num: int) -> list[dict]:
    return [{"file": f"{i // num:02d}_{i % num:02d}.png", "prompt": prompts[i // num], "index": i % num}
            for i in range(len(prompts) * num)]


def settings_dict(pipe, pipeline_dir, ref_files, prompts, num, seed, steps, guidance, image_guidance,
                  max_set_size, no_cache, seconds, command, settings_from: dict | None = None,
                  explain: bool = False) -> dict:
    """What settings.json holds: every setting, the files written, the timing; settings_from: where the
    guidance / image guidance / steps came from (resolve_settings)."""
    return {
        "pipeline_dir": os.path.abspath(pipeline_dir), "references": list(ref_files), "prompts": list(prompts),
        "num_images_per_prompt": num, "seed": seed, "steps": steps,
        "guidance_scale": guidance, "image_guidance_scale": image_guidance,
        "scheduler": type(pipe.scheduler).__name__, "scheduler_config": dict(pipe.scheduler.config),
        "reference_cache": bool(not no_cache and pipe.reference_cache_supported() and image_guidance != 0),
        "max_set_size": max_set_size, "resolution": pipe.resolution, "device": str(pipe.device),
        "jedi": pipe.denoiser.jedi.to_dict(), "outputs": output_names(prompts, num), "grid": "grid.png",
        "sampling_seconds": round(seconds, 3), "command": list(command), "explain": bool(explain),
        **({"settings_from": dict(settings_from)} if settings_from else {}),
    }


def write_results(out_dir: str, result, settings: dict) -> None:
    """The outputs, references/, grid.png and settings.json into an existing directory; with attention maps
    (generate(explain=True)) each output's overlays NN_MM.attention.K.png beside it, and its attention shares
    in settings.json's outputs."""
    from jedi_train.viz import make_grid

    for img, o in zip(result.images, settings["outputs"]):
        img.save(os.path.join(out_dir, o["file"]))
    if getattr(result, "attention_maps", None) is not None:
        write_explanations(out_dir, result, settings["outputs"])
    os.makedirs(os.path.join(out_dir, "references"), exist_ok=True)
    for i, img in enumerate(result.reference_images):
        img.save(os.path.join(out_dir, "references", f"{i:02d}.png"))
    make_grid(result.reference_images, result.images, settings["prompts"]).save(os.path.join(out_dir, "grid.png"))
    with open(os.path.join(out_dir, "settings.json"), "w") as f:
        json.dump(settings, f, indent=2, default=str)  # default=str: tuples/dtypes in scheduler configs




def write_explanations(out_dir: str, result, outputs: list[dict]) -> None:
    """Each output's reference attention overlays beside it; its shares (on each reference, itself, the other
    images of its set) into its settings.json entry under "attention"."""
    from jedi_train.explain import save_attention_overlays

    for maps, o in zip(result.attention_maps, outputs):
        files = save_attention_overlays(maps, result.reference_images, os.path.join(out_dir, o["file"]))
        o["attention"] = {"overlays": [os.path.basename(f) for f in files],
                          "reference_shares": [round(float(x), 4) for x in maps.reference_shares],
                          "self_share": round(maps.self_share, 4), "others_share": round(maps.others_share, 4)}
