"""jedi-eval procedural's detail accuracy and sharpness (jedi_train/eval/details.py): the variants, the
instruments validated by their oracles (ground truth ~ ceiling, the same subject with another detail ~0,
blurred ground truth clearly less sharp), the cell summary."""
import numpy as np
import pytest

from data_pipelines.synth import procedural as P
from jedi_train.eval import details as D
from jedi_train.eval import procedural as ev
from jedi_train.eval.common import bootstrap_ci


def _differences(a: dict, b: dict) -> list[tuple[str, str]]:
    return [(top, key) for top in a if isinstance(a[top], dict) for key in a[top] if a[top][key] != b[top][key]]


def test_variants_share_everything_but_one_attribute():
    rng = np.random.default_rng(3)
    seen = set()
    for i in range(40):
        spec = P.sample_subject(rng, P.CLASSES[i % len(P.CLASSES)])
        for attr, where, values in (("pattern", ("pattern", "kind"), P.PATTERNS),
                                    ("emblem", ("emblem", "kind"), P.EMBLEMS)):
            cands = D.variants(spec, attr)
            if attr == "emblem" and spec["family"] in P.EMBLEMLESS:
                assert cands is None
                continue
            assert cands[0] is spec and sorted(c[where[0]][where[1]] for c in cands) == sorted(values)
            assert all(_differences(spec, c) == [where] for c in cands[1:])
        freq = D.variants(spec, "frequency")
        if spec["pattern"]["kind"] in D.FREQ_KINDS:
            fs = [c["pattern"]["freq"] for c in freq]
            assert sorted(D.freq_band(f) for f in fs) == list(range(D.FREQ_BANDS))  # one per band
            assert all(_differences(spec, c) == [("pattern", "freq")] for c in freq[1:])
            seen.add("frequency")
        else:
            assert freq is None  # solid and two-tone have no frequency to see
        parts = D.variants(spec, "parts")
        flag = P.PART_TOGGLES.get(spec["family"])
        assert (parts is None) == (flag is None)
        if parts:
            assert len(parts) == 2 and _differences(spec, parts[1]) == [("shape", flag)]
            seen.add("parts")
    assert seen == {"frequency", "parts"}


@pytest.fixture(scope="module")
def oracle_rows():
    """Per-image detail columns of ground truth, other-detail and blurred oracles: 8 subjects, 1 scene."""
    rows = {"ground_truth": [], "other_detail": [], "blurred": []}
    for c in ev.make_cases(8, 1, 1, 0, 32, "centered"):
        sc = c.target_scenes[0]
        truths = {(c.index, sc): ev.build_truth(c, sc, 32)}
        dt = D.build_for_cases([c], truths, 32, lambda x, **k: x)[(c.index, sc)]
        for name, got in rows.items():
            got.append({"subject": c.index, **D.columns(truths[(c.index, sc)].oracle[name], dt, name)})
    return rows


def test_oracles_validate_detail_accuracy_and_sharpness(oracle_rows):
    gt = D.summarize_cell(oracle_rows["ground_truth"], 0, bootstrap_ci)
    other = D.summarize_cell(oracle_rows["other_detail"], 0, bootstrap_ci)
    blurred = D.summarize_cell(oracle_rows["blurred"], 0, bootstrap_ci)
    p = gt["details"]["pattern"]
    assert p["k"] == 7 and p["chance"] == pytest.approx(1 / 7) and p["n_subjects"] == 8
    assert p["ceiling"] > 0.6 and p["acc"] > 0.6 and p["gap_closed"] > 0.6  # ground truth ~ the ceiling
    assert other["details"]["pattern"]["acc"] < 0.15 and other["details"]["pattern"]["gap_closed"] < 0
    assert set(gt["details"]) == set(D.ATTRIBUTES)
    # the other-detail oracle differs in each attribute: below chance on every one taken together
    assert np.mean([d["acc"] - d["chance"] for d in other["details"].values()]) < 0
    assert 0.75 < gt["sharpness"] < 1.3 and gt["sharpness_ci"][0] < gt["sharpness"] < gt["sharpness_ci"][1]
    assert blurred["sharpness"] < 0.4 and blurred["sharpness_ci"][1] < 0.6
    # a blur keeps the colours, not the texture: the pattern is no longer recognised as well
    assert blurred["details"]["pattern"]["acc"] < p["acc"] - 0.1
    lines = D.table_markdown([{"refs": 1, "image_guidance": 3.0, **gt}])
    assert lines[0].startswith("| refs | image guidance | pattern acc") and "sharpness" in lines[0]
    assert f"{p['acc']:.2f}: {100 * p['gap_closed']:.0f}%" in lines[2]
    line = D.summary_line(gt)
    assert f"pattern {100 * p['gap_closed']:+.0f}%" in line and f"sharpness {gt['sharpness']:.2f}" in line


def test_sharpness_and_ties():
    img = P.render_subject(P.sample_subject(np.random.default_rng(0), "toy block"), "at night", 1, 32)
    fg = np.ones(32 * 32)
    assert D.hf_energy(D.blur(img, 1.5), fg) < D.hf_energy(D.blur(img, 0.5), fg) < D.hf_energy(img, fg)
    assert D.hf_energy(np.full_like(img, 128), fg) == 0
    # identical centroids: the true label (0) gets a share of the tie, not the argmin's whole credit
    clf = D.NearestCentroid(np.zeros((6, 3)), np.array([0, 0, 1, 1, 2, 2]))
    assert clf.credit(np.zeros((1, 3)), 0)[0] == pytest.approx(1 / 3)
    clf = D.NearestCentroid(np.array([[0.0], [0.1], [1.0], [1.1]]), np.array([0, 0, 1, 1]))
    assert list(clf.credit(np.array([[1.05], [0.0]]), 0)) == [0.0, 1.0]


def test_cli_reports_details_beside_colour(eval_cli, tmp_path):
    """The oracles through jedi-eval procedural: the detail table in summary.md, rows and per-image columns."""
    import csv
    import json

    out = tmp_path / "blurred"
    rc, stdout, err = eval_cli("procedural", "--oracle", "blurred", "--out", out, "--subjects", 2, "--refs", 1,
                               "--image-guidance", 1, "--samples", 1, "--layout", "centered")
    assert rc == 0, err
    row = json.loads((out / "summary.json").read_text())["rows"][0]
    assert row["sharpness"] < 0.5 and "pattern" in row["details"] and "pattern_gap_closed" in row
    assert "| refs | image guidance | pattern acc" in (out / "summary.md").read_text() and "sharpness" in stdout
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"detail_pattern", "pattern_ceiling", "detail_frequency", "sharpness"} <= set(rows[0])
    rc, _, err = eval_cli("procedural", "--oracle", "other_detail", "--details", "off", "--out", tmp_path / "x")
    assert rc == 2 and "drop --details off" in err and err.count("\n") == 1


def test_training_grid_sharpness():
    """The training grids' cheap sharpness (whole images, generated / real) and its line in the grid header."""
    from PIL import Image

    from jedi_train.viz import sample_grid

    real = [P.render_subject(P.sample_subject(np.random.default_rng(s), "ball"), "in the snow", s, 32) for s in range(3)]
    assert D.image_set_sharpness(real, real) == pytest.approx(1.0)
    assert D.image_set_sharpness([D.blur(x) for x in real], real) < 0.5
    assert D.image_set_sharpness(real, [np.full_like(real[0], 90)]) is None
    pil = [Image.fromarray(x) for x in real]
    rows = [(pil[:1], pil[1:], pil[1:], ["a", "b"])]
    plain, noted = sample_grid(rows, cell=32), sample_grid(rows, cell=32, note="sharpness 0.50")
    assert noted.height == plain.height + 13 and noted.width == plain.width
