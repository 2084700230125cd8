"""Launch templates and the Hydra SLURM launcher, run through a real single-node SLURM cluster on localhost.

The cluster (launch/local_slurm.py) is started once for the module and stopped by its pid files.
Skipped when the SLURM/munge packages are not installed or we are not root.
No slurmdbd, so job states come from `scontrol show job`, never sacct.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))
from local_slurm import LocalSlurm, unavailable_reason

pytestmark = pytest.mark.slow
VENV_BIN = Path(sys.executable).parent
CPU_JOB = ["--gres=none", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=6"]
# a few CPU steps, checkpoint every 2 (debug=fast); no W&B, no sample grids to keep jobs short
TRAIN_ARGS = ["trainer=cpu", "experiment=demo", "debug=fast", "logger=none", "~callbacks.sample_grid"]


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    state = tempfile.mkdtemp(prefix="jedi-slurm-test-")  # not under pytest's 0700 tmp: munged must reach it
    c = LocalSlurm(state)
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    yield c
    c.stop()
    assert not any(c._pids().values()), f"daemons left running: {c._pids()}"
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory):
    """The dir jobs are submitted from (logs/ must exist before a job starts) and their JEDI_ROOT,
    with a few tiny set shards where the demo data config looks (so no job synthesizes data)."""
    from helpers.stream_helpers import write_shards

    d = tmp_path_factory.mktemp("slurm_submit")
    (d / "logs").mkdir()
    write_shards(str(d / "data" / "sets" / "procedural"), num_shards=4, sets_per_shard=16, set_sizes=(2, 3, 4))
    return d


def job_env(submit_dir: Path, **extra) -> dict:
    env = dict(os.environ)
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", JEDI_ROOT=str(submit_dir),
               HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1", **extra)
    return env


def ckpt_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def job_log(submit_dir: Path, job_id: str) -> str:
    p = submit_dir / "logs" / f"jedi-train-{job_id}.out"
    return p.read_text(errors="replace") if p.exists() else ""


def assert_completed(cluster, job_id, info, log):
    assert info.get("JobState") == "COMPLETED", (
        f"job {job_id}: {info.get('JobState')} exit {info.get('ExitCode')}\n--- log ---\n{log[-4000:]}")


def test_sbatch_train_runs_and_checkpoints(cluster, submit_dir):
    job = cluster.sbatch(*CPU_JOB, str(REPO / "launch/sbatch_train.sh"), *TRAIN_ARGS,
                         cwd=submit_dir, env=job_env(submit_dir))
    info = cluster.wait_job(job, timeout=150)
    log = job_log(submit_dir, job)
    assert_completed(cluster, job, info, log)
    run_dir = submit_dir / "runs" / f"jedi-train-{job}"  # stable, job-id based run dir
    assert f"run dir {run_dir}" in log
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.exists(), f"no {last}; log:\n{log[-3000:]}"
    assert ckpt_step(last) == 4
    assert "(step 4)" in log
    # the template's defaults reached jedi-train: one node, one device, SLURM-derived run name
    assert re.search(r"1 node\(s\) x 1 task\(s\)", log)
    # Lightning recognised the SLURM job, so --signal=SIGUSR1@90 reaches its checkpoint-and-requeue handler
    assert "SLURM auto-requeueing enabled" in log


def test_requeued_job_resumes_from_its_checkpoint(cluster, submit_dir):
    max_steps = 40
    job = cluster.sbatch(*CPU_JOB, str(REPO / "launch/sbatch_train.sh"), *TRAIN_ARGS,
                         f"trainer.max_steps={max_steps}", cwd=submit_dir, env=job_env(submit_dir))
    last = submit_dir / "runs" / f"jedi-train-{job}" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 150
    step_at_requeue = None
    while time.monotonic() < deadline:
        info = cluster.job(job)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"job ended before it could be requeued: {info.get('JobState')}\n{job_log(submit_dir, job)[-3000:]}")
        if last.exists():
            try:
                step_at_requeue = ckpt_step(last)
            except (EOFError, RuntimeError, OSError):  # being written
                step_at_requeue = None
            if step_at_requeue and step_at_requeue >= 4:
                break
        time.sleep(0.2)
    assert step_at_requeue, f"no checkpoint within the deadline:\n{job_log(submit_dir, job)[-3000:]}"
    assert step_at_requeue < max_steps
    cluster.run("scontrol", "requeue", job)

    info = cluster.wait_job(job, timeout=200)
    log = job_log(submit_dir, job)
    assert_completed(cluster, job, info, log)
    assert info.get("Restarts") == "1", info
    # --open-mode=append: both runs in one log, the second marked by the template's restart count
    first, sep, second = log.partition(f"job {job} restart 1")
    assert sep, f"no restart marker in the log:\n{log[-3000:]}"
    assert "Restoring states from the checkpoint path" not in first
    m = re.search(r"Restoring states from the checkpoint path at (\S+)", second)
    # from the newest complete checkpoint of the run, whatever its name: last.ckpt, or a periodic one when the
    # kill came while last.ckpt was being rewritten (seen on a loaded machine: it resumed from step0000006.ckpt)
    assert m and os.path.dirname(m.group(1)) == str(last.parent), f"restart did not resume:\n{second[-3000:]}"
    assert f"(step {max_steps})" in second
    assert ckpt_step(last) == max_steps
    # the resumed run continued the step count instead of starting over: its loss-curve history,
    # restored from the checkpoint, has every step exactly once
    csv = (last.parent.parent / "loss_curve.csv").read_text().splitlines()
    steps = [int(float(line.split(",")[0])) for line in csv[1:] if line.strip()]
    assert steps == sorted(set(steps)) and len(steps) == max_steps, steps


def test_hydra_sweep_through_slurm_launcher(cluster, submit_dir):
    sweep_dir = submit_dir / "multirun" / "lr"
    cmd = [str(VENV_BIN / "jedi-train"), "-m", "hydra/launcher=slurm", *TRAIN_ARGS,
           "hydra.launcher.gpus_per_node=null", "hydra.launcher.tasks_per_node=1",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=6",
           f"hydra.sweep.dir={sweep_dir}",  # each job runs in sweep_dir/<job num> by itself
           "model.optimizer.lr=1e-3,2e-3"]
    r = subprocess.run(cmd, cwd=submit_dir, env=cluster.env(job_env(submit_dir)), capture_output=True, text=True,
                       timeout=200, check=False)
    logs = "\n".join(p.read_text(errors="replace") for p in sweep_dir.glob(".submitit/*/*.out"))
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}\n--- job logs ---\n{logs[-3000:]}"
    job_dirs = sorted(p for p in sweep_dir.glob(".submitit/*_*") if p.is_dir())
    assert len(job_dirs) == 2, job_dirs  # one SLURM array task per sweep point
    for num, lr in ((0, 1e-3), (1, 2e-3)):
        run = sweep_dir / str(num)
        assert ckpt_step(run / "checkpoints" / "last.ckpt") == 4, logs[-3000:]
        cfg = (run / "config.yaml").read_text()
        assert re.search(rf"lr: {lr:g}|lr: {lr}", cfg), cfg[:2000]
    assert "Job completed successfully" in logs


def test_synth_array_passes_worker_shards(cluster, submit_dir, tmp_path):
    """Each array task gets worker_index = its task id and num_workers_total = the array size
    (a stand-in jedi-synth records its arguments; the real one is tested in its own tests)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "jedi-synth").write_text('#!/bin/bash\necho "ARGS $*"\n')
    (fake / "jedi-synth").chmod(0o755)
    env = job_env(submit_dir)
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    job = cluster.sbatch("--array=0-2", "--cpus-per-task=1", "--time=2", str(REPO / "launch/sbatch_synth_array.sh"),
                         "generator=procedural", "out_dir=x", cwd=submit_dir, env=env)
    bad = cluster.sbatch("--array=1-2", "--cpus-per-task=1", "--time=2", str(REPO / "launch/sbatch_synth_array.sh"),
                         cwd=submit_dir, env=env)
    for i in range(3):
        assert cluster.wait_job(f"{job}_{i}", timeout=60)["JobState"] == "COMPLETED"
        log = (submit_dir / "logs" / f"jedi-synth-{job}_{i}.out").read_text()
        assert f"ARGS num_workers_total=3 worker_index={i} generator=procedural out_dir=x" in log
    # an array not starting at 0 would leave worker 0's share out: refused unless N is given
    assert cluster.wait_job(f"{bad}_1", timeout=60)["JobState"] == "FAILED"
    assert "set JEDI_SYNTH_WORKERS" in (submit_dir / "logs" / f"jedi-synth-{bad}_1.out").read_text()


def test_generate_array_passes_shards(cluster, submit_dir, tmp_path):
    """Each array task runs jedi-generate with --shard-index = its task id and --num-shards = the array size
    (a stand-in jedi-generate records its arguments; sharding itself is tested in test_generate.py)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "jedi-generate").write_text('#!/bin/bash\necho "ARGS $*"\n')
    (fake / "jedi-generate").chmod(0o755)
    env = job_env(submit_dir)
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    script = str(REPO / "launch/sbatch_generate_array.sh")
    job = cluster.sbatch("--array=0-1", "--gres=none", "--cpus-per-task=1", "--time=2", script, "PIPE",
                         "--jobs", "j.jsonl", "--out", "o", cwd=submit_dir, env=env)
    bad = cluster.sbatch("--array=1-2", "--gres=none", "--cpus-per-task=1", "--time=2", script, cwd=submit_dir,
                         env=env)
    for i in range(2):
        assert cluster.wait_job(f"{job}_{i}", timeout=60)["JobState"] == "COMPLETED"
        log = (submit_dir / "logs" / f"jedi-generate-{job}_{i}.out").read_text()
        assert f"ARGS PIPE --jobs j.jsonl --out o --no-progress --num-shards 2 --shard-index {i}" in log
    assert cluster.wait_job(f"{bad}_1", timeout=60)["JobState"] == "FAILED"
    assert "set JEDI_GENERATE_SHARDS" in (submit_dir / "logs" / f"jedi-generate-{bad}_1.out").read_text()
