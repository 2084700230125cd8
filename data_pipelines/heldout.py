"""A held-out split of a user's own sources: a fixed, seeded set of subjects kept out of training.

`choose_heldout` reads set metadata only (keys and json, no image decoding) from the shards in a seeded
order, until it has seen `scan` candidate sets (or every shard), and picks `num_sets` of them with the
seed: min(num_sets, a tenth of the sets seen), at least 1. The training stream then skips those sets
and every set of the same subject (json `subject`, when it is a string: folders imported with several
sets per subject), and the held-out stream yields only them (StreamConfig.exclude_sets / only_sets).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from data_pipelines.schema import SkipSet, set_meta
from data_pipelines.shards import expand_sources, read_tar
from data_pipelines.skips import Counts


def set_identity(meta: dict) -> tuple[str, str | None]:
    """(set id, subject name or None) of a set's metadata."""
    subject = meta.get("subject")
    return str(meta["set_id"]), (subject if isinstance(subject, str) and subject else None)


def choose_heldout(sources: Any, num_sets: int, seed: int = 0, allow_pipe: bool = False,
                   scan_factor: int = 10) -> list[dict]:
    """[{set_id, subject, shard}] of the held-out sets, the same for the same shards and seed."""
    shards = [u for s in expand_sources(sources, allow_pipe) for u in s.urls]
    order = np.random.default_rng([seed, 35]).permutation(len(shards))
    seen: list[dict] = []
    counts = Counts(log_every_s=float("inf"))
    for i in order:
        for _, sample in read_tar(shards[i], counts):
            try:
                set_id, subject = set_identity(set_meta(sample))
            except SkipSet:
                continue
            seen.append({"set_id": set_id, "subject": subject, "shard": shards[i]})
        if len(seen) >= scan_factor * num_sets:
            break
    if not seen:
        return []
    n = max(1, min(num_sets, len(seen) // scan_factor))
    pick = np.random.default_rng([seed, 36]).choice(len(seen), size=n, replace=False)
    return [seen[j] for j in sorted(pick)]
