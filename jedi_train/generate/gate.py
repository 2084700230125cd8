"""The quality gate: score each image against its job's references and its prompt, with the metrics jedi-eval
reports, and decide pass / fail; calibrate a threshold from held-out real photos.

identity = DINO (--dino) similarity to the job's references, else CLIP-I (--clip), else (no extractor) the
procedural world's colour identity (eval/procedural.WorldScorer: for pipelines trained on procedural subjects).
As in jedi-eval dreambench, an image's similarity is its cosine to EACH reference photo, averaged.
prompt = CLIP-T, the CLIP cosine of the image and its prompt (needs --clip).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from jedi_train.eval import dreambench, extractors
from jedi_train.eval.common import EvalError
from jedi_train.sampling import UsageError

CHECKS = ("identity", "prompt")


def parse_checks(text: str | None) -> list[str]:
    if not text:
        return []
    checks = list(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    bad = [c for c in checks if c not in CHECKS]
    if bad or not checks:
        raise UsageError(f"--check {text!r}: unknown check {', '.join(bad) or '(none)'}; use identity, prompt or "
                         "identity,prompt")
    return checks


class Scorer:
    def __init__(self, checks: list[str], dino: str | None = None, clip: str | None = None, device="cpu",
                 resolution: int = 64):
        self.check_args(checks, dino, clip)
        self.checks, self.resolution = list(checks), resolution
        self.metric = "dino" if dino else "clip_i" if clip else "procedural"
        try:
            self.dino = extractors.load_dino(dino, device) if dino else None
            self.clip = extractors.load_clip(clip, device) if clip else None
        except EvalError as e:
            raise UsageError(str(e)) from None
        self.world = None
        if self.metric == "procedural":
            from jedi_train.eval.procedural import WorldScorer

            self.world = WorldScorer(resolution)
        self._refs: dict[tuple, np.ndarray] = {}

    @staticmethod
    def check_args(checks: list[str], dino: str | None, clip: str | None) -> None:
        """Before any model loads: the extractors the checks need, given and plausible."""
        if "prompt" in checks and not clip:
            raise UsageError("--check prompt scores CLIP-T and needs --clip; " + extractors.CLIP_HELP)
        try:
            if dino:
                extractors.check_dino(dino)
            if clip:
                extractors.check_clip(clip)
        except EvalError as e:
            raise UsageError(str(e)) from None

    def describe(self) -> dict:
        names = {"dino": lambda: f"DINO {self.dino.name}", "clip_i": lambda: f"CLIP-I {self.clip.name}",
                 "procedural": lambda: "procedural colour identity (no extractor)"}
        out = {"identity": names[self.metric]()}
        if self.clip is not None:
            out["prompt"] = f"CLIP-T {self.clip.name}"
        return out

    # -- features ----------------------------------------------------------------------------------
    def features(self, images) -> np.ndarray:
        """Identity features of PIL images (or paths): unit embeddings, or procedural colour descriptors."""
        if self.world is not None:
            from jedi_train.pipelines.references import prepare_reference

            return np.stack([self.world.descriptor(np.asarray(prepare_reference(im, self.resolution)))
                             for im in images])
        pils = [dreambench.open_photo(im) if isinstance(im, str) else im.convert("RGB") for im in images]
        return (self.dino or self.clip).embed_images(pils)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.world.similarity(a, b) if self.world is not None else a @ b.T

    def reference_features(self, ref_files: list[str]) -> np.ndarray:
        key = tuple(ref_files)
        if key not in self._refs:
            self._refs[key] = self.features(list(ref_files))
        return self._refs[key]

    # -- scores ------------------------------------------------------------------------------------
    def identity(self, images, ref_files: list[str]) -> np.ndarray:
        """(N,): each image's similarity to every reference, averaged (dreambench.mean_cosine's protocol)."""
        feats, refs = self.features(images), self.reference_features(ref_files)
        if self.world is None:
            return dreambench.mean_cosine(feats, refs)
        return self.similarity(feats, refs).mean(axis=1)

    def score(self, images, ref_files: list[str], prompts: list[str]) -> list[dict]:
        """Per image: {'identity': ..., 'prompt': ...} for the checks asked for."""
        cols = {}
        if "identity" in self.checks:
            cols["identity"] = self.identity(images, ref_files)
        if "prompt" in self.checks:
            pils = [im.convert("RGB") for im in images]
            cols["prompt"] = dreambench.paired_cosine(self.clip.embed_images(pils), self.clip.embed_texts(prompts))
        return [{k: round(float(v[i]), 6) for k, v in cols.items()} for i in range(len(images))]

    def pairwise(self, images) -> float:
        """Mean identity similarity between the images of one set, over all pairs (consistency of a series)."""
        feats = self.features(images)
        if self.world is None:
            return float(np.mean(dreambench.real_vs_real(feats)))
        sim = self.similarity(feats, feats)
        m = len(sim)
        return float((sim.sum() - np.trace(sim)) / (m * (m - 1)))


@dataclass
class Gate:
    """Thresholds (metric -> minimum) and how many candidates a requested image may take."""

    checks: list[str]
    thresholds: dict[str, float]
    best_of: int = 1

    def check_args(self) -> None:
        if self.best_of < 1:
            raise UsageError(f"--best-of {self.best_of} is too small; use --best-of 1 or more")
        for metric in self.thresholds:
            if metric not in self.checks:
                raise UsageError(f"--min-{metric} needs --check {metric} (add it to --check)")
        if self.best_of > 1 and not self.checks:
            raise UsageError(f"--best-of {self.best_of} picks among candidates by their scores; add --check "
                             "identity (and/or prompt)")

    def passes(self, scores: dict) -> bool:
        return all(scores[m] >= t for m, t in self.thresholds.items())

    def margin(self, scores: dict) -> float:
        """How far the image is above its worst threshold (no thresholds: its first checked score)."""
        if self.thresholds:
            return min(scores[m] - t for m, t in self.thresholds.items())
        return scores[self.checks[0]]

    @property
    def stops_early(self) -> bool:
        """With thresholds the first passing candidate is kept; without, the best of all best_of."""
        return bool(self.thresholds)


def calibrate(scorer: Scorer, jobs, pass_fraction: float) -> dict:
    """The identity threshold that `pass_fraction` of the held-out real photos pass (their identity against
    their job's references, scored as generated images are), pooled over the jobs' photos."""
    from jedi_train.pipelines.references import expand_reference_paths

    if not 0 < pass_fraction <= 1:
        raise UsageError(f"--pass-fraction {pass_fraction} must be in (0, 1], e.g. 0.9")
    per_job, values = {}, {}
    for job in jobs:
        if not job.held_out:
            continue
        try:
            refs = [str(p) for p in expand_reference_paths(job.references)]
            photos = [str(p) for p in expand_reference_paths(job.held_out)]
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"{job.label}: {e}") from None
        overlap = sorted({os.path.realpath(p) for p in refs} & {os.path.realpath(p) for p in photos})
        if overlap:
            raise UsageError(f"{job.label}: held-out photo {overlap[0]} is also a reference; held-out photos "
                             "must be other photos of the subject")
        values[job.id] = scorer.identity(photos, refs)
    if not values:
        raise UsageError("no job has 'held_out' photos; add \"held_out\": [real photos of the subject that are not "
                         "references] to the jobs to calibrate on")
    pooled = np.concatenate(list(values.values()))
    threshold = math.floor(float(np.quantile(pooled, 1 - pass_fraction)) * 1e6) / 1e6  # rounded down: still passes
    for job_id, v in values.items():
        per_job[job_id] = {"n_photos": len(v), "mean": round(float(v.mean()), 6),
                           "passing": float(np.mean(v >= threshold))}
    return {"min_identity": threshold, "pass_fraction": pass_fraction, "metric": scorer.metric,
            "n_photos": len(pooled), "n_jobs": len(per_job), "passing": float(np.mean(pooled >= threshold)),
            "per_job": per_job}
