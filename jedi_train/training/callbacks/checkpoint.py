"""Checkpoints that also save `last` when training stops early (max_steps, SIGTERM, Ctrl+C)."""
from __future__ import annotations

import os
import signal
import sys
import threading

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


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
