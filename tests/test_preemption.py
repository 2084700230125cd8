"""Issue 35, item 1: a stop signal is answered within a scheduler's grace period.

SLURM (KillWait) and Kubernetes (terminationGracePeriodSeconds) send SIGKILL 30 s after SIGTERM. So after a
stop signal jedi-train saves `last.ckpt` and exits 143: a sample grid being rendered is abandoned, the
end-of-training grid / identity gain / export are skipped, and a second signal exits at once.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers.safety_runs import ARGS, BIN, env, make_root

from jedi_train.training.callbacks.checkpoint import Checkpoint

# the safety runs' config with an expensive sample grid at step 2 and at the end (thousands of sampling
# steps: minutes on the tiny model), which a stopped run must not wait for
SLOW_GRID = [a for a in ARGS if a != "~callbacks.sample_grid"] + [
    "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.num_sets=2",
    "callbacks.sample_grid.num_inference_steps=1000",
    "callbacks.sample_grid.guidance_scale=3", "callbacks.sample_grid.image_guidance_scale=3", "trainer.max_steps=100000",
    "callbacks.model_checkpoint.every_n_train_steps=1000", "data.num_workers=0", "export_after_fit=true"]
GRACE_S = 25  # well inside the 30 s a scheduler gives; the extras alone would take minutes


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("preempt_root"))


def test_sigterm_during_a_sample_grid_saves_and_exits_143_within_the_grace_period(root):
    run = root / "runs" / "grace"
    log = root / "grace.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(BIN / "jedi-train"), *SLOW_GRID, f"paths.output_dir={run}"], env=env(root),
                                cwd=root, stdout=f, stderr=subprocess.STDOUT)
    curve = run / "loss_curve.csv"
    try:
        deadline = time.monotonic() + 300
        while not (curve.exists() and len(curve.read_text().splitlines()) >= 2):  # step 1 done
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not reach step 1 in time"
            time.sleep(0.1)
        time.sleep(2.0)  # step 2 done: its sample grid (1000 sampling steps x 3 guidance branches) is being rendered now
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {GRACE_S} s after SIGTERM (a scheduler would SIGKILL it): "
                        + log.read_text()[-2000:])
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"] >= 2, out[-3000:]
    assert not list((run / "samples").glob("samples_step*.png")), "a sample grid was rendered after the signal"
    assert not (run / "pipeline").exists(), "exported after the signal"
    assert "sample grid abandoned" in out and "end-of-training extras" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    print(f"exit {took:.1f} s after SIGTERM")


def test_a_second_signal_exits_at_once(monkeypatch):
    """The first SIGTERM asks for a clean stop; a second one (SIGTERM or Ctrl+C) exits now with 128 + signal."""
    exits = []
    monkeypatch.setattr(Checkpoint, "_exit_now", staticmethod(exits.append))
    for first, second in ((signal.SIGTERM, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT),
                          (signal.SIGINT, signal.SIGTERM)):
        cp = Checkpoint(dirpath="unused")
        cp._pid = os.getpid()
        cp._on_signal(first, None)
        assert cp.stopped_by == first and exits == []
        cp._on_signal(second, None)
        assert exits == [128 + second]
        exits.clear()


def test_a_signal_abandons_a_running_extra_and_later_ones_are_skipped(tmp_path):
    """`extra` (what sample grids and identity measurements run in): the signal handler ends it at once."""
    from types import SimpleNamespace

    from jedi_train.training.callbacks.checkpoint import extra, stop_requested

    cp = Checkpoint(dirpath=str(tmp_path))
    cp._pid = os.getpid()
    trainer = SimpleNamespace(callbacks=[cp])
    reached = []
    with extra(trainer, "sample grid"):
        cp._on_signal(signal.SIGTERM, None)  # as if delivered in the middle of the render
        reached.append("rest of the render")
    assert reached == [] and stop_requested(trainer) and cp._extra is None


def test_the_readme_states_the_grace_period_promise():
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    assert "Grace period" in readme and "second SIGTERM" in readme
