"""Exact mid-epoch resume: where each worker is, what a checkpoint stores, the loader that uses it.

A DataLoader over an IterableDataset hands out batches round-robin over its workers (in order,
an exhausted worker dropping out). So the global order is reproducible from:
  - the epoch, and each worker's position after its last CONSUMED batch (a `Cursor`), and
  - which worker comes next: after a resume, DataLoader worker 0 plays that worker (`rotation`).
"Consumed" matters: Lightning fetches one batch ahead, so the loader cannot count what it handed
out; the DataModule reports each batch the model actually receives (`consume`).
"""
from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from torch.utils.data import DataLoader

from data_pipelines.skips import merge

log = logging.getLogger("data_pipelines.stream")
STATE_VERSION = 1


@dataclass
class Cursor:
    """One worker's position in its epoch: the start of the current shuffle block and how far into it."""
    pass_no: int = 0    # epoch mode: passes over this worker's shards (a short worker starts another)
    shard_no: int = 0   # index in the pass's shard list (resampled: the shard draw number)
    sample_no: int = 0  # raw samples of that shard before the block start (skipped unread on resume)
    block_no: int = 0   # shuffle blocks before this one
    taken: int = 0      # items of this block already processed
    batches: int = 0    # batches this worker has yielded this epoch


@dataclass
class StreamState:
    """What one rank's checkpoint holds. Plain ints/dicts: safe in any checkpoint format."""
    epoch: int = 0
    batches: int = 0                                       # consumed this epoch (this rank)
    next_worker: int = 0
    cursors: dict[int, dict] = field(default_factory=dict)  # worker -> Cursor fields
    skipped: dict[str, int] = field(default_factory=dict)   # totals before this epoch / resume
    repaired: dict[str, int] = field(default_factory=dict)
    worker_skipped: dict[int, dict] = field(default_factory=dict)   # this epoch, per worker
    worker_repaired: dict[int, dict] = field(default_factory=dict)

    def skip_counts(self) -> dict[str, int]:
        return merge(self.skipped, *self.worker_skipped.values())

    def repair_counts(self) -> dict[str, int]:
        return merge(self.repaired, *self.worker_repaired.values())

    def fold_counts(self) -> None:
        """Per-worker counters restart with the workers (new epoch, resume): fold them into the totals."""
        self.skipped, self.repaired = self.skip_counts(), self.repair_counts()
        self.worker_skipped, self.worker_repaired = {}, {}

    def next_epoch(self) -> None:
        self.fold_counts()
        self.epoch, self.batches, self.next_worker, self.cursors = self.epoch + 1, 0, 0, {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamState:
        s = cls(**d)
        s.cursors = {int(k): dict(v) for k, v in s.cursors.items()}
        s.worker_skipped = {int(k): dict(v) for k, v in s.worker_skipped.items()}
        s.worker_repaired = {int(k): dict(v) for k, v in s.worker_repaired.items()}
        return s


def ignore_requeue_signal(_worker_id: int) -> None:
    """SLURM sends SIGUSR1 to every process of the step before the time limit; the main process saves
    and requeues (Lightning), a dataloader worker would just die of it (default action) and crash the run."""
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class ResumableLoader:
    """A DataLoader over a `SetStream` that continues where consumption stopped, on every `iter()`.

    `auto_consume=True`: a batch counts as consumed when it is yielded (plain loops). The DataModule
    uses False and calls `consume(batch)` from `on_before_batch_transfer`. Deliberately not named
    state_dict/load_state_dict: Lightning would otherwise also treat it as a stateful loader.
    """

    def __init__(self, stream, num_workers: int = 0, prefetch_factor: int | None = 2, pin_memory: bool = False,
                 auto_consume: bool = True, state: StreamState | None = None):
        if num_workers != stream.num_workers:
            raise ValueError(f"the stream was built for {stream.num_workers} workers, the loader has {num_workers}")
        self.stream, self.num_workers, self.auto_consume = stream, num_workers, auto_consume
        self.prefetch_factor = prefetch_factor if num_workers else None
        self.pin_memory = pin_memory
        self.state = state or StreamState()

    def __len__(self) -> int:
        return self.stream.batches_per_rank

    def __iter__(self) -> Iterator[dict]:
        st = self.state
        if st.batches >= len(self):
            st.next_epoch()
        st.fold_counts()  # the workers about to start count from zero
        self.stream.plan_epoch(st.epoch, st.cursors, st.next_worker)
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                            persistent_workers=False,  # workers must see each epoch's plan
                            worker_init_fn=ignore_requeue_signal if self.num_workers else None)
        for batch in loader:
            if self.auto_consume:
                self.consume(batch)
            yield batch

    def consume(self, batch: dict) -> dict:
        """Record that `batch` reached the model; removes its `_stream` entry."""
        meta = batch.pop("_stream", None)
        if meta is None:
            return batch
        st, w = self.state, int(meta["worker"])
        st.batches += 1
        st.cursors[w] = dict(meta["cursor"])
        st.next_worker = (w + 1) % max(1, self.num_workers)
        st.worker_skipped[w], st.worker_repaired[w] = dict(meta["skipped"]), dict(meta["repaired"])
        return batch

    def skip_counts(self) -> dict[str, int]:
        return self.state.skip_counts()

    def repair_counts(self) -> dict[str, int]:
        return self.state.repair_counts()
