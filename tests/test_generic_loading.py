"""An export loads the way any diffusers user would load it, in a process where jedi_train cannot be
imported at all: DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True) (bundle.py)."""
import json
import os

import numpy as np
import pytest
import torch
from helpers.pipelines import make_pipeline_dir, run_generic

from jedi_train.pipelines.bundle import MODULES, bundle_sources
from jedi_train.pipelines.pipeline_jedi import JeDiPipeline


def jedi_images(pipe_dir):
    pipe = JeDiPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    refs = [np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)]
    return pipe(reference_images=refs, prompt=["a can", "a can on a beach"], num_inference_steps=2,
                guidance_scale=3.0, image_guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_export_loads_with_plain_diffusers_without_jedi_train(tiny_model_dir, tmp_path):
    pipe_dir = make_pipeline_dir(tiny_model_dir, str(tmp_path / "pipe"))
    with open(os.path.join(pipe_dir, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == ["jedi_pipeline", "JeDiPipeline"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    for name in MODULES:
        assert os.path.isfile(os.path.join(pipe_dir, f"{name}.py")), name

    line = run_generic(pipe_dir, tmp_path / "generic.npy", tmp_path, save_to=str(tmp_path / "resaved"))
    _, module, unet_cls = line.split()
    assert module.startswith("diffusers_modules.") and unet_cls == "JointUNet2DConditionModel"
    generic = np.load(tmp_path / "generic.npy")
    ours = jedi_images(pipe_dir)
    assert generic.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(generic, ours)  # the same code and weights: the same images

    # a pipeline loaded from the bundle saves a directory that loads both ways again
    resaved = str(tmp_path / "resaved")
    for name in MODULES:
        assert os.path.isfile(os.path.join(resaved, f"{name}.py")), name
    np.testing.assert_array_equal(jedi_images(resaved), ours)


def test_jedipipeline_uses_the_installed_code_not_the_bundle(tiny_model_dir, tmp_path):
    pipe_dir = make_pipeline_dir(tiny_model_dir, str(tmp_path / "pipe"))
    with open(os.path.join(pipe_dir, "jedi_pipeline.py"), "a") as f:
        f.write("\nraise RuntimeError('bundled code was executed')\n")
    pipe = JeDiPipeline.from_pretrained(pipe_dir)
    assert type(pipe) is JeDiPipeline


def test_bundle_is_flat_and_complete():
    sources = bundle_sources()
    for name, source in sources.items():
        for line in source.splitlines():
            s = line.strip()
            assert not s.startswith(("from data_pipelines", "from jedi_train", "from .model")), (name, s)
    # every module the entry file needs is imported by the entry itself (diffusers copies only those)
    entry = sources["jedi_pipeline.py"]
    for name in MODULES:
        if name != "jedi_pipeline":
            assert f"from .{name} import" in entry, name


def test_without_trust_remote_code_diffusers_refuses_in_one_message(tiny_model_dir, tmp_path):
    from diffusers import DiffusionPipeline

    pipe_dir = make_pipeline_dir(tiny_model_dir, str(tmp_path / "pipe"))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(pipe_dir)
