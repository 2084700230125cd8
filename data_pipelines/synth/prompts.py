"""Stage 1, subjects: who each set is about (for the diffusers backend; the procedural generator
draws its own subjects). Three sources behind one call, `source.subjects(seeds) -> [Subject]`:

- templates: word lists shipped with the package (words_*.txt) combined per set seed;
- file:      a user's text file (one description per line, optionally "class: description") or
             JSONL ({"class": ..., "description": ...}); set i uses entry i mod len;
- llm:       a local transformers causal-LM directory writes "class: description" lines.

A set's subject depends only on its seed (templates, file) or on its seed and its place in the batches of its
shard (llm: one sampling run per batch; batches never cross shards), so any shard can be (re)built alone.
A Subject's `cls` is the short class noun that captions use; `description` (identity details) goes
into the collage prompt and the set's json `subject`, never into the captions.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.synth.writer import SynthError, require_dir

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Subject:
    cls: str
    description: str
    source: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_word_list(path: str | Path) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def read_sections(path: str | Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = None
    for ln in read_word_list(path):
        if ln.startswith("[") and ln.endswith("]"):
            current = out.setdefault(ln[1:-1], [])
        elif current is not None:
            current.append(ln)
    return out


def load_scenes(path: str | None = None) -> list[str]:
    scenes = read_word_list(path or HERE / "words_scenes.txt")
    if not scenes:
        raise SynthError(f"scene list {path} is empty; put one scene phrase per line (e.g. 'on the beach')")
    return scenes


def guess_class(description: str) -> str:
    """The head noun of a description: the last word before 'with'/'in'/','... ("a red mug with dots" -> mug)."""
    head = re.split(r",| with | in | on | made of | that ", description.strip().lower())[0]
    words = re.findall(r"[a-z][a-z\-]*", head)
    return words[-1] if words else "object"


class TemplatePrompts:
    def __init__(self, objects: str | None = None, attributes: str | None = None,
                 template: str = "a {color} {material} {object} {detail}", detail_prob: float = 0.6):
        self.objects = read_word_list(objects or HERE / "words_objects.txt")
        self.attrs = read_sections(attributes or HERE / "words_attributes.txt")
        if not self.objects:
            raise SynthError(f"object list {objects} is empty; put one noun phrase per line")
        self.template, self.detail_prob = template, detail_prob

    def one(self, seed: int) -> Subject:
        rng = np.random.default_rng([seed, 1])
        pick = lambda xs: xs[int(rng.integers(len(xs)))] if xs else ""
        obj = pick(self.objects)
        detail = pick(self.attrs.get("detail", [])) if rng.random() < self.detail_prob else ""
        text = self.template.format(color=pick(self.attrs.get("color", [])),
                                    material=pick(self.attrs.get("material", [])), object=obj, detail=detail)
        return Subject(cls=obj, description=" ".join(text.split()), source="templates")

    def subjects(self, seeds: Sequence[int]) -> list[Subject]:
        return [self.one(s) for s in seeds]


def _parse_line(text: str, source: str) -> Subject | None:
    text = text.strip().strip("\"'").strip()
    if not text:
        return None
    if ":" in text:
        cls, desc = (t.strip() for t in text.split(":", 1))
        if cls and desc and len(cls.split()) <= 3:
            return Subject(cls=cls.lower(), description=desc, source=source)
    return Subject(cls=guess_class(text), description=text, source=source)


class FilePrompts:
    def __init__(self, path: str):
        p = Path(path)
        if not p.is_file():
            raise SynthError(f"prompts.path={path} does not exist; give a text file (one subject per line) "
                             "or a JSONL file with a 'description' field")
        items: list[Subject] = []
        for n, ln in enumerate(p.read_text().splitlines(), 1):
            ln = ln.strip()
            if not ln or ln.startswith("#"):
                continue
            if ln.startswith("{"):
                try:
                    rec = json.loads(ln)
                    desc = str(rec["description"]).strip()
                except (ValueError, KeyError, TypeError):
                    raise SynthError(f"prompts.path={path} line {n} is not a JSON object with a 'description'; "
                                     "fix the line or use plain text, one subject per line") from None
                items.append(Subject(cls=str(rec.get("class") or guess_class(desc)), description=desc, source="file"))
            elif (s := _parse_line(ln, "file")) is not None:
                items.append(s)
        if not items:
            raise SynthError(f"prompts.path={path} has no prompts (empty file); put one subject description "
                             "per line, e.g. 'mug: a red ceramic mug with white dots'")
        self.items = items

    def subjects(self, seeds: Sequence[int], indices: Sequence[int] | None = None) -> list[Subject]:
        return [self.items[i % len(self.items)] for i in (indices if indices is not None else range(len(seeds)))]


def clean_llm_line(text: str) -> str:
    """The first non-empty line of a model's answer, printable characters only, without list markers."""
    text = "".join(ch if ch.isprintable() or ch == "\n" else " " for ch in text)
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    return " ".join(re.sub(r"^\s*(\d+[.)]|-|\*)\s*", "", first).split())[:200]


class LLMPrompts:
    """A local causal LM writes one 'class: description' line per set; unusable output falls back
    to a template subject (recorded as source 'llm_fallback')."""

    def __init__(self, model_dir: str, instruction: str, max_new_tokens: int = 32, temperature: float = 0.9,
                 top_p: float = 0.95, batch_size: int = 16, device: str = "cpu", fallback: TemplatePrompts | None = None):
        require_dir("prompts.model_dir", model_dir,
                    "local transformers causal-LM directory (config.json + weights + tokenizer)")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"  # decoder-only: generation continues from the right edge
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
        self.instruction, self.device = instruction, device
        self.gen = {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": temperature, "top_p": top_p,
                    "pad_token_id": self.tok.pad_token_id}
        self.batch_size = batch_size
        self.fallback = fallback or TemplatePrompts()

    def subjects(self, seeds: Sequence[int]) -> list[Subject]:
        out: list[Subject] = []
        for i in range(0, len(seeds), self.batch_size):
            chunk = list(seeds[i:i + self.batch_size])
            self.torch.manual_seed(chunk[0] % (2**63))  # the chunk's first set seed: reruns give the same text
            enc = self.tok([self.instruction] * len(chunk), return_tensors="pt", padding=True).to(self.device)
            with self.torch.no_grad():
                ids = self.model.generate(**enc, **self.gen)
            texts = self.tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for seed, text in zip(chunk, texts):
                s = _parse_line(clean_llm_line(text), "llm")
                if s is None or sum(len(w) > 1 for w in re.findall(r"[A-Za-z]+", s.description)) < 2:
                    fb = self.fallback.one(seed)
                    s = Subject(cls=fb.cls, description=fb.description, source="llm_fallback")
                out.append(s)
        return out


def build_prompt_source(cfg: Any) -> TemplatePrompts | FilePrompts | LLMPrompts:
    kind = cfg.get("source", "templates")
    if kind == "templates":
        return TemplatePrompts(cfg.get("objects"), cfg.get("attributes"), cfg.get("template") or
                               "a {color} {material} {object} {detail}")
    if kind == "file":
        return FilePrompts(cfg.get("path"))
    if kind == "llm":
        return LLMPrompts(cfg.get("model_dir"), cfg.get("instruction"), cfg.get("max_new_tokens", 32),
                          cfg.get("temperature", 0.9), cfg.get("top_p", 0.95), cfg.get("batch_size", 16),
                          cfg.get("device", "cpu"))
    raise SynthError(f"prompts.source={kind!r} is unknown; use prompts=templates, prompts=file or prompts=llm")
