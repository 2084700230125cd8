"""Issue 12, training side: a signal, a kill or a truncated file never costs a run its work.

jedi-train runs as a user runs it (console script in a subprocess, real signals) on a few procedural-
looking shards and the tiny pixel model: SIGTERM / SIGINT save the current step and exit non-zero, a
rerun resumes from the newest checkpoint that loads, checkpoint writes are atomic in their own
directory, metrics.csv keeps one history across resumes.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.safety_runs import ARGS, BIN, env, make_root, run_safety_jedi


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def csv_steps(run: Path) -> list[int]:
    """Steps of the training rows of metrics.csv (Lightning: the number of steps before the logged one)."""
    with open(run / "csv" / "metrics.csv") as f:
        return [int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/loss")]


def output(p) -> str:
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("safety_root"))


def interrupt(root: Path, run: Path, signum: int, after_steps: int = 3, workers: int = 2, extra=(), group=False):
    """Start a long run, wait until `after_steps` steps are in loss_curve.csv, send `signum` (to rank 0; with
    group=True to its whole process group, DataLoader workers included, as Ctrl+C in a terminal does)."""
    cmd = [str(BIN / "jedi-train"), *ARGS, "trainer.max_steps=100000", "callbacks.model_checkpoint.every_n_train_steps=1000",
           f"data.num_workers={workers}", f"paths.output_dir={run}", *extra]
    log = run.parent / f"{run.name}.log"  # a file, not a pipe: nobody reads a pipe while we wait
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env(root), cwd=root, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=group)
    curve, seen, deadline = run / "loss_curve.csv", 0, time.monotonic() + 300
    try:
        while seen < after_steps:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not reach the steps in time"
            time.sleep(0.2)
            if curve.exists():
                seen = len(curve.read_text().splitlines()) - 1
        os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, log.read_text(), seen


def test_sigterm_saves_the_current_step_exits_143_and_the_rerun_resumes(root):
    run = root / "runs" / "term"
    rc, out, seen = interrupt(root, run, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file(), out[-3000:]
    stopped = step_of(last)
    assert stopped >= seen and f"saved {last}" in out  # the step it was at, not an older periodic one
    assert "Traceback" not in out

    p = run_safety_jedi("jedi-train", *ARGS, f"trainer.max_steps={stopped + 2}", "data.num_workers=2", f"paths.output_dir={run}",
                        root=root)
    assert f"Restoring states from the checkpoint path at {last}" in output(p)
    assert f"(step {stopped + 2})" in p.stdout and step_of(last) == stopped + 2
    assert csv_steps(run) == list(range(stopped + 2))  # one history: the interrupted segment, then the rest


def test_sigint_saves_the_current_step_and_exits_130(root):
    run = root / "runs" / "int"
    rc, out, seen = interrupt(root, run, signal.SIGINT, workers=0)
    assert rc == 128 + signal.SIGINT, out[-3000:]
    assert step_of(run / "checkpoints" / "last.ckpt") >= seen


def test_ctrl_c_to_the_process_group_with_loader_workers_saves_and_exits_130(root):
    """The terminal's Ctrl+C reaches the DataLoader workers too: they must not die first and take the run down."""
    run = root / "runs" / "int-group"
    rc, out, seen = interrupt(root, run, signal.SIGINT, workers=2, group=True)
    assert rc == 128 + signal.SIGINT, out[-3000:]
    assert step_of(run / "checkpoints" / "last.ckpt") >= seen
    assert "Traceback" not in out and "exited unexpectedly" not in out, out[-3000:]


@pytest.mark.slow
def test_sigterm_to_rank_0_of_a_ddp_run_saves_on_every_rank_and_resumes(root):
    """Lightning's own SIGTERM handler deadlocks here (its in-handler broadcast); ours agrees at a step end."""
    run = root / "runs" / "ddp"
    ddp = ["strategy=ddp", "trainer.devices=2"]
    rc, out, seen = interrupt(root, run, signal.SIGTERM, workers=0, extra=ddp)
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    stopped = step_of(run / "checkpoints" / "last.ckpt")
    assert stopped >= seen
    p = run_safety_jedi("jedi-train", *ARGS, *ddp, f"trainer.max_steps={stopped + 1}", "data.num_workers=0",
                        f"paths.output_dir={run}", root=root)
    assert "Restoring states from the checkpoint path" in output(p) and step_of(run / "checkpoints" / "last.ckpt") == stopped + 1


def test_resume_skips_truncated_checkpoints_and_keeps_one_metrics_history(root):
    run = root / "runs" / "truncated"
    common = [*ARGS, "callbacks.model_checkpoint.every_n_train_steps=2", "data.num_workers=0", f"paths.output_dir={run}"]
    run_safety_jedi("jedi-train", *common, "trainer.max_steps=4", root=root)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]
    for name in ("last.ckpt", "step0000004.ckpt"):  # as a kill during a non-atomic copy leaves them
        data = (ckpts / name).read_bytes()
        (ckpts / name).write_bytes(data[: len(data) // 2])
    stale = ckpts / f".last.ckpt.partial-{os.getpid()}"  # a temp file of a save that was killed
    stale.write_bytes(b"half")

    p = run_safety_jedi("jedi-train", *common, "trainer.max_steps=4", root=root)
    text = output(p)
    assert "last.ckpt is not a complete checkpoint" in text and "resuming from step0000002.ckpt" in text, text[-3000:]
    assert f"Restoring states from the checkpoint path at {ckpts / 'step0000002.ckpt'}" in text
    assert not stale.exists()
    # step 4 was saved again under its own name (no step0000004-v1.ckpt), completely this time
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]
    assert step_of(ckpts / "step0000004.ckpt") == step_of(ckpts / "last.ckpt") == 4
    assert csv_steps(run) == [0, 1, 2, 3]  # steps 0-1 from the first run, 2-3 logged again by the second


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(root, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"PK\x03\x04 not really")
    p = run_safety_jedi("jedi-train", *ARGS, "trainer.max_steps=2", "data.num_workers=0", f"paths.output_dir={tmp_path / 'run'}",
                        root=root, check=False)
    assert p.returncode == 2 and "last.ckpt" in p.stderr and "Traceback" not in p.stderr, output(p)[-3000:]
    assert (ckpts / "last.ckpt").read_bytes() == b"PK\x03\x04 not really"  # left alone


KILLED_SAVE = """
import os, signal, sys, torch
import jedi_train.training.checkpoints as c
real = torch.save
def save_then_die(obj, f):  # the process dies after writing, before the rename
    real(obj, f); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
c.torch.save = save_then_die
c.AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.ones(1000)}, sys.argv[1])
"""


def test_a_killed_save_leaves_the_previous_checkpoint_and_a_temp_file_beside_it(tmp_path):
    from jedi_train.training.checkpoints import AtomicCheckpointIO, remove_partials

    dest, other_tmp = tmp_path / "ckpts", tmp_path / "tmpdir"
    other_tmp.mkdir()
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, str(dest / "last.ckpt"))
    p = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(dest / "last.ckpt")], capture_output=True, text=True,
                       env={**os.environ, "TMPDIR": str(other_tmp)}, timeout=300, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert step_of(dest / "last.ckpt") == 1  # the old checkpoint, whole
    partial = [f.name for f in dest.iterdir() if f.name != "last.ckpt"]
    assert len(partial) == 1 and partial[0].startswith(".last.ckpt.partial-")  # in the destination dir
    assert not list(other_tmp.iterdir())  # nothing staged in $TMPDIR (copied across filesystems)
    assert remove_partials(str(dest)) and [f.name for f in dest.iterdir()] == ["last.ckpt"]


def test_a_checkpoint_dir_is_replaced_whole_and_a_killed_one_is_cleaned(tmp_path):
    """DeepSpeed's per-rank shard dirs: written under a hidden name, renamed into place (AtomicDeepSpeedStrategy)."""
    from jedi_train.training.checkpoints import PARTIAL, publish, remove_partials

    final = tmp_path / "last.ckpt"
    (final / "checkpoint").mkdir(parents=True)
    (final / "checkpoint" / "old.pt").write_text("old")
    new = tmp_path / f".last.ckpt{PARTIAL}zero"
    (new / "checkpoint").mkdir(parents=True)
    (new / "checkpoint" / "new.pt").write_text("new")
    publish(str(new), str(final))
    assert os.listdir(final / "checkpoint") == ["new.pt"] and sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    killed = tmp_path / f".step0000002.ckpt{PARTIAL}zero"  # a save killed half-way: a hidden dir only
    (killed / "checkpoint").mkdir(parents=True)
    assert remove_partials(str(tmp_path)) == [str(killed)] and sorted(os.listdir(tmp_path)) == ["last.ckpt"]


def test_atomic_path_keeps_the_old_file_on_failure_and_the_extension_for_format_sniffing(tmp_path):
    from jedi_common.atomic import atomic_path

    target = tmp_path / "grid.png"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.endswith(".png") and os.path.dirname(tmp) == str(tmp_path)  # same dir: the rename is atomic
        Path(tmp).write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["grid.png"]
    with atomic_path(target, fsync=True) as tmp:
        Path(tmp).write_text("new")
    assert target.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["grid.png"]
