"""Measured, not assumed: does the gate raise identity, and are joint sets more consistent? Both run the real
jedi-generate loop (run.Runner) on a jobs file and compare paired values with a bootstrap 95% CI over jobs
(subjects), as jedi-eval does (eval/common.bootstrap_ci).

gate_effect: every requested image's first candidate vs the image the gate kept (--best-of K, threshold
--min-identity; default: the `quantile` of the first candidates' identity, from a pilot run whose images are
the gated run's first tries: same seeds).
joint_consistency: the same jobs as one joint set each vs independent images (same references, prompts and
per-image seeds): mean pairwise identity similarity among a job's images, joint minus independent.
"""
from __future__ import annotations

import json
import os

import numpy as np

from jedi_train.eval.common import bootstrap_ci
from jedi_train.generate import jobs as J
from jedi_train.generate.report import collect
from jedi_train.generate.run import Options, Runner


def _paired(per_job: dict[str, list[float]], seed: int = 0) -> dict:
    means = np.array([np.mean(v) for v in per_job.values()])
    lo, hi = bootstrap_ci(means, seed=seed)
    return {"mean": float(means.mean()), "ci": [lo, hi], "n_jobs": len(means)}


def _run(pipeline_dir, jobs_path, out, **kw) -> list[dict]:
    Runner(Options(pipeline_dir, jobs_path, out, progress=False, **kw), say=lambda line: None).run()
    return collect(out)


def gate_effect(pipeline_dir: str, jobs_path: str, out: str, best_of: int = 4, min_identity: float | None = None,
                quantile: float = 0.5, dino: str | None = None, clip: str | None = None, device=None) -> dict:
    ext = {"dino": dino, "clip": clip, "device": device, "checks": ["identity"]}
    if min_identity is None:
        pilot = _run(pipeline_dir, jobs_path, os.path.join(out, "pilot"), **ext)
        min_identity = float(np.quantile([r["scores"]["identity"] for r in pilot], quantile))
    recs = _run(pipeline_dir, jobs_path, os.path.join(out, "gated"), best_of=best_of,
                thresholds={"identity": min_identity}, **ext)
    first = np.array([r["candidates"][0]["scores"]["identity"] for r in recs])
    kept = np.array([r["scores"]["identity"] for r in recs])
    diff: dict[str, list[float]] = {}
    for r, d in zip(recs, kept - first):
        diff.setdefault(r["job"], []).append(float(d))
    return {"min_identity": min_identity, "best_of": best_of, "n_images": len(recs),
            "first_try": float(first.mean()), "kept": float(kept.mean()), "kept_minus_first": _paired(diff),
            "pass_first_try": float(np.mean(first >= min_identity)),
            "pass_kept": float(np.mean([r["pass"] for r in recs])),
            "candidates_per_image": float(np.mean([r["attempts"] for r in recs]))}


def joint_consistency(pipeline_dir: str, jobs_path: str, out: str, dino: str | None = None,
                      clip: str | None = None, device=None) -> dict:
    from PIL import Image

    from jedi_train.generate.gate import Scorer

    jobs = [j for j in J.read_jobs(jobs_path) if isinstance(j, J.Job) and len(j.slots()) >= 2]
    if not jobs:
        raise ValueError(f"{jobs_path} has no job with 2 or more images; consistency needs a set")
    os.makedirs(out, exist_ok=True)
    sims: dict[str, dict[str, float]] = {}
    scorer = None
    for mode, joint in (("joint", True), ("independent", False)):
        path = os.path.join(out, f"{mode}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"id": j.id, "references": j.references, "prompts": j.prompts,
                                    "num_images": j.num_images, "seed": j.seed, "guidance": j.guidance,
                                    "image_guidance": j.image_guidance, "steps": j.steps, "joint": joint}) + "\n" for j in jobs)
        recs = _run(pipeline_dir, path, os.path.join(out, mode), device=device)
        for j in jobs:
            images = [Image.open(os.path.join(out, mode, r["image"])).convert("RGB") for r in recs if r["job"] == j.id]
            if scorer is None:
                scorer = Scorer(["identity"], dino, clip, device or "cpu", images[0].width)
            sims.setdefault(j.id, {})[mode] = scorer.pairwise(images)
    diff = {k: [v["joint"] - v["independent"]] for k, v in sims.items()}
    return {"metric": scorer.metric, "joint": float(np.mean([v["joint"] for v in sims.values()])),
            "independent": float(np.mean([v["independent"] for v in sims.values()])),
            "joint_minus_independent": _paired(diff), "per_job": sims}
