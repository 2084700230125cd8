"""Checkpoints that also save `last` when training stops early (max_steps, SIGTERM, Ctrl+C), and the
stop-signal grace period: after a stop signal only the checkpoint is written; every end-of-fit extra
(sample grid, identity gain, export, eval) is skipped, one in progress is abandoned (`extra`), and a
second signal exits at once."""
from __future__ import annotations

import contextlib
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
    all-reduce at each step end), saves `last` at once and training ends; `stopped_by` holds the signal
    (jedi-train exits 128 + it). The grace period a scheduler gives (SLURM's KillWait, Kubernetes'
    terminationGracePeriodSeconds: 30 s by default) is spent on nothing else: a sample grid or identity
    measurement running when the signal arrives is abandoned (`extra`), the end-of-training ones and the
    export are skipped (`stop_requested`). A second SIGTERM or Ctrl+C exits at once (128 + signal; a save
    it cuts short leaves only a temp file, removed at the next start). Lightning's own SIGTERM handler is replaced while training: it only stops the loop (exit 0,
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
        if self.stopped_by is not None:
            print(f"received {signal.Signals(signum).name} again: exiting now (exit {128 + signum}; the last "
                  "complete checkpoint stays)", file=sys.stderr, flush=True)
            self._exit_now(128 + signum)
            return
        self.stopped_by = signum
        print(f"received {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping without "
              "the end-of-training extras (send it again to exit at once)", file=sys.stderr, flush=True)
        if self._extra is not None:  # a sample grid / identity measurement: abandon it, the checkpoint first
            raise _ExtraAbandoned(self._extra)

    _extra: str | None = None  # the extra running now (see `extra`)

    @staticmethod
    def _exit_now(code: int) -> None:
        sys.stderr.flush()
        os._exit(code)  # no cleanup that could take the grace period (atexit, loader workers, W&B)

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
        if self.stopped_by:  # keep our handlers: a second signal during teardown still exits at once
            rank_zero_info(f"stopped by {signal.Signals(self.stopped_by).name}: the end-of-training extras (sample "
                           "grid, identity gain, export) were skipped; run the same command again to resume")
            return
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


class _ExtraAbandoned(BaseException):
    """Raised by the signal handler inside `extra`: not an Exception, so no `except Exception` swallows it."""


def signal_checkpoint(trainer) -> Checkpoint | None:
    return next((cb for cb in getattr(trainer, "callbacks", None) or [] if isinstance(cb, Checkpoint)), None)


def stop_requested(trainer) -> bool:
    """A stop signal arrived: callbacks skip their extras (the checkpoint is all that is left to do)."""
    cb = signal_checkpoint(trainer)
    return bool(cb is not None and cb.stopped_by)


@contextlib.contextmanager
def extra(trainer, what: str):
    """Run an optional piece of work (a sample grid, an identity measurement) so that a stop signal arriving
    during it abandons it at once: training then saves its checkpoint and exits within the grace period."""
    cb = signal_checkpoint(trainer)
    if cb is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    cb._extra = what
    try:
        yield
    except _ExtraAbandoned:
        rank_zero_info(f"{what} abandoned: a stop signal arrived")
    finally:
        cb._extra = None


def exit_at_once_on_signals() -> None:
    """After a stopped fit: any further SIGTERM / Ctrl+C exits at once (128 + signal)."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda signum, frame: Checkpoint._exit_now(128 + signum))
