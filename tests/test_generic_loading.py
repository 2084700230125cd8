"""An export loads the way any diffusers user would load it, in a process where jedi_train cannot be
imported at all: DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True) (bundle.py)."""
import json
import os

import numpy as np
import pytest
import torch
from helpers.pipelines import make_pipeline_dir, run_generic

from jedi_train.pipelines.auto import JeDiAutoPipeline
from jedi_train.pipelines.bundle import bundle_sources
from jedi_train.pipelines.pipeline_jedi_sd import JeDiPipeline


def jedi_images(pipe_dir):
    pipe = JeDiAutoPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    refs = [np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)]
    return pipe(reference_images=refs, prompt=["a can", "a can on a beach"], num_inference_steps=2,
                guidance_scale=3.0, image_guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_export_loads_with_plain_diffusers_without_jedi_train(tiny_model_dir, tmp_path):
    pipe_dir = make_pipeline_dir(tiny_model_dir, str(tmp_path / "pipe"))
    with open(os.path.join(pipe_dir, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == ["pipeline_jedi_sd", "JeDiPipeline"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    carried = bundle_sources(JeDiPipeline.__module__)
    for name in carried:
        assert os.path.isfile(os.path.join(pipe_dir, name)), name

    line = run_generic(pipe_dir, tmp_path / "generic.npy", tmp_path, save_to=str(tmp_path / "resaved"))
    _, module, unet_cls = line.split()
    assert module.startswith("diffusers_modules.") and unet_cls == "JointUNet2DConditionModel"
    generic = np.load(tmp_path / "generic.npy")
    ours = jedi_images(pipe_dir)
    assert generic.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(generic, ours)  # the same code and weights: the same images

    # a pipeline loaded from the bundle saves a directory that loads both ways again
    resaved = str(tmp_path / "resaved")
    for name in carried:
        assert os.path.isfile(os.path.join(resaved, name)), name
    np.testing.assert_array_equal(jedi_images(resaved), ours)


def test_jedipipeline_uses_the_installed_code_not_the_bundle(tiny_model_dir, tmp_path):
    pipe_dir = make_pipeline_dir(tiny_model_dir, str(tmp_path / "pipe"))
    with open(os.path.join(pipe_dir, "pipeline_jedi_sd.py"), "a") as f:
        f.write("\nraise RuntimeError('bundled code was executed')\n")
    pipe = JeDiAutoPipeline.from_pretrained(pipe_dir)
    assert type(pipe) is JeDiPipeline


def test_bundle_is_flat_and_complete():
    sources = bundle_sources(JeDiPipeline.__module__)
    # derived from the imports: the pipeline, what it imports (to any depth) and the bundle writer itself
    assert {"pipeline_jedi_sd.py", "jedi_attention.py", "jedi_text.py", "jedi_images.py", "jedi_bundle.py"} <= set(sources)
    for name, source in sources.items():
        for line in source.splitlines():
            s = line.strip()
            assert not s.startswith(("from data_pipelines", "from jedi_train", "from jedi_common")), (name, s)
            if s.startswith("from ."):  # every relative import names a carried file
                words = s.split()
                target = words[3] if words[1] == "." else words[1][1:]  # from . import X as Y | from .X import
                assert target + ".py" in sources, (name, s)
    # every module the entry file needs is imported by the entry itself (diffusers copies only those)
    entry = sources["pipeline_jedi_sd.py"]
    for name in sources:
        if name != "pipeline_jedi_sd.py":
            assert f"from .{name[:-3]} import" in entry, name


def test_bundle_refuses_to_carry_training_code(monkeypatch):
    from jedi_train.pipelines import bundle

    real = bundle._project_imports
    monkeypatch.setattr(bundle, "_project_imports", lambda src: real(src) + [("jedi_train.training.module", None)])
    with pytest.raises(RuntimeError, match="jedi_train.training.module"):
        bundle_sources(JeDiPipeline.__module__)


def test_without_trust_remote_code_diffusers_refuses_in_one_message(tiny_model_dir, tmp_path):
    from diffusers import DiffusionPipeline

    pipe_dir = make_pipeline_dir(tiny_model_dir, str(tmp_path / "pipe"))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(pipe_dir)
