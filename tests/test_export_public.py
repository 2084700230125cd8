"""Issue 35, item 2 and the sampling-defaults friction: what an export carries to the Hub.

No absolute local path (home dir, cluster path, the model or data dirs of the run) in any text file of an
export; the training run's recommended sampling settings travel in it (sampling.json + the model card) and
jedi-sample / jedi-app use them when the user gives none, saying which were used."""
from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from jedi_train.export.to_pipeline import save_pipeline_atomically

TEXT = (".json", ".md", ".txt", ".py", ".yaml", ".yml", ".model")


@pytest.fixture(scope="module")
def export(tiny_model_dir, tmp_path_factory):
    """A run dir as jedi-train leaves it (config.yaml with absolute data paths, recommended sampling) and its
    export, made from the tiny model loaded from its absolute directory."""
    from jedi_train.models.components import load_components
    from jedi_train.models.joint import JeDiConfig
    from jedi_train.pipelines.pipeline_jedi_sd import JeDiPipeline

    root = tmp_path_factory.mktemp("home_user_project")
    run = root / "runs" / "demo-1"
    run.mkdir(parents=True)
    cfg = {"run_name": "demo-1", "paths": {"root_dir": str(root)},
           "data": {"sources": [{"url": f"{root}/data/sets/mine/*.tar", "weight": 1.0},
                                {"url": "/cluster/scratch/alice/sets/*.tar", "weight": 1.0}], "batch_size": 4},
           "trainer": {"devices": 1, "num_nodes": 1}, "strategy": {"name": "auto"},
           "sampling": {"guidance": 3.0, "image_guidance": 2.5, "steps": 4}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    pipe = JeDiPipeline.from_components(load_components(tiny_model_dir, JeDiConfig(reference_attention="references")))
    out = run / "pipeline"
    save_pipeline_atomically(pipe, str(out), card={"hparams": {"model_dir": tiny_model_dir, "optimizer": {"lr": 1e-4}},
                                                   "step": 7, "run_dir": str(run)})
    return out, root, tiny_model_dir


def test_no_absolute_local_path_in_any_exported_text_file(export):
    out, root, model_dir = export
    private = [str(root), os.path.dirname(model_dir), os.path.expanduser("~"), "/cluster/scratch"]
    checked = 0
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in TEXT:
            text = path.read_text(errors="replace")
            checked += 1
            for p in private:
                assert p not in text, f"{path.relative_to(out)} carries the local path {p}"
            found = re.findall(r"(?<![\w.:/~-])/(?:tmp|home|root|work|cluster|scratch|mnt|data|Users)/[\w./-]+", text)
            assert not found, f"{path.relative_to(out)} carries {found[:3]}"
    assert checked >= 5
    card = (out / "README.md").read_text()
    assert "data/sets/mine/*.tar" in card and ".../sets/*.tar" in card  # relative to the run's root, or short


def test_the_export_carries_the_runs_recommended_sampling_settings(export):
    out, _, _ = export
    assert json.loads((out / "sampling.json").read_text()) | {"from": None} == {
        "guidance_scale": 3.0, "image_guidance_scale": 2.5, "num_inference_steps": 4, "from": None}
    card = (out / "README.md").read_text()
    assert "recommended sampling" in card and "guidance_scale=3, image_guidance_scale=2.5" in card


def photo(tmp_path) -> str:
    import numpy as np
    from PIL import Image

    path = str(tmp_path / "ref.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)).save(path)
    return path


def test_jedi_sample_uses_the_recommended_settings_unless_given_and_says_so(export, tmp_path, capsys):
    from jedi_train.cli.sample import main

    out, _, _ = export
    ref = photo(tmp_path)
    assert main([str(out), "--ref", ref, "--prompt", "a toy", "--num", "1", "--out", str(tmp_path / "a")]) == 0
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert (settings["guidance_scale"], settings["image_guidance_scale"], settings["steps"]) == (3.0, 2.5, 4)
    assert settings["settings_from"] == {"guidance": "export", "image_guidance": "export", "steps": "export"}
    err = capsys.readouterr().err
    assert "using the export's recommended text guidance 3, image guidance 2.5, steps 4" in err, err

    assert main([str(out), "--ref", ref, "--prompt", "a toy", "--num", "1", "--guidance", "5", "--steps", "2",
                 "--out", str(tmp_path / "b")]) == 0
    settings = json.loads((tmp_path / "b" / "settings.json").read_text())
    assert (settings["guidance_scale"], settings["image_guidance_scale"], settings["steps"]) == (5.0, 2.5, 2)
    assert "recommended image guidance 2.5" in capsys.readouterr().err


def test_jedi_app_starts_from_the_recommended_settings(export, tmp_path):
    pytest.importorskip("gradio")
    from jedi_train.app.handler import JeDiApp
    from jedi_train.app.ui import build_ui
    from jedi_train.sampling import load_pipeline

    out, _, _ = export
    work = tmp_path / "work"
    work.mkdir()
    app = JeDiApp(load_pipeline(str(out), "cpu", progress=False), str(out), work_dir=str(work))
    assert app.settings == {"guidance": 3.0, "image_guidance": 2.5, "steps": 4}
    assert "image guidance 2.5: recommended by the export" in app.model_info()
    ui = {b.elem_id: b.value for b in build_ui(app).blocks.values() if getattr(b, "elem_id", None)}
    assert (ui["guidance"], ui["image-guidance"], ui["steps"]) == (3.0, 2.5, 4)
    app.generate([photo(tmp_path)], "", "a toy")  # settings not given: the recommended ones
    request = max(work.glob("request-*/jedi-sample/settings.json"))
    settings = json.loads(request.read_text())
    assert (settings["guidance_scale"], settings["image_guidance_scale"], settings["steps"]) == (3.0, 2.5, 4)
