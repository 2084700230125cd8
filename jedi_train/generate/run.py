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
    generate_subjects,
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
    explain: bool = False


@dataclass
class Candidate:
    attempt: int
    images: list  # PIL, one per slot of the unit
    seeds: list[int]
    scores: list[dict]
    attention_maps: list | None = None  # --explain: one AttentionMap per image
    references: list | None = None  # the references as the model saw them (for the overlays)


@dataclass
class Unit:
    slots: list[tuple[int, int]]
    candidates: list[Candidate] = field(default_factory=list)
    done: bool = False


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
        self._settings: dict[str, tuple[dict, dict]] = {}

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
        """The job's sampling settings (resolved once per job: the export's sampling.json is read from disk)."""
        if job.id not in self._settings:
            self._settings[job.id] = resolve_settings(self.o.pipeline_dir, {k: getattr(job, k) for k in SETTINGS})
        return self._settings[job.id]

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
                failed: set[str] = set()
                for pairs in self.calls(work):
                    try:
                        self.run_units(pairs, bar)
                    except USER_ERRORS as e:  # alone again, job by job: the bad job is one line, the others go on
                        self.retry_alone(pairs, bar, failed, e)
                self.summary.jobs_done = sum(job.id not in failed for job in ready)
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

    def calls(self, work: list[tuple[J.Job, list[Unit]]]) -> list[list[tuple[J.Job, Unit]]]:
        """Units grouped into sampling calls across jobs: one call holds units of the same settings, reference
        count and size (a joint job's set, or single images) - each unit a subject of its own in the call
        (its own sets, its own per-image seeds), so an image never depends on what shares its call. Up to
        --images-per-call images per call; with --explain one unit per call (the maps take one subject)."""
        groups: dict[str, list] = {}
        for job, units in work:
            values, _ = self.settings(job)
            for unit in units:
                key = repr((sorted(values.items()), len(job.ref_files), len(unit.slots)))
                groups.setdefault(key, []).append((job, unit))
        calls = []
        for pairs in groups.values():
            per_call = 1 if self.o.explain else max(1, self.o.images_per_call // len(pairs[0][1].slots))
            calls += [pairs[i:i + per_call] for i in range(0, len(pairs), per_call)]
        return calls

    def retry_alone(self, pairs, bar, failed: set[str], error: Exception) -> None:
        jobs = list(dict.fromkeys(job.id for job, _ in pairs))
        for job_id in jobs:
            mine = [(job, u) for job, u in pairs if job.id == job_id and not u.done]
            if not mine:
                continue
            try:
                if len(jobs) == 1:
                    raise error
                self.run_units(mine, bar)
            except USER_ERRORS as e:
                if job_id not in failed:
                    self.error(f"{mine[0][0].label}: {e}")
                    failed.add(job_id)

    def run_units(self, pairs: list[tuple[J.Job, Unit]], bar) -> None:
        """Best-of attempts for units that share their sampling calls; each unit is written once decided."""
        values, _ = self.settings(pairs[0][0])
        for attempt in range(self.gate.best_of):
            active = [(job, u) for job, u in pairs if not u.done]
            if not active:
                break
            self.sample(active, attempt, values)
            for job, unit in active:
                last = unit.candidates[-1]
                if (self.gate.stops_early and self.unit_passes(last)) or attempt == self.gate.best_of - 1:
                    self.finish(job, unit, values)
                    unit.done = True
                    bar.update(len(unit.slots))

    def sample(self, pairs: list[tuple[J.Job, Unit]], attempt: int, values: dict) -> None:
        """One candidate more for each unit, all in one sampling call (sampling.generate_subjects)."""
        k, size = len(pairs[0][0].ref_files), len(pairs[0][1].slots)
        subjects = [(job.ref_files, [job.prompts[p] for p, _ in u.slots],
                     [J.image_seed(job, p, s, attempt) for p, s in u.slots]) for job, u in pairs]
        set_size = max(2, k + size)  # a unit is one set: a joint job's images, or one image, with the references
        maps = None
        if self.o.explain:  # one unit: its attention maps, from the same sampling library
            (refs, prompts, seeds), = subjects
            result, _ = generate(self.pipe, refs, prompts, 1, seeds, values["steps"], values["guidance"],
                                 values["image_guidance"], set_size, self.o.no_cache, explain=True)
            images, references, maps = [result.images], [result.reference_images], [result.attention_maps]
        else:
            result, _ = generate_subjects(self.pipe, subjects, values["steps"], values["guidance"],
                                          values["image_guidance"], set_size, self.o.no_cache)
            images, references = result.images, result.reference_images
        for i, ((job, unit), (refs, prompts, seeds)) in enumerate(zip(pairs, subjects)):
            self.summary.candidates += len(prompts)
            self.write_references(job, references[i])
            scores = (self.scorer.score(images[i], refs, prompts) if self.scorer is not None
                      else [{} for _ in prompts])
            unit.candidates.append(Candidate(attempt, images[i], seeds, scores,
                                             maps[i] if maps else None, references[i]))

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
            if kept.attention_maps is not None:  # --explain: <image stem>.attention.<k>.png beside the image
                from jedi_train.explain import save_attention_overlays

                save_attention_overlays(kept.attention_maps[i], kept.references, image)
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
