"""A non-editable install (issue 10): the wheel carries the Hydra configs and a short demo run works from it.

The configs stay in the repository's top-level conf/ and ship as package data of `data_pipelines.conf`
(pyproject.toml); jedi_common.hydra_args.CONF_DIR finds them in a checkout and in an installed copy.
The wheel is built from a copy of the sources (building in the repository would leave build/ there),
installed with --target and put first on PYTHONPATH: setuptools' editable finder sits after PathFinder
on sys.meta_path (asserted below), so the installed copy shadows the editable one.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "conf", "jedi_train", "data_pipelines")
PROBE = """
import json, sys
import data_pipelines, jedi_train
from jedi_common.hydra_args import CONF_DIR
finders = [getattr(f, "__name__", type(f).__name__) for f in sys.meta_path]
print(json.dumps({"jedi_train": jedi_train.__file__, "data_pipelines": data_pipelines.__file__,
                  "conf_dir": str(CONF_DIR), "finders": finders}))
"""
# experiment=demo debug=fast, smaller still (as in test_train_cli): few sets, 2 steps, one sample grid and identity check at the end
SHORT = ["experiment=demo", "debug=fast", "trainer.max_steps=2", "data.batch_size=2",
         "data.synthesize_if_missing.num_sets=64", "data.heldout_synthesize_if_missing.num_sets=4",
         "callbacks.sample_grid.every_n_steps=2", "callbacks.identity_gain.every_n_steps=2",
         "callbacks.identity_gain.num_sets=4", "callbacks.identity_gain.train_num_sets=4",
         "model.lr_scheduler.num_warmup_steps=1"]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_packages_list_matches_the_source_tree():
    """pyproject.toml lists its packages (conf/ is mapped into one): every package on disk is in the list."""
    tomllib = pytest.importorskip("tomllib")
    from setuptools import find_packages

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = find_packages(str(REPO), include=["jedi_train*", "data_pipelines*"])
    assert sorted(setup["packages"]) == sorted(on_disk + ["data_pipelines.conf"])
    assert setup["package-dir"] == {"data_pipelines.conf": "conf"}


@pytest.mark.slow
def test_wheel_install_ships_the_configs_and_trains_the_demo(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("jedi_train-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    shipped = _files(site)
    assert "data_pipelines/conf/train.yaml" in shipped and "data_pipelines/conf/model/tiny_pixel.yaml" in shipped

    cwd = tmp_path / "cwd"  # the run's working dir: paths.root_dir (data/, models) defaults to it
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("JEDI_ROOT", "PYTHONPATH", "HYDRA_FULL_ERROR")}
    env.update(PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1", WANDB_MODE="offline", WANDB_API_KEY="",
               HF_HUB_OFFLINE="1")
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=cwd, capture_output=True, text=True,
                           timeout=120, check=False)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    for key in ("jedi_train", "data_pipelines", "conf_dir"):
        assert Path(found[key]).resolve().is_relative_to(site.resolve()), (key, found[key])
    assert Path(found["conf_dir"]) == (site / "data_pipelines" / "conf").resolve()
    if "_EditableFinder" in found["finders"]:  # an editable install of the repo: PYTHONPATH must still win
        assert found["finders"].index("PathFinder") < found["finders"].index("_EditableFinder")

    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "jedi_train.cli.train", *SHORT, f"paths.output_dir={out}"],
                         env=env, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    hydra_yaml = (out / ".hydra" / "hydra.yaml").read_text()  # runtime.config_sources: the primary config dir
    assert f"path: {site.resolve() / 'data_pipelines' / 'conf'}\n" in hydra_yaml
    assert str(REPO / "conf") not in hydra_yaml
    assert list((cwd / "data" / "sets" / "procedural_centered").glob("*.tar"))  # data under the cwd
    assert _files(site) == shipped  # nothing written into the installed package
