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
        self.extra: dict[str, int] = {}  # stage-specific cumulative counters
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
            count_names=tuple(self.extra), counts=np.array(list(self.extra.values()), np.int64),
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


# ----------------------------------------------------------------- Prometheus
ALERTS: tuple[str, ...] = ("low_rate", "backlog", "high_memory")


class AlertTracker:
    """Alert states per stage from successive status snapshots.

    - ``low_rate``: a stage with running processes passes fewer than
      ``min_rate_fps`` frames/s (after ``grace_s``);
    - ``backlog``: its queue is deeper than ``backlog_frames`` and deeper than
      in each of the last three snapshots (still growing);
    - ``high_memory``: its processes use more than ``max_rss_mb`` MiB together.

    :meth:`update` returns the alerts that changed state, for logging.
    """

    def __init__(self, min_rate_fps: float, backlog_frames: int, max_rss_mb: float, grace_s: float) -> None:
        self.min_rate_fps = min_rate_fps
        self.backlog_frames = backlog_frames
        self.max_rss_mb = max_rss_mb
        self.grace_s = grace_s
        self.active: dict[tuple[str, str], bool] = {}
        self._depths: dict[str, deque[int]] = {}

    def _evaluate(self, st: object, uptime_s: float) -> dict[str, bool]:
        depths = self._depths.setdefault(st.stage, deque(maxlen=4))  # type: ignore[attr-defined]
        depths.append(st.queue_depth)  # type: ignore[attr-defined]
        growing = len(depths) == depths.maxlen and all(a < b for a, b in zip(depths, list(depths)[1:]))
        running = st.processes > 0 and st.state == "running" and uptime_s >= self.grace_s  # type: ignore[attr-defined]
        return {
            "low_rate": running and st.rate_fps < self.min_rate_fps,  # type: ignore[attr-defined]
            "backlog": st.queue_depth > self.backlog_frames and growing,  # type: ignore[attr-defined]
            "high_memory": st.rss_mb > self.max_rss_mb,  # type: ignore[attr-defined]
        }

    def update(self, reply: object) -> list[tuple[str, str, bool]]:
        """Feed a :class:`~pipeline.messages.StatusReply`; returns ``(stage, alert, now_active)`` changes."""
        changes = []
        for st in reply.stages:  # type: ignore[attr-defined]
            for alert, on in self._evaluate(st, reply.uptime_s).items():  # type: ignore[attr-defined]
                key = (st.stage, alert)
                if self.active.get(key, False) != on:
                    changes.append((st.stage, alert, on))
                self.active[key] = on
        return changes


class StatusCollector:
    """prometheus-client collector exporting the latest status snapshot and alert states.

    Metric names: ``facepro_stage_processes``, ``facepro_stage_rate_fps``,
    ``facepro_stage_queue_depth``, ``facepro_stage_oldest_wait_ms``,
    ``facepro_stage_latency_ms{quantile}``, ``facepro_stage_cpu_percent``,
    ``facepro_stage_rss_mb``, ``facepro_stage_restarts_total``,
    ``facepro_stage_dropped_total{reason}``, ``facepro_alert{alert}`` (0/1),
    all labelled by ``stage``.
    """

    def __init__(self, alerts: AlertTracker) -> None:
        self.reply: object | None = None  # replaced (never mutated) by the supervisor's loop
        self.alerts = alerts

    def collect(self):  # noqa: ANN201 - prometheus-client protocol
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        reply = self.reply
        if reply is None:
            return
        gauges = {name: GaugeMetricFamily(f"facepro_stage_{name}", doc, labels=["stage"]) for name, doc in (
            ("processes", "live processes"), ("rate_fps", "frames passed on per second"),
            ("queue_depth", "frames waiting for the stage"), ("oldest_wait_ms", "age of the oldest waiting frame, ms"),
            ("cpu_percent", "CPU use, 100 = one core"), ("rss_mb", "resident memory, MiB"))}
        latency = GaugeMetricFamily("facepro_stage_latency_ms", "processing latency per item, ms", labels=["stage", "quantile"])
        restarts = CounterMetricFamily("facepro_stage_restarts", "process restarts", labels=["stage"])
        dropped = CounterMetricFamily("facepro_stage_dropped", "frames dropped by reason", labels=["stage", "reason"])
        alert = GaugeMetricFamily("facepro_alert", "alert state (1 = active)", labels=["stage", "alert"])
        for st in reply.stages:  # type: ignore[attr-defined]
            for name, fam in gauges.items():
                fam.add_metric([st.stage], float(getattr(st, name)))
            latency.add_metric([st.stage, "0.5"], st.latency_p50_ms)
            latency.add_metric([st.stage, "0.99"], st.latency_p99_ms)
            restarts.add_metric([st.stage], st.restarts)
            for reason, n in zip(DROP_REASONS, st.drop_counts):
                dropped.add_metric([st.stage, reason], int(n))
            for name in ALERTS:
                alert.add_metric([st.stage, name], 1.0 if self.alerts.active.get((st.stage, name)) else 0.0)
        yield from (*gauges.values(), latency, restarts, dropped, alert)


def start_exporter(collector: StatusCollector, port: int) -> int:
    """Serve ``collector`` on ``http://127.0.0.1:port/metrics`` (0 = any free port); returns the port.

    Raises:
        OSError: the port is taken (the message names it and the config key).
    """
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(collector)
    try:
        server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    except OSError as err:
        raise OSError(f"cannot serve Prometheus metrics on 127.0.0.1:{port} ({err.strerror}); "
                      "change runtime.metrics_port in the config (null disables it)") from None
    return int(server.server_address[1])
