"""SDXL, FLUX.1, SD3, FLUX.2 Klein, FLUX.2-dev and Qwen-Image through the documented CLI, as for SD: jedi-train
experiment=demo model=tiny_sdxl|tiny_flux|tiny_sd3|tiny_flux2_klein|tiny_flux2|tiny_qwenimage,
jedi-export, jedi-sample (K = 3; K = 1 in-process on the same pipeline code path); a checkpoint against another
family's model is refused in one line."""
from __future__ import annotations

import os

import pytest
import torch
from helpers.cli import FAST, run_jedi
from helpers.pipelines import CAN, load, needs_dreambench, run

from jedi_train.export.to_pipeline import export_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@needs_dreambench
@pytest.mark.parametrize(("model", "family", "component"), [("tiny_sdxl", "Stable Diffusion XL", "text_encoder_2"),
                                                            ("tiny_flux", "FLUX.1", "transformer"),
                                                            ("tiny_sd3", "Stable Diffusion 3", "text_encoder_3"),
                                                            ("tiny_flux2_klein", "FLUX.2 Klein", "transformer"),
                                                            ("tiny_flux2", "FLUX.2-dev", "transformer"),
                                                            ("tiny_qwenimage", "Qwen-Image", "transformer")])
def test_train_export_sample_through_the_cli(model, family, component, tmp_path, tiny_model_dir):
    run_dir, pipe_dir = tmp_path / "run", tmp_path / "pipe"
    run_jedi("jedi-train", *FAST, f"model={model}", "trainer.max_steps=3", "export_after_fit=false",
             "~callbacks.sample_grid", "~callbacks.identity_gain", f"paths.output_dir={run_dir}", root=tmp_path)
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    run_jedi("jedi-export", ckpt, str(pipe_dir), root=tmp_path)
    assert os.path.isdir(pipe_dir / component)
    assert f"| backbone | {family}: Joint" in (pipe_dir / "README.md").read_text()  # the card describes its denoiser
    refs = [a for path in CAN[:3] for a in ("--ref", path)]
    run_jedi("jedi-sample", str(pipe_dir), *refs, "--prompt", "a can on a beach", "--num", "2", "--steps", "2",
             "--out", str(tmp_path / "k3"), root=tmp_path)
    assert len([f for f in os.listdir(tmp_path / "k3") if f.endswith(".png")]) == 3  # 2 images + grid
    assert len(os.listdir(tmp_path / "k3" / "references")) == 3
    one = run(load(pipe_dir), CAN[:1])
    assert one.shape == (2, 3, 32, 32) and torch.isfinite(one).all()
    with pytest.raises(ValueError, match=f"is a {family} checkpoint but the model directory holds a Stable "
                                         "Diffusion 1.x/2.x model"):
        export_checkpoint(ckpt, str(tmp_path / "other"), model_dir=tiny_model_dir)
