"""jedi-generate: jobs files, shards, resume, bad jobs, the quality gate, calibrate, results.csv / report.html,
and the two measurements (gate effect, joint consistency) on the tiny exported pipeline."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from jedi_train.cli.generate import main
from jedi_train.generate import jobs as J
from jedi_train.pipelines.references import expand_reference_paths

pytestmark = pytest.mark.usefixtures("one_thread")


def _photos(folder, seeds, size=40):
    os.makedirs(folder, exist_ok=True)
    for s in seeds:
        arr = np.random.default_rng(s).integers(0, 256, (size, size, 3), np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"{s:02d}.png"))
    return str(folder)


def _jobs(path, jobs):
    with open(path, "w") as f:
        f.writelines((j if isinstance(j, str) else json.dumps(j)) + "\n" for j in jobs)
    return str(path)


def _cli(capsys, *argv):
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _records(out):
    from jedi_train.generate.report import collect

    return collect(str(out))


@pytest.fixture
def refs(tmp_path):
    return _photos(tmp_path / "refs", [1, 2])


def test_jobs_file_lines(tmp_path):
    (tmp_path / "photos").mkdir()
    path = _jobs(tmp_path / "jobs.jsonl", [
        {"id": "ok", "references": "photos", "prompts": ["a"], "num_images": 2, "joint": True},
        "{not json",
        {"id": "x", "references": "photos", "prompts": ["a"], "promt": "typo"},
        {"id": "y", "references": "photos", "prompts": [" "]},
        {"id": "ok", "references": "photos", "prompts": ["b"]},
        {"id": "z", "references": "photos", "prompts": ["a"], "num_images": 0},
        {"id": "../up", "references": "photos", "prompts": ["a"]},
        {"id": "rejected", "references": "photos", "prompts": ["a"]},
    ])
    entries = J.read_jobs(path)
    assert isinstance(entries[0], J.Job) and entries[0].references == [str(tmp_path / "photos")]  # jobs file's folder
    assert entries[0].slots() == [(0, 0), (0, 1)] and entries[0].joint
    bad = {e.line: e.message for e in entries if isinstance(e, J.BadLine)}
    assert "not valid JSON" in bad[2] and "'promt'" in bad[3] and "prompts" in bad[4]
    assert "earlier line" in bad[5] and "num_images" in bad[6] and "'id'" in bad[7]
    assert "folder of rejected images" in bad[8]
    assert [e.index for e in entries] == list(range(8))  # bad lines keep their place: shards stay the same


def test_shards_cover_every_job_once(tmp_path, monkeypatch):
    entries = list(range(11))
    shares = [J.my_share(entries, 3, i)[0] for i in range(3)]
    assert sorted(x for s in shares for x in s) == entries
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert J.my_share(entries, None, None) == ([3, 7], 4, 3)  # the array's defaults
    with pytest.raises(J.UsageError, match="shard-index"):
        J.my_share(entries, 2, 2)


def test_generate_bad_jobs_resume_and_shards(pipe_dir, refs, tmp_path, capsys):
    bad_img = tmp_path / "bad"
    bad_img.mkdir()
    (bad_img / "x.png").write_bytes(b"not an image")
    path = _jobs(tmp_path / "jobs.jsonl", [
        {"id": "solo", "references": refs, "prompts": ["a toy", "a toy on a beach"], "num_images": 2, "steps": 2},
        {"id": "missing", "references": str(tmp_path / "nope"), "prompts": ["a"], "steps": 2},
        {"id": "set", "references": refs, "prompts": ["a", "b", "c"], "joint": True, "steps": 2},
        {"id": "unreadable", "references": str(bad_img), "prompts": ["a"], "steps": 2},
        {"id": "empty", "references": refs, "prompts": []},
    ])
    out = tmp_path / "out"
    # two shards into one folder: jobs 0, 2, 4 and 1, 3
    rc0, so0, err0 = _cli(capsys, pipe_dir, "--jobs", path, "--out", out, "--num-shards", 2, "--shard-index", 0,
                          "--no-progress")
    assert rc0 == 1 and "shard 0/2: 2 jobs done, 1 failed; 7 images made" in so0
    errors = [line for line in err0.splitlines() if line.startswith("jedi-generate: error:")]
    assert len(errors) == 1 and "line 5" in errors[0] and "prompts" in errors[0]
    rc1, so1, err1 = _cli(capsys, pipe_dir, "--jobs", path, "--out", out, "--num-shards", 2, "--shard-index", 1,
                          "--no-progress")
    errors = [line for line in err1.splitlines() if line.startswith("jedi-generate: error:")]
    assert rc1 == 1 and len(errors) == 2 and "0 images made" in so1
    assert "'missing'" in errors[0] and "does not exist" in errors[0]
    assert "'unreadable'" in errors[1] and "not a readable image" in errors[1]
    recs = _records(out)
    assert sorted((r["job"], r["prompt_index"], r["sample"]) for r in recs) == sorted(
        [("solo", p, s) for p in range(2) for s in range(2)] + [("set", p, 0) for p in range(3)])
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 7
    os.remove(out / "results.csv")  # shard 0 ended first: `report` rebuilds the files from every record
    rc, so, _ = _cli(capsys, "report", "--out", out)
    assert rc == 0 and "7 images" in so and (out / "results.csv").read_text().count("\n") == 8
    assert _cli(capsys, "report", "--out", tmp_path / "nothing")[0] == 2

    # resume: nothing is made again; a lost image is made again, identical (its own seed, whatever the batch)
    before = np.asarray(Image.open(out / "solo" / "01_00.png"))
    os.remove(out / "solo" / "01_00.json")
    mtime = os.path.getmtime(out / "solo" / "00_00.png")
    rc, so, _ = _cli(capsys, pipe_dir, "--jobs", path, "--out", out, "--num-shards", 2, "--shard-index", 0,
                     "--no-progress")
    assert rc == 1 and "1 images made" in so and "6 already done" in so and "1 candidates" in so
    assert os.path.getmtime(out / "solo" / "00_00.png") == mtime
    assert np.abs(np.asarray(Image.open(out / "solo" / "01_00.png")).astype(int) - before).max() <= 1


def test_independent_image_is_jedi_sample_and_joint_differs(pipe_dir, refs, tmp_path, capsys):
    """joint false: each image is what `jedi-sample --num 1 --seed <its seed>` makes; joint true couples them."""
    from jedi_train.sampling import generate, load_pipeline

    path = _jobs(tmp_path / "jobs.jsonl", [
        {"id": "a", "references": refs, "prompts": ["x", "y"], "steps": 3, "guidance": 2, "image_guidance": 2}])
    joint = _jobs(tmp_path / "joint.jsonl", [
        {"id": "a", "references": refs, "prompts": ["x", "y"], "steps": 3, "guidance": 2, "image_guidance": 2,
         "joint": True}])
    assert _cli(capsys, pipe_dir, "--jobs", path, "--out", tmp_path / "ind", "--no-progress")[0] == 0
    assert _cli(capsys, pipe_dir, "--jobs", joint, "--out", tmp_path / "joint", "--no-progress")[0] == 0
    rec = _records(tmp_path / "ind")[1]
    pipe = load_pipeline(pipe_dir, "cpu", progress=False)
    alone, _ = generate(pipe, sorted(expand_reference_paths(refs)), ["y"], 1, rec["seed"], 3, 2.0, 2.0, 8)
    mine = np.asarray(Image.open(tmp_path / "ind" / rec["image"])).astype(int)
    assert np.abs(mine - np.asarray(alone.images[0])).max() <= 1
    coupled = np.asarray(Image.open(tmp_path / "joint" / "a" / "01_00.png")).astype(int)
    assert _records(tmp_path / "joint")[1]["seed"] == rec["seed"]  # same noise: the difference is the coupling
    assert np.abs(coupled - mine).max() > 2  # beyond batching noise (<= 1 above); a random tiny model couples weakly


def test_jobs_share_sampling_calls_and_explain(pipe_dir, refs, tmp_path, capsys, monkeypatch):
    """Images of several jobs share one sampling call (each its own sets and seed: the same PNGs as one call
    each); --explain writes each image's attention overlays beside it."""
    from jedi_train.pipelines.pipeline_jedi_sd import JeDiPipeline

    calls = []
    real = JeDiPipeline.__call__
    monkeypatch.setattr(JeDiPipeline, "__call__", lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    other = _photos(tmp_path / "other", [3, 4])
    path = _jobs(tmp_path / "jobs.jsonl", [
        {"id": "a", "references": refs, "prompts": ["x", "y"], "steps": 2},
        {"id": "b", "references": other, "prompts": ["z"], "num_images": 2, "steps": 2}])
    assert _cli(capsys, pipe_dir, "--jobs", path, "--out", tmp_path / "many", "--no-progress")[0] == 0
    assert len(calls) == 1 and len(calls[0]["prompt"]) == 4  # four images, two jobs, one call
    calls.clear()
    assert _cli(capsys, pipe_dir, "--jobs", path, "--out", tmp_path / "one", "--no-progress",
                "--images-per-call", 1)[0] == 0
    assert len(calls) == 4
    for rec in _records(tmp_path / "many"):
        a, b = (np.asarray(Image.open(tmp_path / d / rec["image"])).astype(int) for d in ("many", "one"))
        assert np.abs(a - b).max() <= 1, rec["image"]
    assert _cli(capsys, pipe_dir, "--jobs", path, "--out", tmp_path / "explained", "--no-progress", "--explain")[0] == 0
    for rec in _records(tmp_path / "explained"):
        stem = os.path.splitext(tmp_path / "explained" / rec["image"])[0]
        assert all(os.path.isfile(f"{stem}.attention.{k}.png") for k in range(2)), rec["image"]
    report = (tmp_path / "explained" / "report.html").read_text()  # shown beside each image, linked relatively
    for rec in _records(tmp_path / "explained"):
        stem = os.path.splitext(rec["image"])[0]
        assert all(f'src="{stem}.attention.{k}.png"' in report for k in range(2)), rec["image"]


def test_gate_rejects_keeps_scores_and_report(pipe_dir, extractor_dirs, refs, tmp_path, capsys):
    dino, clip = extractor_dirs
    path = _jobs(tmp_path / "jobs.jsonl", [
        {"id": "a", "references": refs, "prompts": ["a toy", "a cup"], "steps": 2}])
    base = ["--jobs", path, "--check", "identity,prompt", "--dino", dino, "--clip", clip, "--no-progress"]
    rc, so, _ = _cli(capsys, pipe_dir, *base, "--out", tmp_path / "hard", "--min-identity", 2, "--best-of", 3)
    assert rc == 0 and "0 accepted, 2 rejected" in so and "6 candidates" in so
    recs = _records(tmp_path / "hard")
    for r in recs:
        assert r["status"] == "rejected" and r["pass"] is False and r["attempts"] == 3
        assert len({c["seed"] for c in r["candidates"]}) == 3
        for c in r["candidates"]:
            assert os.path.isfile(tmp_path / "hard" / c["file"]) and set(c["scores"]) == {"identity", "prompt"}
        best = max(c["scores"]["identity"] for c in r["candidates"])
        assert r["scores"]["identity"] == best  # the kept one is the best of the three
    assert not os.path.exists(tmp_path / "hard" / "a" / "00_00.png")
    page = (tmp_path / "hard" / "report.html").read_text()
    assert page.count('class="rejected"') == 6 and "identity " in page and "a toy" in page
    for src in [s.split('"')[0] for s in page.split('<img src="')[1:]]:
        assert os.path.isfile(tmp_path / "hard" / src), src  # relative links: viewable offline

    # a threshold every first try passes: one candidate each, accepted
    mid = min(r["candidates"][0]["scores"]["identity"] for r in recs)
    rc, so, _ = _cli(capsys, pipe_dir, *base, "--out", tmp_path / "easy", "--min-identity", mid, "--best-of", 3)
    with open(tmp_path / "easy" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["accepted"] * 2 and [r["attempts"] for r in rows] == ["1", "1"]
    assert all(float(r["identity"]) >= mid and r["pass"] == "True" and r["prompt_score"] for r in rows)


def test_gate_effect_measured(pipe_dir, extractor_dirs, refs, tmp_path):
    from jedi_train.generate.measure import gate_effect

    path = _jobs(tmp_path / "jobs.jsonl", [
        {"id": f"s{i}", "references": refs, "prompts": ["a", "b"], "steps": 2, "seed": i} for i in range(3)])
    res = gate_effect(pipe_dir, path, str(tmp_path / "m"), best_of=3, dino=extractor_dirs[0])
    assert res["n_images"] == 6 and res["pass_kept"] >= res["pass_first_try"]
    d = res["kept_minus_first"]
    assert d["mean"] >= 0 and d["ci"][0] <= d["mean"] <= d["ci"][1] and d["n_jobs"] == 3
    assert res["kept"] == pytest.approx(res["first_try"] + d["mean"])


def test_joint_consistency_measured(pipe_dir, extractor_dirs, refs, tmp_path):
    from jedi_train.generate.measure import joint_consistency

    path = _jobs(tmp_path / "jobs.jsonl", [
        {"id": f"s{i}", "references": refs, "prompts": ["a", "b", "c", "d"], "steps": 2, "seed": i}
        for i in range(2)])
    res = joint_consistency(pipe_dir, path, str(tmp_path / "m"), dino=extractor_dirs[0])
    assert set(res["per_job"]) == {"s0", "s1"} and res["metric"] == "dino"
    d = res["joint_minus_independent"]
    assert d["mean"] == pytest.approx(res["joint"] - res["independent"]) and d["ci"][0] <= d["ci"][1]
    assert all(-1 <= v["joint"] <= 1 and v["joint"] != v["independent"] for v in res["per_job"].values())


def test_calibrate(extractor_dirs, tmp_path, capsys):
    refs = _photos(tmp_path / "r", [1, 2])
    held = _photos(tmp_path / "h", [3, 4, 5, 6])
    path = _jobs(tmp_path / "jobs.jsonl", [{"id": "a", "references": refs, "prompts": ["x"], "held_out": held},
                                           {"id": "b", "references": refs, "prompts": ["x"]}])
    rc, so, _ = _cli(capsys, "calibrate", "--jobs", path, "--dino", extractor_dirs[0], "--pass-fraction", 0.75,
                     "--out", tmp_path / "cal.json")
    cal = json.loads((tmp_path / "cal.json").read_text())
    assert rc == 0 and f"--min-identity {cal['min_identity']}" in so and cal["n_photos"] == 4
    assert cal["passing"] == 0.75 and cal["per_job"]["a"]["n_photos"] == 4 and "b" not in cal["per_job"]
    from jedi_train.generate.gate import Scorer

    scores = Scorer(["identity"], extractor_dirs[0]).identity(
        sorted(expand_reference_paths(held)), sorted(expand_reference_paths(refs)))
    assert np.sum(scores >= cal["min_identity"]) == 3
    # held-out photos must not be references
    bad = _jobs(tmp_path / "bad.jsonl", [{"id": "a", "references": refs, "prompts": ["x"], "held_out": refs}])
    rc, _, err = _cli(capsys, "calibrate", "--jobs", bad, "--dino", extractor_dirs[0])
    assert rc == 2 and "also a reference" in err and err.count("jedi-generate: error:") == 1


def test_bad_options_one_line_before_the_model(pipe_dir, refs, tmp_path, capsys):
    path = _jobs(tmp_path / "jobs.jsonl", [{"id": "a", "references": refs, "prompts": ["x"]}])
    for argv, words in ((["--check", "prompt"], "needs --clip"), (["--check", "looks"], "unknown check"),
                        (["--min-identity", "0.5"], "needs --check identity"), (["--best-of", "3"], "add --check"),
                        (["--check", "identity", "--dino", str(tmp_path)], "no config.json")):
        rc, _, err = _cli(capsys, pipe_dir, "--jobs", path, "--out", tmp_path / "o", *argv)
        assert rc == 2 and words in err and err.count("jedi-generate: error:") == 1, (argv, err)
    rc, _, err = _cli(capsys, tmp_path, "--jobs", path, "--out", tmp_path / "o")
    assert rc == 2 and "model_index.json" in err
    assert not os.path.exists(tmp_path / "o")


def test_procedural_identity_prefers_the_subject():
    """No extractor: the procedural world's colour identity ranks the true subject above same-class others."""
    from data_pipelines.synth import procedural
    from jedi_train.eval.procedural import WorldScorer

    world = WorldScorer(32)
    wins = []
    for i in range(6):
        rng = np.random.default_rng(100 + i)
        cls = procedural.CLASSES[i % len(procedural.CLASSES)]
        subject, other = procedural.sample_subject(rng, cls), procedural.sample_subject(rng, cls)
        refs = [world.descriptor(procedural.render_subject(subject, "on the beach", s, 32)) for s in (1, 2)]
        target = world.descriptor(procedural.render_subject(subject, "in the snow", 3, 32))
        wrong = world.descriptor(procedural.render_subject(other, "in the snow", 3, 32))
        sim = world.similarity(np.stack([target, wrong]), np.stack(refs)).mean(1)
        wins.append(sim[0] > sim[1])
    assert np.mean(wins) >= 5 / 6
