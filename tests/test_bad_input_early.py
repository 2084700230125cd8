"""Issue 35, item 4: bad input that was not yet one line. Each is refused in one `PROG: error:` line, exit 2,
before the model loads, and creates nothing."""
from __future__ import annotations

import time

import pytest
from helpers.cli import cli, compose_train, one_line_error

from jedi_train.training.config_checks import check_config


def test_eval_out_that_is_a_file_is_one_line_before_the_model_loads(eval_cli, pipe_dir, tmp_path, monkeypatch):
    from jedi_train import sampling

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(sampling, "load_pipeline", no_load)
    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    for bench, extra in (("procedural", ()), ("dreambench", ("--bench", str(tmp_path), "--dino", "x", "--clip", "y"))):
        for out in (a_file, a_file / "sub"):
            rc, _, err = eval_cli(bench, pipe_dir, "--out", out, *extra)
            assert rc == 2 and "Traceback" not in err, err
            line = err.strip().splitlines()[-1]
            assert line.startswith("jedi-eval: error: --out") and "is a file" in line, err
    assert a_file.read_text() == "mine"


def test_max_steps_minus_one_needs_a_bound(tmp_path):
    cfg = compose_train(["experiment=demo", "trainer.max_steps=-1", "trainer.max_time=null"], tmp_path)
    with pytest.raises(ValueError, match=r"trainer.max_steps=-1 means no step limit .* trainer.max_time="):
        check_config(cfg)
    check_config(compose_train(["experiment=demo", "trainer.max_steps=-1"], tmp_path))  # the demo's max_time bounds it
    check_config(compose_train(["trainer.max_steps=-1", "+trainer.max_epochs=3"], tmp_path))


def test_a_data_url_matching_nothing_is_one_line_and_creates_nothing(tmp_path):
    run = tmp_path / "runs" / "mine"
    t0 = time.monotonic()
    p = cli("jedi-train", "experiment=demo", f"data.sources=[{{url: {tmp_path}/my_sets/*.tar}}]",
            f"paths.output_dir={run}", cwd=tmp_path)
    took = time.monotonic() - t0
    line = one_line_error(p, "jedi-train")
    assert "my_sets/*.tar" in line and "matches no shards" in line
    assert "LOCAL_RANK" not in p.stderr + p.stdout and "GPU available" not in p.stderr + p.stdout  # no Lightning
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists(), list(tmp_path.rglob("*"))
    print(f"refused in {took:.1f} s")
