"""The training EMA: one update per optimizer step, saved with its own step; the ZeRO-3 slices' merge and
refusals (the 2-rank ZeRO-3 run itself is in test_distributed.py)."""
import lightning as L
import pytest
import torch
from helpers.tiny_module import SameSets, make_module
from torch.utils.data import DataLoader

from jedi_train.training.callbacks import Checkpoint
from jedi_train.training.ema import TrainingEMA, merge_partitions


def _slices(whole: list[torch.Tensor], world: int) -> list[dict]:
    """What `partition` leaves on each rank: DeepSpeed's layout, rank r holds flat[r*P:(r+1)*P], zero-padded."""
    states = []
    for r in range(world):
        shadow = []
        for t in whole:
            size = -(-t.numel() // world)
            piece = torch.zeros(size)
            flat = t.flatten()[r * size:(r + 1) * size]
            piece[:flat.numel()] = flat
            shadow.append(piece)
        states.append({"decay": 0.9, "optimization_step": 7, "shadow_params": shadow,
                       "partition": {"rank": r, "world_size": world, "shapes": [list(t.shape) for t in whole]}})
    return states


def test_slices_merge_back_to_the_whole_ema():
    whole = [torch.randn(3, 5), torch.randn(7), torch.randn(2, 2, 3)]
    merged = merge_partitions(list(reversed(_slices(whole, 4))))  # in any order
    assert merged["optimization_step"] == 7 and "partition" not in merged
    assert all(torch.equal(a, b) for a, b in zip(whole, merged["shadow_params"]))


def test_missing_slices_and_other_ranks_are_refused():
    states = _slices([torch.randn(10)], 3)
    with pytest.raises(ValueError, match=r"ranks \[0, 2\] of a 3-rank ZeRO-3 run; it is incomplete"):
        merge_partitions([states[0], states[2]])
    ema = TrainingEMA([torch.nn.Parameter(torch.zeros(10))])
    with pytest.raises(ValueError, match="rank 1's slice of a ZeRO-3 run over 3 ranks, this is rank 0 of 1"):
        ema.load_state_dict(states[1])


def test_ema_steps_once_per_optimizer_step_and_checkpoints_hold_their_step(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir)
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Checkpoint(dirpath=tmp_path, save_last=False, every_n_train_steps=2,
                                              filename="step{step}", auto_insert_metric_name=False)])
    trainer.fit(module, DataLoader(SameSets(module.components.tokenizer), batch_size=2))
    assert trainer.global_step == 3 and module.ema.optimization_step == 3  # 6 batches, 3 steps
    periodic = torch.load(tmp_path / "step2.ckpt", weights_only=False)  # saved in a batch-end hook
    assert periodic["global_step"] == 2 and periodic["ema"]["optimization_step"] == 2
