"""Low-memory training (issue 15, part 3): a LoRA run's frozen base stored in bf16 / fp8, 8-bit AdamW's errors.

The base's Linear/Conv weights are kept in the storage dtype and upcast when read (lora.store_base_in), so
the adapter trains in fp32; the end-of-training export fuses into the full-precision base from disk.
"""
from __future__ import annotations

import pytest
import torch
from helpers.batches import set_batch

from jedi_train.training.module import JeDiModule

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(model_dir, base_dtype=None, rank=4, **kw):
    return JeDiModule(model_dir=model_dir, lora={"rank": rank, "base_dtype": base_dtype}, ema={"enabled": True},
                      **kw)


def _batch(module, sets=2, n=3, seed=0):
    ids = module.components.text.token_ids(["a photo of a toy on the beach"] * n)
    return set_batch(ids.expand(sets, *ids.shape).clone(), sets, n, module.resolution, seed)


def _loss(module, batch, seed=0):
    return module.objective(batch, generator=torch.Generator().manual_seed(seed))["loss"]


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype,ratio", [("bfloat16", 0.5), ("float8_e4m3fn", 0.25)])
def test_the_frozen_base_is_stored_in_low_precision_and_the_adapter_still_trains(tiny_model_dir, dtype, ratio):
    full, low = _module(tiny_model_dir), _module(tiny_model_dir, dtype)
    frozen = [n for n, p in low.unet.named_parameters() if not p.requires_grad]
    kept = dict(full.unet.named_parameters())
    stored = {n: p for n, p in low.unet.named_parameters() if not p.requires_grad}
    cast = [n for n in frozen if stored[n].dtype == getattr(torch, dtype)]
    assert any(".to_q.base_layer." in n for n in cast) and any("conv" in n for n in cast)
    plain = [n.replace("parametrizations.weight.original", "weight") for n in cast]  # the name without storage
    assert _bytes(stored[n] for n in cast) == pytest.approx(ratio * _bytes(kept[n] for n in plain))
    assert low.strict_loading is False  # a LoRA checkpoint holds the trained weights only: resume loads it partially
    for n, p in low.unet.named_parameters():  # what trains stays fp32
        if p.requires_grad:
            assert p.dtype == torch.float32 and ("lora_" in n or n.startswith("conv_in.")), n

    batch = _batch(low)
    ref, loss = _loss(full, batch), _loss(low, batch)
    tol = {"bfloat16": 0.005, "float8_e4m3fn": 0.02}[dtype]  # the base's rounding, nothing else (seen: 1e-4, 1.4e-3)
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= tol * ref.item()
    loss.backward()
    grads = [p.grad for n, p in low.unet.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(stored[n].dtype == getattr(torch, dtype) for n in cast)  # back in storage after the forward


def test_the_end_of_training_export_fuses_into_the_full_precision_base(tiny_model_dir, tmp_path):
    from jedi_train.export.to_pipeline import export_module
    from jedi_train.pipelines.pipeline_jedi import JeDiPipeline

    low, full = _module(tiny_model_dir, "float8_e4m3fn"), _module(tiny_model_dir)
    with torch.no_grad():
        for (n, p), (_, q) in zip(low.unet.named_parameters(), full.unet.named_parameters()):
            if p.requires_grad:  # the same "trained" adapter in both
                p.add_(0.01 * torch.randn_like(p))
                q.copy_(p)
    a = JeDiPipeline.from_pretrained(export_module(low, str(tmp_path / "a"), use_ema=False)).unet.state_dict()
    b = JeDiPipeline.from_pretrained(export_module(full, str(tmp_path / "b"), use_ema=False)).unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # not fused into fp8-rounded weights


def test_bad_low_memory_settings_are_one_clear_error(tiny_model_dir):
    with pytest.raises(ValueError, match=r"base_dtype.*model.lora.rank > 0"):
        _module(tiny_model_dir, "bfloat16", rank=0)
    with pytest.raises(ValueError, match=r"base_dtype='int3' is not supported; use one of bfloat16"):
        _module(tiny_model_dir, "int3")
    m = JeDiModule(model_dir=tiny_model_dir, optimizer={"_target_": "jedi_train.training.module.adamw_8bit", "lr": 1e-3})
    with pytest.raises(ValueError, match=r"adamw8bit (needs bitsandbytes: pip install 'jedi-train\[adam8bit\]'|runs on CUDA)"):
        m.configure_optimizers()
    with pytest.raises(ValueError, match=r"model.optimizer._target_='torch.optim.SGDX' could not be built .*"
                                         r"use a class path such as torch.optim.AdamW"):
        JeDiModule(model_dir=tiny_model_dir, optimizer={"_target_": "torch.optim.SGDX"}).configure_optimizers()
    with pytest.raises(ValueError, match=r"model.optimizer.name is gone: choose the optimizer with "
                                         r"model/optimizer=adamw"):
        JeDiModule(model_dir=tiny_model_dir, optimizer={"name": "adamw8bit"}).configure_optimizers()
