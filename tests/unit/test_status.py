"""The status aggregator's arithmetic: totals, queue depths, rates, drops by reason, retired processes, summary."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.counters import BlockSnapshot
from pipeline.messages import DROP_REASONS
from pipeline.status import (LiveProc, RateWindow, Retired, StageView, incomplete, losses, queue_depths, run_summary,
                             status_reply, totals)

ORDER = ("capture", "detection", "recognition", "storage")


def snap(frames_in: int = 0, frames_out: int = 0, sent: int = 0, backlog: int = 0, drops: dict | None = None,
         extra: dict | None = None, p50: float = 0.0, p99: float = 0.0, oldest: float = 0.0, rss: float = 0.0,
         error: str = "") -> BlockSnapshot:
    d = np.zeros(len(DROP_REASONS), np.int64)
    for reason, n in (drops or {}).items():
        d[DROP_REASONS.index(reason)] = n
    return BlockSnapshot(pid=1, owner_pid=2, heartbeat_ns=1, frames_in=frames_in, frames_out=frames_out, sent=sent,
                         backlog=backlog, drops=d, extra=dict(extra or {}), latency_p50_ms=p50, latency_p99_ms=p99,
                         oldest_wait_ms=oldest, max_rss_mb=rss, last_error=error)


def views(**live: list[BlockSnapshot]) -> dict[str, StageView]:
    return {s: StageView(tuple(LiveProc(100 + i, sn, 10.0, 50.0) for i, sn in enumerate(live.get(s, []))), Retired())
            for s in ORDER}


def test_totals_include_retired_processes() -> None:
    r = Retired()
    r.add(snap(frames_in=10, frames_out=9, sent=9, drops={"lost": 1}, extra={"blurry": 2}, rss=80.0), "detection-0 (pid 7)")
    v = StageView((LiveProc(8, snap(frames_in=5, frames_out=5, sent=4, backlog=1, drops={"lost": 2}, extra={"blurry": 1})),), r)
    t = totals(v)
    assert (t.frames_in, t.frames_out, t.sent, t.backlog) == (15, 14, 13, 1)
    assert t.drops[DROP_REASONS.index("lost")] == 3 and t.counts == {"blurry": 3}
    assert r.peak_rss_mb == {"detection-0 (pid 7)": 80.0}


def test_an_exited_process_keeps_its_work_counts_but_not_its_gauges() -> None:
    """After a restart the stage's counts are the work of every process, but a gauge (a state) is the live one's."""
    r = Retired()
    r.add(snap(extra={"published": 7, "port": 36772, "reorder_waiting_for": -1, "outbox_pending": 5,
                      "face detector scrfd_500m.onnx on CPU": 1}), "api-0 (pid 7)")
    live = snap(extra={"published": 2, "port": 36772, "reorder_waiting_for": 19, "outbox_pending": 0,
                       "face detector scrfd_500m.onnx on CPU": 1})
    assert totals(StageView((LiveProc(8, live),), r)).counts == {
        "published": 9, "port": 36772, "reorder_waiting_for": 19, "outbox_pending": 0,
        "face detector scrfd_500m.onnx on CPU": 1}
    r.add(live, "api-0 (pid 8)")  # the run ended: with no live process the last exited one's state stands
    assert totals(StageView((), r)).counts == {
        "published": 9, "port": 36772, "reorder_waiting_for": 19, "outbox_pending": 0,
        "face detector scrfd_500m.onnx on CPU": 1}


def test_queue_depth_is_upstream_sent_minus_received_plus_backlog() -> None:
    v = views(capture=[snap(frames_out=100, sent=100)], detection=[snap(frames_in=60, sent=58, backlog=2), snap(frames_in=30, sent=30)],
              recognition=[snap(frames_in=80, backlog=5)], storage=[snap(frames_in=10)])
    tot = {s: totals(x) for s, x in v.items()}
    assert queue_depths(ORDER, tot) == {"capture": 0, "detection": 100 - 90 + 2, "recognition": 88 - 80 + 5, "storage": 0}
    v2 = views(capture=[snap(sent=5)], detection=[snap(frames_in=9)])  # counters read a step apart: never negative
    assert queue_depths(ORDER, {s: totals(x) for s, x in v2.items()})["detection"] == 0


def test_a_stage_off_the_chain_has_no_upstream() -> None:
    v = views(capture=[snap(frames_out=10, sent=10)], detection=[snap(frames_in=10, sent=10)],
              recognition=[snap(frames_in=10, sent=7)], storage=[snap(frames_in=7, sent=7)])
    v["mqtt"] = StageView((LiveProc(100, snap(frames_out=3, backlog=7)),), Retired())  # events published, outbox depth
    v["api"] = StageView((LiveProc(200, snap(frames_in=3, frames_out=3, backlog=1)),), Retired())  # requests, not frames
    tot = {s: totals(x) for s, x in v.items()}
    assert queue_depths(list(v), tot, chain=ORDER) == {"capture": 0, "detection": 0, "recognition": 0, "storage": 0,
                                                       "mqtt": 7, "api": 1}  # the outbox depth, not storage's acks
    assert queue_depths(list(v), tot)["mqtt"] == 7 + 7  # without a chain it would count storage's acks
    reply = status_reply("r", 1.0, v, {s: RateWindow() for s in v}, 1.0, chain=ORDER)
    assert [(st.stage, st.queue_depth) for st in reply.stages][-2:] == [("mqtt", 7), ("api", 1)]


def test_rate_over_the_window() -> None:
    w = RateWindow(span_s=5.0)
    assert w.rate(0.0, 0) == 0.0
    assert w.rate(1.0, 10) == pytest.approx(10.0)
    assert w.rate(2.0, 30) == pytest.approx(15.0)
    for t in range(3, 20):
        w.rate(float(t), 30 + 20 * (t - 2))
    assert w.rate(20.0, 30 + 20 * 18) == pytest.approx(20.0)  # old samples left the window


def test_status_reply_drops_by_reason_latency_and_usage() -> None:
    v = views(capture=[snap(frames_out=4, sent=4)],
              detection=[snap(frames_in=4, frames_out=4, drops={"motion_skipped": 3}, p50=5.0, p99=9.0, oldest=3.0),
                         snap(drops={"motion_skipped": 1, "queue_full": 2}, p50=7.0, p99=8.0, extra={"n": 1})])
    v["recognition"] = StageView((), Retired(), restarts=2, last_error="boom", state="failed")
    rates = {s: RateWindow() for s in ORDER}
    reply = status_reply("run1", 12.345, v, rates, now=1.0)
    det = reply.stages[1]
    assert [s.stage for s in reply.stages] == list(ORDER) and reply.uptime_s == 12.35
    assert det.processes == 2 and list(det.pids) == [100, 101]
    assert det.drop_counts[DROP_REASONS.index("motion_skipped")] == 4 and det.dropped == 6
    assert (det.latency_p50_ms, det.latency_p99_ms, det.oldest_wait_ms) == (7.0, 9.0, 3.0)
    assert det.cpu_percent == 20.0 and det.rss_mb == 100.0 and det.count_names == ("n",) and list(det.counts) == [1]
    rec = reply.stages[2]
    assert (rec.state, rec.restarts, rec.last_error, rec.processes) == ("failed", 2, "boom", 0)


def test_losses_and_completeness() -> None:
    v = views(detection=[snap(drops={"motion_skipped": 5})])
    assert losses(v) == {} and incomplete(v) == []
    v = views(recognition=[snap(drops={"lost": 3, "behind": 1})], capture=[snap(extra={"ended_early": 1})])
    assert losses(v) == {"recognition": {"lost": 3}}
    assert incomplete(v) == ["recognition lost=3", "capture ended early (1)"]
    v["capture"] = StageView((), Retired(), restarts=1)  # a restarted capture resumes after its last frame: no loss
    assert incomplete(v) == ["recognition lost=3"]


def test_summary_shape() -> None:
    r = Retired()
    r.add(snap(frames_in=10, frames_out=10, sent=10, drops={"lost": 2}, extra={"k": 1}, rss=12.34, p50=3.0, p99=9.5),
          "recognition-0 (pid 9)")
    r.add(snap(p50=4.0, p99=7.0), "recognition-0 (pid 10)")
    v = views(detection=[snap(p50=1.5, p99=2.25)])
    v["recognition"] = StageView((), r, restarts=1)
    s = run_summary("run1", 5.0, v, active_s=4.0, exit_code=3, file_mode=True)
    assert s["run_id"] == "run1" and s["wall_s"] == 5.0 and s["active_s"] == 4.0 and s["exit_code"] == 3
    rec = s["stages"]["recognition"]
    assert rec == {"frames_in": 10, "frames_out": 10, "sent": 10, "rate_fps": 2.0, "dropped": {"lost": 2},
                   "restarts": 1, "peak_rss_mb": {"recognition-0 (pid 9)": 12.3, "recognition-0 (pid 10)": 0.0},
                   "counts": {"k": 1}, "latency_p50_ms": 4.0, "latency_p99_ms": 9.5}  # the worst process's
    assert (s["stages"]["detection"]["latency_p50_ms"], s["stages"]["detection"]["latency_p99_ms"]) == (1.5, 2.25)
    assert s["restarts"] == {"capture": 0, "detection": 0, "recognition": 1, "storage": 0}
    assert s["losses"] == {"recognition": {"lost": 2}} and s["complete"] is False and "failure" not in s
    assert s["interrupted"] is False
    live = run_summary("run1", 5.0, views(), failure="stage x failed", file_mode=False)
    assert live["complete"] is None and live["failure"] == "stage x failed" and "active_s" not in live


@pytest.mark.parametrize("counts, expected", [
    ({}, ""),
    ({"batches": 0, "batch_frames": 0}, ""),
    ({"batches": 4, "batch_frames": 10, "batch_timeouts": 2},
     "batches: 4, mean 2.50 frames, 2 closed by the timeout"),
    ({"batches": 4, "batch_frames": 10, "batch_timeouts": 2, "detector_batches": 3, "detector_batch_frames": 7,
      "detector_runs": 7, "detector_discarded": 1},
     "batches: 4, mean 2.50 frames, 2 closed by the timeout; to the detector: 3, mean 2.33 frames, 7 model runs, 1 discarded"),
    ({"batches": 5, "batch_frames": 20, "face_embed_runs": 4, "face_embeddings": 10, "reid_runs": 2, "reid_crops": 9},
     "batches: 5, mean 4.00 frames, 0 closed by the timeout; face embedder: 4 runs, mean 2.50 crops; Re-ID: 2 runs, mean 4.50 crops"),
    ({"batches": 5, "batch_frames": 20, "face_detector_runs": 5, "face_analyses": 12},
     "batches: 5, mean 4.00 frames, 0 closed by the timeout; face detector: 5 runs, mean 2.40 images"),
    ({"face_embed_runs": 4, "face_embeddings": 10}, ""),  # recognition frame by frame: no batching line
])
def test_batch_summary(counts: dict, expected: str) -> None:
    from pipeline.status import batch_summary

    assert batch_summary(counts) == expected


def test_status_table_shows_batching_summed_over_detection_processes() -> None:
    from pipeline.cli import _status_table

    v = views(detection=[snap(extra={"batches": 2, "batch_frames": 8, "batch_timeouts": 0}),
                         snap(extra={"batches": 2, "batch_frames": 4, "batch_timeouts": 1})])
    table = _status_table(status_reply("run1", 1.0, v, {s: RateWindow() for s in ORDER}, now=1.0)).splitlines()
    at = next(i for i, line in enumerate(table) if line.startswith("detection"))
    assert table[at + 2].strip() == "batches: 4, mean 3.00 frames, 1 closed by the timeout"  # after its counts line
    assert sum("batches:" in line for line in table) == 1
