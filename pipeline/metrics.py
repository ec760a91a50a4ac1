"""Per-process counters, latency percentiles and the heartbeat; alert states and the Prometheus exporter.

Each process owns one :class:`StageCounters`, whose fields live in the
process's shared-memory counter block (:mod:`pipeline.counters`): an
increment is visible to the supervisor at once and survives a SIGKILL. The
:class:`Heartbeat` thread stamps the block's heartbeat time every
``runtime.stats_interval_s`` (so a process blocked in a long C call, or
waiting for a ring slot or a slow database, keeps beating; a stopped one does
not) and publishes latency percentiles and peak memory. The supervisor turns
the blocks of all processes into rates, queue depths and drops
(:mod:`pipeline.status`).
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections import deque
from typing import Collection

import numpy as np

from pipeline import counters as cb
from pipeline.counters import CounterBlock, ExtraCounters
from pipeline.messages import DROP_REASONS, StageStats

_REASON_INDEX = {r: i for i, r in enumerate(DROP_REASONS)}


def _int_word(index: int, doc: str) -> property:
    def get(self: StageCounters) -> int:
        return int(self.block.ints[index])

    def put(self: StageCounters, value: int) -> None:
        self.block.ints[index] = value

    return property(get, put, doc=doc)


def _float_word(index: int, doc: str) -> property:
    def get(self: StageCounters) -> float:
        return float(self.block.floats[index])

    def put(self: StageCounters, value: float) -> None:
        self.block.floats[index] = value

    return property(get, put, doc=doc)


class StageCounters:
    """Cumulative counters of one process, stored in its counter block.

    Args:
        stage, index: the process's stage and index.
        window: latency samples kept for the percentiles.
        block: the process's counter block; a private block when None (tests, tools).

    Attributes:
        frames_in: items received.
        frames_out: items processed.
        sent: messages sent downstream.
        drops: ``(len(DROP_REASONS),) int64`` drops per reason (a view on the block).
        backlog: items held inside the process (set by the stage).
        oldest_wait_ms: age of the oldest held item, ms (set by the stage).
        last_error: last error text (UTF-8, cut at 1023 bytes).
        extra: stage-specific cumulative counters, name → int (up to 32 names of up to 64 UTF-8 bytes).
    """

    frames_in = _int_word(cb.W_FRAMES_IN, "items received")
    frames_out = _int_word(cb.W_FRAMES_OUT, "items processed")
    sent = _int_word(cb.W_SENT, "messages sent downstream")
    backlog = _int_word(cb.W_BACKLOG, "items held inside the process")
    oldest_wait_ms = _float_word(cb.W_OLDEST_WAIT_MS, "age of the oldest held item, ms")

    def __init__(self, stage: str, index: int, window: int = 512, block: CounterBlock | None = None) -> None:
        self.stage = stage
        self.index = index
        self.block = block if block is not None else CounterBlock.private()
        self.block.ints[cb.W_PID] = os.getpid()
        self.drops = self.block.drops
        self.extra = ExtraCounters(self.block)
        self._latency_ms: deque[float] = deque(maxlen=window)

    @property
    def last_error(self) -> str:
        return self.block.last_error

    @last_error.setter
    def last_error(self, text: str) -> None:
        self.block.last_error = text

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` drops for ``reason`` (one of :data:`~pipeline.messages.DROP_REASONS`)."""
        self.drops[_REASON_INDEX[reason]] += n

    def observe_ms(self, latency_ms: float) -> None:
        """Record the processing time of one item, milliseconds."""
        self._latency_ms.append(latency_ms)

    def percentiles(self) -> tuple[float, float]:
        """(p50, p99) of the recorded latencies, ms; (0, 0) when none."""
        samples = list(self._latency_ms)
        if not samples:
            return 0.0, 0.0
        p50, p99 = np.percentile(np.asarray(samples, float), [50, 99])
        return float(p50), float(p99)

    def publish(self) -> None:
        """Write the heartbeat time, the latency percentiles and the peak RSS into the block."""
        p50, p99 = self.percentiles()
        f = self.block.floats
        f[cb.W_P50_MS], f[cb.W_P99_MS] = p50, p99
        self.block.ints[cb.W_MAX_RSS_KB] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.block.beat()

    def snapshot(self) -> StageStats:
        """The counters as a :class:`~pipeline.messages.StageStats` message."""
        p50, p99 = self.percentiles()
        return StageStats(
            stage=self.stage, index=self.index, pid=os.getpid(), sent_at_ns=time.time_ns(),
            frames_in=self.frames_in, frames_out=self.frames_out, drop_counts=self.drops.copy(), sent=self.sent,
            latency_p50_ms=p50, latency_p99_ms=p99, backlog=self.backlog, oldest_wait_ms=self.oldest_wait_ms,
            max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, last_error=self.last_error,
            count_names=tuple(self.extra), counts=np.array(list(self.extra.values()), np.int64),
        )


class Heartbeat:
    """Keeps a process's counter block beating.

    :meth:`start` runs a daemon thread that calls :meth:`StageCounters.publish`
    every ``interval_s``; :meth:`beat` does the same from the stage loop, at most
    every ``interval_s`` unless ``force``. ``sender`` is accepted for
    compatibility and unused (the supervisor reads the block).
    """

    def __init__(self, counters: StageCounters, sender: object = None, interval_s: float = 0.5) -> None:
        self.counters = counters
        self.sender = sender
        self.interval_s = interval_s
        self._next = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self._next:
            self.counters.publish()
            self._next = now + self.interval_s

    def start(self) -> Heartbeat:
        """Start the beating thread (daemon: it never keeps the process alive)."""
        self.counters.publish()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.counters.publish()

    def stop(self) -> None:
        self._stop.set()


# ----------------------------------------------------------------- Prometheus
ALERTS: tuple[str, ...] = ("low_rate", "backlog", "high_memory")


class AlertTracker:
    """Alert states per stage from successive status snapshots.

    - ``low_rate``: a stage with running processes passes fewer than
      ``min_rate_fps`` frames/s (after ``grace_s``; only the stages in
      ``rate_stages`` when given: a row off the data path has no frame rate; the api
      counts none, the mqtt publisher counts rare events);
    - ``backlog``: its queue is deeper than ``backlog_frames`` and deeper than
      in each of the last three snapshots (still growing);
    - ``high_memory``: its processes use more than ``max_rss_mb`` MiB together.

    :meth:`update` returns the alerts that changed state, for logging.
    """

    def __init__(self, min_rate_fps: float, backlog_frames: int, max_rss_mb: float, grace_s: float,
                 rate_stages: Collection[str] | None = None) -> None:
        self.min_rate_fps = min_rate_fps
        self.rate_stages = None if rate_stages is None else frozenset(rate_stages)
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
        running = running and (self.rate_stages is None or st.stage in self.rate_stages)  # type: ignore[attr-defined]
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
        counts = GaugeMetricFamily("facepro_stage_count", "stage-specific counters and states (offline, lock_wait_ms, "
                                   "replayed, reconnects, face_rejected_*...; as in facepro status)", labels=["stage", "name"])
        for st in reply.stages:  # type: ignore[attr-defined]
            for name, n in zip(st.count_names, st.counts):
                counts.add_metric([st.stage, name], float(n))
            for name, fam in gauges.items():
                fam.add_metric([st.stage], float(getattr(st, name)))
            latency.add_metric([st.stage, "0.5"], st.latency_p50_ms)
            latency.add_metric([st.stage, "0.99"], st.latency_p99_ms)
            restarts.add_metric([st.stage], st.restarts)
            for reason, n in zip(DROP_REASONS, st.drop_counts):
                dropped.add_metric([st.stage, reason], int(n))
            for name in ALERTS:
                alert.add_metric([st.stage, name], 1.0 if self.alerts.active.get((st.stage, name)) else 0.0)
        yield from (*gauges.values(), latency, restarts, dropped, alert, counts)


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
