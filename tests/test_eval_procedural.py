"""jedi-eval procedural: the metric validated by its oracles, the pieces, one end-to-end run on a tiny exported
pipeline (resumed), and bad input."""
import csv
import functools
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines.synth import procedural as P
from jedi_train.eval import procedural as ev


@pytest.fixture
def cli(eval_cli):
    return functools.partial(eval_cli, "procedural")


def summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def test_oracles_validate_the_metric(cli, tmp_path):
    """Ground-truth renders close ~all of the gap and are scene-classified; another subject closes ~none."""
    args = ("--subjects", 16, "--refs", 1, "--image-guidance", 1, "--samples", 2, "--details", "off")  # test_eval_details
    assert cli("--out", tmp_path / "gt", "--oracle", "ground_truth", *args)[0] == 0
    assert cli("--out", tmp_path / "other", "--oracle", "other_subject", *args)[0] == 0
    gt, other = summary(tmp_path / "gt")["rows"][0], summary(tmp_path / "other")["rows"][0]
    assert gt["gap_closed"] > 0.8 and gt["gap_closed_ci"][0] > 0.6 and gt["nearest_subject_acc"] > 0.6
    assert gt["scene_acc"] > 0.75 and summary(tmp_path / "gt")["ground_truth_scene_acc"] > 0.75
    lo, _ = other["gap_closed_ci"]
    assert abs(other["gap_closed"]) < 0.25 and lo < 0.1 and other["nearest_subject_acc"] < 0.4
    assert gt["n_images"] == other["n_images"] == 32


def test_descriptor_pieces():
    px = np.random.default_rng(0).random((500, 3))
    h = ev.soft_histogram(px, np.ones(500))
    assert h.shape == (64,) and abs(h.sum() - 1) < 1e-9 and ev.soft_histogram(px, np.zeros(500)).sum() == 0
    assert ev.tv_distance(h, h) == 0 and ev.tv_distance(h, np.zeros(64)) == 1.0
    red, blue = np.tile([[1.0, 0, 0]], (10, 1)), np.tile([[0, 0, 1.0]], (10, 1))
    assert ev.tv_distance(ev.soft_histogram(red, np.ones(10)), ev.soft_histogram(blue, np.ones(10))) == 1.0
    # the scene explains its background, not the subject
    spec = P.sample_subject(np.random.default_rng(1))
    renders = [P.render_subject(spec, "on the beach", s, 32, with_mask=True) for s in range(6)]
    sm = ev.SceneModel([im[m == 0] for im, m in renders[:5]])
    img, mask = renders[5]
    fg = sm.foreground(img).reshape(32, 32)
    inside, outside = fg[mask == 255].mean(), fg[mask == 0].mean()
    assert inside > 0.3 and outside < 0.1 and inside > 5 * outside
    assert ev.configs([0, 1, 3], [0, 2]) == [(0, 0.0), (1, 0.0), (1, 2.0), (3, 0.0), (3, 2.0)]
    assert ev.generation_key(3, 0.0) == ev.generation_key(0, 0.0) == (0, 0.0)
    assert ev.gap_closed(np.array([[0.5, 0.5, 0.1]])) == 0.0 and ev.gap_closed(np.array([[0.1, 0.5, 0.1]])) == 1.0


def test_held_out_subjects_are_reproducible_and_balanced():
    a, b = ev.make_cases(16, 3, 2, 0, 32), ev.make_cases(16, 3, 2, 0, 32)
    assert [c.spec for c in a] == [c.spec for c in b] and all(np.array_equal(x, y) for x, y in zip(a[0].refs, b[0].refs))
    assert {c.cls for c in a} == set(P.CLASSES)
    for c in a:
        assert len(c.refs) == 3 and not set(c.ref_scenes) & set(c.target_scenes)
        assert len(c.distractors) == 7 and all(d["family"] == c.cls and d != c.spec for d in c.distractors)
    assert ev.make_cases(1, 3, 2, 1, 32)[0].spec != a[0].spec  # --seed selects other subjects


def test_end_to_end_resume_and_bad_input(cli, pipe_dir, tmp_path, monkeypatch):
    from jedi_train.pipelines.pipeline_jedi_sd import JeDiPipeline

    calls = []
    orig = JeDiPipeline.__call__

    def spy(self, *a, **k):  # (subjects in the call, references per subject, image guidance)
        calls.append((len(k["prompt"]), [len(r or []) for r in k["reference_images"]], k["image_guidance_scale"]))
        return orig(self, *a, **k)

    monkeypatch.setattr(JeDiPipeline, "__call__", spy)
    out = tmp_path / "e"
    args = (pipe_dir, "--out", out, "--subjects", 2, "--refs", "0,1", "--image-guidance", "0,2", "--samples", 1,
            "--steps", 2, "--grids", 1)
    rc, _, err = cli(*args)
    assert rc == 0, err
    # refs 0 = the true no-reference baseline: no references reach the pipeline, so no branch sees them;
    # both subjects share one call per cell (--batch 8)
    assert calls == [(2, [0, 0], 0.0), (2, [1, 1], 2.0)]
    s = summary(out)
    cells = [(r["refs"], r["image_guidance"]) for r in s["rows"]]
    assert cells == [(0, 0.0), (1, 0.0), (1, 2.0)]
    row0, row1 = s["rows"][0], s["rows"][1]
    assert row0["gap_closed"] == row1["gap_closed"]  # image guidance 0 hides the references: the same images
    assert all(r["n_images"] == 2 and len(r["gap_closed_ci"]) == 2 and len(r["per_subject_gap_closed"]) == 2
               for r in s["rows"])
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {"distance", "chance", "ceiling", "nearest_is_true", "scene_correct"} <= set(rows[0])
    assert {"detail_pattern", "pattern_ceiling", "sharpness"} <= set(rows[0])  # details beside colour identity
    assert all(r["sharpness"] > 0 and "pattern" in r["details"] for r in s["rows"])
    assert sorted(os.listdir(out / "images")) == ["refs0_ig0", "refs1_ig2"]
    assert os.listdir(out / "grids") == ["subject0000.png"] and "gap closed" in (out / "summary.md").read_text()
    # a rerun generates nothing: the images on disk are reused
    calls.clear()
    assert cli(*args)[0] == 0 and calls == [] and summary(out)["rows"] == s["rows"]
    # a re-exported pipeline in the same place (further training) must not reuse the old images
    unet = os.path.join(pipe_dir, "unet")
    weights = next(f for f in os.listdir(unet) if f.endswith(".safetensors"))
    st = os.stat(os.path.join(unet, weights))
    os.utime(os.path.join(unet, weights), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        rc, _, err = cli(*args)
        assert rc == 2 and "other settings" in err
    finally:
        os.utime(os.path.join(unet, weights), ns=(st.st_atime_ns, st.st_mtime_ns))
    # one subject per call (--batch 1): the same images, one call each
    calls.clear()
    rc, _, err = cli(*args[:2], tmp_path / "one", *args[3:], "--batch", 1)
    assert rc == 0, err
    assert calls == [(1, [0], 0.0)] * 2 + [(1, [1], 2.0)] * 2
    for cell in ("refs0_ig0", "refs1_ig2"):
        for name in sorted(os.listdir(out / "images" / cell)):
            a, b = (np.asarray(Image.open(d / "images" / cell / name), np.int16) for d in (out, tmp_path / "one"))
            assert np.abs(a - b).max() <= 1, (cell, name)
    # other settings into the same --out: refused, nothing mixed
    rc, _, err = cli(pipe_dir, "--out", out, "--subjects", 2, "--refs", "0,1", "--steps", 3)
    assert rc == 2 and err.startswith("jedi-eval: error:") and "other settings" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, words", [
    (["{model}", "--out", "{out}"], "not a saved pipeline"),
    (["{missing}", "--out", "{out}"], "does not exist"),
    (["--out", "{out}"], "no PIPELINE_DIR"),
    (["{pipe}", "--out", "{out}", "--refs", "12"], "exceed the 13 scenes"),
    (["{pipe}", "--out", "{out}", "--refs", "a,b"], "comma-separated"),
    (["{pipe}", "--out", "{out}", "--samples", "0"], "too small"),
])
def test_bad_input_is_one_line(cli, pipe_dir, tiny_model_dir, tmp_path, argv, words):
    fill = {"model": tiny_model_dir, "missing": tmp_path / "nope", "out": tmp_path / "o", "pipe": pipe_dir}
    rc, _, err = cli(*[a.format(**fill) for a in argv])
    assert rc == 2 and err.startswith("jedi-eval: error:") and words in err and err.count("\n") == 1
    assert not (tmp_path / "o" / "summary.json").exists()


def test_layout_defaults_to_the_runs_procedural_world(tmp_path):
    from jedi_train.eval.common import EvalError
    from jedi_train.eval.procedural import run_layout

    pipe = tmp_path / "run" / "pipeline"
    pipe.mkdir(parents=True)
    assert run_layout(str(pipe)) == "varied"  # no run config beside the pipeline: jedi-synth's default
    (tmp_path / "run" / "config.yaml").write_text("procedural_layout: centered\nseed: 0\n")
    assert run_layout(str(pipe)) == "centered"
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    assert run_layout(str(pipe)) == "varied"
    (tmp_path / "run" / "config.yaml").write_text("procedural_layout: sideways\n")
    with pytest.raises(EvalError, match="sideways"):
        run_layout(str(pipe))
