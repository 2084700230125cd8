"""Lightning strategies as jedi-train configures them (conf/strategy/).

`AtomicDeepSpeedStrategy`: DeepSpeed writes a checkpoint as a directory of per-rank shards, in place, so
a kill mid-save leaves a half-written directory under the checkpoint's name. Here every rank writes into
a hidden temp dir beside it and rank 0 renames it into place once all ranks are done: a kill leaves the
previous checkpoint intact and a hidden temp dir that the next start removes (checkpoints.remove_partials).
"""
from __future__ import annotations

import os
import shutil

from lightning.pytorch.strategies import DeepSpeedStrategy

from jedi_common.atomic import PARTIAL, publish


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy whose checkpoint directories appear complete or not at all (see module doc)."""

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        filepath = self.broadcast(os.fspath(filepath))
        if "://" in filepath:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        directory, name = os.path.split(os.path.abspath(filepath))
        tmp = os.path.join(directory, f".{name}{PARTIAL}zero")  # one name on every rank
        if self.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)  # a save killed before
            os.makedirs(directory, exist_ok=True)
        self.barrier("jedi_checkpoint_start")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("jedi_checkpoint_written")  # every rank's shards are on disk
        if self.is_global_zero:
            publish(tmp, filepath)
        self.barrier("jedi_checkpoint_published")
