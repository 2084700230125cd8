"""The training stream: WebDataset shards of sets -> padded batches of sets, resumable exactly.

Each DataLoader worker runs one chain of stages (see `SetStream.worker_stream`):

    urls -> split by node/worker -> tar -> validate keys -> shuffle (blocks) -> decode/repair ->
    resize/crop/flip -> subsample set -> choose references [-> cached encodings] -> tokenize -> batch (padded)

Cached encodings (`jedi-data encode`): with `cache_fingerprint` set, sets cached for that model bring
their latents + text embeddings (the centre crop: random crops and flips are refused) and a batch
of such sets carries them; other sets are encoded on the fly by the objective.

Everything a worker yields is a deterministic function of (seed, epoch, rank, worker, position):
its shard list, the shuffle of each block of `shuffle_buffer` samples and each set's random choices
are seeded from those numbers only. Each batch carries the worker's position after it (a `Cursor`);
a resumed worker skips to that position at the raw-tar level (no decoding) and goes on with exactly
the next set. Why blocks instead of webdataset's rolling shuffle buffer: a rolling buffer's content
depends on everything read since the epoch began, a block's only on where it starts.

Epoch mode: each epoch, shards are shuffled with (seed, epoch) and dealt to ranks, then workers
(webdataset's split_by_node / split_by_worker do the same dealing, but from the environment; here
rank and worker must be explicit inputs to be replayable). Every rank yields the same number of
batches per epoch (`batches_per_rank`, from the set count), so DDP ranks never wait on each other: a
worker whose shards run out starts another pass over them, reshuffled. Resampled mode: each worker
draws shards with replacement, a source's probability proportional to its weight.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_pipelines.resume import Cursor
from data_pipelines.schema import validate_sample
from data_pipelines.sets import SetOptions, collate_sets, load_set
from data_pipelines.shards import count_samples, expand_sources, read_tar
from data_pipelines.skips import Counts

log = logging.getLogger("data_pipelines.stream")
_SHARD_ORDER, _SHARD_DRAW, _PASS, _BLOCK, _ITEM = range(5)  # rng stream tags


@dataclass
class StreamConfig(SetOptions):
    sources: Any = None             # pattern | [pattern, ...] | [{url: pattern, weight: w}, ...]
    batch_size: int = 4             # sets per batch (per rank)
    resampled: bool = False         # infinite weighted shard sampling instead of epochs over the shards
    shuffle_buffer: int = 64        # sets shuffled together (a block); 1 = stream order
    shardshuffle: bool = True       # shuffle shard order each epoch
    epoch_sets: int | None = None   # sets per epoch (all ranks); None = counted from local tar headers
    allow_pipe: bool = False        # pipe: URLs run shell commands
    seed: int = 0
    log_every_s: float = 60.0       # skip log lines at most this often (plus the first of each reason)
    # a held-out split (heldout.py): sets (ids) and subjects kept out of this stream, or the only ones in it
    exclude_sets: frozenset | None = None
    exclude_subjects: frozenset | None = None
    only_sets: frozenset | None = None


class CachedTokenize:
    """Captions repeat (templates, padding ""): tokenize each distinct caption once per worker."""

    def __init__(self, tokenize: Callable[[list[str]], torch.Tensor], max_items: int = 100_000):
        self.tokenize, self.max_items, self.cache = tokenize, max_items, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            if len(self.cache) + len(missing) > self.max_items:
                self.cache.clear()
            self.cache.update(zip(missing, self.tokenize(missing)))
        return torch.stack([self.cache[c] for c in captions])


def check_cache_options(opt: SetOptions) -> None:
    """Cached latents are the centre crop, unflipped: random crops / flips would train on other pixels."""
    if opt.crop != "center" or opt.flip_prob:
        raise ValueError(f"the shards hold cached latents of the centre crop, but data.crop={opt.crop} "
                         f"data.flip_prob={opt.flip_prob}: set data.crop=center data.flip_prob=0, or "
                         "data.use_cache=false to encode the images on the fly")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class SetStream(IterableDataset):
    """The stream of one rank. `num_workers` must equal the DataLoader's (0 = in-process)."""

    def __init__(self, cfg: StreamConfig, tokenize: Callable[[list[str]], torch.Tensor] | None = None,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 empty_text: dict[str, torch.Tensor] | None = None):
        """empty_text: the cache's "" caption embedding (needed with cfg.cache_fingerprint)."""
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        if cfg.cache_fingerprint:
            check_cache_options(cfg)
            if empty_text is None:
                raise ValueError("cached encodings need the cache's empty-prompt embedding (empty_text)")
        self.empty_text = empty_text
        self.num_workers, self.workers = num_workers, max(1, num_workers)
        self.tokenize = CachedTokenize(tokenize) if tokenize is not None else None
        self.sources = expand_sources(cfg.sources, cfg.allow_pipe)
        self.shards = [u for s in self.sources for u in s.urls]
        if cfg.batch_size < 1:  # else a ZeroDivisionError, or "lower data.batch_size" for a negative one
            raise ValueError(f"data.batch_size={cfg.batch_size} must be >= 1 (sets per step, per rank)")
        if not 1 <= cfg.min_set <= cfg.max_set:
            raise ValueError(f"need 1 <= min_set <= max_set, got {cfg.min_set}, {cfg.max_set}")
        if not cfg.resampled:
            if len(self.shards) < world_size * self.workers:
                raise ValueError(f"epoch mode needs at least one shard per rank and worker: {len(self.shards)} "
                                 f"shards < {world_size} ranks x {self.workers} workers. Write more, smaller "
                                 "shards, lower data.num_workers, or set data.resampled=true")
            if len({s.weight for s in self.sources}) > 1:
                log.warning("source weights apply in resampled mode only; epoch mode reads every shard once")
        epoch_sets = cfg.epoch_sets or max(1, count_samples(self.shards) - len(cfg.exclude_sets or ()))
        self.batches_per_rank = epoch_sets // (world_size * cfg.batch_size)
        if self.batches_per_rank < 1:
            raise ValueError(f"{epoch_sets} sets per epoch make no batch of {cfg.batch_size} sets on each of "
                             f"{world_size} ranks; lower data.batch_size or add data")
        self.epoch, self.cursors, self.rotation = 0, {}, 0

    # -- what the loader sets before each iteration (resume.py) -----------------------------------
    def plan_epoch(self, epoch: int, cursors: dict[int, dict], rotation: int) -> None:
        """Epoch to stream, each worker's start, and which worker the DataLoader's worker 0 plays."""
        self.epoch, self.cursors, self.rotation = epoch, dict(cursors), rotation

    def quota(self, worker: int) -> int:
        """Batches this worker yields per epoch; the round-robin over workers adds up to batches_per_rank."""
        q, r = divmod(self.batches_per_rank, self.workers)
        return q + (worker < r)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if (info.num_workers if info else 0) != self.num_workers:
            raise RuntimeError(f"SetStream was built for {self.num_workers} workers, runs under "
                               f"{info.num_workers if info else 0}")
        worker = ((info.id if info else 0) + self.rotation) % self.workers
        return self.worker_stream(self.epoch, worker, Cursor(**self.cursors.get(worker, {})))

    # -- the chain ---------------------------------------------------------------------------------
    def worker_stream(self, epoch: int, worker: int, start: Cursor) -> Iterator[dict]:
        counts = Counts(self.cfg.log_every_s, where=f"[rank {self.rank} worker {worker}] ")
        samples = self.valid_samples(epoch, worker, start, counts)   # shards -> tar -> validate
        items = self.shuffled(samples, epoch, worker, start, counts)  # block shuffle, per-set rng
        sets = self.decoded(items, counts)                            # decode/crop/subsample/refs
        return self.batched(sets, worker, start, counts)              # tokenize, pad, batch

    def shard_at(self, epoch: int, worker: int, pass_no: int, shard_no: int) -> str | None:
        if self.cfg.resampled:
            rng = _rng(_SHARD_DRAW, self.cfg.seed, epoch, self.rank, worker, shard_no)
            w = np.array([s.weight for s in self.sources], dtype=np.float64)
            src = self.sources[int(rng.choice(len(w), p=w / w.sum()))]
            return src.urls[int(rng.integers(len(src.urls)))]
        mine = self._pass_shards(epoch, worker, pass_no)
        return mine[shard_no] if shard_no < len(mine) else None

    def _pass_shards(self, epoch: int, worker: int, pass_no: int) -> list[str]:
        order = np.arange(len(self.shards))
        if self.cfg.shardshuffle:
            _rng(_SHARD_ORDER, self.cfg.seed, epoch).shuffle(order)
        mine = order[self.rank::self.world_size][worker::self.workers]  # split by node, then by worker
        if pass_no and self.cfg.shardshuffle:
            _rng(_PASS, self.cfg.seed, epoch, self.rank, worker, pass_no).shuffle(mine)
        return [self.shards[i] for i in mine]

    def valid_samples(self, epoch: int, worker: int, start: Cursor, counts: Counts):
        """(position, raw sample) of the samples that have every key their json announces.

        Epoch mode also yields (start of the next pass, None) at the end of each pass."""
        pass_no, shard_no, skip = start.pass_no, start.shard_no, start.sample_no
        empty_in_a_row, give_up = 0, (4 * len(self.shards) + 8 if self.cfg.resampled else
                                      len(self._pass_shards(epoch, worker, 0)) + 1)
        while True:
            url = self.shard_at(epoch, worker, pass_no, shard_no)
            if url is None:  # epoch mode: this worker's shards are done; another pass, reshuffled
                pass_no, shard_no = pass_no + 1, 0
                yield (pass_no, 0, 0), None  # a pass end: shuffle blocks do not mix passes
                continue
            found = False
            for index, sample in read_tar(url, counts, skip):
                reason = validate_sample(sample)  # BEFORE decoding: truncated tars give partial samples
                if reason:
                    counts.skip(reason, f"{url} {sample.get('__key__')}")
                    continue
                if not self._in_split(sample):  # a held-out split: not counted as a skip
                    continue
                found = True
                yield (pass_no, shard_no, index), sample
            empty_in_a_row = 0 if found else empty_in_a_row + 1
            if empty_in_a_row >= give_up:
                log.error("[rank %d worker %d] no readable set in %d shards in a row; this worker stops "
                          "(check the data with `jedi-data stats`)", self.rank, worker, empty_in_a_row)
                return
            shard_no, skip = shard_no + 1, 0

    def _in_split(self, sample) -> bool:
        cfg = self.cfg
        if cfg.exclude_sets is None and cfg.only_sets is None:
            return True
        from data_pipelines.heldout import set_identity
        from data_pipelines.schema import set_meta

        set_id, subject = set_identity(set_meta(sample))
        if cfg.only_sets is not None:
            return set_id in cfg.only_sets
        return set_id not in cfg.exclude_sets and (subject is None or subject not in (cfg.exclude_subjects or ()))

    def shuffled(self, samples, epoch: int, worker: int, start: Cursor, counts: Counts):
        """Blocks of `shuffle_buffer` samples, each permuted by its own seed; (cursor after, sample, rng)."""
        size = max(1, self.cfg.shuffle_buffer)
        pos, block_no, taken = (start.pass_no, start.shard_no, start.sample_no), start.block_no, start.taken
        while True:
            counts.muted = taken > 0  # replaying a block that was read (and counted) before the checkpoint
            block, next_pos = [], None
            for p, sample in samples:
                if sample is None:  # pass end: close the block; an empty block starts at the next pass
                    if block:
                        next_pos = p
                        break
                    pos = p
                    continue
                block.append((p, sample))
                if len(block) == size:
                    break
            counts.muted = False
            if not block:
                return
            order = _rng(_BLOCK, self.cfg.seed, epoch, self.rank, worker, block_no).permutation(len(block))
            for j in range(taken, len(block)):
                rng = _rng(_ITEM, self.cfg.seed, epoch, self.rank, worker, block_no, j)
                yield Cursor(*pos, block_no=block_no, taken=j + 1), block[order[j]][1], rng
            last = block[-1][0]
            pos, block_no, taken = next_pos or (last[0], last[1], last[2] + 1), block_no + 1, 0

    def decoded(self, items, counts: Counts):
        for cursor, sample, rng in items:
            try:
                s = load_set(sample, self.cfg, rng, counts)
            except Exception as e:  # noqa: BLE001 - a set we failed to foresee is still just skipped
                counts.skip("set_error", f"{sample.get('__url__')} {sample.get('__key__')}: {e!r}")
                continue
            if s is not None:
                yield cursor, s

    def batched(self, sets, worker: int, start: Cursor, counts: Counts):
        quota, done, buf = self.quota(worker), start.batches, []
        if done >= quota:
            return
        for cursor, s in sets:
            buf.append(s)
            if len(buf) < self.cfg.batch_size:
                continue
            batch, buf, done = collate_sets(buf, self.tokenize, self.empty_text), [], done + 1
            batch["_stream"] = {"worker": worker, "cursor": asdict(replace(cursor, batches=done)),
                                "skipped": dict(counts.skipped), "repaired": dict(counts.repaired)}
            yield batch
            if done >= quota:
                return
