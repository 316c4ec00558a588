"""The gateway's Prometheus metrics, served at /metrics by the HTTP front (web/).

One registry per server, not the client library's global one: a process (a test) may run
several servers. Calls are counted as they end; what the server holds (open streams,
watchers, tasks by status, commits) is read when scraped. No gRPC or HTTP here: the
transports report what they saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from storage.base import Change
from storage.stats import Distribution, TailStats, WriterStats
from task_manager.clock import Clock
from task_manager.v1.task_manager_pb2 import STATUS_SENT

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
"""Unary calls take a millisecond or two; a stream's whole life falls in the last."""

DISPATCH_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1)
"""On one replica a commit reaches its agent's stream in well under a millisecond; from
another replica, after that replica's tail reads it (milliseconds)."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Observed(Protocol):
    """What the server holds, read at each scrape."""

    def open_agent_streams(self) -> int: ...

    def open_watches(self) -> int: ...

    def writer_stats(self) -> WriterStats: ...

    def tail_stats(self) -> TailStats | None: ...

    def revision(self) -> int:
        """The newest revision this server has published."""
        ...

    def deadlines_fired(self) -> int: ...


class Metrics:
    """Counts calls as the transports end them; renders everything for a scrape."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        self._rpcs = Counter(
            "task_manager_rpcs",
            "gRPC calls ended, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self._rpc_seconds = Histogram(
            "task_manager_rpc_duration_seconds",
            "gRPC calls by method: how long each took (a stream: its whole life)",
            ["method"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._http = Counter(
            "task_manager_http_requests",
            "HTTP requests answered, by route and status code",
            ["route", "code"],
            registry=self.registry,
        )
        self._http_seconds = Histogram(
            "task_manager_http_request_duration_seconds",
            "HTTP requests by route: how long each took",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._attempts = Counter(
            "task_manager_attempts_started",
            "Attempts of tasks started (sent to an agent), by number: 1, or retry (a later one)",
            ["kind"],
            registry=self.registry,
        )
        self._dispatch_seconds = Histogram(
            "task_manager_dispatch_seconds",
            "From the change that sent a task to an agent (its create, release, retry or"
            " hand-over to a pool member) to its ExecuteRequest leaving on the agent's stream",
            buckets=DISPATCH_BUCKETS_S,
            registry=self.registry,
        )
        self._first_attempts = self._attempts.labels("first")
        self._retries = self._attempts.labels("retry")
        # Children by labels, looked up once: labels() costs a lock and a dict each call,
        # and this runs on every call the gateway answers.
        self._rpc_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._http_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._task_counts: Mapping[str, int] = {}

    def rpc_ended(self, method: str, code: str, seconds: float) -> None:
        children = self._rpc_children.get((method, code))
        if children is None:
            children = (self._rpcs.labels(method, code), self._rpc_seconds.labels(method))
            self._rpc_children[(method, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def http_answered(self, route: str, code: int, seconds: float) -> None:
        children = self._http_children.get((route, code))
        if children is None:
            children = (self._http.labels(route, str(code)), self._http_seconds.labels(route))
            self._http_children[(route, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def task_dispatched(self, sent_ns: int) -> None:
        """dispatch.Dispatched: an ExecuteRequest is leaving, sent by a change at sent_ns."""
        self._dispatch_seconds.observe(max(0, self._clock.now_ns() - sent_ns) / 1e9)

    def changes_committed(self, changes: Sequence[Change]) -> None:
        """A change feed subscriber: counts the attempts the changes started."""
        for change in changes:
            task = change.task
            # An attempt starts with the change that sends it (a pool's hand-over to
            # another member sends it again, and is not a new attempt).
            if (
                task.status.status == STATUS_SENT
                and task.attempts
                and task.attempts[-1].start_time == task.last_update_time
            ):
                (self._retries if task.attempt > 1 else self._first_attempts).inc()

    def observe(self, observed: Observed) -> None:
        """Reads what the server holds at each scrape (once, at startup)."""
        self.registry.register(_Held(observed, lambda: self._task_counts))

    def render(self, task_counts: Mapping[str, int]) -> bytes:
        """The text a scrape answers, with the tasks by status as the caller just read."""
        self._task_counts = task_counts
        return generate_latest(self.registry)


class _Held(Collector):
    def __init__(self, observed: Observed, task_counts: Callable[[], Mapping[str, int]]):
        self._observed = observed
        self._task_counts = task_counts

    def collect(self) -> Iterable[Metric]:
        observed = self._observed
        yield GaugeMetricFamily(
            "task_manager_agent_streams",
            "ListenAsAgent streams open on this server",
            value=observed.open_agent_streams(),
        )
        yield GaugeMetricFamily(
            "task_manager_watchers",
            "WatchTasks streams open on this server",
            value=observed.open_watches(),
        )
        tasks = GaugeMetricFamily(
            "task_manager_tasks", "Tasks in the store, by status", labels=["status"]
        )
        for status, count in sorted(self._task_counts().items()):
            tasks.add_metric([status], count)
        yield tasks
        writer = observed.writer_stats()
        yield _histogram(
            "task_manager_store_batch_writes",
            "Units of work per transaction this server's writer committed: its count is the"
            " commits, its sum the writes",
            writer.batch_writes,
        )
        yield _histogram(
            "task_manager_store_commit_seconds",
            "Each transaction this server's writer committed, from its begin to its commit's"
            " return",
            writer.commit_seconds,
        )
        tail = observed.tail_stats()
        if tail is not None:
            yield _histogram(
                "task_manager_replica_tail_lag_seconds",
                "Per read of the other replicas' commits: how long ago the newest was made"
                " (by its replica's clock) when this replica published it",
                tail.lag_seconds,
            )
            yield GaugeMetricFamily(
                "task_manager_replica_tail_lag_revisions",
                "Revisions other replicas announced that this replica has not published yet",
                value=max(0, tail.announced_revision - observed.revision()),
            )
        yield CounterMetricFamily(
            "task_manager_deadlines_fired",
            "Timeouts, scheduled releases and retries this server's timekeeper fired",
            value=observed.deadlines_fired(),
        )


def _histogram(name: str, documentation: str, distribution: Distribution) -> Metric:
    counts = list(distribution.counts)  # one copy: the writer thread may add meanwhile
    cumulative, buckets = 0, []
    for bound, count in zip((*distribution.bounds, float("inf")), counts, strict=True):
        cumulative += count
        buckets.append((_bound(bound), cumulative))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=distribution.sum)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
