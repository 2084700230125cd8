"""The subject-pixel identity gain (error with vs without references) with its error bar, as a CSV."""
from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from jedi_common.atomic import atomic_write_text
from jedi_train.training.callbacks.checkpoint import extra, stop_requested
from jedi_train.training.strategies import shards_weights


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
                    b = dm.fixed_batch(sources, n, self.set_size, num_refs=1, heldout=name == "heldout")
                    if b is not None and "subject_mask" in b:
                        batches[name] = {k: v for k, v in b.items() if torch.is_tensor(v)}
        if "heldout" not in batches:
            rank_zero_warn("identity gain skipped: no held-out sets with subject masks (data.heldout_sources; "
                           "procedural shards written with generator.masks=true carry masks)", category=UserWarning)
        return batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step > 0 and step % self.every == 0 and not stop_requested(trainer):
            with extra(trainer, "identity gain"):  # a stop signal abandons it: the checkpoint comes first
                self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if stop_requested(trainer):  # stopped by a signal: the grace period is for the checkpoint
            return
        if not self.rows or self.rows[-1]["step"] != trainer.global_step:
            with extra(trainer, "identity gain"):
                self.measure(trainer, pl_module)

    @rank_zero_only
    def measure(self, trainer, pl_module) -> dict | None:
        from jedi_train.models.objective import identity_gain

        if self.batches is None:
            self.batches = self._collect(trainer)
        if "heldout" not in self.batches or shards_weights(trainer.strategy):
            return None
        row: dict = {"step": trainer.global_step}
        with pl_module.ema_weights() as denoiser:
            was_training = denoiser.training
            denoiser.eval()
            for name, b in self.batches.items():
                r = identity_gain(pl_module.objective, {k: v.to(pl_module.device) for k, v in b.items()},
                                  self.timesteps, self.seeds)
                suffix = "" if name == "heldout" else "_train"
                row[f"identity_gain{suffix}"], row[f"identity_gain{suffix}_se"] = r["gain"], r["se"]
            denoiser.train(was_training)
        self.rows.append(row)
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
        os.makedirs(self.out_dir, exist_ok=True)
        keys = list(row)
        lines = [",".join(keys)] + [",".join([str(r["step"])] + [f"{r.get(k, float('nan')):.6g}" for k in keys[1:]])
                                    for r in self.rows]
        atomic_write_text(os.path.join(self.out_dir, "identity_gain.csv"), "\n".join(lines) + "\n")
        return row
