"""jedi-train / jedi-export for the safety tests (test_safety_train, test_safety_export): ARGS (the base config,
tiny pixel model on CPU, on the shards make_root writes; no W&B, grids or identity gain), env, and
run_safety_jedi (a console script in a subprocess with that env: one OpenMP thread, HF offline)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from . import zygote

BIN = Path(sys.executable).parent
# the base config (tiny pixel model, CPU) on the shards make_root writes; no W&B, grids or identity gain
ARGS = ["logger=csv", "~callbacks.sample_grid", "~callbacks.identity_gain", "~callbacks.progress",
        "trainer.enable_progress_bar=false", "data.sources=[{url: '${paths.data_dir}/sets/safety/*.tar'}]",
        "data.heldout_sources=null", "data.synthesize_if_missing=null", "data.min_set=2", "data.max_set=4",
        "data.batch_size=2", "model.objective.subject_loss_weight=1.0", "trainer.log_every_n_steps=1",
        "callbacks.loss_curve.every_n_steps=1", "export_after_fit=false"]


def env(root: Path) -> dict:
    return {**os.environ, "JEDI_ROOT": str(root), "WANDB_MODE": "offline", "WANDB_API_KEY": "", "HYDRA_FULL_ERROR": "0",
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_safety_jedi(tool: str, *args, root: Path, check: bool = True) -> subprocess.CompletedProcess:
    p = zygote.run([str(BIN / tool), *map(str, args)], env=env(root), cwd=root, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def make_root(root: Path) -> Path:
    """A JEDI_ROOT with a few training shards (where ARGS points the data config)."""
    sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/
    from helpers.stream_helpers import write_shards

    write_shards(str(root / "data" / "sets" / "safety"), num_shards=2, sets_per_shard=16, set_sizes=(2, 3, 4))
    return root
