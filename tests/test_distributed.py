"""Multi-process training on CPU: DDP (gloo, 2 processes) and DeepSpeed ZeRO-2/3 through a test-only
CPU shim, with real ZeRO checkpoints consolidated and loaded back into a joint UNet."""
import json
import os
import subprocess
import sys

import pytest
import torch

from jedi_train.training.checkpoints import load_checkpoint, load_unet_weights, unet_state_from_checkpoint
from jedi_train.models.joint_unet import load_joint_unet

SCRIPT = os.path.join(os.path.dirname(__file__), "helpers", "fit_tiny.py")
pytestmark = pytest.mark.slow


def _fit(model_dir, out, strategy, devices, steps=2, lora=False, resume=None):
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_PORT=str(29500 + (os.getpid() + devices) % 1000))
    extra = (["lora"] if lora else []) + ([f"resume={resume}"] if resume else [])
    proc = subprocess.run([sys.executable, SCRIPT, model_dir, str(out), strategy, str(devices), str(steps)] + extra,
                          capture_output=True, text=True, env=env, timeout=600, cwd=out, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.load(open(out / f"result_rank{r}.json")) for r in range(devices)]


def test_ddp_two_processes(tiny_model_dir, tmp_path):
    results = _fit(tiny_model_dir, tmp_path, "ddp", 2)
    assert [r["world_size"] for r in results] == [2, 2]
    assert all(r["global_step"] == 2 for r in results)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and "ema" in ckpt


def _consolidates(ckpt_dir, model_dir: str, ranks: int) -> dict:
    """A real ZeRO checkpoint (one optimizer shard per rank, written aside and renamed into place) that
    consolidates into trained joint-UNet weights; returns the loaded checkpoint."""
    assert ckpt_dir.is_dir()
    shards = [f for f in os.listdir(ckpt_dir / "checkpoint") if "optim_states" in f]
    assert len(shards) == ranks
    assert not [f for f in os.listdir(ckpt_dir.parent) if ".partial-" in f]
    ckpt = load_checkpoint(str(ckpt_dir))
    unet = load_joint_unet(model_dir)
    before = unet.conv_in.weight.clone()
    load_unet_weights(unet, unet_state_from_checkpoint(ckpt), str(ckpt_dir))
    assert not torch.equal(before, unet.conv_in.weight)  # trained weights, not the initial ones
    assert "ema" in ckpt and ckpt["hyper_parameters"]["model_dir"] == model_dir
    return ckpt


def test_deepspeed_zero2_checkpoint_consolidates(tiny_model_dir, tmp_path):
    results = _fit(tiny_model_dir, tmp_path, "zero2", 2)
    assert all(r["global_step"] == 2 and r["world_size"] == 2 for r in results)
    _consolidates(tmp_path / "checkpoints" / "last.ckpt", tiny_model_dir, 2)


def test_zero3_consolidates_shards_the_ema_resumes_and_merges_for_export(tiny_model_dir, tmp_path):
    """ZeRO-3 over 2 ranks: the checkpoint consolidates; each rank keeps half the EMA and saves its slice; a
    resumed run continues the slices exactly (EMA_3 = d * EMA_2 + (1 - d) * W_3, d = EMAModel's decay at
    step 3); export reads the whole."""
    from diffusers.training_utils import EMAModel

    from jedi_train.models.lora import trained_parameters

    unet = load_joint_unet(tiny_model_dir)
    total = sum(p.numel() for p in trained_parameters(unet))
    (tmp_path / "a").mkdir()
    first = _fit(tiny_model_dir, tmp_path / "a", "zero3", 2, steps=2)
    assert all(r["global_step"] == 2 and r["world_size"] == 2 for r in first)
    assert all(total / 2 <= r["ema_numel"] < total / 2 + 1000 for r in first)  # half each (+ padding)
    a = _consolidates(tmp_path / "a" / "checkpoints" / "last.ckpt", tiny_model_dir, 2)
    assert "partition" not in a["ema"] and a["ema"]["optimization_step"] == 2
    (tmp_path / "b").mkdir()
    _fit(tiny_model_dir, tmp_path / "b", "zero3", 2, steps=3, resume=str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    b = load_checkpoint(str(tmp_path / "b" / "checkpoints" / "last.ckpt"))
    assert b["global_step"] == 3 and b["ema"]["optimization_step"] == 3
    names = b["trained_names"]
    weights = unet_state_from_checkpoint(b)
    d = EMAModel([torch.zeros(1)], decay=0.9).get_decay(3)
    assert 0 < d < 0.9
    for name, ema_a, ema_b in zip(names, a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        assert ema_b.shape == weights[name].shape
        torch.testing.assert_close(ema_b, d * ema_a + (1 - d) * weights[name].detach().float(), rtol=1e-4, atol=1e-6)
    moved = max(float((e - weights[n].detach().float()).abs().max()) for n, e in zip(names, b["ema"]["shadow_params"]))
    assert moved > 0  # the EMA is not the weights
    from jedi_train.export.to_pipeline import export_checkpoint
    from jedi_train.pipelines.pipeline_jedi import JeDiPipeline

    exported = JeDiPipeline.from_pretrained(export_checkpoint(str(tmp_path / "b" / "checkpoints" / "last.ckpt"),
                                                              str(tmp_path / "pipe"))).unet.state_dict()
    for name, ema_b in zip(names, b["ema"]["shadow_params"]):
        torch.testing.assert_close(exported[name].float(), ema_b)  # the whole EMA, merged from both ranks


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_lora_trains_under_ddp_and_zero2_and_exports(tiny_model_dir, tmp_path, strategy):
    """LoRA on 2 processes: both ranks step; the checkpoint (a DDP file, or a ZeRO-2 directory with
    exclude_frozen_parameters) holds only the trained weights and exports to a pipeline whose UNet differs
    from the base."""
    from jedi_train.export.to_pipeline import export_checkpoint
    from jedi_train.pipelines.pipeline_jedi import JeDiPipeline

    (tmp_path / "run").mkdir()
    results = _fit(tiny_model_dir, tmp_path / "run", strategy, 2, lora=True)
    assert [r["global_step"] for r in results] == [2, 2] and [r["world_size"] for r in results] == [2, 2]
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(str(ckpt_path))
    assert ckpt["lora_base"] and "ema" in ckpt
    # the Lightning file / the consolidated ZeRO states hold the adapter + conv_in only
    assert all("lora" in k or "conv_in" in k for k in unet_state_from_checkpoint(ckpt))
    out = export_checkpoint(str(ckpt_path), str(tmp_path / "pipe"))
    trained = JeDiPipeline.from_pretrained(out).unet
    base = load_joint_unet(tiny_model_dir)
    assert not any("lora" in k for k in trained.state_dict())  # fused
    assert not torch.equal(trained.conv_in.weight, base.conv_in.weight)
    own = base.state_dict()
    diff = max(float((v - own[n]).abs().max()) for n, v in trained.state_dict().items() if "attn1.to_q" in n)
    assert diff > 0  # the fused adapter moved the attention projections
