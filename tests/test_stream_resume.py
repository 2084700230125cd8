"""Exact mid-epoch resume: an interrupted + restored stream yields exactly what an uninterrupted one
would have yielded next (same sets, same order, same crops and references), with 2 workers and 2
ranks (rank passed explicitly), in epoch and resampled modes, across epoch boundaries and with bad
data in the shards."""
import json
import os
from pathlib import Path

import pytest
import torch
from helpers.stream_helpers import write_shards

from data_pipelines.resume import ResumableLoader, StreamState
from data_pipelines.stream import SetStream, StreamConfig

WORKERS, WORLD = 2, 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume_shards")
    paths = write_shards(str(d), num_shards=6, sets_per_shard=7, set_sizes=(1, 2, 3, 4, 5), size=16)
    raw = Path(paths[2]).read_bytes()  # a truncated shard: partial last sample, counted skips
    Path(paths[2]).write_bytes(raw[: int(len(raw) * 0.6)])
    return str(d)


def make_loader(shards, rank, resampled, state=None, batch_size=3, workers=WORKERS):
    cfg = StreamConfig(sources=os.path.join(shards, "*.tar"), resolution=16, min_image_size=4, batch_size=batch_size,
                       shuffle_buffer=5, resampled=resampled, epoch_sets=42, seed=7, crop="random", flip_prob=0.5)
    stream = SetStream(cfg, tokenize=lambda caps: torch.tensor([[len(c), hash(c) % 997] for c in caps]),
                       rank=rank, world_size=WORLD, num_workers=workers)
    return ResumableLoader(stream, workers, state=state)


def take(loader, n):
    out, it = [], iter(loader)
    while len(out) < n:
        try:
            b = next(it)
        except StopIteration:  # epoch end: the next iter() starts the next epoch
            it = iter(loader)
            continue
        out.append(b)
    it.close()
    return out


def signature(batch):
    return (tuple(batch["set_id"]), batch["is_ref"].tolist(), batch["valid"].tolist(),
            float(batch["pixel_values"].double().sum()), batch["input_ids"].tolist())


@pytest.mark.parametrize("resampled", [False, True], ids=["epoch", "resampled"])
def test_interrupted_and_resumed_equals_uninterrupted(shards, resampled):
    total = 17  # batches per rank: 42 sets // (2 ranks x 3) = 7 per epoch -> crosses two epoch boundaries
    for rank in range(WORLD):
        full = take(make_loader(shards, rank, resampled), total)
        assert len({b["set_id"][0] for b in full}) > 3
        for stop in (3, 6, 7, 8, 12):  # mid-epoch (either next worker; 6: one worker done), epoch end, after
            first = make_loader(shards, rank, resampled)
            head = take(first, stop)
            state = json.loads(json.dumps(first.state.to_dict()))  # what a checkpoint stores
            resumed = make_loader(shards, rank, resampled, state=StreamState.from_dict(state))
            tail = take(resumed, total - stop)
            got = [signature(b) for b in head + tail]
            want = [signature(b) for b in full]
            assert [g[0] for g in got] == [w[0] for w in want], f"rank {rank} stop {stop}: set order differs"
            assert got == want, f"rank {rank} stop {stop}: same sets but different crops/refs/tokens"
            # skip counters continue instead of restarting or double counting
            assert resumed.skip_counts() == make_counts(shards, rank, resampled, total)


def make_counts(shards, rank, resampled, total):
    loader = make_loader(shards, rank, resampled)
    take(loader, total)
    return loader.skip_counts()


def test_ranks_get_disjoint_sets_and_equal_steps(tmp_path):
    write_shards(str(tmp_path), num_shards=8, sets_per_shard=6, set_sizes=(2, 3), size=16)
    seen = []
    for rank in range(WORLD):
        loader = make_loader(str(tmp_path), rank, resampled=False)
        loader.stream.cfg.epoch_sets = None
        loader.stream.__init__(loader.stream.cfg, rank=rank, world_size=WORLD, num_workers=WORKERS)  # count sets
        batches = list(loader)
        assert len(batches) == len(loader) == 48 // (WORLD * 3)  # per rank, not per worker
        seen += [s for b in batches for s in b["set_id"]]
    assert len(seen) == len(set(seen)) == 48  # every set exactly once per epoch over ranks x workers


def test_too_few_shards_for_ranks_x_workers_is_a_clear_error(tmp_path):
    write_shards(str(tmp_path), num_shards=3, sets_per_shard=4, size=16)
    with pytest.raises(ValueError, match="3 shards < 2 ranks x 2 workers"):
        make_loader(str(tmp_path), 0, resampled=False)
    make_loader(str(tmp_path), 0, resampled=True)  # resampled mode draws shards: fine
