"""Per-process counters, latency percentiles and the heartbeat sent to the supervisor.

Each process owns one :class:`StageCounters`; its :meth:`StageCounters.snapshot`
becomes a :class:`~pipeline.messages.StageStats` sent every
``runtime.stats_interval_s`` over the ``stats`` endpoint. The supervisor turns
the cumulative counters of all processes into rates, queue depths and drops
(:func:`aggregate`).
"""

from __future__ import annotations

import os
import resource
import time
from collections import deque

import numpy as np

from pipeline.messages import DROP_REASONS, StageStats

_REASON_INDEX = {r: i for i, r in enumerate(DROP_REASONS)}


class StageCounters:
    """Cumulative counters of one process.

    Attributes:
        frames_in: items received.
        frames_out: items processed.
        sent: messages sent downstream.
        drops: ``(len(DROP_REASONS),) int64`` drops per reason.
        backlog: items held inside the process (set by the stage).
        oldest_wait_ms: age of the oldest held item, ms (set by the stage).
        last_error: last error text.
    """

    def __init__(self, stage: str, index: int, window: int = 512) -> None:
        self.stage = stage
        self.index = index
        self.frames_in = 0
        self.frames_out = 0
        self.sent = 0
        self.drops = np.zeros(len(DROP_REASONS), dtype=np.int64)
        self.backlog = 0
        self.oldest_wait_ms = 0.0
        self.last_error = ""
        self._latency_ms: deque[float] = deque(maxlen=window)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` drops for ``reason`` (one of :data:`~pipeline.messages.DROP_REASONS`)."""
        self.drops[_REASON_INDEX[reason]] += n

    def observe_ms(self, latency_ms: float) -> None:
        """Record the processing time of one item, milliseconds."""
        self._latency_ms.append(latency_ms)

    def percentiles(self) -> tuple[float, float]:
        """(p50, p99) of the recorded latencies, ms; (0, 0) when none."""
        if not self._latency_ms:
            return 0.0, 0.0
        p50, p99 = np.percentile(np.fromiter(self._latency_ms, float), [50, 99])
        return float(p50), float(p99)

    def snapshot(self) -> StageStats:
        p50, p99 = self.percentiles()
        return StageStats(
            stage=self.stage, index=self.index, pid=os.getpid(), sent_at_ns=time.time_ns(),
            frames_in=self.frames_in, frames_out=self.frames_out, drop_counts=self.drops.copy(), sent=self.sent,
            latency_p50_ms=p50, latency_p99_ms=p99, backlog=self.backlog, oldest_wait_ms=self.oldest_wait_ms,
            max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, last_error=self.last_error,
        )


class Heartbeat:
    """Sends :meth:`StageCounters.snapshot` at most every ``interval_s`` (non-blocking)."""

    def __init__(self, counters: StageCounters, sender: object, interval_s: float) -> None:
        self.counters = counters
        self.sender = sender
        self.interval_s = interval_s
        self._next = 0.0

    def beat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self._next:
            self.sender.send(self.counters.snapshot(), timeout_ms=0)  # type: ignore[attr-defined]
            self._next = now + self.interval_s
