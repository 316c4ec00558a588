"""What a store measures of itself, for /metrics to render (task_manager/metrics.py).

The storage layer knows no Prometheus: it fills plain distributions (counts by upper
bound) from its writer thread and its tail, and the metrics read them at each scrape. A
scrape may see a count without the sum of the same observation; nothing here is exact
to the observation, and nothing needs to be.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field


class Distribution:
    """Observations counted by bucket, as a Prometheus histogram counts them: bucket i
    holds the values above bound i-1 and at most bound i; the last, those above all."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


BATCH_WRITES_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
"""Up to group_commit.MAX_BATCH."""

COMMIT_SECONDS_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
"""An SQLite batch without fsync takes tens of microseconds; with fsync or over the
network to PostgreSQL, milliseconds."""

TAIL_LAG_SECONDS_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
"""A NOTIFY brings another replica's commit in a millisecond or so; the fallback poll
(--tail-poll) in at most its period."""


@dataclass(slots=True)
class WriterStats:
    """The group-commit writer's, filled on its thread."""

    batch_writes: Distribution = field(default_factory=lambda: Distribution(BATCH_WRITES_BOUNDS))
    """Units of work per committed transaction: how much group commit batches."""
    commit_seconds: Distribution = field(
        default_factory=lambda: Distribution(COMMIT_SECONDS_BOUNDS)
    )
    """Each committed batch, from its transaction's begin to its commit's return."""


@dataclass(slots=True)
class TailStats:
    """A replica's reading of the other replicas' commits (PostgreSQL), on the loop."""

    lag_seconds: Distribution = field(default_factory=lambda: Distribution(TAIL_LAG_SECONDS_BOUNDS))
    """Per page of others' commits published: how long ago the newest of them was made
    (by the writing replica's clock: a skew between hosts shows here)."""
    announced_revision: int = 0
    """The highest revision another replica's NOTIFY announced."""
