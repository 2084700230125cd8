"""The training callbacks on their own, on a one-layer LightningModule (no diffusion model): the loss
curve's record/summary/state, the identity gain's state and schedule, Checkpoint's signal handling.
(Sample grids under ZeRO-3 are in test_module.py; the full run's CSV files in test_train_cli.py.)"""
import csv
import os
import signal
import threading
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from jedi_train.training.callbacks import Checkpoint, IdentityGainCallback, LossCurveCallback

pytestmark = pytest.mark.usefixtures("one_thread")


class Sets(Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        return {"x": torch.full((4,), float(i % 7)), "set_id": f"set{i}"}


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.lin(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def fit(callbacks, steps, root):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(Tiny(), DataLoader(Sets(), batch_size=2))
    return trainer


# -- LossCurveCallback --------------------------------------------------------------------------------
def test_loss_curve_records_every_step_with_its_sets_and_writes_csv(tmp_path):
    cb = LossCurveCallback(out_dir=str(tmp_path / "run"), every_n_steps=2)
    fit([cb], 5, tmp_path)
    assert [s for s, _ in cb.history] == [1, 2, 3, 4, 5]
    assert cb.set_ids == [f"set{2 * i}|set{2 * i + 1}" for i in range(5)]  # the sets behind each loss
    with open(tmp_path / "run" / "loss_curve.csv") as f:  # written at the end: all 5 steps
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), r["sets"]) for r in rows] == list(zip([1, 2, 3, 4, 5], cb.set_ids))
    assert [float(r["loss"]) for r in rows] == pytest.approx([v for _, v in cb.history], abs=1e-7)
    assert (tmp_path / "run" / "loss_curve.png").is_file()


def test_loss_curve_skips_steps_without_outputs_and_writes_on_schedule(tmp_path):
    cb = LossCurveCallback(out_dir=str(tmp_path), every_n_steps=3)
    trainer = SimpleNamespace(global_step=1)
    cb.on_train_batch_end(trainer, None, {"loss": torch.tensor(2.0)}, {"set_id": ["a", "b"]}, 0)
    trainer.global_step = 2
    cb.on_train_batch_end(trainer, None, None, {"set_id": ["c"]}, 1)  # a skipped (non-finite) step
    assert cb.history == [(1, 2.0)] and cb.set_ids == ["a|b"] and not os.listdir(tmp_path)
    trainer.global_step = 3
    cb.on_train_batch_end(trainer, None, torch.tensor(1.0), {}, 2)  # a bare loss, a batch without set ids
    assert cb.history == [(1, 2.0), (3, 1.0)] and cb.set_ids == ["a|b", ""]
    assert (tmp_path / "loss_curve.csv").read_text() == "step,loss,sets\n1,2.00000000,a|b\n3,1.00000000,\n"


def test_loss_curve_summary_windows():
    cb = LossCurveCallback(out_dir="unused")
    assert cb.summary() is None
    cb.history = [(1, 9.0)]
    assert cb.summary() is None  # one step: no start and end to compare
    cb.history = [(10, 4.0), (20, 3.0), (30, 2.0), (40, 1.0), (50, 0.0)]
    assert cb.summary() == {"steps": 50, "window": 2, "start": 3.5, "end": 0.5}  # window <= half the run
    assert cb.summary(window=1) == {"steps": 50, "window": 1, "start": 4.0, "end": 0.0}


def test_loss_curve_state_round_trip(tmp_path):
    cb = LossCurveCallback(out_dir=str(tmp_path))
    cb.history, cb.set_ids = [(1, 0.5), (2, 0.25), (3, 0.125)], ["a", "b", "c"]
    path = tmp_path / "state.pt"
    torch.save(cb.state_dict(), path)
    again = LossCurveCallback(out_dir=str(tmp_path))
    again.load_state_dict(torch.load(path))
    assert again.history == cb.history and again.set_ids == cb.set_ids and again.summary() == cb.summary()
    listed = LossCurveCallback(out_dir=str(tmp_path))  # lists, as a JSON round trip gives them back
    listed.load_state_dict({"history": [[1, 0.5], [2, 0.25]], "set_ids": ["a", "b"]})
    assert listed.history == [(1, 0.5), (2, 0.25)] and all(isinstance(h, tuple) for h in listed.history)
    empty = LossCurveCallback(out_dir=str(tmp_path))
    empty.load_state_dict({})  # a checkpoint from before the callback existed
    assert empty.history == [] and empty.set_ids == []


def test_loss_curve_history_survives_a_resume(tmp_path):
    """Resumed from a checkpoint, the run's curve holds the steps before the stop as well."""
    first = LossCurveCallback(out_dir=str(tmp_path / "a"))
    fit([first, Checkpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=100)], 3, tmp_path)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("LossCurveCallback"))
    resumed = LossCurveCallback(out_dir=str(tmp_path / "b"))
    resumed.load_state_dict(state)
    assert resumed.history == first.history and [s for s, _ in resumed.history] == [1, 2, 3]


# -- IdentityGainCallback -----------------------------------------------------------------------------
def test_identity_gain_state_round_trip():
    cb = IdentityGainCallback()
    cb.rows = [{"step": 500, "identity_gain": 1.2, "identity_gain_se": 0.1}]
    again = IdentityGainCallback()
    again.load_state_dict(cb.state_dict())
    assert again.rows == cb.rows and again.rows is not cb.rows
    again.load_state_dict({})
    assert again.rows == []


def test_identity_gain_schedule(monkeypatch):
    """Measured every `every_n_steps` (not at step 0) and at the end unless the last step was just measured."""
    cb = IdentityGainCallback(every_n_steps=3)
    steps = []
    monkeypatch.setattr(cb, "measure", lambda trainer, pl_module: steps.append(trainer.global_step))
    for step in range(8):
        cb.on_train_batch_end(SimpleNamespace(global_step=step), None, None, None, step)
    assert steps == [3, 6]
    cb.rows = [{"step": 7}]
    cb.on_train_end(SimpleNamespace(global_step=7), None)
    assert steps == [3, 6]  # step 7 is already in the rows
    cb.on_train_end(SimpleNamespace(global_step=8), None)
    assert steps == [3, 6, 8]


def test_identity_gain_without_masked_heldout_sets_warns_once_and_does_nothing(tmp_path):
    cb = IdentityGainCallback(out_dir=str(tmp_path))
    trainer = SimpleNamespace(global_step=10, datamodule=None, loggers=[])
    with pytest.warns(UserWarning, match="identity gain skipped"):
        assert cb.measure(trainer, None) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cb.measure(trainer, None) is None  # decided once: no second warning
    assert cb.rows == [] and not os.listdir(tmp_path)


# -- Checkpoint ---------------------------------------------------------------------------------------
def test_sigterm_saves_last_after_the_step_and_stops(tmp_path, capfd):
    """A real SIGTERM during step 3: the step finishes, `last` is saved at step 3 (periodic saves are every
    100 steps), training stops, and the signal handlers are the ones from before fit."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    cp = Checkpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=100)

    class Term(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                assert signal.getsignal(signal.SIGTERM) == cp._on_signal  # never kill the test process
                os.kill(os.getpid(), signal.SIGTERM)

    trainer = fit([Term(), cp], 50, tmp_path)
    assert cp.stopped_by == signal.SIGTERM and trainer.global_step == 3
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert "received SIGTERM: saving a checkpoint after this step" in capfd.readouterr().err
    assert {s: signal.getsignal(s) for s in before} == before


def test_signal_handler_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(Checkpoint, "_exit_now", staticmethod(exits.append))  # os._exit in a real run
    cp = Checkpoint(dirpath="unused")
    cp._pid = os.getpid()
    cp._on_signal(signal.SIGINT, None)
    assert cp.stopped_by == signal.SIGINT and exits == []
    cp._on_signal(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]
    term = Checkpoint(dirpath="unused")
    term._pid = os.getpid()
    term._on_signal(signal.SIGTERM, None)
    term._on_signal(signal.SIGTERM, None)  # SIGTERM again: exits at once too (issue 35: within the grace period)
    assert term.stopped_by == signal.SIGTERM and exits[-1] == 128 + signal.SIGTERM
    worker = Checkpoint(dirpath="unused")
    worker._pid = os.getpid() + 1  # as in a forked DataLoader worker: Ctrl+C is the main process's business
    worker._on_signal(signal.SIGINT, None)
    assert worker.stopped_by is None


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_checkpoint_saved_again_replaces_the_old_one(tmp_path):
    """No `-v1` copies: a second run writing the same steps into the same folder replaces the files."""
    for _ in range(2):
        fit([Checkpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=2, save_top_k=-1)],
            5, tmp_path)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 5
