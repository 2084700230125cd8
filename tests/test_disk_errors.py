"""Read-only and full disks in the console scripts: one line naming the path, the reason and the fix,
exit 2, no traceback, and no half-written file under a final name (issue 12).

Real mounts (a read-only bind mount, a 4 MiB tmpfs), not mocks; skipped where mounting is not allowed."""
import glob
import os
import subprocess
import uuid

import pytest
import torch
from helpers.cli import FAST, cli, one_line_error


def _mount(*args):
    p = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        pytest.skip(f"cannot mount here ({p.stderr.strip()[:80]}): needs root with CAP_SYS_ADMIN")


@pytest.fixture
def readonly_dir(tmp_path):
    d = tmp_path / f"ro-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    (d / "kept.txt").write_text("a user's file\n")
    _mount("--bind", "-o", "ro", str(d), str(d))
    yield d
    subprocess.run(["umount", str(d)], check=False)


@pytest.fixture
def full_dir(tmp_path):
    d = tmp_path / f"full-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d))
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_jedi_train_into_a_read_only_dir_is_one_line_before_anything_runs(tmp_path, readonly_dir):
    p = cli("jedi-train", "logger=none", "trainer.max_steps=1", f"paths.output_dir={readonly_dir}/run", cwd=tmp_path)
    line = one_line_error(p, "jedi-train")
    assert "read-only" in line and str(readonly_dir) in line and "paths.output_dir" in line, line
    assert sorted(os.listdir(readonly_dir)) == ["kept.txt"]


def test_jedi_synth_into_a_read_only_dir_is_one_line(tmp_path, readonly_dir):
    p = cli("jedi-synth", "generator=procedural", "num_sets=2", "set_size=2", "resolution=32",
            f"out_dir={readonly_dir}/sets", cwd=tmp_path)
    line = one_line_error(p, "jedi-synth")
    assert "read-only" in line and "out_dir" in line, line


def test_a_disk_that_fills_during_training_is_one_line_and_leaves_no_truncated_checkpoint(tmp_path, full_dir):
    run = full_dir / "run"
    p = cli("jedi-train", *FAST, "logger=none", "trainer.max_steps=4", "export_after_fit=false",
            "callbacks.sample_grid=null", "callbacks.identity_gain=null", f"paths.output_dir={run}", cwd=tmp_path,
            timeout=600)
    line = one_line_error(p, "jedi-train")
    assert ("disk is full" in line or "full disk" in line) and "paths.output_dir" in line, line
    for ckpt in glob.glob(str(run / "checkpoints" / "*.ckpt")):  # whatever carries a final name is complete
        assert "global_step" in torch.load(ckpt, map_location="cpu", weights_only=True)


def test_sample_and_eval_into_a_read_only_dir_are_one_line(tmp_path, readonly_dir, pipe_dir):
    ref = tmp_path / "ref.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(ref)
    p = cli("jedi-sample", pipe_dir, "--ref", ref, "--prompt", "a toy", "--num", "1", "--steps", "1",
            "--out", readonly_dir / "samples", cwd=tmp_path)
    assert "read-only" in one_line_error(p, "jedi-sample")
    p = cli("jedi-eval", "procedural", pipe_dir, "--out", readonly_dir / "eval", "--subjects", "2", "--samples", "1",
            "--steps", "1", "--refs", "1", cwd=tmp_path)
    assert "read-only" in one_line_error(p, "jedi-eval")
    assert sorted(os.listdir(readonly_dir)) == ["kept.txt"]
