"""Jobs files and where a job's images live.

One JSON object per line (blank lines skipped):
    {"id": "mug", "references": ["photos/mug/"], "prompts": ["a mug on a beach", ...], "num_images": 2,
     "seed": 0, "guidance": 3, "image_guidance": 3, "steps": 25, "joint": false, "held_out": ["real/mug/"]}
id, references (files or folders) and prompts are required. Relative paths are relative to the jobs file's
folder. guidance / image_guidance / steps left out: jedi-sample's (the export's sampling.json, else its
defaults). joint: true generates all of a job's images as ONE set (targets coupled with each other and the
references); false (default): every image in its own set with the references, as separate jedi-sample calls
would. held_out: real photos of the subject that are not references (for `jedi-generate calibrate`).

Per requested image (prompt PP, sample SS) in OUT: <id>/PP_SS.png (accepted), <id>/PP_SS.json (its record:
written last, so it marks the image finished), rejected/<id>/PP_SS.tryA.png (candidates that never passed).
"""
from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass, field

import numpy as np

from jedi_train.sampling import DEFAULTS, UsageError

KEYS = ("id", "references", "prompts", "num_images", "seed", "guidance", "image_guidance", "steps", "joint",
        "held_out")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class JobError(Exception):
    """What is wrong with one job: one line, the other jobs go on."""


@dataclass
class Job:
    index: int  # position among the file's jobs (blank lines not counted): decides the shard
    line: int
    id: str
    references: list[str]
    prompts: list[str]
    num_images: int = 1
    seed: int = DEFAULTS["seed"]
    guidance: float | None = None
    image_guidance: float | None = None
    steps: int | None = None
    joint: bool = False
    held_out: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"job {self.id!r} (line {self.line})"

    def slots(self) -> list[tuple[int, int]]:
        """(prompt index, sample index) of every requested image, prompt-major."""
        return [(p, s) for p in range(len(self.prompts)) for s in range(self.num_images)]


@dataclass
class BadLine:
    index: int
    line: int
    message: str

    @property
    def label(self) -> str:
        return f"line {self.line}"


def _paths(value, name: str, base: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise JobError(f"'{name}' must be a path or a list of paths (image files or folders)")
    return [v if os.path.isabs(v) else os.path.join(base, v) for v in value]


def _number(obj: dict, key: str, kind, low):
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise JobError(f"'{key}' is {value!r}; give {'an integer' if kind is int else 'a number'} >= {low}")
    if value < low:
        raise JobError(f"'{key}' is {value}; give {key} >= {low}")
    return kind(value)


def parse_job(obj, index: int, line: int, base: str) -> Job:
    if not isinstance(obj, dict):
        raise JobError("not a JSON object; write one {\"id\": ..., \"references\": ..., \"prompts\": ...} per line")
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise JobError(f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(KEYS)}")
    job_id = obj.get("id")
    if not isinstance(job_id, str) or not ID_PATTERN.match(job_id):
        raise JobError(f"'id' {job_id!r} must be a name of letters, digits, '.', '_' or '-' (it names the output "
                       "folder)")
    if job_id == "rejected":
        raise JobError("'id' 'rejected' is the folder of rejected images; give the job another id")
    if "references" not in obj:
        raise JobError(f"job {job_id!r} has no 'references'; give the subject's photos (files or a folder)")
    prompts = obj.get("prompts")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise JobError(f"job {job_id!r} has no usable 'prompts' (empty, or an empty prompt); give a list of "
                       "non-empty prompts")
    joint = obj.get("joint", False)
    if not isinstance(joint, bool):
        raise JobError(f"job {job_id!r}: 'joint' is {joint!r}; give true or false")
    try:
        return Job(index, line, job_id, _paths(obj["references"], "references", base), list(prompts),
                   _number(obj, "num_images", int, 1) or 1,
                   DEFAULTS["seed"] if obj.get("seed") is None else _number(obj, "seed", int, 0),
                   _number(obj, "guidance", float, 0), _number(obj, "image_guidance", float, 0),
                   _number(obj, "steps", int, 1), joint, _paths(obj.get("held_out") or [], "held_out", base))
    except JobError as e:
        raise JobError(f"job {job_id!r}: {e}") from None


def read_jobs(path: str) -> list[Job | BadLine]:
    """Every job of the file in order; a line that is not a valid job becomes a BadLine (its one error line).
    A missing or empty file: UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"--jobs {path} does not exist; give a JSON-lines file, one job per line")
    base = os.path.dirname(os.path.abspath(path))
    entries: list[Job | BadLine] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            index = len(entries)
            try:
                try:
                    obj = json.loads(text)
                except ValueError as e:
                    raise JobError(f"not valid JSON ({e.args[0].split(':')[0]}); write one JSON object per line") \
                        from None
                job = parse_job(obj, index, number, base)
                if job.id in seen:
                    raise JobError(f"job id {job.id!r} is used by an earlier line; give each job its own id")
                seen.add(job.id)
                entries.append(job)
            except JobError as e:
                entries.append(BadLine(index, number, str(e)))
    if not entries:
        raise UsageError(f"--jobs {path} holds no jobs; write one JSON object per line")
    return entries


def my_share(entries: list, num_shards: int | None, shard_index: int | None) -> tuple[list, int, int]:
    """This process's jobs: round robin over the file's order (every shard gets a similar share); N and I
    default to the SLURM array's (SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID), else 1 and 0."""
    from data_pipelines.synth.writer import SynthError, shard_slice

    try:
        n, i = shard_slice(num_shards, shard_index)
    except SynthError as e:
        raise UsageError(str(e)) from None
    return entries[i::n], n, i


def image_seed(job: Job, prompt_index: int, sample: int, attempt: int) -> int:
    """The generator seed of one candidate: from (job seed, job id, image, attempt) alone, so an image is the
    same whichever shard, batch or rerun makes it."""
    state = np.random.SeedSequence([job.seed, zlib.crc32(job.id.encode()), prompt_index, sample, attempt])
    return int(state.generate_state(1)[0] >> 1)


def stem(prompt_index: int, sample: int) -> str:
    return f"{prompt_index:02d}_{sample:02d}"


def image_path(out: str, job: Job, slot) -> str:
    return os.path.join(out, job.id, stem(*slot) + ".png")


def record_path(out: str, job: Job, slot) -> str:
    return os.path.join(out, job.id, stem(*slot) + ".json")


def rejected_path(out: str, job: Job, slot, attempt: int) -> str:
    return os.path.join(out, "rejected", job.id, f"{stem(*slot)}.try{attempt}.png")


def read_record(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def finished(out: str, job: Job, slot, key: dict) -> bool:
    """The image has a record made with the same settings (other settings: it is made again)."""
    record = read_record(record_path(out, job, slot))
    return record is not None and record.get("key") == key
