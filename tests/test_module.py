"""The LightningModule on its own (in-memory batches): exact resume, NaN guard, EMA in checkpoints."""
import lightning as L
import pytest
import torch
from helpers.tiny_module import SameSets, make_module
from torch.utils.data import DataLoader

from jedi_train.training.callbacks import Checkpoint
from jedi_train.training.module import JeDiModule


def _fit(module, steps, ckpt_dir=None, ckpt_path=None, nan_from=None, root=None):
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]) if outputs else None)

    callbacks = [Record()] + ([Checkpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=100)]
                              if ckpt_dir else [])
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, callbacks=callbacks,
                        enable_checkpointing=ckpt_dir is not None, default_root_dir=ckpt_dir or root,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(SameSets(module.components.tokenizer, nan_from), batch_size=2),
                ckpt_path=ckpt_path)
    return losses, trainer


def test_resumed_run_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    full, _ = _fit(make_module(tiny_model_dir), 4)
    first, _ = _fit(make_module(tiny_model_dir), 2, ckpt_dir=tmp_path)  # last.ckpt written at stop (step 2)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and "ema" in ckpt and ckpt["lr_schedulers"]
    rest, _ = _fit(make_module(tiny_model_dir), 4, ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(first + rest) == 4
    assert max(abs(a - b) for a, b in zip(full, first + rest)) < 1e-6
    assert full[0] != full[-1]  # the weights did move


def test_nonfinite_losses_are_skipped_then_stop_the_run(tiny_model_dir):
    module = make_module(tiny_model_dir, max_nonfinite_steps=3)
    before = {k: v.clone() for k, v in module.unet.state_dict().items()}
    with pytest.raises(RuntimeError, match="NaN/inf for 3 steps in a row"):
        _fit(module, 10, nan_from=0)
    assert module.nonfinite_total == 3
    assert all(torch.equal(before[k], v) for k, v in module.unet.state_dict().items())  # no step was taken


def test_frozen_parts_stay_out_of_the_optimizer_and_checkpoint(tiny_model_dir):
    module = make_module(tiny_model_dir)
    names = set(module.state_dict())
    assert names and all(n.startswith("unet.") for n in names)  # text encoder / VAE not saved or sharded
    opt = module.configure_optimizers  # needs a trainer for max_steps: check the parameter set instead
    trainable = {id(p) for p in module.unet.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in module.components.text_encoder.parameters())
    assert len(trainable) == len(list(module.unet.parameters())) and callable(opt)


def test_trainable_prefixes_limit_what_trains(tiny_model_dir):
    module = make_module(tiny_model_dir, trainable=["conv_in", "down_blocks.1.attentions"])
    trained = [n for n, p in module.unet.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith(("conv_in", "down_blocks.1.attentions")) for n in trained)


def test_sample_grid_is_skipped_with_a_warning_under_zero3(tmp_path):
    from types import SimpleNamespace

    from jedi_train.training.callbacks import SampleGridCallback

    cb = SampleGridCallback(out_dir=str(tmp_path))
    cb.sets = [{"refs": [], "truth": [], "prompts": ["x"]}]  # something to render
    trainer = SimpleNamespace(strategy=SimpleNamespace(zero_stage_3=True), global_step=5, loggers=[])
    with pytest.warns(UserWarning, match="ZeRO-3"):
        assert cb.render(trainer, pl_module=None) is None
    assert not list(tmp_path.iterdir())


def test_optimizer_and_schedule_come_from_their_partial_configs(tiny_model_dir):
    """model.optimizer / model.lr_scheduler are `_partial_` configs: any optimizer class, any diffusers schedule."""
    m = JeDiModule(model_dir=tiny_model_dir, optimizer={"_target_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9},
                   lr_scheduler={"name": "linear", "num_warmup_steps": 2})
    m.trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    out = m.configure_optimizers()
    opt, sch = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    trained = {id(p) for p in m.unet.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trained
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    # linear warmup over 2 steps, then linear decay to 0 at max_steps = 6
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.375, 0.25, 0.125])
