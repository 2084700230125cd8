"""The console scripts as a user runs them: run_jedi (a jedi-* script in its own process (helpers.zygote), W&B offline, JEDI_ROOT
set), FAST (demo overrides for a few-step run) and losses (a run's loss_curve.csv); cli / one_line_error
(bad input: exit 2 and one error line); compose_train (the train config, composed and resolved in-process)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from jedi_train.train import CONF_DIR

from . import zygote

BIN = Path(sys.executable).parent
FAST = ["experiment=demo", "data.synthesize_if_missing.num_sets=64", "data.heldout_synthesize_if_missing.num_sets=4",
        "data.batch_size=4", "callbacks.sample_grid.every_n_steps=4", "callbacks.sample_grid.num_sets=2",
        "callbacks.sample_grid.num_inference_steps=2", "callbacks.model_checkpoint.every_n_train_steps=2",
        "trainer.log_every_n_steps=1", "callbacks.loss_curve.every_n_steps=2", "model.lr_scheduler.num_warmup_steps=2",
        "callbacks.identity_gain.num_sets=4", "callbacks.identity_gain.train_num_sets=4", "callbacks.identity_gain.seeds=[0]"]


def run_jedi(tool: str, *args: str, root: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "JEDI_ROOT": str(root), "WANDB_MODE": "offline", "WANDB_API_KEY": "",
           "HYDRA_FULL_ERROR": "0"}
    p = zygote.run([str(BIN / tool), *args], env=env, cwd=root, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def losses(run_dir: Path) -> list[tuple[int, float, str]]:
    with open(run_dir / "loss_curve.csv") as f:
        return [(int(r["step"]), float(r["loss"]), r["sets"]) for r in csv.DictReader(f)]


def cli(tool, *args, cwd, timeout=300):
    env = {**os.environ, "JEDI_ROOT": str(cwd), "WANDB_MODE": "offline", "WANDB_API_KEY": "", "HYDRA_FULL_ERROR": "0",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return zygote.run([os.path.join(BIN, tool), *map(str, args)], env=env, cwd=cwd, timeout=timeout)


def one_line_error(p, tool):
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith((f"{tool}: error:", f"{tool}: refusing")), p.stderr[-3000:]
    return last


def compose_train(overrides, tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.root_dir = str(tmp_path)
            del cfg["hydra"]  # read-only; its interpolations are resolved through HydraConfig above
        OmegaConf.resolve(cfg)
        return cfg
