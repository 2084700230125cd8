"""LoRA (issue 15): what trains, what a checkpoint holds, exact resume, fused vs adapter-only export.

The CLI part trains the demo configuration with `model.lora.rank=4` through the console scripts, as a user
would: 2 steps, resumed to 4, against 4 uninterrupted steps.
"""
from __future__ import annotations

import os

import pytest
import torch
from helpers.cli import FAST, losses, run_jedi

from jedi_train.models.joint import JeDiConfig
from jedi_train.models.lora import LoraSettings, add_lora, trained_names

pytestmark = pytest.mark.usefixtures("one_thread")
LORA = ["model.lora.rank=4", "export_after_fit=false"]


def _unet(model_dir):
    from jedi_train.models.components import load_components

    return load_components(model_dir).unet


def _predict(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    x = torch.randn(2, c, s, s, generator=g)
    text = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500, 500]), text).sample


def test_only_the_adapter_and_the_new_input_weights_train_and_a_lora_step_changes_outputs(tiny_model_dir):
    unet = _unet(tiny_model_dir)
    before = _predict(unet)
    add_lora(unet, LoraSettings(rank=4))
    names = trained_names(unet)
    assert names and all("lora_" in n or n.startswith("conv_in.") for n in names)
    assert {"conv_in.weight", "conv_in.bias"} <= set(names)
    assert any(".attn1.to_q.lora_A" in n for n in names) and any(".attn2.to_v.lora_B" in n for n in names)
    assert torch.allclose(_predict(unet), before, atol=1e-6)  # B = 0 at init: the base model, unchanged
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    _predict(unet)  # warm
    out = unet(torch.randn(2, unet.config.in_channels, 16, 16), torch.tensor([10, 900]),
               torch.randn(2, 8, unet.config.cross_attention_dim)).sample
    out.square().mean().backward()
    opt.step()
    assert not torch.allclose(_predict(unet), before, atol=1e-4)


def test_a_target_that_matches_nothing_is_one_clear_error(tiny_model_dir):
    with pytest.raises(ValueError, match="'to_qq' matches no module"):
        add_lora(_unet(tiny_model_dir), LoraSettings(rank=4, target_modules=["to_qq"]))
    with pytest.raises(ValueError, match="model.trainable and model.lora are exclusive"):
        from jedi_train.training.module import JeDiModule

        JeDiModule(tiny_model_dir, lora={"rank": 2}, trainable=["conv_in"])


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jedi_lora")
    full, resumed = root / "full", root / "resumed"
    run_jedi("jedi-train", *FAST, *LORA, "trainer.max_steps=4", f"paths.output_dir={full}", root=root)
    run_jedi("jedi-train", *FAST, *LORA, "trainer.max_steps=2", f"paths.output_dir={resumed}", root=root)
    second = run_jedi("jedi-train", *FAST, *LORA, "trainer.max_steps=4", f"paths.output_dir={resumed}", root=root)
    return {"root": root, "full": full, "resumed": resumed, "second": second}


def test_lora_checkpoints_hold_only_trained_weights_and_resume_exactly(lora_runs):
    ckpt = torch.load(lora_runs["full"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    unet_keys = [k for k in ckpt["state_dict"] if k.startswith("unet.")]
    assert unet_keys and all("lora_" in k or k.startswith("unet.conv_in.") for k in unet_keys)
    assert sorted(f"unet.{n}" for n in ckpt["trained_names"]) == sorted(unet_keys)
    assert len(ckpt["ema"]["shadow_params"]) == len(unet_keys) and ckpt["lora_base"]
    trained = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("unet."))
    assert trained < 0.2 * 4.1e6  # the tiny UNet has ~4 M weights; the checkpoint a fraction of them
    assert "resumed at step 2" in lora_runs["second"].stdout + lora_runs["second"].stderr
    full, res = losses(lora_runs["full"]), losses(lora_runs["resumed"])
    assert [s for s, *_ in res] == [s for s, *_ in full]
    for (_, a, sa), (_, b, sb) in zip(full, res):
        assert sa == sb and a == pytest.approx(b, rel=1e-5)


def test_fused_export_equals_the_adapter_loaded_into_the_base_pipeline(lora_runs, tmp_path):
    from jedi_train.models.components import load_components
    from jedi_train.pipelines.pipeline_jedi import JeDiPipeline

    root, ckpt = lora_runs["root"], str(lora_runs["full"] / "checkpoints" / "last.ckpt")
    fused, adapter = tmp_path / "fused", tmp_path / "lora"
    run_jedi("jedi-export", ckpt, str(fused), root=root)
    out = run_jedi("jedi-export", ckpt, str(adapter), "--lora-only", root=root)
    assert "exported LoRA adapter" in out.stdout
    assert os.listdir(adapter) == ["pytorch_lora_weights.safetensors"]
    pipe = JeDiPipeline.from_pretrained(str(fused))
    hp = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    base = JeDiPipeline.from_components(load_components(hp["model_dir"], JeDiConfig.from_dict(hp),
                                                        hp["prediction_type"]))
    plain = _predict(base.unet)
    base.load_lora_weights(str(adapter))
    assert not torch.allclose(_predict(base.unet), plain, atol=1e-5)  # the adapter (and conv_in) took effect
    torch.testing.assert_close(_predict(base.unet), _predict(pipe.unet), atol=2e-5, rtol=1e-4)
    again = run_jedi("jedi-export", ckpt, str(adapter), "--lora-only", root=root, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_lora_only_on_a_full_finetune_is_refused(tmp_path, tiny_model_dir):
    from jedi_train.training.checkpoints import atomic_save
    from jedi_train.export.to_pipeline import export_checkpoint
    from jedi_train.models.components import load_components

    unet = load_components(tiny_model_dir).unet
    ckpt = tmp_path / "full.ckpt"
    atomic_save({"state_dict": {f"unet.{k}": v for k, v in unet.state_dict().items()},
                 "hyper_parameters": {"model_dir": tiny_model_dir}}, str(ckpt))
    with pytest.raises(ValueError, match="trained without LoRA"):
        export_checkpoint(str(ckpt), str(tmp_path / "out"), lora_only=True)
