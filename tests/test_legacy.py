"""Checkpoints and exports written before the package was regrouped (tests/fixtures/legacy, made by
make_legacy.py at 3dda140) still load, resume and sample the same images."""
import os
import shutil

import numpy as np
import pytest
import torch

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "legacy")
pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(pipe_dir):
    from jedi_train.pipelines.auto import JeDiAutoPipeline

    pipe = JeDiAutoPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    ref = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    return pipe(reference_images=[ref], prompt=["a photo of a mug"], num_inference_steps=3, guidance_scale=2.0,
                image_guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(os.path.join(LEGACY, "expected.npz")))


@pytest.mark.parametrize("name", ["sd_export", "flux_export"])
def test_old_export_samples_the_same_images(name, expected, tmp_path):
    copy = shutil.copytree(os.path.join(LEGACY, name), tmp_path / name)  # loading must not need to write
    np.testing.assert_allclose(_sample(copy), expected[name], atol=2e-5)


def test_old_checkpoint_exports_to_the_same_pipeline(expected, tmp_path):
    from jedi_train.export.to_pipeline import export_checkpoint

    out = export_checkpoint(os.path.join(LEGACY, "sd.ckpt"), str(tmp_path / "export"),
                            model_dir=os.path.join(LEGACY, "sd_base"))
    np.testing.assert_allclose(_sample(out), expected["sd_export"], atol=2e-5)


def test_old_checkpoint_resumes_into_the_module():
    from jedi_train.training.checkpoints import safe_load
    from jedi_train.training.module import JeDiModule

    ckpt = safe_load(os.path.join(LEGACY, "sd.ckpt"))
    hp = {k: v for k, v in ckpt["hyper_parameters"].items() if k != "model_dir"}
    module = JeDiModule(model_dir=os.path.join(LEGACY, "sd_base"), **hp)
    assert all(k.startswith("unet.") for k in ckpt["state_dict"])  # the attribute's name before the rename
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])  # strict: every saved key has its place
    own = module.state_dict()
    assert len(own) == len(ckpt["state_dict"])
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(own["denoiser." + key[len("unet."):]], value)
    assert module.ema is not None and len(module.ema.shadow_params) == len(ckpt["ema"]["shadow_params"])
