"""jedi-data import as a job: any worker split writes the same bytes as one run, an interrupted import resumes,
another import's OUT_DIR is refused, and the shards are what `jedi-data stats` and `jedi-train` read."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from helpers.cli import losses, one_line_error
from helpers.import_replicas import folders_src, run_import, subjects200k_src, syncd_src, uno1m_src

SOURCES = {"subjects200k": (subjects200k_src, []), "uno1m": (uno1m_src, []), "syncd": (syncd_src, []),
           "folders": (folders_src, ["--set-size", 2, "--caption", "a photo of a {subject}"])}


def console(tool: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    """A console script as this checkout's pyproject.toml defines it (the venv's bin/ may come from another
    checkout), in a subprocess with the environment of helpers.cli.cli."""
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts[tool].split(":")
    env = {**os.environ, "JEDI_ROOT": str(cwd), "WANDB_MODE": "offline", "WANDB_API_KEY": "", "HYDRA_FULL_ERROR": "0",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    code = f"import sys; sys.argv[0] = {tool!r}; from {module} import {func}; sys.exit({func}())"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600, check=False)


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", list(SOURCES))
def test_a_worker_split_writes_the_same_bytes_as_one_run(tmp_path, fmt):
    build, extra = SOURCES[fmt]
    src = build(tmp_path / "src")
    assert run_import(fmt, src, tmp_path / "one", "--sets-per-shard", 2, *extra) == 0
    for i in (2, 0, 1):  # any order, as SLURM array tasks finish
        assert run_import(fmt, src, tmp_path / "split", "--sets-per-shard", 2, "--num-shards", 3,
                          "--shard-index", i, *extra) == 0
    one, split = files(tmp_path / "one"), files(tmp_path / "split")
    assert len([k for k in one if k.endswith(".tar")]) >= 3 and one == split


def test_an_interrupted_import_resumes_and_redoes_only_the_unfinished_shard(tmp_path, monkeypatch):
    from data_pipelines.importers.subjects200k import Subjects200K

    src = subjects200k_src(tmp_path / "src")
    assert run_import("subjects200k", src, tmp_path / "clean", "--sets-per-shard", 2) == 0
    out = tmp_path / "out"
    build, calls = Subjects200K._build, []

    def dies_in_shard_two(self, rec):
        calls.append(rec[1])
        if len(calls) == 4:  # the first set of shard 000001 (shard 0 = rows 0-1, shard 1 = row 2 of file 0)
            raise KeyboardInterrupt  # a kill: nothing after this point runs
        return build(self, rec)

    monkeypatch.setattr(Subjects200K, "_build", dies_in_shard_two)
    with pytest.raises(KeyboardInterrupt):
        run_import("subjects200k", src, out, "--sets-per-shard", 2)
    assert sorted(p.name for p in out.glob("*.tar")) == ["sets-000000.tar", "sets-000001.tar"]  # whole ones only
    assert (out / ".sets-000002.tar.partial").exists() and not (out / "manifest.json").exists()
    first = (out / "sets-000000.tar").stat()
    monkeypatch.setattr(Subjects200K, "_build", build)
    assert run_import("subjects200k", src, out, "--sets-per-shard", 2) == 0
    assert (out / "sets-000000.tar").stat().st_mtime_ns == first.st_mtime_ns  # complete: not redone
    assert not (out / ".sets-000002.tar.partial").exists()
    clean, resumed = files(tmp_path / "clean"), files(out)
    assert clean == resumed


def test_a_limited_trial_run_grows_into_the_full_import(tmp_path):
    src = uno1m_src(tmp_path / "src")
    assert run_import("uno1m", src, tmp_path / "full", "--sets-per-shard", 3) == 0
    out = tmp_path / "out"
    assert run_import("uno1m", src, out, "--sets-per-shard", 3, "--limit", 4) == 0
    trial = json.loads((out / "manifest.json").read_text())
    assert trial["units_planned"] == 2 and trial["sets"] == 4
    kept = (out / "sets-000000.tar").stat().st_mtime_ns
    assert run_import("uno1m", src, out, "--sets-per-shard", 3) == 0
    assert (out / "sets-000000.tar").stat().st_mtime_ns == kept  # the trial's whole shard is kept
    full = files(tmp_path / "full")
    assert {k: v for k, v in files(out).items() if k != ".jedi-data-import/config.json"} == \
        {k: v for k, v in full.items() if k != ".jedi-data-import/config.json"}


def test_an_out_dir_imported_with_other_settings_is_refused(tmp_path, capsys):
    src = subjects200k_src(tmp_path / "src")
    assert run_import("subjects200k", src, tmp_path / "out") == 0
    capsys.readouterr()
    assert run_import("subjects200k", src, tmp_path / "out", "--min-quality", 3) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "min_quality: 5.0 -> 3.0" in err[0] and "another out_dir" in err[0], err


def test_imported_shards_are_read_by_jedi_data_stats_and_train_a_few_steps(tmp_path):
    """The console scripts as a user runs them: jedi-data import, jedi-data stats, jedi-train."""
    src = subjects200k_src(tmp_path / "src")
    p = console("jedi-data", "import", "subjects200k", src, tmp_path / "sets", "--sets-per-shard", 4, "--no-progress",
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("\n") == 1 and "7 sets / 14 images" in p.stdout and "low_imageQuality=1" in p.stdout
    stats = console("jedi-data", "stats", f"{tmp_path}/sets/*.tar", "--json", cwd=tmp_path)
    s = json.loads(stats.stdout)
    assert (s["shards"], s["sets"], s["images"], s["skipped"]) == (4, 7, 14, {})
    bad = console("jedi-data", "import", "laion", src, tmp_path / "x", cwd=tmp_path)
    assert "use one of subjects200k, uno1m, syncd, folders" in one_line_error(bad, "jedi-data import")
    run = tmp_path / "run"
    p = console("jedi-train", "experiment=demo", "debug=fast", f"data.sources=[{{url: '{tmp_path}/sets/*.tar'}}]",
             "data.synthesize_if_missing=null", "data.heldout_sources=null", "data.heldout_synthesize_if_missing=null",
             "data.min_set=2", "data.max_set=2", "data.batch_size=2", "data.num_workers=0", "trainer.max_steps=2",
             "export_after_fit=false", "~callbacks.sample_grid", "~callbacks.identity_gain",
             "callbacks.loss_curve.every_n_steps=1", f"paths.output_dir={run}", cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    steps = losses(run)
    assert len(steps) == 2 and all("subjects200k-" in sets for _, _, sets in steps), steps  # imported sets
