"""Identity against ground truth on held-out procedural subjects (refs x image guidance table).

For each held-out subject (a seed range never used for training shards) the model gets K reference
renders (random scenes and poses) and prompts naming other scenes; every generated image is scored
against the subject re-rendered in that scene (procedural.render_subject), which no real benchmark has.

Identity distance d(image, subject, scene): a subject-sensitive colour distance that ignores what the
scene explains. The image's foreground is every pixel whose colour is far from all background colours of
that scene (palette: background pixels of ground-truth renders in the scene); its soft 4x4x4 RGB
histogram is compared (total variation, in [0, 1]) with the subject's prototype: the histogram of
subject pixels (exact masks) over several ground-truth renders in the same scene (poses and lighting
vary). An image with no foreground scores 1.
- chance: d(image, a different subject of the same class), the same image scored against 7 distractors
  (mean): paired, so a blurry or hedging image that is no nearer the true subject than any other
  scores 0, whatever its distance (scoring distractors' own renders instead rewards blur: a run with
  no references closed 29% of an unpaired gap, at chance nearest-subject accuracy);
- ceiling: d(another ground-truth render of the true subject, true subject);
- gap closed = (chance - d) / (chance - ceiling), a ratio of means over images, per subject and
  overall, with a bootstrap 95% CI over subjects.
- nearest-subject accuracy: the true subject's prototype is nearer than all 7 distractors' (chance 1/8).
- scene accuracy: the image's whole colour histogram classified by the nearest of 13 scene centroids
  (calibrated on ground-truth renders; its accuracy on ground truth is reported too).
`--oracle ground_truth` scores ground-truth renders instead of samples (~100% gap closed),
`--oracle other_subject` renders of another subject (~0%): they validate the metric itself.
Beside colour identity: detail accuracy (pattern kind, frequency band, emblem, part layout) and
sharpness (details.py); `--oracle other_detail` (the same subject with another value of each attribute:
detail accuracy ~0) and `--oracle blurred` (ground truth blurred: sharpness well below 1) check them.
refs 0 (or image guidance 0) is the true no-reference baseline: no references in any guidance branch.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy.spatial import cKDTree

from data_pipelines.synth import procedural
from data_pipelines.synth.scenes import SCENE_NAMES
from jedi_common.atomic import atomic_path, atomic_write_text
from jedi_train.eval import details
from jedi_train.eval.common import (
    EvalError,
    bootstrap_ci,
    load_pipeline,
    parse_float_list,
    parse_int_list,
    write_csv_atomic,
    write_json_atomic,
)
from jedi_train.export.artifacts import log_eval_to_run
from jedi_train.export.model_card import update_eval_section

EVAL_TAG = 7_000_003  # subjects come from SeedSequence([EVAL_TAG, seed, i]): never a training set's seed
NUM_DISTRACTORS = 7
PROTO_RENDERS = 4
BG_TAU = 0.1  # colour distance (RGB in [0, 1]) below which a pixel counts as background; full foreground at 2x
ORACLES = ("none", "ground_truth", "other_subject", "other_detail", "blurred")


# -- the held-out world ------------------------------------------------------------------------------
@dataclass
class Case:
    """One held-out subject: its references and targets, and the distractors it is told apart from."""

    index: int
    spec: dict
    cls: str
    ref_scenes: list[str]
    ref_seeds: list[int]
    target_scenes: list[str]
    distractors: list[dict]
    gt_seed: int  # renders for prototypes / ceiling / oracles are seeded from it
    layout: str = "varied"  # how subjects sit in the frame (procedural.LAYOUTS), as in the training data
    refs: list[np.ndarray] = field(default_factory=list)

    def prompt(self, scene: str) -> str:
        return f"a photo of a {self.cls} {scene}"


def make_cases(num_subjects: int, max_refs: int, samples: int, seed: int, resolution: int,
               layout: str = "varied") -> list[Case]:
    cases = []
    for i in range(num_subjects):
        rng = np.random.default_rng([EVAL_TAG, seed, i])
        family = procedural.CLASSES[i % len(procedural.CLASSES)]  # balanced classes
        spec = procedural.sample_subject(rng, family)
        scenes = [SCENE_NAMES[j] for j in rng.permutation(len(SCENE_NAMES))]
        ref_scenes = scenes[:max_refs]
        rest = scenes[max_refs:] or scenes
        target_scenes = [rest[j % len(rest)] for j in range(samples)]
        ref_seeds = [int(x) for x in rng.integers(0, 2**62, size=max_refs)]
        distractors = [procedural.sample_subject(np.random.default_rng([EVAL_TAG, seed, i, 1, j]), family)
                       for j in range(NUM_DISTRACTORS)]
        case = Case(i, spec, family, ref_scenes, ref_seeds, target_scenes, distractors, int(rng.integers(0, 2**62)),
                    layout)
        case.refs = [procedural.render_subject(spec, sc, s, resolution, layout=layout)
                     for sc, s in zip(ref_scenes, ref_seeds)]
        cases.append(case)
    return cases


# -- colour descriptors -----------------------------------------------------------------------------
def soft_histogram(pixels: np.ndarray, weights: np.ndarray, bins: int = 4) -> np.ndarray:
    """(P, 3) colours in [0, 1], (P,) weights -> (bins**3,) trilinear soft histogram, summing to 1
    (all zeros when the weights are)."""
    x = np.clip(pixels, 0, 1) * (bins - 1)
    lo = np.minimum(np.floor(x).astype(int), bins - 2)
    frac = x - lo
    hist = np.zeros(bins ** 3)
    for corner in range(8):
        off = np.array([(corner >> k) & 1 for k in range(3)])
        w = weights * np.prod(np.where(off, frac, 1 - frac), axis=1)
        idx = ((lo + off) * np.array([bins * bins, bins, 1])).sum(1)
        hist += np.bincount(idx, weights=w, minlength=bins ** 3)
    total = hist.sum()
    return hist / total if total > 0 else hist


def tv_distance(a: np.ndarray, b: np.ndarray) -> float:
    if a.sum() == 0 or b.sum() == 0:
        return 1.0
    return float(0.5 * np.abs(a - b).sum())


class SceneModel:
    """What a scene explains: its background colours (palette) from ground-truth renders."""

    def __init__(self, backgrounds: list[np.ndarray]):
        colours = np.concatenate([b.reshape(-1, 3) for b in backgrounds]).astype(np.float32) / 255
        q = np.unique(np.round(colours * 31).astype(np.int16), axis=0)  # 5 bits per channel
        self.palette = q.astype(np.float32) / 31
        self.tree = cKDTree(self.palette)

    def foreground(self, image: np.ndarray) -> np.ndarray:
        """uint8 (R, R, 3) -> (R*R,) foreground weight in [0, 1]: distance to the nearest palette colour."""
        px = image.reshape(-1, 3).astype(np.float32) / 255
        dist, _ = self.tree.query(px, k=1, distance_upper_bound=2 * BG_TAU)
        return np.clip((np.minimum(dist, 2 * BG_TAU) - BG_TAU) / BG_TAU, 0, 1)

    def descriptor(self, image: np.ndarray) -> np.ndarray:
        return soft_histogram(image.reshape(-1, 3).astype(np.float32) / 255, self.foreground(image))


def subject_prototype(renders: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Histogram of subject pixels (exact masks) over several (image, mask) renders."""
    px = np.concatenate([im.reshape(-1, 3) for im, _ in renders]).astype(np.float32) / 255
    w = np.concatenate([m.reshape(-1) for _, m in renders]).astype(np.float32) / 255
    return soft_histogram(px, w)


def _renders(spec: dict, scene: str, base_seed: int, count: int, resolution: int, layout: str):
    return [procedural.render_subject(spec, scene, int(base_seed) + k, resolution, with_mask=True, layout=layout)
            for k in range(count)]


@dataclass
class Truth:
    """Everything the score of one (subject, scene) needs, computed once from ground-truth renders."""

    scene: SceneModel
    prototypes: np.ndarray  # (1 + distractors, bins^3): the true subject first
    ceiling: float
    ceiling_image: np.ndarray  # a ground-truth render of the target (shown in grids)
    oracle: dict  # name -> image


def build_truth(case: Case, scene: str, resolution: int) -> Truth:
    base = case.gt_seed + 1000 * SCENE_NAMES.index(scene)
    true = _renders(case.spec, scene, base, PROTO_RENDERS + 2, resolution, case.layout)  # protos, ceiling, oracle
    others = [_renders(d, scene, base + 100 * (j + 1), PROTO_RENDERS, resolution, case.layout)
              for j, d in enumerate(case.distractors)]
    fresh = procedural.sample_subject(np.random.default_rng([EVAL_TAG, case.gt_seed, 2]), case.cls)
    other_img = procedural.render_subject(fresh, scene, base + 99, resolution, layout=case.layout)
    backgrounds = [im[m == 0] for im, m in true + [r for rs in others for r in rs]]
    sm = SceneModel(backgrounds)
    protos = np.stack([subject_prototype(true[:PROTO_RENDERS])] + [subject_prototype(rs) for rs in others])
    ceiling_img = true[PROTO_RENDERS][0]
    ceiling = tv_distance(sm.descriptor(ceiling_img), protos[0])
    return Truth(sm, protos, ceiling, ceiling_img,
                 {"ground_truth": true[PROTO_RENDERS + 1][0], "other_subject": other_img})


class SceneClassifier:
    """Nearest centroid over whole-image colour histograms, one centroid per scene."""

    def __init__(self, resolution: int, per_scene: int = 16, seed: int = 0, layout: str = "varied"):
        rng = np.random.default_rng([EVAL_TAG, seed, 10**6])
        cents = []
        for sc in SCENE_NAMES:
            feats = [self.feature(procedural.render(procedural.sample_subject(rng), sc, rng, resolution, layout=layout))
                     for _ in range(per_scene)]
            cents.append(np.mean(feats, axis=0))
        self.centroids = np.stack(cents)

    @staticmethod
    def feature(image: np.ndarray) -> np.ndarray:
        px = image.reshape(-1, 3).astype(np.float32) / 255
        return soft_histogram(px, np.ones(len(px)))

    def predict(self, image: np.ndarray) -> str:
        return SCENE_NAMES[int(np.abs(self.centroids - self.feature(image)).sum(1).argmin())]


class WorldScorer:
    """Identity in the procedural world WITHOUT ground truth (jedi-generate --check identity with no extractors):
    an image's scene (SceneClassifier) picks the background palette (SceneModel of that scene's ground-truth
    renders) that separates its subject; the subject's soft colour histogram is the image's descriptor, as
    for score_image. Similarity of two descriptors: 1 - total variation (1 = same colours, 0 = disjoint)."""

    def __init__(self, resolution: int, seed: int = 0, per_scene: int = 6, layout: str = "varied"):
        self.resolution = resolution
        self.classifier = SceneClassifier(resolution, seed=seed, layout=layout)
        rng = np.random.default_rng([EVAL_TAG, seed, 2 * 10**6])
        self.scenes = {}
        for sc in SCENE_NAMES:
            renders = [procedural.render(procedural.sample_subject(rng), sc, rng, resolution, with_mask=True,
                                         layout=layout) for _ in range(per_scene)]
            self.scenes[sc] = SceneModel([im[m == 0] for im, m in renders])

    def descriptor(self, image: np.ndarray) -> np.ndarray:
        """uint8 (R, R, 3) at self.resolution -> foreground colour histogram (zeros: no foreground)."""
        return self.scenes[self.classifier.predict(image)].descriptor(image)

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(N, D) and (M, D) descriptors -> (N, M) of 1 - tv_distance."""
        return np.array([[1.0 - tv_distance(x, y) for y in b] for x in a]).reshape(len(a), len(b))


def score_image(image: np.ndarray, truth: Truth) -> dict:
    desc = truth.scene.descriptor(image)
    dists = [tv_distance(desc, p) for p in truth.prototypes]
    return {"distance": dists[0], "chance": float(np.mean(dists[1:])), "ceiling": truth.ceiling,
            "nearest_is_true": float(int(np.argmin(dists)) == 0)}


def gap_closed(rows: np.ndarray) -> float:
    """rows (n, 3): distance, chance, ceiling -> (mean chance - mean d) / (mean chance - mean ceiling)."""
    d, c, e = rows.mean(0)
    return float((c - d) / (c - e)) if c - e > 1e-9 else float("nan")


# -- the run ----------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("pipeline_dir", nargs="?", help="pipeline directory written by jedi-export (not needed with --oracle)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (a rerun reuses its images)")
    p.add_argument("--subjects", type=int, default=64, help="held-out subjects (default 64)")
    p.add_argument("--refs", default="0,1,3", help="reference counts to evaluate (default 0,1,3)")
    p.add_argument("--image-guidance", default="0,1,3", help="image guidance scales (default 0,1,3; 0 = no refs)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="text guidance (default 1: the text branch as trained, no extra push)")
    p.add_argument("--samples", type=int, default=2, help="generated images per subject, each in another scene")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--batch", type=int, default=8,
                   help="subjects per pipeline call (default 8; the same images as 1, faster; lower it if memory runs out)")
    p.add_argument("--seed", type=int, default=0, help="selects the held-out subjects and the sampling noise")
    p.add_argument("--oracle", choices=ORACLES, default="none",
                   help="score ground-truth renders (ground_truth), another subject (other_subject), the subject "
                        "with other details (other_detail) or blurred ground truth (blurred) instead")
    p.add_argument("--resolution", type=int, default=32, help="render size with --oracle (else the pipeline's)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--grids", type=int, default=8, help="subjects that get a grid (default 8)")
    p.add_argument("--wandb", choices=("auto", "off"), default="auto",
                   help="auto: log the table and grids to the W&B run that trained the pipeline (its run dir's "
                        "wandb_id.txt; offline without an API key); off: never")
    p.add_argument("--details", choices=("on", "off"), default="on",
                   help="on: detail accuracy and sharpness beside colour identity (~0.7 s per subject and "
                        "sample on a loaded 2-core machine); off: colour identity only")
    p.add_argument("--layout", choices=list(procedural.LAYOUTS), default=None,
                   help="how subjects sit in the frame, as in the training data (default: the run's "
                        "procedural_layout from PIPELINE_DIR/../config.yaml, else varied)")


def configs(refs: list[int], guidance: list[float]) -> list[tuple[int, float]]:
    """The table's (refs, image guidance) cells; refs 0 has only image guidance 0."""
    out = []
    for r in refs:
        for s in ([0.0] if r == 0 else guidance):
            if (r, s) not in out:
                out.append((r, s))
    return out


def generation_key(r: int, s: float) -> tuple[int, float]:
    """Cells that generate the same images: without references in any branch, K does not matter."""
    return (0, 0.0) if r == 0 or s == 0 else (r, s)


def weights_fingerprint(pipeline_dir: str | None) -> str | None:
    """Size and mtime of the UNet's weight files: a re-exported (further trained) pipeline in the same
    place must not reuse the images of the old one."""
    folder = os.path.join(pipeline_dir or "", "unet")
    if not os.path.isdir(folder):
        return None
    files = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin")))
    stats = [os.stat(os.path.join(folder, f)) for f in files]
    return ";".join(f"{f}:{st.st_size}:{st.st_mtime_ns}" for f, st in zip(files, stats))


def run_layout(pipeline_dir: str | None) -> str:
    """The procedural world a run trained on: `procedural_layout` in the run dir's config.yaml (the
    exported pipeline sits in RUN_DIR/pipeline), else "varied" (jedi-synth's default)."""
    path = os.path.join(os.path.dirname(os.path.abspath(pipeline_dir or ".")), "config.yaml")
    if not pipeline_dir or not os.path.exists(path):
        return "varied"
    from omegaconf import OmegaConf

    layout = OmegaConf.load(path).get("procedural_layout") or "varied"
    if layout not in procedural.LAYOUTS:
        raise EvalError(f"{path} names procedural_layout={layout!r}; known: {', '.join(procedural.LAYOUTS)}")
    return str(layout)


def check_args(args) -> tuple[list[int], list[float]]:
    if args.layout is None:
        args.layout = run_layout(args.pipeline_dir)
    refs = parse_int_list(args.refs, "--refs")
    guid = parse_float_list(args.image_guidance, "--image-guidance")
    for name, value, low in (("--subjects", args.subjects, 1), ("--samples", args.samples, 1), ("--steps", args.steps, 1),
                             ("--batch", args.batch, 1)):
        if value < low:
            raise EvalError(f"{name} {value} is too small; use {name} {low} or more")
    if max(refs) + args.samples > len(SCENE_NAMES):
        raise EvalError(f"--refs {max(refs)} + --samples {args.samples} exceed the {len(SCENE_NAMES)} scenes; "
                        "lower one of them")
    if args.oracle in ("other_detail", "blurred") and args.details == "off":
        raise EvalError(f"--oracle {args.oracle} checks the detail measures; drop --details off")
    if args.oracle == "none" and not args.pipeline_dir:
        raise EvalError("no PIPELINE_DIR given; pass the folder jedi-export wrote (or --oracle for a metric check)")
    return refs, guid


def run(args) -> int:
    from tqdm.auto import tqdm

    refs, guid = check_args(args)
    cells = configs(refs, guid)
    settings = {"subjects": args.subjects, "refs": refs, "image_guidance": guid, "guidance": args.guidance,
                "samples": args.samples, "steps": args.steps, "seed": args.seed, "oracle": args.oracle,
                "pipeline": os.path.abspath(args.pipeline_dir) if args.pipeline_dir else None,
                "pipeline_weights": weights_fingerprint(args.pipeline_dir) if args.oracle == "none" else None,
                "render_resolution": args.resolution if args.oracle != "none" else None, "layout": args.layout}
    settings_path = os.path.join(args.out, "settings.json")
    if os.path.exists(settings_path):  # before the model loads: a mismatch is refused at once
        with open(settings_path) as f:
            if json.load(f) != json.loads(json.dumps(settings)):
                raise EvalError(f"--out {args.out} holds an evaluation with other settings; use a new --out")
    pipe = load_pipeline(args.pipeline_dir, args.device) if args.oracle == "none" else None
    resolution = pipe.resolution if pipe is not None else args.resolution
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(settings_path, settings)
    settings = {**settings, "resolution": resolution}

    cases = make_cases(args.subjects, max(refs), args.samples, args.seed, resolution, args.layout)
    keys = list(dict.fromkeys(generation_key(r, s) for r, s in cells))
    images = generate(pipe, cases, keys, args, tqdm) if pipe is not None else None
    truths = {(c.index, sc): build_truth(c, sc, resolution)
              for c in tqdm(cases, desc="ground truth", leave=False) for sc in c.target_scenes}
    classifier = SceneClassifier(resolution, seed=args.seed, layout=args.layout)
    detail_truths = details.build_for_cases(cases, truths, resolution, tqdm) if args.details == "on" else {}

    per_image = []
    for r, s in cells:
        for c in cases:
            for j, sc in enumerate(c.target_scenes):
                t = truths[(c.index, sc)]
                img = t.oracle[args.oracle] if images is None else images[generation_key(r, s)][(c.index, j)]
                row = {"refs": r, "image_guidance": s, "subject": c.index, "class": c.cls, "sample": j,
                       "scene": sc, **score_image(img, t), "scene_correct": float(classifier.predict(img) == sc),
                       **details.columns(img, detail_truths.get((c.index, sc)), args.oracle)}
                per_image.append(row)
    gt_scene_acc = float(np.mean([classifier.predict(t.ceiling_image) == sc for (_, sc), t in truths.items()]))
    summary = summarize(per_image, cells, settings, gt_scene_acc)
    if images is not None:
        write_grids(args.out, cases, cells, images, truths, args.grids)
    write_csv_atomic(os.path.join(args.out, "per_image.csv"), [
        {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()} for row in per_image])
    atomic_write_text(os.path.join(args.out, "summary.md"), summary_markdown(summary))
    write_json_atomic(os.path.join(args.out, "summary.json"), summary)  # last: its presence means complete
    if args.oracle == "none" and update_eval_section(args.pipeline_dir, summary_markdown(summary)):
        print(f"model card {os.path.join(args.pipeline_dir, 'README.md')}: evaluation section updated")
    if args.oracle == "none" and args.wandb == "auto":
        grids = sorted(glob.glob(os.path.join(args.out, "grids", "*.png")))
        run_id = log_eval_to_run(args.pipeline_dir, "eval_procedural", summary["rows"], WANDB_COLUMNS, grids)
        if run_id:
            print(f"W&B: table and {len(grids)} grids logged to the training run {run_id}")
    print(summary_markdown(summary))
    return 0


WANDB_COLUMNS = ["refs", "image_guidance", "gap_closed", "nearest_subject_acc", "scene_acc", "distance", "chance",
                 "ceiling", "n_images", "pattern_acc", "pattern_gap_closed", "frequency_gap_closed", "emblem_gap_closed",
                 "parts_gap_closed", "sharpness"]


def generate(pipe, cases: list[Case], keys: list[tuple[int, float]], args, tqdm) -> dict:
    """{key: {(subject, sample): uint8 image}}; images already in --out/images are reused. Up to --batch
    subjects share one pipeline call, each with its own generator: the same images as one call each."""
    import torch

    out: dict = {}
    bar = tqdm(total=len(keys) * len(cases), desc="generating", unit="subject")
    for r, s in keys:
        folder = os.path.join(args.out, "images", f"refs{r}_ig{s:g}")
        os.makedirs(folder, exist_ok=True)
        got = out.setdefault((r, s), {})
        paths = {c.index: [os.path.join(folder, f"{c.index:04d}_{j}.png") for j in range(len(c.target_scenes))]
                 for c in cases}
        todo = [c for c in cases if not all(os.path.exists(p) for p in paths[c.index])]
        reused = len(cases) - len(todo)
        bar.update(reused)
        for first in range(0, len(todo), args.batch):
            batch = todo[first:first + args.batch]
            res = pipe(reference_images=[[Image.fromarray(x) for x in c.refs[:r]] if r else None for c in batch],
                       reference_captions=[[c.prompt(sc) for sc in c.ref_scenes[:r]] if r else None for c in batch],
                       prompt=[[c.prompt(sc) for sc in c.target_scenes] for c in batch],
                       generator=[torch.Generator(device="cpu").manual_seed(args.seed * 1_000_003 + c.index)
                                  for c in batch],  # the same noise per cell
                       num_inference_steps=args.steps, guidance_scale=args.guidance, image_guidance_scale=s,
                       output_type="np")
            for c, arrays in zip(batch, res.images):
                for p, arr in zip(paths[c.index], arrays):
                    with atomic_path(p) as tmp:
                        Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(tmp)
                bar.update(1)
        for c in cases:
            for j, p in enumerate(paths[c.index]):
                got[(c.index, j)] = np.asarray(Image.open(p).convert("RGB"))
    bar.close()
    return out


def summarize(per_image: list[dict], cells, settings: dict, gt_scene_acc: float) -> dict:
    rows = []
    for r, s in cells:
        sel = [x for x in per_image if x["refs"] == r and x["image_guidance"] == s]
        subjects = sorted({x["subject"] for x in sel})
        per_subject = np.array([np.mean([[x["distance"], x["chance"], x["ceiling"]] for x in sel
                                         if x["subject"] == k], axis=0) for k in subjects])
        nearest = np.array([np.mean([x["nearest_is_true"] for x in sel if x["subject"] == k]) for k in subjects])
        lo, hi = bootstrap_ci(per_subject, gap_closed, seed=settings["seed"])
        nlo, nhi = bootstrap_ci(nearest, seed=settings["seed"])
        rows.append({"refs": r, "image_guidance": s, "gap_closed": gap_closed(per_subject), "gap_closed_ci": [lo, hi],
                     "nearest_subject_acc": float(nearest.mean()), "nearest_subject_acc_ci": [nlo, nhi],
                     "scene_acc": float(np.mean([x["scene_correct"] for x in sel])),
                     "distance": float(per_subject[:, 0].mean()), "chance": float(per_subject[:, 1].mean()),
                     "ceiling": float(per_subject[:, 2].mean()), "n_images": len(sel), "n_subjects": len(subjects),
                     "per_subject_gap_closed": {int(k): gap_closed(per_subject[i:i + 1]) for i, k in enumerate(subjects)},
                     **details.summarize_cell(sel, settings["seed"], bootstrap_ci)})
    return {"rows": rows, "pipeline": settings["pipeline"], "settings": settings,
            "ground_truth_scene_acc": gt_scene_acc, "nearest_subject_chance": 1 / (1 + NUM_DISTRACTORS)}


def summary_markdown(summary: dict) -> str:
    st = summary["settings"]
    lines = [f"# jedi-eval procedural: {st['subjects']} held-out subjects x {st['samples']} images per cell"
             + (f" (oracle: {st['oracle']})" if st["oracle"] != "none" else ""), "",
             ("| refs | image guidance | gap closed (95% CI) | nearest subject (chance 0.125) | scene acc | "
             "distance / chance / ceiling | images |"), "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lo, hi = r["gap_closed_ci"]
        lines.append(f"| {r['refs']} | {r['image_guidance']:g} | {100 * r['gap_closed']:.1f}% "
                     f"({100 * lo:.1f}, {100 * hi:.1f}) | {r['nearest_subject_acc']:.3f} | {r['scene_acc']:.3f} | "
                     f"{r['distance']:.3f} / {r['chance']:.3f} / {r['ceiling']:.3f} | {r['n_images']} |")
    lines += ["", (f"Scene classifier accuracy on ground-truth renders: {summary['ground_truth_scene_acc']:.3f}. "
              "Gap closed = (chance - distance) / (chance - ceiling); CI: bootstrap over subjects."), ""]
    lines += details.table_markdown(summary["rows"])
    return "\n".join(lines)


def write_grids(out: str, cases: list[Case], cells, images: dict, truths: dict, count: int) -> None:
    from jedi_train.viz import sample_grid

    os.makedirs(os.path.join(out, "grids"), exist_ok=True)
    for c in cases[:count]:
        rows = []
        for r, s in cells:
            gen = [Image.fromarray(images[generation_key(r, s)][(c.index, j)]) for j in range(len(c.target_scenes))]
            truth = [Image.fromarray(truths[(c.index, sc)].ceiling_image) for sc in c.target_scenes]
            labels = [f"refs {r}, img guid {s:g}: {sc}" for sc in c.target_scenes]
            rows.append(([Image.fromarray(x) for x in c.refs[:r]], gen, truth, labels))
        path = os.path.join(out, "grids", f"subject{c.index:04d}.png")
        with atomic_path(path) as tmp:
            sample_grid(rows).save(tmp)
