"""DreamBench protocol: DINO, CLIP-I, CLIP-T (and MDINO) of JeDi samples of real photographed subjects.

jedi-eval dreambench PIPELINE_DIR --bench DIR --refs 1,3 --samples 4 --out DIR --dino DIR --clip SPEC

The bench is a DreamBench-layout folder (<subject>/<NN>.jpg + prompts_and_classes.txt); only the
subjects whose folder exists are evaluated. Per subject: the 25 object or live-subject prompts
(live = the cat and dog classes, DreamBench's 9 pets) with the class noun filled in and NO rare
token ("a dog in the jungle"; JeDi is finetuning-free, there is no learned identifier), K
references drawn reproducibly from (seed, subject) (nested: the 1-reference set is a subset of the
3-reference set), S images per prompt.

Per image: DINO and CLIP-I = cosine of the image's embedding to each real photo of the subject,
averaged over ALL its photos, the references included (DreamBooth's protocol: compare against every
real image; a model that copies its references scores high, which the grids make visible). CLIP-T =
CLIP cosine of the image and its prompt. MDINO (only with --masks DIR holding DIR/<subject>/<NN>.png
for the real photos): DINO of the WHOLE generated image (it has no mask) against the masked real
photos (background filled with the ImageNet mean colour, i.e. zero after normalisation), over the
photos that have a mask. --real adds the real-vs-real ceiling (each photo against the others; for
MDINO each whole photo against the others masked, as a generated image is scored).

--out: images/<subject>/refs<K>/<PP>_<SS>.png, grids/<subject>.png, per_image.csv, summary.md and,
written last, summary.json. Rerunning with the same generation settings reuses the PNGs on disk and
recomputes every score (generation.json records the settings; different ones are refused).
Overall means are means of per-subject means with 95% bootstrap CIs over subjects; per-subject CIs
are over prompts.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import time
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from jedi_common.atomic import atomic_path, atomic_write_text
from jedi_train.eval import common, extractors
from jedi_train.eval.common import EvalError
from jedi_train.export.artifacts import log_eval_to_run
from jedi_train.export.model_card import update_eval_section

LIVE_CLASSES = ("cat", "dog")
METRICS = ("dino", "clip_i", "clip_t", "mdino")
MASK_FILL = (124, 116, 104)  # ImageNet mean colour: normalises to ~0
PUBLISHED = [  # other papers' numbers, with real pretrained extractors (DINO ViT-S/16, CLIP ViT-B/32)
    {"method": "DreamBooth (Stable Diffusion)", "dino": 0.668, "clip_i": 0.803, "clip_t": 0.305,
     "source": "Ruiz et al. 2023, DreamBooth, Table 1"},
    {"method": "Textual Inversion (Stable Diffusion)", "dino": 0.569, "clip_i": 0.780, "clip_t": 0.255,
     "source": "Ruiz et al. 2023, DreamBooth, Table 1"},
    {"method": "BLIP-Diffusion (zero-shot)", "dino": 0.594, "clip_i": 0.779, "clip_t": 0.300,
     "source": "Li et al. 2023, BLIP-Diffusion, Table 1"},
    {"method": "Real images", "dino": 0.774, "clip_i": 0.885, "clip_t": None,
     "source": "Ruiz et al. 2023, DreamBooth, Table 1"},
]
_TEMPLATE = re.compile(r"""^\s*(['"])(.*)\1\s*\.format\(""")


# -- the bench ---------------------------------------------------------------------------------------
@dataclass
class Bench:
    root: str
    classes: dict[str, str]  # subject -> class noun, in the table's order
    object_templates: list[str]
    live_templates: list[str]

    def is_live(self, subject: str) -> bool:
        return self.classes[subject] in LIVE_CLASSES

    def prompts(self, subject: str) -> list[str]:
        templates = self.live_templates if self.is_live(subject) else self.object_templates
        return [fill_prompt(t, self.classes[subject]) for t in templates]

    def photos(self, subject: str) -> list[str]:
        from jedi_train.pipelines.references import IMAGE_EXTENSIONS

        folder = os.path.join(self.root, subject)
        return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]

    def present(self) -> list[str]:
        return [s for s in self.classes if os.path.isdir(os.path.join(self.root, s))]


def fill_prompt(template: str, class_noun: str) -> str:
    """'a {0} {1} in the snow' -> 'a dog in the snow': {0} (DreamBooth's rare token) is left empty."""
    return " ".join(template.format("", class_noun).split())


def load_bench(root: str) -> Bench:
    """Parse prompts_and_classes.txt: the `subject_name,class` table, then the object prompts and the
    live-subject prompts, each a list of 'a {0} {1} ...'.format(unique_token, class_token) lines."""
    path = os.path.join(root, "prompts_and_classes.txt")
    if not os.path.isdir(root):
        raise EvalError(f"--bench {root} does not exist; give a DreamBench-layout folder")
    if not os.path.isfile(path):
        raise EvalError(f"--bench {root} has no prompts_and_classes.txt, so it is not a DreamBench-layout folder "
                        "(subject folders of photos + prompts_and_classes.txt)")
    classes, lists, section, in_table = {}, {"object": [], "live": []}, None, False
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            low = text.lower()
            if low.replace(" ", "") == "subject_name,class":
                in_table = True
            elif in_table and "," in text:
                name, noun = (v.strip() for v in text.split(",", 1))
                classes[name] = noun
            elif in_table and text:
                in_table = False  # the table ends at the first line that is not `name,class`
            if low.startswith("object prompts"):
                section = "object"
            elif low.startswith("live subject prompts"):
                section = "live"
            elif section and (m := _TEMPLATE.match(text)):
                lists[section].append(m.group(2))
    for what, found in (("a `subject_name,class` table", classes), ("object prompts", lists["object"]),
                        ("live subject prompts", lists["live"])):
        if not found:
            raise EvalError(f"{path} has no {what}; use DreamBench's prompts_and_classes.txt format")
    return Bench(root, classes, lists["object"], lists["live"])


def choose_references(photos: list[str], k: int, seed: int, subject: str) -> list[str]:
    """K photos drawn from (seed, subject) alone (crc32: stable across processes, unlike hash()); the
    first K of one permutation, so smaller reference sets are subsets of larger ones."""
    order = np.random.default_rng([seed, zlib.crc32(subject.encode())]).permutation(len(photos))
    return [photos[i] for i in sorted(order[:k])]


def generation_seed(seed: int, subject: str, k: int, first_prompt: int) -> int:
    """One generator seed per pipeline call, independent of which other subjects / --refs are run."""
    return int(np.random.SeedSequence([seed, zlib.crc32(subject.encode()), k, first_prompt]).generate_state(1)[0])


# -- metrics -----------------------------------------------------------------------------------------
def _unit(x) -> np.ndarray:
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mean_cosine(gen_emb, real_embs) -> np.ndarray:
    """(N, D) generated and (M, D) real embeddings -> (N,): each image's cosine to every real one, averaged."""
    return (_unit(gen_emb) @ _unit(real_embs).T).mean(axis=1)


def paired_cosine(a, b) -> np.ndarray:
    """Row i of a against row i of b (CLIP-T: an image and its own prompt)."""
    return np.sum(_unit(a) * _unit(b), axis=1)


def real_vs_real(embs, others=None) -> np.ndarray:
    """(M, D) -> (M,): each real photo against the OTHER photos of its subject (the ceiling). `others`:
    the same M photos embedded another way (row i = photo i; MDINO: masked), compared instead."""
    sim = _unit(embs) @ _unit(embs if others is None else others).T
    m = len(sim)
    return (sim.sum(axis=1) - np.diag(sim)) / (m - 1) if m > 1 else np.full(m, np.nan)


def open_photo(path: str) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


def apply_mask(img: Image.Image, mask_path: str) -> Image.Image:
    """Subject (mask > 127) kept, the rest filled with MASK_FILL."""
    mask = np.asarray(Image.open(mask_path).convert("L").resize(img.size, Image.NEAREST)) > 127
    return Image.fromarray(np.where(mask[..., None], np.asarray(img), np.uint8(MASK_FILL)))


# -- CLI ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline_dir", help="pipeline directory written by jedi-export")
    p.add_argument("--bench", required=True, metavar="DIR", help="DreamBench-layout folder")
    p.add_argument("--refs", default="1,3", help="comma-separated reference counts K (default 1,3)")
    p.add_argument("--samples", type=int, default=4, help="images per (subject, prompt, K) (default 4)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (a rerun reuses its images)")
    p.add_argument("--subjects", default=None, help="comma-separated subset (default: every subject folder)")
    p.add_argument("--wandb", choices=("auto", "off"), default="auto",
                   help="auto: log the table and grids to the W&B run that trained the pipeline; off: never")
    p.add_argument("--prompts-per-subject", type=int, default=25, metavar="N",
                   help="use the first N of the 25 prompts (default 25, the protocol; fewer for smoke tests)")
    p.add_argument("--batch-prompts", type=int, default=5, metavar="N", help="prompts per subject and call (default 5)")
    p.add_argument("--batch", type=int, default=4, metavar="N",
                   help="subjects (prompt chunks) per pipeline call (default 4; the same images as 1, faster)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference choice and the noise (default 0)")
    p.add_argument("--guidance", type=float, default=3.0, help="text guidance scale (default 3.0)")
    p.add_argument("--image-guidance", type=float, default=2.0, help="image guidance scale (default 2.0)")
    p.add_argument("--dino", default=None, metavar="DIR", help="local transformers ViT/DINOv2 directory (required)")
    p.add_argument("--clip", default=None, metavar="SPEC",
                   help="local transformers CLIPModel directory or open_clip ARCH:CHECKPOINT (required)")
    p.add_argument("--masks", default=None, metavar="DIR", help="subject masks DIR/<subject>/<NN>.png: adds MDINO")
    p.add_argument("--real", action="store_true", help="also score real photos against each other (the ceiling)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _plan(args) -> dict:
    """Every check that needs no model: EvalError before anything heavy loads."""
    for name, value, low in (("--samples", args.samples, 1), ("--steps", args.steps, 1),
                             ("--prompts-per-subject", args.prompts_per_subject, 1),
                             ("--batch-prompts", args.batch_prompts, 1), ("--batch", args.batch, 1)):
        if value < low:
            raise EvalError(f"{name} {value} is too small; use {name} {low} or more")
    if args.guidance < 0 or args.image_guidance < 0:
        raise EvalError("--guidance and --image-guidance must be >= 0")
    refs = sorted(set(common.parse_int_list(args.refs, "--refs", low=1)))
    bench = load_bench(args.bench)
    present = bench.present()
    if args.subjects:
        subjects = list(dict.fromkeys(s.strip() for s in args.subjects.split(",") if s.strip()))
        for s in subjects:
            if s not in bench.classes:
                raise EvalError(f"--subjects {s} is not in {args.bench}/prompts_and_classes.txt; "
                                f"subjects here: {','.join(present)}")
            if s not in present:
                raise EvalError(f"--subjects {s} has no photo folder in {args.bench}; subjects here: {','.join(present)}")
    else:
        subjects = present
    if not subjects:
        raise EvalError(f"--bench {args.bench} has none of the subject folders its table lists")
    photos = {s: bench.photos(s) for s in subjects}
    for s in subjects:
        n = len(photos[s])
        if refs[-1] > n:
            raise EvalError(f"--refs {refs[-1]} is more than the {n} photos of subject {s} "
                            f"({os.path.join(args.bench, s)}); use --refs {n} or less, or leave {s} out with --subjects")
        if args.real and n < 2:
            raise EvalError(f"--real compares photos with each other, but subject {s} has {n}; leave it out")
    n_prompts = min(args.prompts_per_subject, len(bench.object_templates), len(bench.live_templates))
    masks = {}
    if args.masks:
        if not os.path.isdir(args.masks):
            raise EvalError(f"--masks {args.masks} does not exist; give a folder of <subject>/<NN>.png masks")
        for s in subjects:
            for p in photos[s]:
                m = os.path.join(args.masks, s, os.path.splitext(os.path.basename(p))[0] + ".png")
                if os.path.isfile(m):
                    masks.setdefault(s, {})[p] = m
        if not masks:
            raise EvalError(f"--masks {args.masks} has no <subject>/<NN>.png for any evaluated subject's photos")
    extractors.check_dino(args.dino)
    extractors.check_clip(args.clip)
    generation = {"pipeline": os.path.realpath(args.pipeline_dir), "samples": args.samples, "steps": args.steps,
                  "seed": args.seed, "guidance": args.guidance, "image_guidance": args.image_guidance,
                  "prompts_per_subject": n_prompts, "batch_prompts": args.batch_prompts}
    gen_file = os.path.join(args.out, "generation.json")
    if os.path.isfile(gen_file):
        with open(gen_file) as f:
            old = json.load(f)
        diff = sorted(k for k in generation if old.get(k) != generation[k])
        if diff:
            raise EvalError(f"--out {args.out} holds images generated with other settings ({', '.join(diff)} "
                            f"differ); use another --out, or delete {args.out}/images and generation.json")
    return {"refs": refs, "bench": bench, "subjects": subjects, "photos": photos, "n_prompts": n_prompts,
            "masks": masks, "generation": generation}


def _image_path(out: str, subject: str, k: int, p: int, s: int) -> str:
    return os.path.join(out, "images", subject, f"refs{k}", f"{p:02d}_{s:02d}.png")


def _save_png(img: Image.Image, path: str) -> None:
    with atomic_path(path) as tmp:  # a killed run never leaves a truncated PNG to "reuse"
        img.save(tmp)


def _generate(args, plan, pipe) -> tuple[int, int]:
    """Every missing PNG, a few prompts per pipeline call. Returns (generated, reused)."""
    import torch
    from tqdm.auto import tqdm

    jobs = []
    for subject in plan["subjects"]:
        prompts = plan["bench"].prompts(subject)[:plan["n_prompts"]]
        for k in plan["refs"]:
            for first in range(0, len(prompts), args.batch_prompts):
                chunk = list(range(first, min(first + args.batch_prompts, len(prompts))))
                paths = [_image_path(args.out, subject, k, p, s) for p in chunk for s in range(args.samples)]
                jobs.append((subject, k, first, [prompts[p] for p in chunk], paths))
    todo = [j for j in jobs if not all(os.path.isfile(p) for p in j[4])]
    total = sum(len(j[4]) for j in jobs)
    missing = sum(len(j[4]) for j in todo)
    calls: dict[int, list] = {}  # the jobs of one call share their reference count
    for job in todo:
        refs = choose_references(plan["photos"][job[0]], job[1], args.seed, job[0])
        calls.setdefault(len(refs), []).append((job, refs))
    with tqdm(total=missing, desc="generating", unit="img") as bar:
        for group in calls.values():
            for first in range(0, len(group), args.batch):  # --batch jobs per call, one generator each
                batch = group[first:first + args.batch]
                out = pipe(reference_images=[refs for _, refs in batch], prompt=[job[3] for job, _ in batch],
                           generator=[torch.Generator("cpu").manual_seed(generation_seed(args.seed, *job[:3]))
                                      for job, _ in batch],
                           num_images_per_prompt=args.samples, num_inference_steps=args.steps,
                           guidance_scale=args.guidance, image_guidance_scale=args.image_guidance, output_type="pil")
                for (job, _), images in zip(batch, out.images):
                    paths = job[4]
                    os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
                    for img, path in zip(images, paths):  # prompt-major, as the paths are
                        if not os.path.isfile(path):
                            _save_png(img, path)
                    bar.update(len(paths))
    return missing, total - missing


def _score(args, plan, dino, clip) -> tuple[list[dict], dict]:
    """per_image rows, and the real-vs-real values per subject (with --real)."""
    rows, real = [], {}
    for subject in plan["subjects"]:
        bench, photos = plan["bench"], plan["photos"][subject]
        prompts = bench.prompts(subject)[:plan["n_prompts"]]
        real_imgs = [open_photo(p) for p in photos]
        real_dino, real_clip = dino.embed_images(real_imgs), clip.embed_images(real_imgs)
        masks = plan["masks"].get(subject, {})
        has_mask = [i for i, p in enumerate(photos) if p in masks]
        masked = dino.embed_images([apply_mask(real_imgs[i], masks[photos[i]]) for i in has_mask]) if masks else None
        text = clip.embed_texts(prompts)
        if args.real:
            real[subject] = {"dino": real_vs_real(real_dino), "clip_i": real_vs_real(real_clip)}
            if masked is not None and len(masked) > 1:  # as for generated images: whole photo vs masked others
                real[subject]["mdino"] = real_vs_real(real_dino[has_mask], masked)
        for k in plan["refs"]:
            refs = ";".join(os.path.basename(p) for p in choose_references(photos, k, args.seed, subject))
            keys = [(p, s) for p in range(len(prompts)) for s in range(args.samples)]
            paths = [_image_path(args.out, subject, k, p, s) for p, s in keys]
            gen = [Image.open(p).convert("RGB") for p in paths]
            g_dino, g_clip = dino.embed_images(gen), clip.embed_images(gen)
            scores = {"dino": mean_cosine(g_dino, real_dino), "clip_i": mean_cosine(g_clip, real_clip),
                      "clip_t": paired_cosine(g_clip, text[[p for p, _ in keys]])}
            if plan["masks"]:
                scores["mdino"] = mean_cosine(g_dino, masked) if masked is not None else np.full(len(keys), np.nan)
            for i, ((p, s), path) in enumerate(zip(keys, paths)):
                rows.append({"subject": subject, "class": bench.classes[subject], "live": bench.is_live(subject),
                             "refs": k, "ref_files": refs, "prompt_index": p, "prompt": prompts[p], "sample": s,
                             "image": os.path.relpath(path, args.out),
                             **{m: round(float(v[i]), 6) if np.isfinite(v[i]) else None for m, v in scores.items()}})
    return rows, real


def _stats(values, seed: int) -> tuple[float | None, list[float] | None]:
    v = np.asarray([np.nan if x is None else x for x in np.ravel(values)], dtype=np.float64).reshape(np.shape(values))
    if v.size == 0 or not np.isfinite(v).all():
        return None, None
    return float(v.mean()), list(common.bootstrap_ci(v, seed=seed))


def _summarize(args, plan, rows, real) -> dict:
    metrics = [m for m in METRICS if rows and m in rows[0]]
    per_subject, overall = [], []
    for k in plan["refs"]:
        subject_means = {m: [] for m in metrics}
        for subject in plan["subjects"]:
            sub = [r for r in rows if r["subject"] == subject and r["refs"] == k]
            entry = {"subject": subject, "class": plan["bench"].classes[subject],
                     "live": plan["bench"].is_live(subject), "refs": k, "n_images": len(sub)}
            for m in metrics:  # CI over prompts: (prompts, samples) rows resampled whole
                by_prompt = np.array([r[m] for r in sub]).reshape(plan["n_prompts"], args.samples)
                entry[m], entry[f"{m}_ci"] = _stats(by_prompt, args.seed)
                if entry[m] is not None:
                    subject_means[m].append(entry[m])
            per_subject.append(entry)
        row = {"refs": k, "n_images": sum(r["refs"] == k for r in rows), "n_subjects": len(plan["subjects"])}
        for m in metrics:  # CI over subjects; mdino over the subjects that have masks
            row[m], row[f"{m}_ci"] = _stats(subject_means[m], args.seed)
        if "mdino" in metrics:
            row["mdino_n_subjects"] = len(subject_means["mdino"])
        overall.append(row)
    result = {"rows": overall, "per_subject": per_subject}
    if real:
        result["real"] = {"n_photos": sum(len(v["dino"]) for v in real.values()),
                          "per_subject": {s: {m: float(np.mean(x)) for m, x in v.items()} for s, v in real.items()}}
        for m in ("dino", "clip_i", "mdino"):
            means = [float(np.mean(v[m])) for v in real.values() if m in v]
            if means:
                result["real"][m], result["real"][f"{m}_ci"] = _stats(means, args.seed)
    return result


def _fmt(mean, ci) -> str:
    return "-" if mean is None else f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _markdown(summary: dict, metrics: list[str]) -> str:
    names = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "mdino": "MDINO"}
    st = summary["settings"]
    head = "| " + " | ".join(names[m] for m in metrics) + " |"
    lines = ["# DreamBench evaluation", "",
             (f"Pipeline `{summary['pipeline']['path']}`; {len(st['subjects'])} subjects, {st['prompts_per_subject']} "
             f"prompts each, {st['samples']} sample(s) per prompt, {st['steps']} steps, guidance {st['guidance']}, "
             f"image guidance {st['image_guidance']}, seed {st['seed']}."),
             f"Extractors: DINO {st['dino']}; CLIP {st['clip']}.", "",
             "## Overall: mean [95% bootstrap CI over subjects]", "", "| refs | images " + head,
             "|---|---" + "|---" * len(metrics) + "|"]
    for r in summary["rows"]:
        lines.append(f"| {r['refs']} | {r['n_images']} | "
                     + " | ".join(_fmt(r[m], r[f"{m}_ci"]) for m in metrics) + " |")
    if "real" in summary:
        rr = summary["real"]
        lines.append(f"| real photos vs each other | {rr['n_photos']} | "
                     + " | ".join(_fmt(rr.get(m), rr.get(f"{m}_ci")) for m in metrics) + " |")
    lines += ["", "## Published reference rows", "",
              ("Other papers' numbers, measured with real pretrained extractors (DINO ViT-S/16, CLIP ViT-B/32) "
              "on all 30 subjects: NOT comparable to a run with other extractors, fewer subjects or a tiny "
              "random model."), "", "| method | DINO | CLIP-I | CLIP-T | source |", "|---|---|---|---|---|"]
    for p in PUBLISHED:
        cells = ["-" if p[m] is None else f"{p[m]:.3f}" for m in ("dino", "clip_i", "clip_t")]
        lines.append(f"| {p['method']} | " + " | ".join(cells) + f" | {p['source']} |")
    lines += ["", "## Per subject: mean [95% bootstrap CI over prompts]", "",
              "| subject | class | refs | images " + head, "|---|---|---|---" + "|---" * len(metrics) + "|"]
    for e in summary["per_subject"]:
        lines.append(f"| {e['subject']} | {e['class']}{' (live)' if e['live'] else ''} | {e['refs']} | "
                     f"{e['n_images']} | " + " | ".join(_fmt(e[m], e[f"{m}_ci"]) for m in metrics) + " |")
    lines += ["", "## Protocol", "",
              ("- Prompts: DreamBench's object / live-subject templates with the class noun and no rare token "
              "(JeDi learns no identifier): 'a dog in the jungle'. Live = cat and dog classes."),
              ("- DINO / CLIP-I: each generated image against every real photo of its subject, the references "
              "included (DreamBooth's protocol); CLIP-T: image against its own prompt."),
              ("- MDINO: the whole generated image (no masks exist for it) against the masked real photos; "
               "its real-photo row: each whole photo against the other photos, masked."),
              "- Overall values are means of per-subject means.", ""]
    return "\n".join(lines)


def run(args) -> int:
    t0 = time.time()
    plan = _plan(args)
    os.makedirs(args.out, exist_ok=True)
    for name in ("summary.json", "summary.md", "per_image.csv"):  # an old run's must not look like this one's
        if os.path.exists(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))
    try:
        pipe = common.load_pipeline(args.pipeline_dir, args.device)
    except ValueError as e:  # e.g. a plain UNet where the joint one belongs
        raise EvalError(str(e)) from None
    device = pipe.device
    dino, clip = extractors.load_dino(args.dino, device), extractors.load_clip(args.clip, device)
    common.write_json_atomic(os.path.join(args.out, "generation.json"), plan["generation"])
    generated, reused = _generate(args, plan, pipe)
    t_gen = time.time() - t0
    rows, real = _score(args, plan, dino, clip)
    summary = _summarize(args, plan, rows, real)
    common.write_csv_atomic(os.path.join(args.out, "per_image.csv"), rows)
    _write_grids(args, plan, pipe.resolution)
    summary["settings"] = {**plan["generation"], "bench": os.path.realpath(args.bench), "refs": plan["refs"],
                           "subjects": plan["subjects"], "dino": dino.name, "clip": clip.name,
                           "masks": args.masks, "real": args.real, "device": str(device),
                           "references": {s: {k: [os.path.basename(p) for p in choose_references(
                               plan["photos"][s], k, args.seed, s)] for k in plan["refs"]} for s in plan["subjects"]},
                           "images_generated": generated, "images_reused": reused,
                           "seconds_generation": round(t_gen, 2), "seconds_total": round(time.time() - t0, 2)}
    summary["pipeline"] = {"path": os.path.realpath(args.pipeline_dir), "resolution": pipe.resolution,
                           "scheduler": type(pipe.scheduler).__name__, "vae": pipe.vae is not None,
                           "jedi": pipe.denoiser.jedi.to_dict()}
    summary["published"] = PUBLISHED
    metrics = [m for m in METRICS if m in summary["rows"][0]]
    atomic_write_text(os.path.join(args.out, "summary.md"), _markdown(summary, metrics))
    common.write_json_atomic(os.path.join(args.out, "summary.json"), summary)  # last: marks the run complete
    update_eval_section(args.pipeline_dir, _markdown(summary, metrics))  # the export's model card
    grids = sorted(glob.glob(os.path.join(args.out, "grids", "*.png")))
    if args.wandb == "auto" and log_eval_to_run(args.pipeline_dir, "eval_dreambench", summary["rows"], ["refs", *metrics], grids):
        print(f"W&B: table and {len(grids)} grids logged to the training run")
    for r in summary["rows"]:
        print(f"refs {r['refs']}: " + ", ".join(f"{m} {_fmt(r[m], r[f'{m}_ci'])}" for m in metrics))
    print(f"{generated} images generated, {reused} reused; results in {args.out}")
    return 0


def _write_grids(args, plan, resolution: int) -> None:
    """grids/<subject>.png: per K, its references then one row per prompt (jedi-sample's picture)."""
    from jedi_train.pipelines.references import prepare_reference
    from jedi_train.viz import make_grid

    os.makedirs(os.path.join(args.out, "grids"), exist_ok=True)
    for subject in plan["subjects"]:
        prompts = plan["bench"].prompts(subject)[:plan["n_prompts"]]
        parts = []
        for k in plan["refs"]:
            refs = [prepare_reference(p, resolution)
                    for p in choose_references(plan["photos"][subject], k, args.seed, subject)]
            gen = [Image.open(_image_path(args.out, subject, k, p, s)).convert("RGB")
                   for p in range(len(prompts)) for s in range(args.samples)]
            parts.append(make_grid(refs, gen, [f"[{k} ref] {p}" for p in prompts]))
        grid = Image.new("RGB", (max(g.width for g in parts), sum(g.height for g in parts)), (255, 255, 255))
        y = 0
        for g in parts:
            grid.paste(g, (0, y))
            y += g.height
        _save_png(grid, os.path.join(args.out, "grids", f"{subject}.png"))
