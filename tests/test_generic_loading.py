"""An export loads the way any diffusers user would load it, in a process where jedi_train cannot be
imported at all: DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True) (bundle.py)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from test_pipeline import make_pipeline_dir

from jedi_train.bundle import MODULES, bundle_sources
from jedi_train.pipeline import JeDiPipeline

# a fresh interpreter that cannot import this project (as on a colleague's machine without it)
GENERIC = textwrap.dedent("""
    import sys
    for name in ("jedi_train", "data_pipelines"):
        sys.modules[name] = None  # any import of it raises ImportError
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    refs = [np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)]
    out = pipe(reference_images=refs, prompt=["a can", "a can on a beach"], num_inference_steps=2,
               guidance_scale=3.0, image_guidance_scale=2.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    np.save(sys.argv[2], out.images)
    print("LOADED", type(pipe).__module__, type(pipe.denoiser).__name__, flush=True)
    if len(sys.argv) > 3:
        pipe.save_pretrained(sys.argv[3])
""")


def run_generic(pipe_dir, out_npy, tmp_path, save_to=None):
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-c", GENERIC, pipe_dir, str(out_npy)] + ([save_to] if save_to else [])
    p = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return next(line for line in p.stdout.splitlines() if line.startswith("LOADED"))


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
