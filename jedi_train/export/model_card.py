"""README.md of an exported pipeline: the model card the Hugging Face Hub reads (YAML front matter),
how to load and call the model, how it was trained, its sample grid and its latest jedi-eval table.

Written by jedi-export into the export's temp directory (published atomically with the rest);
jedi-eval replaces the evaluation section when it measures that export.
"""
from __future__ import annotations

import glob
import os
import re
import shutil

import yaml

from jedi_common.atomic import atomic_write_text

EVAL_BEGIN, EVAL_END = "<!-- jedi-eval:begin -->", "<!-- jedi-eval:end -->"
TAGS = ["jedi", "joint-image-diffusion", "personalization", "subject-driven-generation", "text-to-image",
        "jedi-train"]


def find_run_dir(path: str | None) -> str | None:
    """The training run a checkpoint or export belongs to: the nearest folder up with config.yaml."""
    d = os.path.abspath(path) if path else None
    for _ in range(3):
        if not d:
            return None
        if os.path.isfile(os.path.join(d, "config.yaml")):
            return d
        d = os.path.dirname(d)
    return None


def run_config(run_dir: str | None) -> dict:
    """The run's resolved config (RUN/config.yaml, written by jedi-train); {} when absent or unreadable."""
    if not run_dir:
        return {}
    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            return yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return {}


def run_wandb_id(run_dir: str | None) -> str | None:
    """The run's W&B id (RUN/wandb_id.txt, kept across resumes), or None."""
    try:
        with open(os.path.join(run_dir or "", "wandb_id.txt")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _run_info(run_dir: str | None) -> dict:
    cfg = run_config(run_dir)
    if not cfg:
        return {}
    data, trainer = cfg.get("data") or {}, cfg.get("trainer") or {}
    root = (cfg.get("paths") or {}).get("root_dir")
    return {"run_name": cfg.get("run_name"), "run_id": run_wandb_id(run_dir), "root_dir": root,
            "sources": [public_path(s.get("url"), root) for s in data.get("sources") or [] if isinstance(s, dict)],
            "batch_size": data.get("batch_size"), "devices": trainer.get("devices"),
            "num_nodes": trainer.get("num_nodes"), "strategy": (cfg.get("strategy") or {}).get("name")}


def public_path(path: str | None, root: str | None) -> str:
    """A path as an export may show it to the world: relative to the run's root (paths.root_dir) when inside
    it, a URL (s3://, gs://, http) or a Hub id as given, otherwise only its last two parts: never a home
    directory or cluster path."""
    if not path:
        return "?"
    text = str(path)
    if "://" in text or not os.path.isabs(text):
        return text
    if root and os.path.isabs(str(root)):
        rel = os.path.relpath(text, str(root))
        if not rel.startswith(".."):
            return rel
    return os.path.join("...", *[p for p in text.split(os.sep) if p][-2:])


def recommended_sampling(run_dir: str | None) -> dict:
    """The run's recommended sampling settings (its config's `sampling`), under sampling.json's names."""
    from jedi_train.sampling import SETTINGS

    saved = run_config(run_dir).get("sampling") or {}
    out = {}
    for key, (name, _, _) in SETTINGS.items():
        value = saved.get(key) if isinstance(saved, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def _base_model(model_dir: str | None) -> str | None:
    """A Hub id ("org/name") the run started from: the id itself, or a Hub cache snapshot path
    (.../models--org--name/snapshots/<rev>); other local paths are not Hub models."""
    if not model_dir:
        return None
    cached = re.search(r"models--([\w.-]+?)--([\w.-]+)/snapshots/", model_dir)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if not os.path.exists(model_dir) and re.fullmatch(r"[\w.-]+/[\w.-]+", model_dir):
        return model_dir
    return None


def latest_eval_table(run_dir: str | None) -> str | None:
    """The newest jedi-eval summary.md under the run (eval*/summary.md), without its title line."""
    if not run_dir:
        return None
    found = sorted(glob.glob(os.path.join(run_dir, "eval*", "summary.md")), key=os.path.getmtime)
    if not found:
        return None
    with open(found[-1]) as f:
        return _eval_section(f.read())


def _eval_section(summary_md: str) -> str:
    lines = summary_md.strip().splitlines()
    title = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("#") else "jedi-eval"
    return f"{EVAL_BEGIN}\n## Evaluation ({title})\n\n" + "\n".join(lines[1:]).strip() + f"\n{EVAL_END}"


def render(pipe, hparams: dict, step: int | None, run_dir: str | None, eval_md: str | None,
           grid_file: str | None) -> str:
    info = _run_info(run_dir)
    jedi = pipe.denoiser.jedi
    front = {"library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": TAGS}
    base = _base_model(hparams.get("model_dir"))
    if base:
        front["base_model"] = base
    opt = hparams.get("optimizer") or {}
    world = (info.get("devices") or 1) if isinstance(info.get("devices"), int) else 1
    world *= info.get("num_nodes") or 1
    rows = [("backbone", pipe.describe()),
            ("base model", base or f"local `{public_path(hparams.get('model_dir'), info.get('root_dir'))}`"),
            ("JeDi", (f"conditioning {jedi.conditioning}, reference timestep {jedi.reference_timestep}, "
                      f"reference attention {jedi.reference_attention}, "
                      f"reference cache {'on' if pipe.reference_cache_supported() else 'off'}")),
            ("prediction", pipe.scheduler.config.get("prediction_type") or "flow (velocity)"),
            ("data", ", ".join(f"`{s}`" for s in info.get("sources") or []) or "?"),
            ("steps", step if step is not None else "?"),
            ("batch", f"{info.get('batch_size', '?')} sets per device x {world} device(s)"
                      + (f", {info['strategy']}" if info.get("strategy") else "")),
            ("learning rate", opt.get("lr", "?")),
            ("run", f"{info.get('run_name') or '?'}" + (f" (W&B id `{info['run_id']}`)" if info.get("run_id") else ""))]
    rec = recommended_sampling(run_dir)
    g, ig = rec.get("guidance_scale", 3.0), rec.get("image_guidance_scale", 3.0)
    if rec:
        rows.append(("recommended sampling", ", ".join(f"{k} {v:g}" for k, v in rec.items())
                     + " (`sampling.json`: jedi-sample / jedi-app use them when not given)"))
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    snippet = (
        "```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
        "pipe = DiffusionPipeline.from_pretrained(\"PATH_OR_REPO\", trust_remote_code=True)  # code ships here\n"
        "# or, with jedi-train installed: from jedi_train.pipelines.auto import JeDiAutoPipeline; "
        "JeDiAutoPipeline.from_pretrained(...)\n"
        "images = pipe(reference_images=[\"ref1.jpg\", \"ref2.jpg\"],  # 1..K photos of one subject\n"
        "              prompt=[\"a photo of it on the beach\"], num_images_per_prompt=4,\n"
        f"              guidance_scale={g:g}, image_guidance_scale={ig:g},  # text / identity strength\n"
        "              generator=torch.Generator().manual_seed(0)).images\n```\n")
    parts = ["---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n",
             f"# JeDi personalized text-to-image ({pipe.resolution} px)\n",
             ("A Joint-Image Diffusion (JeDi) model trained with jedi-train (the `jedi-train` package): give "
              "it a few photos of a subject and prompts; it generates the subject in new scenes without "
              "finetuning (the references join the set of images it denoises jointly).\n"),
             "## Use\n", snippet,
             ("From the shell, with jedi-train installed: `jedi-sample PATH --ref PHOTOS_DIR --prompt \"a photo of "
              "it on the beach\" --num 4 --out OUT_DIR`"
              + (" (the recommended settings below are its defaults for this model).\n" if rec else ".\n")),
             "## Training\n", table + "\n"]
    if grid_file:
        parts += ["## Samples during training\n", f"![samples]({grid_file})\n"]
    if eval_md:
        parts.append(eval_md + "\n")
    return "\n".join(parts)


def write_model_card(out_dir: str, pipe, hparams: dict, step: int | None, run_dir: str | None) -> str:
    """README.md (and samples.png, the run's newest sample grid) into a pipeline directory."""
    grid = None
    grids = sorted(glob.glob(os.path.join(run_dir, "samples", "*.png"))) if run_dir else []
    if grids:
        shutil.copyfile(grids[-1], os.path.join(out_dir, "samples.png"))
        grid = "samples.png"
    rec = recommended_sampling(run_dir)
    if rec:  # jedi-sample / jedi-app read it (sampling.recommended_settings)
        import json

        from jedi_train.sampling import RECOMMENDED_FILE

        atomic_write_text(os.path.join(out_dir, RECOMMENDED_FILE), json.dumps(
            {**rec, "from": "the training run's config (sampling:)"}, indent=2) + "\n")
    path = os.path.join(out_dir, "README.md")
    atomic_write_text(path, render(pipe, hparams, step, run_dir, latest_eval_table(run_dir), grid))
    return path


def update_eval_section(pipeline_dir: str, summary_md: str) -> bool:
    """Put a jedi-eval summary into an export's model card (replacing the previous one); False if the
    directory has no card written by jedi-export."""
    path = os.path.join(pipeline_dir, "README.md")
    try:
        with open(path) as f:
            card = f.read()
    except OSError:
        return False
    if not card.startswith("---\n"):
        return False
    section = _eval_section(summary_md)
    if EVAL_BEGIN in card and EVAL_END in card:
        card = card[:card.index(EVAL_BEGIN)] + section + card[card.index(EVAL_END) + len(EVAL_END):]
    else:
        card = card.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(path, card)
    return True
