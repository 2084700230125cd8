"""jedi-eval compare: B - A of two procedural evaluations, paired over subjects, on the oracles."""
import json

import pytest

ARGS = ("--subjects", 6, "--refs", 1, "--image-guidance", 1, "--samples", 1, "--layout", "centered")


@pytest.fixture(scope="module")
def oracle_dirs(tmp_path_factory):
    from jedi_train.cli.eval import main

    root = tmp_path_factory.mktemp("compare")
    for oracle in ("ground_truth", "blurred"):  # shared by the tests below: scored once
        assert main(["procedural", "--oracle", oracle, "--out", str(root / oracle), *map(str, ARGS)]) == 0
    return root


def test_a_run_against_itself_differs_by_exactly_zero(oracle_dirs, eval_cli):
    gt = oracle_dirs / "ground_truth"
    rc, stdout, err = eval_cli("compare", gt, gt)
    assert rc == 0, err
    from jedi_train.eval.compare import compare

    row = compare(gt, gt)["rows"][0]
    for name in ("gap_closed", "scene_acc", "pattern_gap_closed", "sharpness"):
        assert row[name]["diff"] == 0 and row[name]["diff_ci"] == [0, 0], name
    assert "within noise" in stdout


def test_a_blur_is_measured_as_less_sharp_and_less_detailed(oracle_dirs, eval_cli, tmp_path):
    rc, _, err = eval_cli("compare", oracle_dirs / "ground_truth", oracle_dirs / "blurred", "--out", tmp_path)
    assert rc == 0, err
    row = json.loads((tmp_path / "compare.json").read_text())["rows"][0]
    sharp = row["sharpness"]
    assert sharp["a"] > 0.8 and sharp["b"] < 0.3 and sharp["diff_ci"][1] < 0  # B - A below 0, CI too
    assert row["pattern_gap_closed"]["diff"] < 0 and row["n_subjects"] == 6
    assert "| 1 | 1 | sharpness |" in (tmp_path / "compare.md").read_text()


def test_unpaired_or_unfinished_evaluations_are_refused(oracle_dirs, eval_cli, tmp_path):
    other = tmp_path / "fewer"
    args = list(ARGS)
    args[1] = 4  # --subjects 4: other subjects, not pairable
    assert eval_cli("procedural", "--oracle", "ground_truth", "--details", "off", "--out", other, *args)[0] == 0
    rc, _, err = eval_cli("compare", oracle_dirs / "ground_truth", other)
    assert rc == 2 and "differ in subjects" in err and err.count("\n") == 1
    rc, _, err = eval_cli("compare", oracle_dirs / "ground_truth", tmp_path / "nothing")
    assert rc == 2 and "not a finished jedi-eval procedural result" in err and err.count("\n") == 1
