"""Counters of skipped and repaired data, by reason, with rate-limited logging.

Bad data never stops a run: every stage that drops a set (or an image) or fixes one calls
`skip(reason)` / `repair(reason)`. The counts ride along with each batch to the main process, so
the training loop can log them; the log lines are rate-limited so a bad shard cannot flood a log.
"""
from __future__ import annotations

import logging
import time
from collections import Counter

log = logging.getLogger("data_pipelines.stream")


class Counts:
    """Per-worker counters. `muted` is set while the stream replays data it already counted (resume)."""

    def __init__(self, log_every_s: float = 60.0, where: str = ""):
        self.skipped: Counter[str] = Counter()
        self.repaired: Counter[str] = Counter()
        self.muted = False
        self.log_every_s, self.where = log_every_s, where
        self._last_log = -float("inf")
        self._since_log = 0

    def skip(self, reason: str, detail: str = "") -> None:
        if self.muted:
            return
        first = reason not in self.skipped
        self.skipped[reason] += 1
        self._since_log += 1
        now = time.monotonic()
        if first or now - self._last_log >= self.log_every_s:
            # the first occurrence of each reason with its detail, then a periodic summary
            log.warning("%sskipped (%s) %s; %d skips since last report, totals %s", self.where, reason,
                        detail[:200], self._since_log, dict(self.skipped))
            self._last_log, self._since_log = now, 0

    def repair(self, reason: str) -> None:
        if not self.muted:
            self.repaired[reason] += 1


def merge(*counters: dict) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counters:
        total.update(c or {})
    return dict(sorted(total.items()))
