"""Stage 2, diffusers backend: a local text-to-image model draws a photo collage of one subject in
several scenes; split.py cuts it into panels.

Any directory AutoPipelineForText2Image can load (SD 1.x/2.x, SDXL, ...). One collage per set, in
batches; each set has its own torch.Generator seeded from the set seed, so a set looks the same
whichever batch or worker draws it.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from data_pipelines.synth.writer import SynthError, require_dir

DEFAULT_TEMPLATE = ("a {rows}x{cols} photo collage of the same {subject}, in {n} different scenes: {scenes}; "
                    "the same object in every panel, high quality photos")


def collage_prompt(template: str, subject: str, scenes: Sequence[str], rows: int, cols: int) -> str:
    return template.format(rows=rows, cols=cols, n=len(scenes), subject=subject, scenes=", ".join(scenes))


def check_generator_dir(model_dir: str | None) -> None:
    """generator.model_dir must be a local diffusers pipeline directory (model_index.json); else SynthError."""
    require_dir("generator.model_dir", model_dir,
                "local diffusers text-to-image model directory (with model_index.json)")
    if not (Path(model_dir) / "model_index.json").is_file():
        raise SynthError(f"generator.model_dir={model_dir} has no model_index.json; point it at a diffusers "
                         "pipeline directory (e.g. one saved with save_pretrained)")


class CollageDrawer:
    def __init__(self, model_dir: str, rows: int = 2, cols: int = 2, panel: int = 512, steps: int = 30,
                 guidance_scale: float = 7.5, negative_prompt: str | None = None, device: str = "cpu",
                 dtype: str = "float32"):
        check_generator_dir(model_dir)
        import torch
        from diffusers import AutoPipelineForText2Image

        self.torch = torch
        torch_dtype = getattr(torch, dtype)
        try:
            self.pipe = AutoPipelineForText2Image.from_pretrained(model_dir, torch_dtype=torch_dtype)
        except (OSError, ValueError) as e:
            raise SynthError(f"generator.model_dir={model_dir} could not be loaded as a text-to-image pipeline "
                             f"({str(e).splitlines()[0]}); check the directory") from None
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.rows, self.cols, self.panel, self.steps = rows, cols, panel, steps
        self.guidance_scale, self.negative_prompt, self.device = guidance_scale, negative_prompt, device

    def draw(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        gens = [self.torch.Generator(self.device).manual_seed(int(s) % (2**63)) for s in seeds]
        neg = [self.negative_prompt] * len(prompts) if self.negative_prompt else None
        out = self.pipe(prompt=list(prompts), negative_prompt=neg, height=self.rows * self.panel,
                        width=self.cols * self.panel, num_inference_steps=self.steps,
                        guidance_scale=self.guidance_scale, generator=gens, output_type="pil")
        return list(out.images)
