"""Fit JeDiModule on in-memory sets with a given strategy; run as a script (DDP re-launches it).

usage: fit_tiny.py MODEL_DIR OUT_DIR STRATEGY DEVICES STEPS [lora] [resume=CKPT]   (STRATEGY: ddp | zero2 |
       zero3; lora: a rank-4 LoRA instead of the full fine-tune; resume: continue from that checkpoint)
Writes OUT_DIR/checkpoints/last.ckpt (a file, or a ZeRO directory) and OUT_DIR/result_rank<r>.json (with the
number of EMA elements this rank holds).
"""
import json
import os
import sys

import lightning as L
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from helpers.deepspeed_cpu import CPUDeepSpeedStrategy
from helpers.tiny_module import SameSets, make_module
from jedi_train.training.callbacks import Checkpoint


def main():
    model_dir, out, strategy, devices, steps = sys.argv[1:6]
    # exclude_frozen_parameters as conf/strategy/deepspeed_zero2.yaml sets it
    strat = {"ddp": lambda: "ddp", "zero2": lambda: CPUDeepSpeedStrategy(stage=2, exclude_frozen_parameters=True),
             "zero3": lambda: CPUDeepSpeedStrategy(stage=3, exclude_frozen_parameters=True)}[strategy]()
    extra = sys.argv[6:]
    lora = {"lora": {"rank": 4}} if "lora" in extra else {}
    resume = next((a.split("=", 1)[1] for a in extra if a.startswith("resume=")), None)
    module = make_module(model_dir, **lora)
    trainer = L.Trainer(max_steps=int(steps), accelerator="cpu", devices=int(devices), strategy=strat,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                        callbacks=[Checkpoint(dirpath=os.path.join(out, "checkpoints"), save_last=True,
                                              every_n_train_steps=1000)])
    trainer.fit(module, DataLoader(SameSets(module.components.tokenizer), batch_size=2), ckpt_path=resume)
    with open(os.path.join(out, f"result_rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"global_step": trainer.global_step, "world_size": trainer.world_size,
                   "loss": float(trainer.callback_metrics["train/loss"]),
                   "ema_numel": sum(t.numel() for t in module.ema.shadow_params)}, f)


if __name__ == "__main__":
    main()
