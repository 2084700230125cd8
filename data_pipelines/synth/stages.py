"""The stages glued together per set: generator -> (split) -> filter -> caption -> encoded sample.

Both generators share one interface, `generate(indices) -> [Candidate]`, working in batches of
`batch_size` sets; set i always comes from set_seed(seed, i), so results do not depend on batching,
shards or workers. `SynthStages.unit_results(unit)` yields the writer's SetResults for one shard.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines.schema import encode_set

from data_pipelines.synth import procedural
from data_pipelines.synth.caption import build_captioner
from data_pipelines.synth.filter import build_filter
from data_pipelines.synth.prompts import FilePrompts, build_prompt_source, load_scenes
from data_pipelines.synth.writer import SetResult, SynthError, Unit

set_seed = procedural.set_seed


@dataclass
class Candidate:
    index: int
    images: list = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    reject: str | None = None
    masks: list | None = None  # subject masks, when the generator knows them


class ProceduralGenerator:
    name = "procedural"

    def __init__(self, cfg: Any, set_size: int, resolution: int, seed: int):
        self.scenes = list(cfg.get("scenes") or procedural.SCENE_NAMES)
        self.classes = list(cfg.get("classes") or procedural.CLASSES)
        for what, given, known in (("scenes", self.scenes, procedural.SCENE_NAMES),
                                   ("classes", self.classes, procedural.CLASSES)):
            bad = [x for x in given if x not in known]
            if bad:
                raise SynthError(f"generator.{what} has unknown entries {bad}; choose from {list(known)}")
        self.set_size, self.resolution, self.seed = set_size, resolution, seed
        self.batch_size = int(cfg.get("batch_size", 64))
        self.masks = bool(cfg.get("masks", True))
        self.layout = str(cfg.get("layout", "varied"))
        if self.layout not in procedural.LAYOUTS:
            raise SynthError(f"generator.layout={self.layout} is unknown; use one of {list(procedural.LAYOUTS)}")

    def generate(self, indices: Sequence[int]) -> list[Candidate]:
        out = []
        for i in indices:
            images, captions, meta, masks = procedural.make_set(
                set_seed(self.seed, i), self.set_size, self.resolution, scenes=self.scenes, classes=self.classes,
                with_masks=True, layout=self.layout)
            out.append(Candidate(i, images, captions, meta, masks=masks if self.masks else None))
        return out


class DiffusersGenerator:
    name = "diffusers"

    def __init__(self, cfg: Any, set_size: int, resolution: int, seed: int, prompts: Any, split_cfg: Any):
        from data_pipelines.synth.collage import DEFAULT_TEMPLATE, CollageDrawer, check_generator_dir

        check_generator_dir(cfg.get("model_dir"))
        self.rows, self.cols = int(cfg.get("rows", 2)), int(cfg.get("cols", 2))
        if self.rows * self.cols < set_size:
            raise SynthError(f"a {self.rows}x{self.cols} collage has fewer panels than set_size={set_size}; "
                             "raise generator.rows/generator.cols or lower set_size")
        self.panel = int(cfg.get("panel_size") or resolution)
        self.prompts, self.split_cfg = prompts, split_cfg or {}
        self.scenes = load_scenes(cfg.get("scenes_file"))
        self.template = cfg.get("prompt_template") or DEFAULT_TEMPLATE
        self.caption_template = cfg.get("caption_template") or "a photo of a {cls} {scene}"
        self.set_size, self.resolution, self.seed = set_size, resolution, seed
        self.batch_size = int(cfg.get("batch_size", 4))
        self.drawer = CollageDrawer(cfg["model_dir"], self.rows, self.cols, self.panel, int(cfg.get("steps", 30)),
                                    float(cfg.get("guidance_scale", 7.5)), cfg.get("negative_prompt"),
                                    cfg.get("device", "cpu"), cfg.get("dtype", "float32"))

    def generate(self, indices: Sequence[int]) -> list[Candidate]:
        from data_pipelines.synth.collage import collage_prompt
        from data_pipelines.synth.split import split_collage

        seeds = [set_seed(self.seed, i) for i in indices]
        if isinstance(self.prompts, FilePrompts):
            subjects = self.prompts.subjects(seeds, indices)
        else:
            subjects = self.prompts.subjects(seeds)
        n = self.rows * self.cols
        scenes = []
        for s in seeds:
            rng = np.random.default_rng([s, 2])
            scenes.append([self.scenes[j] for j in rng.choice(len(self.scenes), n, replace=n > len(self.scenes))])
        prompts = [collage_prompt(self.template, sub.description, sc, self.rows, self.cols)
                   for sub, sc in zip(subjects, scenes)]
        collages = self.drawer.draw(prompts, seeds)
        out = []
        for i, seed, sub, sc, prompt, img in zip(indices, seeds, subjects, scenes, prompts, collages):
            panels, keep, dropped, grid = split_collage(
                img, self.rows, self.cols, auto=bool(self.split_cfg.get("auto", True)),
                blank_std=float(self.split_cfg.get("blank_std", 4.0)),
                duplicate_mad=float(self.split_cfg.get("duplicate_mad", 3.0)))
            # scene names are only known per panel when the model drew the grid that was asked for
            panel_scenes = sc if tuple(grid) == (self.rows, self.cols) else [None] * len(panels)
            keep = keep[:self.set_size]
            meta = {"subject_id": f"{sub.source}-{seed:x}", "class": sub.cls, "generator": "diffusers", "seed": seed,
                    "subject": {**sub.to_json(), "collage_prompt": prompt, "grid": list(grid),
                                "dropped_panels": {str(k): v for k, v in dropped.items()}}}
            if len(keep) < self.set_size:
                out.append(Candidate(i, meta=meta, reject="too_few_panels"))
                continue
            images = [np.asarray(Image.fromarray(panels[k]).resize((self.resolution,) * 2, Image.BICUBIC))
                      if panels[k].shape[:2] != (self.resolution,) * 2 else panels[k] for k in keep]
            names = [panel_scenes[k] for k in keep]
            captions = [self.caption_template.format(cls=sub.cls, scene=s) if s else f"a photo of a {sub.cls}"
                        for s in names]
            meta["scenes"] = [s or "" for s in names]
            out.append(Candidate(i, images, captions, meta))
        return out


class SynthStages:
    """Generator -> (split) -> filter -> caption for one jedi-synth config (a chain of stages, not a diffusers pipeline)."""

    def __init__(self, cfg: Any):
        gname = cfg.generator.get("name")
        set_size, res, seed = int(cfg.set_size), int(cfg.resolution), int(cfg.seed)
        if gname == "procedural":
            if cfg.prompts.get("source", "templates") != "templates":
                raise SynthError(f"prompts={cfg.prompts.get('source')} is used by generator=diffusers only; the "
                                 "procedural generator draws its own subjects (drop the prompts override)")
            self.generator: Any = ProceduralGenerator(cfg.generator, set_size, res, seed)
        elif gname == "diffusers":
            prompts = build_prompt_source(cfg.prompts)
            self.generator = DiffusersGenerator(cfg.generator, set_size, res, seed, prompts, cfg.get("split"))
        else:
            raise SynthError(f"generator.name={gname!r} is unknown; use generator=procedural or generator=diffusers")
        self.filter = build_filter(cfg.get("filter"))
        self.captioner = build_captioner(cfg.get("caption"))
        self.ext, self.quality, self.seed = cfg.image_ext, int(cfg.jpeg_quality), seed

    def set_id(self, index: int) -> str:
        return f"{self.generator.name}-{self.seed}-{index:09d}"

    def finish(self, c: Candidate) -> SetResult:
        if c.reject is None and self.filter is not None:
            c.reject, sims = self.filter.check(c.images)
            c.meta["similarity"] = {k: round(v, 4) for k, v in sims.items()}
        if c.reject is not None:
            return SetResult(None, reject=c.reject)
        if self.captioner is not None:
            c.meta["prompt_captions"] = list(c.captions)
            c.captions = self.captioner(c.images)
        sample = encode_set(self.set_id(c.index), c.images, c.captions, c.meta, ext=self.ext, quality=self.quality,
                            masks=c.masks)
        return SetResult(sample, num_images=len(c.images))

    def unit_results(self, unit: Unit) -> Iterator[SetResult]:
        bs = max(1, self.generator.batch_size)
        for start in range(unit.start, unit.stop, bs):
            for c in self.generator.generate(list(range(start, min(start + bs, unit.stop)))):
                yield self.finish(c)
