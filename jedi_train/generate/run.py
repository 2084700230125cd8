"""The jedi-generate run: this shard's jobs, checked before the model loads, then one job after another
through jedi_train/sampling.py (the pipeline loaded once), each image scored and gated, written with its
record the moment it is decided; a bad job is one line and the others go on.

Units: a joint job is ONE unit (its images are one set, generated and regenerated together); otherwise every
requested image is its own unit (its own set with the references), and a job's pending units share each
sampling call (per-image seeds, so an image never depends on which others share its call).
"""
from __future__ import annotations

import glob
import os
import sys
import time
from dataclasses import dataclass, field

from jedi_common.atomic import atomic_path
from jedi_train.generate import jobs as J
from jedi_train.generate.gate import Gate, Scorer
from jedi_train.sampling import (
    SETTINGS,
    UsageError,
    check_pipeline_dir,
    generate,
    prepare_references,
    resolve_settings,
)

USER_ERRORS = (UsageError, ValueError, FileNotFoundError, OSError)  # one line for the job, the others go on


@dataclass
class Options:
    pipeline_dir: str
    jobs: str
    out: str
    checks: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    best_of: int = 1
    dino: str | None = None
    clip: str | None = None
    num_shards: int | None = None
    shard_index: int | None = None
    device: str | None = None
    scheduler: str | None = None
    no_cache: bool = False
    images_per_call: int = 8
    progress: bool = True


@dataclass
class Candidate:
    attempt: int
    images: list  # PIL, one per slot of the unit
    seeds: list[int]
    scores: list[dict]


@dataclass
class Unit:
    slots: list[tuple[int, int]]
    candidates: list[Candidate] = field(default_factory=list)


@dataclass
class Summary:
    shard: tuple[int, int] = (0, 1)
    jobs_done: int = 0
    errors: list[str] = field(default_factory=list)
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    candidates: int = 0
    seconds: float = 0.0


class Runner:
    def __init__(self, opts: Options, say=None):
        self.o = opts
        self.gate = Gate(opts.checks, opts.thresholds, opts.best_of)
        self.say = say or (lambda line: print(line, file=sys.stderr))
        self.summary = Summary()
        self.pipe = self.scorer = None

    # -- before the model loads ------------------------------------------------------------------------
    def check(self) -> tuple[list[J.Job], list]:
        """(this shard's runnable jobs, its bad entries); UsageError for what stops the whole run."""
        o = self.o
        if o.images_per_call < 1:
            raise UsageError(f"--images-per-call {o.images_per_call} is too small; use 1 or more")
        self.gate.check_args()
        Scorer.check_args(o.checks, o.dino, o.clip)
        check_pipeline_dir(o.pipeline_dir)
        if os.path.exists(o.out) and not os.path.isdir(o.out):
            raise UsageError(f"--out {o.out} is a file; give a directory for the images")
        mine, n, i = J.my_share(J.read_jobs(o.jobs), o.num_shards, o.shard_index)
        self.summary.shard = (i, n)
        ready = []
        for entry in mine:
            if isinstance(entry, J.BadLine):
                self.error(f"--jobs {o.jobs} line {entry.line}: {entry.message}")
                continue
            try:
                entry.ref_files, warnings = prepare_references(entry.references)
            except USER_ERRORS as e:
                self.error(f"{entry.label}: {e}")
                continue
            for w in warnings:
                self.say(f"jedi-generate: warning: {entry.label}: {w}")
            ready.append(entry)
        return ready, mine

    def error(self, line: str) -> None:
        line = " ".join(line.split())
        self.summary.errors.append(line)
        self.say(f"jedi-generate: error: {line}")

    # -- settings and resume ---------------------------------------------------------------------------
    def settings(self, job: J.Job) -> tuple[dict, dict]:
        return resolve_settings(self.o.pipeline_dir, {k: getattr(job, k) for k in SETTINGS})

    def key(self, job: J.Job, slot, values: dict) -> dict:
        """What an image depends on: a record made with anything else is made again."""
        from jedi_train.eval.procedural import weights_fingerprint

        o = self.o
        return {"pipeline": os.path.realpath(o.pipeline_dir), "weights": weights_fingerprint(o.pipeline_dir),
                "references": job.ref_files, "prompt": job.prompts[slot[0]], "seed": job.seed, **values,
                "joint": job.joint, "set": [job.prompts, job.num_images] if job.joint else None,
                "checks": o.checks, "thresholds": o.thresholds, "best_of": o.best_of,
                "metric": self.metric, "scheduler": o.scheduler, "no_cache": o.no_cache}

    @property
    def metric(self) -> str | None:
        if not self.o.checks:
            return None
        return "dino" if self.o.dino else "clip_i" if self.o.clip else "procedural"

    def pending(self, job: J.Job) -> list[Unit]:
        values, _ = self.settings(job)
        todo = [s for s in job.slots() if not J.finished(self.o.out, job, s, self.key(job, s, values))]
        if job.joint:
            return [Unit(job.slots())] if todo else []  # a set is made again whole
        return [Unit([s]) for s in todo]

    # -- the run ---------------------------------------------------------------------------------------
    def run(self) -> Summary:
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        ready, _ = self.check()
        os.makedirs(self.o.out, exist_ok=True)
        work = [(job, self.pending(job)) for job in ready]
        total = sum(len(u.slots) for _, units in work for u in units)
        self.summary.skipped = sum(len(job.slots()) for job in ready) - total
        if total:
            self.load()
        with tqdm(total=total, desc="jedi-generate", unit="img", disable=not self.o.progress) as bar:
            say = self.say
            self.say = lambda line: tqdm.write(line, file=sys.stderr)  # lines above the bar, not through it
            try:
                for job, units in work:
                    try:
                        self.run_job(job, units, bar)
                        self.summary.jobs_done += 1
                    except USER_ERRORS as e:
                        self.error(f"{job.label}: {e}")
            finally:
                self.say = say
        from jedi_train.generate.report import write_reports

        write_reports(self.o.out)
        self.summary.seconds = time.perf_counter() - t0
        return self.summary

    def load(self) -> None:
        from jedi_train.sampling import load_pipeline, make_scheduler

        self.pipe = load_pipeline(self.o.pipeline_dir, self.o.device, progress=False)
        self.pipe.scheduler = make_scheduler(self.pipe.scheduler, self.o.scheduler, self.pipe.family)
        if self.o.checks:
            self.scorer = Scorer(self.o.checks, self.o.dino, self.o.clip, self.pipe.device, self.pipe.resolution)

    def run_job(self, job: J.Job, units: list[Unit], bar) -> None:
        values, _ = self.settings(job)
        active = list(units)
        for attempt in range(self.gate.best_of):
            if not active:
                break
            self.sample(job, active, attempt, values)
            for unit in list(active):
                last = unit.candidates[-1]
                if (self.gate.stops_early and self.unit_passes(last)) or attempt == self.gate.best_of - 1:
                    self.finish(job, unit, values)
                    active.remove(unit)
                    bar.update(len(unit.slots))

    def sample(self, job: J.Job, units: list[Unit], attempt: int, values: dict) -> None:
        """One candidate more for each unit. BATCHING: this per-job call is what a call over several jobs'
        sets (per-set references in the pipeline) replaces; units of one job already share calls."""
        k = len(job.ref_files)
        if job.joint:
            groups = [[u] for u in units]  # one set: all of the job's images, coupled
        else:  # without references in the sets (image guidance 0) max_set_size cannot keep targets apart
            n = self.o.images_per_call if values["image_guidance"] != 0 else 1
            groups = [units[i:i + n] for i in range(0, len(units), n)]
        for group in groups:
            slots = [s for u in group for s in u.slots]
            seeds = [J.image_seed(job, p, s, attempt) for p, s in slots]
            prompts = [job.prompts[p] for p, _ in slots]
            set_size = k + len(slots) if job.joint else k + 1  # joint: one set; else each image alone with the refs
            result, _ = generate(self.pipe, job.ref_files, prompts, 1, seeds, values["steps"], values["guidance"],
                                 values["image_guidance"], max(2, set_size), self.o.no_cache)
            # EXPLAIN HOOK (--explain, issue 33 item 3): reference attention maps of `result` go here, saved
            # beside each image as <stem>.attention.<k>.png when the image is written (finish).
            self.summary.candidates += len(slots)
            self.write_references(job, result.reference_images)
            scores = (self.scorer.score(result.images, job.ref_files, prompts) if self.scorer is not None
                      else [{} for _ in slots])
            i = 0
            for u in group:
                n = len(u.slots)
                u.candidates.append(Candidate(attempt, result.images[i:i + n], seeds[i:i + n], scores[i:i + n]))
                i += n

    def unit_passes(self, c: Candidate) -> bool:
        return all(self.gate.passes(s) for s in c.scores)

    def unit_margin(self, c: Candidate) -> float:
        return min(self.gate.margin(s) for s in c.scores)

    def finish(self, job: J.Job, unit: Unit, values: dict) -> None:
        """Keep the first passing candidate (with thresholds), else the best; write images, then records."""
        cands = unit.candidates
        passing = [c for c in cands if self.unit_passes(c)] if self.gate.stops_early else []
        kept = passing[0] if passing else (max(cands, key=self.unit_margin) if self.o.checks else cands[0])
        out = self.o.out
        for i, slot in enumerate(unit.slots):
            scores = kept.scores[i]
            ok = self.gate.passes(scores) if self.o.checks else None
            accepted, stale = J.image_path(out, job, slot), glob.glob(glob.escape(J.rejected_path(out, job, slot, 0))
                                                                      .replace(".try0.png", ".try*.png"))
            for path in stale:
                os.remove(path)
            files = {}
            if ok is False:  # never passed: every candidate kept in rejected/ with its scores
                if os.path.exists(accepted):
                    os.remove(accepted)
                for c in cands:
                    files[c.attempt] = J.rejected_path(out, job, slot, c.attempt)
                    _save(c.images[i], files[c.attempt])
                image = files[kept.attempt]
                self.summary.rejected += 1
            else:
                _save(kept.images[i], accepted)
                image = accepted
                self.summary.accepted += 1
            record = {"job": job.id, "line": job.line, "prompt_index": slot[0], "prompt": job.prompts[slot[0]],
                      "sample": slot[1], "image": os.path.relpath(image, out),
                      "status": "rejected" if ok is False else "accepted", "pass": ok, "attempts": len(cands),
                      "seed": kept.seeds[i], "scores": scores, "joint": job.joint,
                      "references": [os.path.relpath(p, out) for p in sorted(glob.glob(os.path.join(
                          glob.escape(os.path.join(out, job.id, "references")), "*.png")))],
                      "candidates": [{"attempt": c.attempt, "seed": c.seeds[i], "scores": c.scores[i],
                                      "file": os.path.relpath(files[c.attempt], out) if c.attempt in files else None}
                                     for c in cands],
                      "metric": self.metric, "thresholds": self.o.thresholds, "settings": values,
                      "key": self.key(job, slot, values)}
            with atomic_path(J.record_path(out, job, slot)) as tmp, open(tmp, "w") as f:  # no fsync: a rename
                f.write(_json(record))  # is enough against a killed process, and fsync per image is slow

    def write_references(self, job: J.Job, refs) -> None:
        folder = os.path.join(self.o.out, job.id, "references")
        if os.path.isdir(folder) and len(os.listdir(folder)) == len(refs):
            return
        os.makedirs(folder, exist_ok=True)
        for i, img in enumerate(refs):
            _save(img, os.path.join(folder, f"{i:02d}.png"))


def _save(img, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:  # a killed run never leaves a truncated PNG
        img.save(tmp)


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=1, default=str) + "\n"
