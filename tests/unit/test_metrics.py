"""Counters, percentiles, alert states and the Prometheus collector (no processes, no sockets)."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pipeline.messages import DROP_REASONS, StageStatus, StatusReply
from pipeline.metrics import AlertTracker, StageCounters, StatusCollector


def _status(stage: str = "detection", rate: float = 10.0, queue: int = 0, rss: float = 100.0, procs: int = 1,
            state: str = "running", uptime: float = 100.0) -> StatusReply:
    drops = np.zeros(len(DROP_REASONS), np.int64)
    drops[DROP_REASONS.index("overwritten")] = 3
    st = StageStatus(stage=stage, processes=procs, pids=np.arange(procs, dtype=np.int64), rate_fps=rate, queue_depth=queue,
                     oldest_wait_ms=5.0, drop_counts=drops, latency_p50_ms=12.0, latency_p99_ms=40.0, cpu_percent=90.0,
                     rss_mb=rss, restarts=2, state=state, count_names=("lock_wait_ms", "offline"),
                     counts=np.array([1500, 1], np.int64))
    return StatusReply(run_id="r", uptime_s=uptime, stages=(st,))


def test_counters_snapshot_percentiles_and_drops() -> None:
    c = StageCounters("recognition", 0)
    for ms in range(1, 101):
        c.observe_ms(float(ms))
    c.drop("lost", 2)
    snap = c.snapshot()
    assert snap.latency_p50_ms == pytest.approx(50.5) and snap.latency_p99_ms == pytest.approx(99.01)
    assert snap.drop_counts[DROP_REASONS.index("lost")] == 2 and snap.dropped == 2
    assert snap.max_rss_mb > 0


def test_low_rate_only_after_grace_and_while_running() -> None:
    a = AlertTracker(min_rate_fps=1.0, backlog_frames=10, max_rss_mb=500, grace_s=10)
    assert a.update(_status(rate=0.0, uptime=5)) == []  # still in the grace period
    assert a.update(_status(rate=0.0)) == [("detection", "low_rate", True)]
    assert a.update(_status(rate=0.0)) == []  # no repeated change
    assert a.update(_status(rate=5.0)) == [("detection", "low_rate", False)]
    assert a.update(_status(rate=0.0, procs=0, state="done")) == []


def test_low_rate_only_for_the_rate_stages() -> None:
    a = AlertTracker(min_rate_fps=1.0, backlog_frames=10, max_rss_mb=500, grace_s=0, rate_stages=("detection",))
    assert a.update(_status(stage="api", rate=0.0)) == []  # the api passes no frames
    assert a.update(_status(stage="mqtt", rate=0.0)) == []  # a quiet hour publishes nothing: not an alert
    assert a.update(_status(stage="mqtt", rate=0.0, rss=900.0)) == [("mqtt", "high_memory", True)]
    assert a.update(_status(stage="detection", rate=0.0)) == [("detection", "low_rate", True)]


def test_backlog_needs_a_deep_and_growing_queue() -> None:
    a = AlertTracker(min_rate_fps=0.0, backlog_frames=10, max_rss_mb=500, grace_s=0)
    for depth in (20, 20, 20, 20):
        assert a.update(_status(queue=depth)) == []  # deep but steady
    changes = [a.update(_status(queue=d)) for d in (21, 22, 23)]
    assert changes[-1] == [("detection", "backlog", True)]
    assert a.update(_status(queue=5)) == [("detection", "backlog", False)]


def test_high_memory() -> None:
    a = AlertTracker(min_rate_fps=0.0, backlog_frames=10, max_rss_mb=500, grace_s=0)
    assert a.update(_status(rss=800.0)) == [("detection", "high_memory", True)]


def test_collector_exports_status_and_alerts() -> None:
    a = AlertTracker(min_rate_fps=1.0, backlog_frames=10, max_rss_mb=50, grace_s=0)
    col = StatusCollector(a)
    reg = CollectorRegistry()
    reg.register(col)
    assert generate_latest(reg) == b""  # nothing before the first snapshot
    col.reply = _status()
    a.update(col.reply)
    text = generate_latest(reg).decode()
    assert 'facepro_stage_rate_fps{stage="detection"} 10.0' in text
    assert 'facepro_stage_dropped_total{reason="overwritten",stage="detection"} 3.0' in text
    assert 'facepro_stage_latency_ms{quantile="0.99",stage="detection"} 40.0' in text
    assert 'facepro_alert{alert="high_memory",stage="detection"} 1.0' in text
    assert 'facepro_alert{alert="low_rate",stage="detection"} 0.0' in text
    assert 'facepro_stage_count{name="lock_wait_ms",stage="detection"} 1500.0' in text  # e.g. storage waiting for a lock
    assert 'facepro_stage_count{name="offline",stage="detection"} 1.0' in text
