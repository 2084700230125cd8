"""Issue 12, export and loading side: jedi-export never deletes what it did not write, and no
checkpoint a user hands us is unpickled beyond tensors and plain data (weights_only=True)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from helpers.safety_runs import ARGS, make_root, run_safety_jedi


class Payload:
    """Unpickling this runs a shell command (what a hostile .ckpt can do under weights_only=False)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 1, "state_dict": {}, "hyper_parameters": {"model_dir": "x"}, "x": Payload(marker)}, path)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run exported at the end of training, then resumed (and exported again) one step further."""
    root = make_root(tmp_path_factory.mktemp("export_root"))
    run = root / "runs" / "r"
    common = [*ARGS, "export_after_fit=true", "data.num_workers=0", "callbacks.model_checkpoint.every_n_train_steps=2",
              f"paths.output_dir={run}"]
    run_safety_jedi("jedi-train", *common, "trainer.max_steps=2", root=root)
    first = digest(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    second = run_safety_jedi("jedi-train", *common, "trainer.max_steps=3", root=root)
    return {"root": root, "run": run, "first": first, "second": second, "ckpt": run / "checkpoints" / "last.ckpt"}


def test_end_of_training_export_replaces_the_runs_previous_export_on_resume(trained):
    run = trained["run"]
    assert f"exported pipeline: {run / 'pipeline'}" in trained["second"].stdout
    assert digest(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors") != trained["first"]
    assert not [p for p in run.iterdir() if p.name.startswith(".export-")]  # no temp dirs left


def test_export_refuses_a_non_empty_directory_that_is_not_an_export(trained, tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        p = run_safety_jedi("jedi-export", trained["ckpt"], out, *extra, root=trained["root"], check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
        assert "not a previous export" in p.stderr
        assert (out / "chapter1.tex").read_text() == "years of work" and os.listdir(out) == ["chapter1.tex"]


def test_export_replaces_a_previous_export_only_with_overwrite(trained, tmp_path):
    out = tmp_path / "pipe"
    run_safety_jedi("jedi-export", trained["ckpt"], out, root=trained["root"])
    assert (out / "model_index.json").is_file()
    p = run_safety_jedi("jedi-export", trained["ckpt"], out, root=trained["root"], check=False)
    assert p.returncode == 2 and "--overwrite" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_safety_jedi("jedi-export", trained["ckpt"], out, "--overwrite", "--no-ema", root=trained["root"])
    assert (out / "model_index.json").is_file() and str(out) in p.stdout
    (out / "notes.txt").write_text("mine")  # an export with something else in it is not replaced either
    p = run_safety_jedi("jedi-export", trained["ckpt"], out, "--overwrite", root=trained["root"], check=False)
    assert p.returncode == 2 and "notes.txt" in p.stderr and (out / "notes.txt").read_text() == "mine"


def test_train_refuses_to_export_over_other_files_before_training(trained, tmp_path):
    run = tmp_path / "run"
    (run / "pipeline").mkdir(parents=True)
    (run / "pipeline" / "notes.txt").write_text("mine")
    p = run_safety_jedi("jedi-train", *ARGS, "export_after_fit=true", "trainer.max_steps=2", "data.num_workers=0",
                        f"paths.output_dir={run}", root=trained["root"], check=False)
    assert p.returncode == 2 and "not a previous export" in p.stderr, p.stderr[-2000:]
    assert not (run / "checkpoints").exists() and (run / "pipeline" / "notes.txt").read_text() == "mine"


def test_a_pickle_payload_in_a_checkpoint_is_never_run(trained, tmp_path):
    marker = tmp_path / "payload-ran"
    ckpt = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    p = run_safety_jedi("jedi-export", ckpt, tmp_path / "out", root=trained["root"], check=False)
    assert not marker.exists(), "the checkpoint's pickle payload was executed"
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    assert "system" in p.stderr and "weights_only=True" in p.stderr and not (tmp_path / "out").exists()

    run = tmp_path / "run"  # resuming: an explicit ckpt_path, and the run dir's own checkpoints
    for extra in ([f"ckpt_path={ckpt}"], []):
        evil_checkpoint(run / "checkpoints" / "last.ckpt", marker)
        p = run_safety_jedi("jedi-train", *ARGS, "trainer.max_steps=2", "data.num_workers=0", f"paths.output_dir={run}", *extra,
                            root=trained["root"], check=False)
        assert not marker.exists(), "the checkpoint's pickle payload was executed"
        assert p.returncode == 2 and "system" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_deepspeed_shards_are_checked_before_the_converter_unpickles_them(tmp_path):
    from jedi_train.training.checkpoints import UnsafeCheckpointError, load_checkpoint

    marker = tmp_path / "payload-ran"
    ds = tmp_path / "last.ckpt"
    evil_checkpoint(ds / "checkpoint" / "mp_rank_00_model_states.pt", marker)
    (ds / "latest").write_text("checkpoint")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_checkpoint(str(ds))
    assert not marker.exists()


def test_temp_dirs_of_killed_exports_are_removed_and_live_ones_kept(tmp_path):
    """A kill during an export leaves a hidden `.<name>.partial-<pid>-*` dir; the next export into the same
    place removes it, unless its writer is still running (another job exporting there)."""
    from jedi_common.atomic import staged_dir

    dead = tmp_path / ".pipe.partial-999999999-abc"  # no such pid
    live = tmp_path / f".pipe.partial-{os.getpid()}-xyz"
    for d in (dead, live):
        d.mkdir()
        (d / "model_index.json").write_text("{}")
    with staged_dir(str(tmp_path / "pipe")) as tmp:
        Path(tmp, "model_index.json").write_text("{}")
        assert os.stat(tmp).st_mode & 0o077 == 0o777 & ~_umask() & 0o077  # not private to its writer
    assert sorted(os.listdir(tmp_path)) == sorted(["pipe", live.name])


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
