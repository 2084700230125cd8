"""jedi-synth end to end on the procedural generator: shard schema, rerun/resume, worker slices,
bad input. Most runs are in-process (compose + run); the acceptance spelling runs the real script."""
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.synth import read_samples, synth_cfg
from PIL import Image

from data_pipelines.schema import parse_meta, validate_sample
from data_pipelines.synth import cli, procedural
from data_pipelines.synth.stages import SynthStages
from data_pipelines.synth.writer import SynthError

BIN = os.path.dirname(sys.executable)


def snapshot(d):
    return {p.relative_to(d).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(Path(d).rglob("*")) if p.is_file()}


def test_acceptance_command_schema_and_idempotent_rerun(tmp_path):
    out = tmp_path / "sets"
    cmd = [shutil.which("jedi-synth", path=BIN) or "jedi-synth", "generator=procedural", "num_sets=64", "set_size=4",
           "resolution=64", f"out_dir={out}"]
    res = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(tmp_path)) == ["sets"]  # no Hydra outputs/, .hydra/ or log file in the cwd
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["sets"] == 64 and manifest["images"] == 256
    assert manifest["config"]["generator"]["name"] == "procedural" and manifest["rejects"] == {}
    tars = sorted(out.glob("*.tar"))
    assert [t.name for t in tars] == [s["file"] for s in manifest["shards"]] and len(tars) == 4
    ids = []
    for t in tars:
        for s in read_samples(t):
            assert validate_sample(s) is None
            meta = parse_meta(s["json"])
            assert meta["num_images"] == 4 and meta["image_ext"] == "jpg" and len(meta["captions"]) == 4
            assert meta["generator"] == "procedural" and meta["class"] in procedural.CLASSES
            assert len(meta["scenes"]) == 4 and "subject" in meta and meta["subject_id"].startswith("proc-")
            assert Image.open(io.BytesIO(s["0.jpg"])).size == (64, 64)
            # the stored seed re-creates the set exactly (captions, subject)
            _, caps, m2 = procedural.make_set(meta["seed"], 4, 64)
            assert caps == meta["captions"] and m2["subject"] == meta["subject"]
            ids.append(meta["set_id"])
    assert len(set(ids)) == 64
    before = snapshot(out)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0 and "0 written, 4 already complete" in res.stderr
    assert snapshot(out) == before  # not one file rewritten, not even the manifest
    assert time.perf_counter() - t0 < 30


def test_two_workers_produce_the_same_shards_as_one(tmp_path):
    single, split = tmp_path / "single", tmp_path / "split"
    cli.run(synth_cfg(single, "num_sets=40", "set_size=3", "resolution=32", "sets_per_shard=8"))
    s0 = cli.run(synth_cfg(split, "num_sets=40", "set_size=3", "resolution=32", "sets_per_shard=8",
                           "num_workers_total=2", "worker_index=0"))
    assert s0["units_written"] == 3 and not s0["manifest_complete"]
    assert sorted(p.name for p in split.glob("*.tar")) == ["sets-000000.tar", "sets-000002.tar", "sets-000004.tar"]
    s1 = cli.run(synth_cfg(split, "num_sets=40", "set_size=3", "resolution=32", "sets_per_shard=8",
                           "num_workers_total=2", "worker_index=1"))
    assert s1["units_written"] == 2 and s1["manifest_complete"]
    a = {p.name: p.read_bytes() for p in single.glob("*.tar")}
    b = {p.name: p.read_bytes() for p in split.glob("*.tar")}
    assert a == b and len(a) == 5  # byte-identical shards
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (single, split))
    assert ma["config"].pop("out_dir") != mb["config"].pop("out_dir") and ma == mb


def test_slurm_array_variables_pick_the_slice(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    s = cli.run(synth_cfg(tmp_path, "num_sets=12", "set_size=2", "resolution=16", "sets_per_shard=2"))
    assert s["worker"] == "2/3" and sorted(p.name for p in tmp_path.glob("*.tar")) == ["sets-000002.tar",
                                                                                       "sets-000005.tar"]


def test_resume_after_crash_redoes_only_the_broken_unit(tmp_path, monkeypatch):
    args = ("num_sets=30", "set_size=2", "resolution=16", "sets_per_shard=10")
    original = SynthStages.unit_results

    def crashing(self, unit):
        for k, r in enumerate(original(self, unit)):
            if unit.index == 1 and k == 4:
                raise KeyboardInterrupt("simulated crash mid-unit")
            yield r

    monkeypatch.setattr(SynthStages, "unit_results", crashing)
    with pytest.raises(KeyboardInterrupt):
        cli.run(synth_cfg(tmp_path / "run", *args))
    run = tmp_path / "run"
    assert (run / "sets-000000.tar").is_file() and not (run / "sets-000001.tar").exists()
    assert (run / ".sets-000001.tar.partial").exists()  # the half-written unit has no final name
    assert not (run / "manifest.json").exists()
    done0 = (run / "sets-000000.tar").stat().st_mtime_ns
    monkeypatch.setattr(SynthStages, "unit_results", original)
    s = cli.run(synth_cfg(run, *args))
    assert s["units_skipped"] == 1 and s["units_written"] == 2 and s["manifest_complete"]
    assert (run / "sets-000000.tar").stat().st_mtime_ns == done0  # complete unit not redone
    assert not list(run.glob(".*.partial"))
    cli.run(synth_cfg(tmp_path / "clean", *args))
    for name in ("sets-000000.tar", "sets-000001.tar", "sets-000002.tar"):
        assert (run / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_more_sets_later_extends_and_other_config_is_refused(tmp_path):
    cli.run(synth_cfg(tmp_path, "num_sets=12", "set_size=2", "resolution=16", "sets_per_shard=8"))
    first = (tmp_path / "sets-000000.tar").read_bytes()
    s = cli.run(synth_cfg(tmp_path, "num_sets=20", "set_size=2", "resolution=16", "sets_per_shard=8"))
    # unit 1 held sets 8..11 and now must hold 8..15: redone; unit 0 unchanged
    assert s["units_skipped"] == 1 and s["units_written"] == 2 and s["manifest_sets"] == 20
    assert (tmp_path / "sets-000000.tar").read_bytes() == first
    with pytest.raises(SynthError, match="different config.*set_size: 2 -> 3"):
        cli.run(synth_cfg(tmp_path, "num_sets=20", "set_size=3", "resolution=16", "sets_per_shard=8"))


@pytest.mark.parametrize("args, needle", [
    (["generator=foo"], "Could not find 'generator/foo' (available: diffusers, procedural)"),
    (["nmu_sets=3"], "+nmu_sets=3"),  # a misspelt key names the fix
    (["set_size=1"], "set_size=1 is too small"),
    (["resolution=60"], "resolution=60 is not a positive multiple of 8"),
    (["generator=diffusers", "generator.model_dir=/no/such/model"], "generator.model_dir=/no/such/model does not exist"),
    (["num_workers_total=2", "worker_index=2"], "worker_index=2 is outside 0..1"),
    (["caption=model", "caption.model_dir=/no/captioner"], "caption.model_dir=/no/captioner does not exist"),
    (["prompts=llm", "prompts.model_dir=/no/llm"], "prompts=llm is used by generator=diffusers only"),
    (["generator=diffusers"], "generator.model_dir is required"),
])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(tmp_path, monkeypatch, capsys, args, needle):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["jedi-synth", *args, f"out_dir={out}", "num_sets=4"])
    monkeypatch.chdir(tmp_path)
    try:
        rc = cli.main()
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1 and err.startswith("jedi-synth: error:")
    assert os.listdir(tmp_path) == []  # no out_dir, no Hydra files


def test_empty_prompt_file_is_refused_by_the_script(tmp_path):
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    res = subprocess.run([shutil.which("jedi-synth", path=BIN) or "jedi-synth", "generator=diffusers",
                          f"generator.model_dir={tmp_path / 'model'}", "prompts=file",
                          f"prompts.path={tmp_path / 'empty.txt'}", f"out_dir={tmp_path / 'out'}"],
                         check=False, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "has no prompts (empty file)" in res.stderr and not (tmp_path / "out").exists()
