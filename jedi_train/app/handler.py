"""What the page calls: JeDiApp.generate (references + prompts -> gallery, references, zip, status, and with
"explain" each result's reference attention overlays) and
JeDiApp.preview (uploads -> the references as the model will see them). Sampling is jedi-sample's own
(sampling.py: prepare_references, make_scheduler, generate, settings_dict, write_results), with the same
defaults; a request's directory holds exactly what jedi-sample writes to --out, and the zip holds that."""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time

import gradio as gr

from jedi_train import sampling as sample

MAX_PROMPTS = 8
MAX_IMAGES_PER_PROMPT = 8
MAX_STEPS = 200
MAX_PIXELS = 8192 * 8192  # per reference photo: a shared server decodes nothing bigger
TRACK_TQDM = gr.Progress(track_tqdm=True)  # Gradio swaps in each request's own tracker: the sampler's tqdm
KEEP_RESULTS = 16  # request directories kept on disk (the page's downloads point into them)
SCHEDULER_CHOICES = ("default", *sample.SCHEDULERS)  # default: the pipeline's own


def refuse(msg: str) -> gr.Error:
    """A user's mistake: one line in the page (a toast), no traceback in the server's log."""
    return gr.Error(" ".join(msg.split()), print_exception=False)


def _path(f) -> str:
    return os.fspath(getattr(f, "name", f))  # gr.File gives paths; older Gradio gave tempfile wrappers


def _short(msg: str, files) -> str:
    """One line, with upload temp folders stripped from the paths (the user knows the file names)."""
    for f in files:
        folder = os.path.dirname(f)
        if folder:
            msg = msg.replace(folder + os.sep, "")
    return msg


def parse_prompts(text: str | None) -> list[str]:
    prompts = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    if not prompts:
        raise refuse("no prompt given; write one prompt per line in the Prompts box")
    if len(prompts) > MAX_PROMPTS:
        raise refuse(f"{len(prompts)} prompts given, at most {MAX_PROMPTS} per request; remove some lines")
    return prompts


def parse_seed(value) -> int:
    text = str(value if value is not None else "").strip().lower()
    if text in ("random", "r", "-1"):
        return secrets.randbelow(2**31)
    try:
        seed = int(float(text))
    except ValueError:
        raise refuse(f"seed {value!r} is not a number; give an integer such as 0, or \"random\"") from None
    if seed < 0:
        raise refuse(f"seed {seed} is negative; give 0 or more, or \"random\"")
    return seed


class JeDiApp:
    def __init__(self, pipe, pipeline_dir: str, max_refs: int = 8, work_dir: str | None = None,
                 examples: dict | None = None):
        self.pipe, self.pipeline_dir, self.max_refs = pipe, os.path.abspath(pipeline_dir), max_refs
        self.base_scheduler = pipe.scheduler
        # the page's initial settings: the export's recommended ones (sampling.json), else jedi-sample's defaults
        self.settings, self.settings_from = sample.resolve_settings(self.pipeline_dir, {})
        self.work_dir = work_dir or tempfile.mkdtemp(prefix="jedi-app-")
        self.examples = examples if examples is not None else {}
        self.lock = threading.Lock()  # one sampling at a time on the one model (the queue also says so)
        self._count = 0

    # -- what the page shows about the model -------------------------------------------------------
    def model_info(self) -> str:

        pipe = self.pipe
        if pipe.reference_cache_supported():
            cache = "on (references at t = 0, attending only to references: keys/values computed once)"
        else:
            cache = (f"off (this model has reference_timestep={pipe.denoiser.jedi.reference_timestep}; "
                     "references are recomputed at every step)")
        return (f"**Model** `{self.pipeline_dir}`  \n**Backbone** {pipe.describe()}  \n"
                f"**Resolution** {pipe.resolution} px  \n**Reference KV cache** {cache}  \n"
                f"**Device** {pipe.device}  \n**Sampler** {type(self.base_scheduler).__name__} (default)  \n"
                f"**Settings** {self.settings_line()}")

    def settings_line(self) -> str:
        """Which initial settings the page shows and where they came from."""
        v, src = self.settings, self.settings_from
        where = {"export": f"recommended by the export ({sample.RECOMMENDED_FILE})", "default": "jedi-sample's default"}
        return "; ".join(f"{sample.SETTINGS[k][2]} {v[k]:g}: {where[src[k]]}" for k in sample.SETTINGS)

    # -- references -------------------------------------------------------------------------------
    def _reference_files(self, files, example: str | None) -> tuple[list[str], list[str]]:
        paths = [_path(f) for f in files or []]
        if not paths and example:
            if example not in self.examples:
                raise refuse(f"example {example!r} is unknown; pick one from the list")
            paths = list(self.examples[example].files)
        if len(paths) > self.max_refs:
            raise refuse(f"{len(paths)} reference photos given, at most {self.max_refs}; remove some "
                           f"(or start jedi-app with --max-refs {len(paths)})")
        try:
            return sample.prepare_references(paths, MAX_PIXELS) if paths else ([], [])
        except (sample.UsageError, ValueError, FileNotFoundError, OSError) as e:
            raise refuse(_short(str(e), paths)) from None

    def preview(self, files, example: str | None = None):
        """Uploads (or an example) -> the references cropped and resized as the model will see them."""
        from jedi_train.pipelines.references import load_references

        ref_files, warnings = self._reference_files(files, example)
        for w in warnings:
            gr.Warning(_short(w, ref_files))
        return load_references(ref_files, self.pipe.resolution)[1] if ref_files else []

    # -- sampling ---------------------------------------------------------------------------------
    def _new_request_dir(self) -> str:
        old = sorted(d for d in os.listdir(self.work_dir) if d.startswith("request-"))
        for d in old[:max(0, len(old) - KEEP_RESULTS + 1)]:
            shutil.rmtree(os.path.join(self.work_dir, d), ignore_errors=True)
            try:
                os.remove(os.path.join(self.work_dir, d + ".zip"))
            except FileNotFoundError:
                pass
        self._count += 1
        path = os.path.join(self.work_dir, f"request-{time.strftime('%Y%m%d-%H%M%S')}-{self._count:05d}")
        os.makedirs(os.path.join(path, "jedi-sample"))
        return path

    def generate(self, files, example, prompts_text, num=1, steps=None, guidance=None, image_guidance=None,
                 scheduler="default", seed=sample.DEFAULTS["seed"], explain=False, progress=TRACK_TQDM):
        """-> (gallery [(png, prompt)], references as the model saw them [png], zip path, status markdown,
        explained [(overlay png, caption)]: with explain, per result its overlay over each reference (where it took
        its subject from, jedi-sample --explain's files), else []).
        steps / guidance / image_guidance None: the export's recommended value, else jedi-sample's default."""
        values, settings_from = sample.resolve_settings(
            self.pipeline_dir, {"steps": steps, "guidance": guidance, "image_guidance": image_guidance})
        steps, guidance, image_guidance = values["steps"], values["guidance"], values["image_guidance"]
        prompts = parse_prompts(prompts_text)
        num, steps = int(num), int(steps)
        if not 1 <= num <= MAX_IMAGES_PER_PROMPT:
            raise refuse(f"number of images {num} is out of range; use 1 to {MAX_IMAGES_PER_PROMPT} per prompt")
        if not 1 <= steps <= MAX_STEPS:
            raise refuse(f"steps {steps} is out of range; use 1 to {MAX_STEPS}")
        guidance, image_guidance = float(guidance), float(image_guidance)
        if guidance < 0 or image_guidance < 0:
            raise refuse("text guidance and image guidance must be 0 or more")
        if scheduler not in SCHEDULER_CHOICES:
            raise refuse(f"scheduler {scheduler!r} is unknown; use one of {', '.join(SCHEDULER_CHOICES)}")
        seed = parse_seed(seed)
        progress(0, desc="reading references")
        ref_files, warnings = self._reference_files(files, example)
        if not ref_files and image_guidance != 0:
            raise refuse(f"no reference photos, but image guidance {image_guidance:g} needs them; upload 1 to "
                           f"{self.max_refs} photos of the subject (or pick an example), or set image guidance to 0 "
                           "for plain text-to-image")
        for w in warnings:
            gr.Warning(_short(w, ref_files))

        max_set_size = sample.DEFAULTS["max_set_size"]
        with self.lock:
            self.pipe.scheduler = sample.make_scheduler(self.base_scheduler, None if scheduler == "default" else scheduler,
                                                       self.pipe.family)
            progress(0, desc="sampling")
            try:
                result, seconds = sample.generate(self.pipe, ref_files, prompts, num, seed, steps, guidance,
                                                  image_guidance, max_set_size, explain=bool(explain))
            except ValueError as e:
                raise refuse(_short(str(e), ref_files)) from None
            settings = sample.settings_dict(self.pipe, self.pipeline_dir, ref_files, prompts, num, seed, steps,
                                            guidance, image_guidance, max_set_size, False, seconds, ["jedi-app"],
                                            settings_from, bool(explain))
        request = self._new_request_dir()
        out = os.path.join(request, "jedi-sample")
        sample.write_results(out, result, settings)
        archive = shutil.make_archive(os.path.join(request, f"jedi-app-seed{seed}"), "zip", root_dir=out)
        gallery = [(os.path.join(out, o["file"]), o["prompt"]) for o in settings["outputs"]]
        refs = [os.path.join(out, "references", f) for f in sorted(os.listdir(os.path.join(out, "references")))]
        status = (f"{len(gallery)} image{'s' if len(gallery) != 1 else ''} from {len(ref_files)} reference(s) in {seconds:.1f} s: seed {seed}, "
                  f"{steps} steps, {settings['scheduler']}, reference cache "
                  f"{'on' if settings['reference_cache'] else 'off'}")
        if warnings:
            status += "\n\n" + "\n".join(f"- warning: {_short(w, ref_files)}" for w in warnings)
        return gallery, refs, archive, status, explained(out, settings["outputs"])


def explained(out: str, outputs: list[dict]) -> list[tuple[str, str]]:
    """[(overlay png, caption)] in result order, each result's overlays one after the other (none without explain)."""
    shown = []
    for i, o in enumerate(outputs):
        a = o.get("attention")
        for j, name in enumerate(a["overlays"] if a else []):
            caption = f"result {i + 1} ({o['prompt']}): reference {j + 1}, {100 * a['reference_shares'][j]:.0f}%"
            shown.append((os.path.join(out, name), caption + " of its attention"))
    return shown
