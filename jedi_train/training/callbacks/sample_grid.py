"""Personalized sample grids every K steps: a PNG in the run dir and a W&B image."""
from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from jedi_common.atomic import atomic_path
from jedi_train.eval.details import image_set_sharpness
from jedi_train.training.callbacks.checkpoint import extra, stop_requested
from jedi_train.training.strategies import shards_weights
from jedi_train.viz import sample_grid, to_pil


class SampleGridCallback(L.Callback):
    """Every `every_n_steps`, personalize held-out sets with the EMA weights and save a grid.

    Row per set: its reference images | generated targets (captions as labels) | the real targets.
    The header and the W&B caption give the grid's sharpness: generated / real high-frequency energy.
    The references are sampled with their captions, as training showed them. Held-out sets come from
    the datamodule's `heldout_batch(num_sets)` when it has one, otherwise from the first training batch.
    Default guidance 1 / 1: the text + references branch alone, the one training shows most often (the
    unconditional branches see ~3-7% of targets at 10% caption and reference dropout).
    """

    def __init__(self, every_n_steps: int = 250, num_sets: int = 4, num_targets: int = 2,
                 num_inference_steps: int = 25, guidance_scale: float = 1.0, image_guidance_scale: float = 1.0,
                 out_dir: str = "samples", seed: int = 0):
        self.every, self.num_sets, self.num_targets = every_n_steps, num_sets, num_targets
        self.steps, self.cfg, self.img_cfg = num_inference_steps, guidance_scale, image_guidance_scale
        self.out_dir, self.seed = out_dir, seed
        self.sets: list[dict] | None = None
        self.last_grid: str | None = None

    def _collect(self, trainer, batch):
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "heldout_batch"):
            held = dm.heldout_batch(self.num_sets)
            if held is not None:
                batch = held
        sets = []
        for b in range(min(self.num_sets, batch["is_ref"].shape[0])):
            valid = batch["valid"][b] if "valid" in batch else torch.ones_like(batch["is_ref"][b])
            idx = valid.nonzero().flatten().tolist()
            refs = [i for i in idx if batch["is_ref"][b, i]] or idx[:1]
            targets = [i for i in idx if i not in refs][: self.num_targets]
            caps = batch["captions"][b]
            sets.append({"refs": [to_pil(batch["pixel_values"][b, i]) for i in refs],
                         "ref_captions": [caps[i] for i in refs],
                         "truth": [to_pil(batch["pixel_values"][b, i]) for i in targets],
                         "prompts": [caps[i] for i in targets]})
        return sets

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.sets is None and trainer.is_global_zero:
            self.sets = self._collect(trainer, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step > 0 and step % self.every == 0 and not stop_requested(trainer):
            with extra(trainer, "sample grid"):  # a stop signal abandons it: the checkpoint comes first
                self.render(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if stop_requested(trainer):  # stopped by a signal: the grace period is for the checkpoint
            return
        if self.last_grid is None or not self.last_grid.endswith(f"{trainer.global_step:07d}.png"):
            with extra(trainer, "sample grid"):
                self.render(trainer, pl_module)

    @rank_zero_only
    def render(self, trainer, pl_module) -> str | None:
        if not self.sets:
            return None
        if shards_weights(trainer.strategy):
            # ZeRO-3 / FSDP shard every weight across ranks: a rank-0-only forward pass would wait forever
            rank_zero_warn("sample grids are skipped under ZeRO-3 / FSDP; render them from a checkpoint with "
                           "jedi-export + jedi-sample", category=UserWarning)
            return None
        from jedi_train.pipelines.pipeline_jedi_sd import JeDiPipeline

        rows = []
        with pl_module.ema_weights() as denoiser:
            was_training = denoiser.training
            denoiser.eval()
            pipe = JeDiPipeline.from_components(pl_module.components, denoiser)
            pipe.set_progress_bar_config(disable=True)
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            for s in self.sets:
                out = pipe(reference_images=s["refs"], prompt=s["prompts"], reference_captions=s["ref_captions"],
                           num_inference_steps=self.steps, guidance_scale=self.cfg,
                           image_guidance_scale=self.img_cfg, generator=g, output_type="pil").images
                rows.append((s["refs"], out, s["truth"], s["prompts"]))
            denoiser.train(was_training)
        sharp = image_set_sharpness([g for r in rows for g in r[1]], [t for r in rows for t in r[2]])
        note = f"sharpness {sharp:.2f} (generated / real high-frequency energy, whole images)" if sharp else ""
        grid = sample_grid(rows, note=note)
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"samples_step{trainer.global_step:07d}.png")
        with atomic_path(path) as tmp:
            grid.save(tmp)
        self.last_grid = path
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[grid], step=trainer.global_step,
                                 caption=[f"step {trainer.global_step}: refs | generated | real" + (f"; {note}" if note else "")])
            if sharp and hasattr(logger, "log_metrics"):
                logger.log_metrics({"eval/grid_sharpness": sharp}, step=trainer.global_step)
        return path
