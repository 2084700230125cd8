"""Tiny exported pipelines for the pipeline tests (SD, SDXL, FLUX, SD3): the DreamBench reference images (CAN, DOG,
needs_dreambench), make_pipeline_dir (export a tiny joint model), load, run (2-step sampling) and
run_generic (load an export with plain diffusers in a process that cannot import jedi_train)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from jedi_train.models.components import load_components
from jedi_train.models.joint import JeDiConfig
from jedi_train.pipelines.auto import JeDiAutoPipeline
from jedi_train.pipelines.pipeline_jedi_sd import JeDiPipeline

DREAMBENCH = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "dreambench")
CAN = [os.path.join(DREAMBENCH, "can", f"{i:02d}.jpg") for i in range(5)]
DOG = [os.path.join(DREAMBENCH, "dog2", f"{i:02d}.jpg") for i in range(3)]
needs_dreambench = pytest.mark.skipif(not os.path.isdir(DREAMBENCH), reason="../shared/dreambench not present")


def make_pipeline_dir(model_dir, out_dir, reference_attention="set", reference_timestep="zero", **jedi):
    """Export a tiny joint model as a pipeline. The zero-initialised reference input channels get random
    weights, so references reach the model through their input channels as well as attention."""
    c = load_components(model_dir, JeDiConfig(reference_timestep=reference_timestep, **jedi))
    weight = c.denoiser.get_submodule(c.denoiser.joint_input_module).weight
    lc = c.denoiser.jedi.latent_channels
    widened = c.denoiser.jedi.conditioning == "channels"  # the noisy input's features (FLUX.1, Qwen-Image: 2x2 patches)
    base = weight.shape[1] * lc // (2 * lc + 1) if widened else weight.shape[1]
    with torch.no_grad():
        weight[:, base:].normal_(
            0, 0.1, generator=torch.Generator().manual_seed(1))
    c.denoiser.set_reference_attention(reference_attention)
    JeDiPipeline.from_components(c).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def load(path):
    pipe = JeDiAutoPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, refs, prompts=("a can", "a can on a beach"), seed=0, **kw):
    kw = {"num_inference_steps": 2, "guidance_scale": 3.0, "image_guidance_scale": 2.0, "output_type": "pt", **kw}
    return pipe(reference_images=refs, prompt=list(prompts), generator=torch.Generator().manual_seed(seed),
                **kw).images


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
