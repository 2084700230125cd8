"""jedi-eval on every family's export: `procedural` (the procedural world rendered at the model's resolution) and
`dreambench` (tiny random DINO / CLIP extractors, a DreamBench-format bench) load SDXL, FLUX.1 and SD3 exports
through the one pipeline loader and score them. SD exports are covered by test_eval_procedural/_dreambench."""
import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["tiny_sdxl_model_dir", "tiny_flux_model_dir", "tiny_sd3_model_dir"])
def family_export(request, tmp_path_factory):
    """The tiny model made joint for 32 px, saved as jedi-export saves it (naming its family's pipeline)."""
    from jedi_train.models import families
    from jedi_train.models.components import load_components
    from jedi_train.models.joint import JeDiConfig
    from jedi_train.pipelines.pipeline_jedi import JeDiBasePipeline

    c = load_components(request.getfixturevalue(request.param), JeDiConfig(resolution=32))
    out = str(tmp_path_factory.mktemp(c.family) / "pipeline")
    JeDiBasePipeline.from_components(c).save_pretrained(out, safe_serialization=True)
    with open(f"{out}/model_index.json") as f:
        assert json.load(f)["_class_name"][1] == families.get(c.family).pipeline().__name__
    return out


def test_procedural_eval_runs_on_the_export(family_export, eval_cli, tmp_path):
    pipe_dir = family_export
    rc, _, err = eval_cli("procedural", pipe_dir, "--out", tmp_path / "e", "--subjects", 2, "--refs", "0,1",
                          "--image-guidance", "0,2", "--samples", 1, "--steps", 2, "--guidance", 2)
    assert rc == 0, err
    s = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert s["settings"]["resolution"] == 32  # rendered at the model's resolution
    assert [(r["refs"], r["image_guidance"]) for r in s["rows"]] == [(0, 0.0), (1, 0.0), (1, 2.0)]
    assert all(r["n_images"] == 2 and len(r["gap_closed_ci"]) == 2 for r in s["rows"])


def test_dreambench_eval_runs_on_the_export(family_export, eval_cli, extractor_dirs, fake_bench, tmp_path):
    pipe_dir = family_export
    rc, _, err = eval_cli("dreambench", pipe_dir, "--bench", fake_bench, "--subjects", "box", "--refs", 1,
                          "--samples", 1, "--steps", 2, "--prompts-per-subject", 2, "--out", tmp_path / "d",
                          "--dino", extractor_dirs[0], "--clip", extractor_dirs[1], "--device", "cpu", "--wandb", "off")
    assert rc == 0, err
    s = json.loads((tmp_path / "d" / "summary.json").read_text())
    row = s["rows"][0]
    assert row["refs"] == 1 and row["n_images"] == 2 and s["pipeline"]["resolution"] == 32
    for m in ("dino", "clip_i", "clip_t"):
        assert -1 <= row[f"{m}_ci"][0] <= row[m] <= row[f"{m}_ci"][1] <= 1
