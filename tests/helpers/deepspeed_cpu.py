"""Test-only: Lightning's DeepSpeedStrategy on CPU (gloo), so real ZeRO checkpoints are written in CI.

Lightning refuses DeepSpeed without CUDA. Three narrow overrides (see ../shared/ENVIRONMENT.md):
skip the CUDA accelerator check, skip device-index validation, and put the root device on CPU.
"""
import os

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy

from jedi_train.training.strategies import AtomicDeepSpeedStrategy

os.environ.setdefault("DS_ACCELERATOR", "cpu")


class CPUDeepSpeedStrategy(AtomicDeepSpeedStrategy):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's version raises without CUDA

    def setup_distributed(self) -> None:
        reset_seed()  # as DeepSpeedStrategy, minus the CUDA device-index validation
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)
