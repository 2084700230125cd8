"""strategy=fsdp: FSDP2 (fully_shard) with 2 gloo ranks on CPU through the real jedi-train CLI (sharded DCP
checkpoints, resume, export joined from the shards), its dry-run bytes against ZeRO-3's, and its refusals."""
from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
from helpers.cli import FAST, cli, compose_train, one_line_error, run_jedi

from jedi_train.train import check_resume_strategy
from jedi_train.training.checkpoints import UnsafeCheckpointError, checkpoint_step, load_checkpoint
from jedi_train.training.config_checks import check_strategy
from jedi_train.training.dry_run import estimate

RUN = [*FAST, "strategy=fsdp", "trainer.devices=2", "logger=none", "data.num_workers=0", "~callbacks.sample_grid",
       "~callbacks.identity_gain", "callbacks.model_checkpoint.every_n_train_steps=1000", "data.batch_size=1"]


def _torch_join(ckpt_dir: str) -> dict:
    """A sharded checkpoint joined by torch's own DCP -> torch.save converter (not ours)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(os.path.dirname(ckpt_dir), "whole.pt")
    dcp_to_torch_save(ckpt_dir, out)
    try:
        return torch.load(out, weights_only=False)
    finally:
        os.remove(out)


@pytest.mark.slow
def test_two_ranks_train_save_shards_resume_and_export_the_joined_weights(tmp_path):
    """1 step on 2 ranks -> a sharded checkpoint; a second run resumes it for step 2 and exports (export_after_fit)
    from the final shards, joined; the export equals a single-process export of the same (joined) checkpoint."""
    from diffusers.training_utils import EMAModel

    from jedi_train.export.to_pipeline import export_checkpoint
    from jedi_train.pipelines.auto import JeDiAutoPipeline

    run = tmp_path / "run"
    run_jedi("jedi-train", *RUN, "trainer.max_steps=1", "export_after_fit=false", f"paths.output_dir={run}",
             root=tmp_path)
    ckpts = run / "checkpoints"
    first = tmp_path / "step1.ckpt"
    shutil.copytree(ckpts / "last.ckpt", first)  # the next run replaces last.ckpt
    # the distributed-checkpoint layout: one file of slices per rank, DCP's index, Lightning's metadata
    assert sorted(os.listdir(first)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    sizes = [os.path.getsize(first / f"__{r}_0.distcp") for r in (0, 1)]
    assert all(0.4 < s / sum(sizes) < 0.6 for s in sizes)  # each rank wrote about half
    a = load_checkpoint(str(first))
    assert a["global_step"] == 1 and a["ema"]["optimization_step"] == 1

    p = run_jedi("jedi-train", *RUN, "trainer.max_steps=2", "export_after_fit=true", f"paths.output_dir={run}",
                 root=tmp_path)
    assert "Restoring states from the checkpoint path" in p.stdout + p.stderr
    assert not [f for f in os.listdir(ckpts) if ".partial-" in f]  # written aside, renamed into place
    last = str(ckpts / "last.ckpt")
    b, whole = load_checkpoint(last), _torch_join(last)
    assert checkpoint_step(last) == b["global_step"] == 2
    assert {int(s["step"]) for s in whole["optimizer_0"]["state"].values()} == {2}  # AdamW resumed, not anew
    names = b["trained_names"]
    weights = {n: b["state_dict"][f"denoiser.{n}"] for n in names}
    for n, ema in zip(names, b["ema"]["shadow_params"]):  # our joining == torch's
        assert torch.equal(weights[n], whole["state_dict"][f"denoiser.{n}"]) and torch.equal(ema, whole["ema_shadow"][n])
    d = EMAModel([torch.zeros(1)], decay=b["ema"]["decay"]).get_decay(2)
    moved = 0.0
    for n, ema_a, ema_b in zip(names, a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        # the resumed slices continue exactly: EMA_2 = d * EMA_1 + (1 - d) * W_2
        torch.testing.assert_close(ema_b, d * ema_a + (1 - d) * weights[n], rtol=1e-5, atol=1e-7)
        moved = max(moved, float((weights[n] - a["state_dict"][f"denoiser.{n}"]).abs().max()))
    assert moved > 0  # step 2 trained

    # export_after_fit joined the shards; a single-process export of the same weights (one .ckpt file) is identical
    single = tmp_path / "single.ckpt"
    torch.save(b, single)
    fsdp_unet = JeDiAutoPipeline.from_pretrained(str(run / "pipeline")).unet.state_dict()
    single_unet = JeDiAutoPipeline.from_pretrained(export_checkpoint(str(single), str(tmp_path / "p1"))).unet.state_dict()
    assert fsdp_unet.keys() == single_unet.keys()
    assert all(torch.equal(fsdp_unet[k], single_unet[k]) for k in fsdp_unet)
    for n, ema in zip(names, b["ema"]["shadow_params"]):
        assert torch.equal(fsdp_unet[n].float(), ema)  # the EMA, joined from both ranks


def test_dry_run_counts_fsdp_like_zero3(tmp_path, tiny_model_dir):
    def _dry(overrides):
        return estimate(compose_train(["experiment=demo", f"model.model_dir={tiny_model_dir}", "trainer.devices=8",
                                       *overrides], tmp_path))

    fsdp, zero3 = _dry(["strategy=fsdp"]), _dry(["strategy=deepspeed_zero3"])
    assert fsdp["fsdp"] and fsdp["per_rank"] == zero3["per_rank"]  # weights, gradients, AdamW, EMA: all / 8
    assert fsdp["per_rank"]["gradients (fp32)"] == 4 * fsdp["trained"] / 8
    ddp = _dry(["strategy=ddp"])
    assert ddp["per_rank"]["AdamW states (fp32)"] == 8 * fsdp["per_rank"]["AdamW states (fp32)"]
    lora, lora_ddp = _dry(["strategy=fsdp", "model.lora.rank=4"]), _dry(["strategy=ddp", "model.lora.rank=4"])
    base = "frozen base of the denoiser (float32)"
    assert lora["per_rank"][base] == lora_ddp["per_rank"][base] / 8  # fully_shard shards the frozen base too
    assert lora["frozen_base"] > 0 and lora["per_rank"] == _dry(["strategy=deepspeed_zero3", "model.lora.rank=4"])["per_rank"]


def test_fsdp_refusals_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="model.lora.base_dtype=null or use strategy=deepspeed_zero2"):
        check_strategy(compose_train(["strategy=fsdp", "model.lora.rank=4", "model.lora.base_dtype=bfloat16"], tmp_path))
    with pytest.raises(ValueError, match="use model/optimizer=adamw with strategy=fsdp"):
        check_strategy(compose_train(["strategy=fsdp", "model/optimizer=adamw8bit"], tmp_path))
    with pytest.raises(ValueError, match="trainer.precision=16-mixed does not work with strategy=fsdp"):
        check_strategy(compose_train(["strategy=fsdp", "trainer.precision=16-mixed"], tmp_path))
    check_strategy(compose_train(["strategy=fsdp", "model.lora.rank=4"], tmp_path))  # a LoRA in fp32: fine
    sharded = tmp_path / "last.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")
    with pytest.raises(ValueError, match="is a sharded checkpoint of strategy=fsdp; resume it with strategy=fsdp"):
        check_resume_strategy(compose_train(["strategy=ddp"], tmp_path), str(sharded))
    check_resume_strategy(compose_train(["strategy=fsdp"], tmp_path), str(sharded))
    import torch.distributed.fsdp as fsdp_module

    monkeypatch.delattr(fsdp_module, "fully_shard")  # a torch without FSDP2
    with pytest.raises(ValueError, match=r"needs FSDP2 \(torch.distributed.fsdp.fully_shard"):
        check_strategy(compose_train(["strategy=fsdp"], tmp_path))
    monkeypatch.undo()
    p = cli("jedi-train", "strategy=fsdp", "model.lora.rank=4", "model.lora.base_dtype=float8_e4m3fn",
            f"paths.output_dir={tmp_path}/run", cwd=tmp_path)
    assert "strategy=fsdp" in one_line_error(p, "jedi-train")


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_sharded_checkpoint_whose_index_runs_code_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "last.ckpt"
    ckpt.mkdir()
    torch.save({"global_step": 5}, ckpt / "meta.pt")
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Boom()))
    for read in (checkpoint_step, load_checkpoint):
        with pytest.raises(UnsafeCheckpointError, match=r"\.metadata holds a Python object \(posix.system\)"):
            read(str(ckpt))
    assert not (tmp_path / "pwned.txt").exists()
