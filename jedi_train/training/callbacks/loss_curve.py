"""The loss curve of the whole run (resumes included) as CSV + PNG."""
from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from jedi_common.atomic import atomic_path

from jedi_train.viz import plot_loss_curve


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
        plot_loss_curve(self.history, os.path.join(self.out_dir, "loss_curve.png"))
