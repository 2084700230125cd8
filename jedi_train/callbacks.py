"""Training callbacks: personalized sample grids every K steps (PNG in the run dir + W&B image), the
subject-pixel identity gain with its error bar, the loss curve, checkpoints."""
from __future__ import annotations

import os
import signal
import sys
import threading

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from data_pipelines.atomic import atomic_path

from .viz import sample_grid, to_pil


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes `last` when training stops between periodic saves (max_steps, a
    signal), so a resumed run loses nothing. A checkpoint saved again at a step that already has one
    replaces it (no `-v1` copies after a resume; writes are atomic, see checkpoints.py).

    SIGTERM / the first Ctrl+C during training: after the current step every rank agrees to stop (an
    all-reduce at each step end), saves `last` at once (before other callbacks' end-of-training work) and
    training ends; `stopped_by` holds the signal (jedi-train exits 128 + it). A second Ctrl+C interrupts
    at once. Lightning's own SIGTERM handler is replaced while training: it only stops the loop (exit 0,
    nothing saved) and its in-handler broadcast deadlocks DDP (seen here; Lightning issue #20806).
    SLURM's requeue signal (SIGUSR1) stays Lightning's: checkpoint and requeue.
    """

    def __init__(self, *args, enable_version_counter: bool = False, **kwargs):
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)
        self.stopped_by: int | None = None
        self._handlers: dict = {}

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        if threading.current_thread() is threading.main_thread():  # after Lightning registered its handlers
            self._pid = os.getpid()
            self._handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame):
        if os.getpid() != self._pid:  # a forked DataLoader worker: this process stops it
            if signum == signal.SIGTERM:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if self.stopped_by is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.stopped_by is None:
            self.stopped_by = signum
            print(f"received {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                  "(Ctrl+C again to stop at once)", file=sys.stderr, flush=True)

    def _restore_handlers(self):
        for s, handler in self._handlers.items():
            signal.signal(s, handler)
        self._handlers = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if (batch_idx + 1) % trainer.accumulate_grad_batches:  # stop only after an optimizer step
            return
        if trainer.strategy.reduce_boolean_decision(self.stopped_by is not None, all=False):
            self.stopped_by = self.stopped_by or signal.SIGTERM  # another rank got the signal
            self._save_at_end(trainer)
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        self._save_at_end(trainer)
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception):
        super().on_exception(trainer, pl_module, exception)
        self._restore_handlers()

    def _save_at_end(self, trainer):
        if self._last_global_step_saved == trainer.global_step or not (self.save_last or self.stopped_by):
            return
        candidates = self._monitor_candidates(trainer)
        if self.save_last:
            self._save_last_checkpoint(trainer, candidates)
        else:
            self._save_checkpoint(trainer, self.format_checkpoint_name(candidates))
        if self.stopped_by:
            rank_zero_info(f"stopped at step {trainer.global_step}: saved {self._last_checkpoint_saved}")


class SampleGridCallback(L.Callback):
    """Every `every_n_steps`, personalize held-out sets with the EMA weights and save a grid.

    Row per set: its reference images | generated targets (captions as labels) | the real targets.
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
        if self.every and step > 0 and step % self.every == 0:
            self.render(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.last_grid is None or not self.last_grid.endswith(f"{trainer.global_step:07d}.png"):
            self.render(trainer, pl_module)

    @rank_zero_only
    def render(self, trainer, pl_module) -> str | None:
        if not self.sets:
            return None
        if getattr(trainer.strategy, "zero_stage_3", False):
            # ZeRO-3 shards every weight across ranks: a rank-0-only forward pass would wait forever
            rank_zero_warn("sample grids are skipped under ZeRO-3; render them from a checkpoint with "
                           "jedi-export + jedi-sample", category=UserWarning)
            return None
        from .export import build_pipeline

        rows = []
        with pl_module.ema_weights() as unet:
            was_training = unet.training
            unet.eval()
            pipe = build_pipeline(pl_module.components, unet)
            pipe.set_progress_bar_config(disable=True)
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            for s in self.sets:
                out = pipe(reference_images=s["refs"], prompt=s["prompts"], reference_captions=s["ref_captions"],
                           num_inference_steps=self.steps, guidance_scale=self.cfg,
                           image_guidance_scale=self.img_cfg, generator=g, output_type="pil").images
                rows.append((s["refs"], out, s["truth"], s["prompts"]))
            unet.train(was_training)
        grid = sample_grid(rows)
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"samples_step{trainer.global_step:07d}.png")
        with atomic_path(path) as tmp:
            grid.save(tmp)
        self.last_grid = path
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[grid], step=trainer.global_step,
                                 caption=[f"step {trainer.global_step}: refs | generated | real"])
        return path


class IdentityGainCallback(L.Callback):
    """Every `every_n_steps` (and at the end): does the model use its references for the subject?

    `model.objective.identity_gain` on `num_sets` fixed held-out sets of `set_size` images with exactly
    one reference, over `seeds` x `timesteps`, subject pixels only, with the EMA weights; the same on
    `train_num_sets` fixed TRAINING sets (using references on seen subjects vs generalising to new ones).
    Logs eval/identity_gain, eval/identity_gain_se, eval/identity_gain_train(_se); writes
    `out_dir/identity_gain.csv`. Needs subject masks in the shards (procedural: generator.masks=true);
    without them it warns once and does nothing.
    """

    def __init__(self, every_n_steps: int = 500, num_sets: int = 64, set_size: int = 3,
                 timesteps=(500, 700, 900), seeds=(0, 1, 2, 3), out_dir: str = "samples", train_num_sets: int = 32):
        self.every, self.num_sets, self.set_size = every_n_steps, num_sets, set_size
        self.train_num_sets = train_num_sets
        self.timesteps, self.seeds, self.out_dir = tuple(timesteps), tuple(seeds), out_dir
        self.batches: dict[str, dict] | None = None
        self.rows: list[dict] = []

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state):
        self.rows = list(state.get("rows", []))

    def _collect(self, trainer) -> dict[str, dict]:
        dm = getattr(trainer, "datamodule", None)
        batches = {}
        if dm is not None and hasattr(dm, "fixed_batch"):
            for name, sources, n in (("heldout", dm.heldout_sources, self.num_sets),
                                     ("train", dm.cfg.sources, self.train_num_sets)):
                if sources and n:
                    b = dm.fixed_batch(sources, n, self.set_size, num_refs=1)
                    if b is not None and "subject_mask" in b:
                        batches[name] = {k: v for k, v in b.items() if torch.is_tensor(v)}
        if "heldout" not in batches:
            rank_zero_warn("identity gain skipped: no held-out sets with subject masks (data.heldout_sources; "
                           "procedural shards written with generator.masks=true carry masks)", category=UserWarning)
        return batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step > 0 and step % self.every == 0:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if not self.rows or self.rows[-1]["step"] != trainer.global_step:
            self.measure(trainer, pl_module)

    @rank_zero_only
    def measure(self, trainer, pl_module) -> dict | None:
        from .model.objective import identity_gain

        if self.batches is None:
            self.batches = self._collect(trainer)
        if "heldout" not in self.batches or getattr(trainer.strategy, "zero_stage_3", False):
            return None
        row: dict = {"step": trainer.global_step}
        with pl_module.ema_weights() as unet:
            was_training = unet.training
            unet.eval()
            for name, b in self.batches.items():
                r = identity_gain(pl_module.objective, {k: v.to(pl_module.device) for k, v in b.items()},
                                  self.timesteps, self.seeds)
                suffix = "" if name == "heldout" else "_train"
                row[f"identity_gain{suffix}"], row[f"identity_gain{suffix}_se"] = r["gain"], r["se"]
            unet.train(was_training)
        self.rows.append(row)
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
        from data_pipelines.synth.writer import atomic_write_text

        os.makedirs(self.out_dir, exist_ok=True)
        keys = list(row)
        lines = [",".join(keys)] + [",".join([str(r["step"])] + [f"{r.get(k, float('nan')):.6g}" for k in keys[1:]])
                                    for r in self.rows]
        atomic_write_text(os.path.join(self.out_dir, "identity_gain.csv"), "\n".join(lines) + "\n")
        return row


class LossCurveCallback(L.Callback):
    """Keeps (step, loss, set ids) for the whole run (resumes included); writes loss_curve.csv + .png.

    The set ids make a resumed run checkable against an uninterrupted one: same losses, same data.
    """

    def __init__(self, out_dir: str, every_n_steps: int = 100):
        self.out_dir, self.every = out_dir, every_n_steps
        self.history: list[tuple[int, float]] = []
        self.set_ids: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not outputs:  # a skipped (non-finite) step
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.history.append((trainer.global_step, float(loss)))
        self.set_ids.append("|".join(map(str, batch.get("set_id", []))))
        if self.every and trainer.global_step % self.every == 0:
            self.write(trainer)

    def on_train_end(self, trainer, pl_module):
        self.write(trainer)

    def state_dict(self):
        return {"history": self.history, "set_ids": self.set_ids}

    def load_state_dict(self, state):
        self.history = [tuple(x) for x in state.get("history", [])]
        self.set_ids = list(state.get("set_ids", []))

    def summary(self, window: int = 50) -> dict | None:
        """Mean loss over the first and last `window` steps."""
        if len(self.history) < 2:
            return None
        w = max(1, min(window, len(self.history) // 2))
        first = sum(v for _, v in self.history[:w]) / w
        last = sum(v for _, v in self.history[-w:]) / w
        return {"steps": self.history[-1][0], "window": w, "start": first, "end": last}

    @rank_zero_only
    def write(self, trainer):
        if not self.history:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        csv = os.path.join(self.out_dir, "loss_curve.csv")
        with atomic_path(csv) as tmp, open(tmp, "w") as f:
            f.write("step,loss,sets\n" + "".join(f"{s},{v:.8f},{ids}\n" for (s, v), ids in
                                                 zip(self.history, self.set_ids)))
        from .viz import plot_loss_curve

        plot_loss_curve(self.history, os.path.join(self.out_dir, "loss_curve.png"))
