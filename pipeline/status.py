"""The status aggregator: per-process counter snapshots + retired totals → StatusReply and the run summary.

Pure functions and small value objects: no processes, sockets or clocks (the
caller passes ``now``). The supervisor reads each live process's counter
block (:class:`~pipeline.counters.BlockSnapshot`), keeps the final counts of
exited processes in a :class:`Retired` per stage, and asks this module for:

- stage totals (live + retired): ``frames_in``, ``frames_out``, ``sent``,
  ``backlog`` (live only), drops per reason, extra counts;
- queue depth of a stage = upstream ``sent`` − own ``frames_in`` (never
  negative) + own ``backlog``; 0 for the first stage;
- rate = frames_out growth over the last ``span_s`` seconds (:class:`RateWindow`);
- losses: drops whose reason is in :data:`LOSS_REASONS`, per stage;
- the run summary dict written to ``last_run.json``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from pipeline.counters import BlockSnapshot
from pipeline.messages import DROP_REASONS, StageStatus, StatusReply

#: Drop reasons that mean a frame of a file was not processed (exit code 3 in file mode).
LOSS_REASONS: tuple[str, ...] = ("lost", "overwritten", "queue_full")
#: Extra counter a capture process sets > 0 when its file source ended before its last frame.
ENDED_EARLY = "ended_early"


def _zeros() -> np.ndarray:
    return np.zeros(len(DROP_REASONS), np.int64)


#: Extra counters that state what a process is doing now (gauges), not work it did: an exited process's last value is
#: replaced by its successor's rather than added to it (``port`` 73544 after an api restart, a waiting frame of
#: -1 + 19); with no live process left (the run summary) the last exited process's value stands.
GAUGES: frozenset[str] = frozenset({
    "ready", "port", "offline", "reorder_waiting_for", "storage_unacked", "lock_wait_ms",
    "mqtt_connected", "outbox_pending", "jobs_queued", "jobs_running", "job_cpu_percent",
    "frigate_mqtt_connected", "frigate_up", "frigate_queued",
})


def is_gauge(name: str) -> bool:
    """True for a gauge extra counter: one of :data:`GAUGES`, or a ``<model> on <provider>`` line."""
    return name in GAUGES or " on " in name


@dataclass
class Retired:
    """Final counts of a stage's exited processes.

    Attributes:
        drops: ``(len(DROP_REASONS),) int64``.
        counts: extra counter name → sum (work counts only).
        gauges: gauge name (:func:`is_gauge`) → the value the last exited process reported.
        peak_rss_mb: ``"<stage>-<index> (pid <pid>)"`` → MiB, one entry per process that ever ran.
        latency_p50_ms, latency_p99_ms: the worst exited process's last published percentiles of its
            per-item processing time (its window of recent items), milliseconds.
    """

    frames_in: int = 0
    frames_out: int = 0
    sent: int = 0
    drops: np.ndarray = field(default_factory=_zeros)
    counts: dict = field(default_factory=dict)
    gauges: dict = field(default_factory=dict)
    peak_rss_mb: dict = field(default_factory=dict)
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0

    def add(self, snap: BlockSnapshot, label: str, peak_rss_mb: float | None = None) -> None:
        """Book the final counts of one exited process (``label`` names it in ``peak_rss_mb``)."""
        self.frames_in += snap.frames_in
        self.frames_out += snap.frames_out
        self.sent += snap.sent
        self.drops = self.drops + snap.drops
        for name, n in snap.extra.items():
            if is_gauge(name):  # its last state, until a live process reports its own
                self.gauges[name] = int(n)
            else:
                self.counts[name] = self.counts.get(name, 0) + int(n)
        self.peak_rss_mb[label] = max(snap.max_rss_mb, peak_rss_mb or 0.0)
        self.latency_p50_ms = max(self.latency_p50_ms, snap.latency_p50_ms)
        self.latency_p99_ms = max(self.latency_p99_ms, snap.latency_p99_ms)


@dataclass(frozen=True)
class LiveProc:
    """One live process: its counters, and CPU/RSS as measured by the supervisor (percent, MiB)."""

    pid: int
    counters: BlockSnapshot
    cpu_percent: float = 0.0
    rss_mb: float = 0.0


@dataclass(frozen=True)
class StageView:
    """What the supervisor knows about one stage. ``state``: running, starting, done, stopped or failed."""

    live: tuple[LiveProc, ...]
    retired: Retired
    restarts: int = 0
    last_error: str = ""
    state: str = "running"


@dataclass(frozen=True)
class Totals:
    """A stage's counters summed over live and retired processes (``backlog``: live only)."""

    frames_in: int
    frames_out: int
    sent: int
    backlog: int
    drops: np.ndarray
    counts: dict


def totals(view: StageView) -> Totals:
    snaps = [p.counters for p in view.live]
    r = view.retired
    counts = dict(r.counts)
    live_gauges: dict[str, int] = {}
    for s in snaps:
        for name, n in s.extra.items():
            into = live_gauges if is_gauge(name) else counts
            into[name] = into.get(name, 0) + int(n)
    counts.update({**r.gauges, **live_gauges})  # a gauge: the live processes' values, else the last exited one's
    return Totals(frames_in=r.frames_in + sum(s.frames_in for s in snaps),
                  frames_out=r.frames_out + sum(s.frames_out for s in snaps),
                  sent=r.sent + sum(s.sent for s in snaps), backlog=sum(s.backlog for s in snaps),
                  drops=r.drops + sum((s.drops for s in snaps), _zeros()), counts=counts)


def queue_depths(order: Sequence[str], stage_totals: Mapping[str, Totals],
                 chain: Sequence[str] | None = None) -> dict[str, int]:
    """Items waiting for each stage: upstream sent − received here (≥ 0) + held inside it; 0 for the first.

    Args:
        order: every stage of ``stage_totals``.
        chain: the stages that feed each other, in order (default: ``order``); a stage outside it has
            no upstream: its depth is what it holds (``backlog``).
    """
    links = [s for s in (order if chain is None else chain) if s in stage_totals]
    out = {}
    for stage in order:
        t = stage_totals[stage]
        if stage not in links:
            out[stage] = t.backlog
            continue
        i = links.index(stage)
        out[stage] = 0 if i == 0 else max(0, stage_totals[links[i - 1]].sent - t.frames_in) + t.backlog
    return out


class RateWindow:
    """Items per second over the last ``span_s`` seconds from cumulative totals fed with :meth:`rate`."""

    def __init__(self, span_s: float = 5.0) -> None:
        self.span_s = span_s
        self._samples: deque[tuple[float, int]] = deque(maxlen=64)

    def rate(self, now: float, total: int) -> float:
        """Add the sample ``(now, total)`` and return the rate, items/s (0 until two samples differ in time)."""
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.span_s:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0


def _stage_status(stage: str, view: StageView, t: Totals, depth: int, rate: float) -> StageStatus:
    snaps = [p.counters for p in view.live]
    return StageStatus(
        stage=stage, processes=len(view.live), pids=np.array([p.pid for p in view.live], np.int64),
        rate_fps=round(rate, 2), queue_depth=depth, oldest_wait_ms=max((s.oldest_wait_ms for s in snaps), default=0.0),
        drop_counts=t.drops.astype(np.int64), latency_p50_ms=max((s.latency_p50_ms for s in snaps), default=0.0),
        latency_p99_ms=max((s.latency_p99_ms for s in snaps), default=0.0),
        cpu_percent=round(sum(p.cpu_percent for p in view.live), 1), rss_mb=round(sum(p.rss_mb for p in view.live), 1),
        restarts=view.restarts, state=view.state, last_error=view.last_error,
        count_names=tuple(t.counts), counts=np.array(list(t.counts.values()), np.int64))


def status_reply(run_id: str, uptime_s: float, views: Mapping[str, StageView], rates: Mapping[str, RateWindow],
                 now: float, chain: Sequence[str] | None = None) -> StatusReply:
    """The ``facepro status`` answer; ``views`` in pipeline order, one :class:`RateWindow` per stage (fed here);
    ``chain``: the stages that feed each other (:func:`queue_depths`; default: all of ``views``)."""
    order = list(views)
    tot = {s: totals(v) for s, v in views.items()}
    depth = queue_depths(order, tot, chain)
    stages = tuple(_stage_status(s, views[s], tot[s], depth[s], rates[s].rate(now, tot[s].frames_out)) for s in order)
    return StatusReply(run_id=run_id, uptime_s=round(uptime_s, 2), stages=stages)


def status_json(reply: StatusReply) -> dict:
    """The ``facepro status --json`` document (also ``GET /api/status``): ``run_id``, ``uptime_s`` (s) and one dict
    per stage: ``stage``, ``processes``, ``rate_fps``, ``queue_depth``, ``dropped``, ``drops`` (reason → n),
    ``pids``, ``state``, ``oldest_wait_ms``, ``latency_p50_ms``, ``latency_p99_ms``, ``cpu_percent``, ``rss_mb``
    (MiB), ``restarts``, ``last_error``, ``counts`` (name → n)."""
    return {"run_id": reply.run_id, "uptime_s": reply.uptime_s, "stages": [
        {"stage": s.stage, "processes": s.processes, "rate_fps": s.rate_fps, "queue_depth": s.queue_depth,
         "dropped": s.dropped, "drops": {r: int(n) for r, n in zip(DROP_REASONS, s.drop_counts)},
         "pids": [int(p) for p in s.pids], "state": s.state, "oldest_wait_ms": s.oldest_wait_ms,
         "latency_p50_ms": s.latency_p50_ms, "latency_p99_ms": s.latency_p99_ms, "cpu_percent": s.cpu_percent,
         "rss_mb": s.rss_mb, "restarts": s.restarts, "last_error": s.last_error,
         "counts": {n: int(v) for n, v in zip(s.count_names, s.counts)}}
        for s in reply.stages]}


def losses(views: Mapping[str, StageView]) -> dict[str, dict[str, int]]:
    """Per stage, the non-zero drops whose reason is in :data:`LOSS_REASONS` (stages without any left out)."""
    out = {}
    for stage, view in views.items():
        drops = totals(view).drops
        found = {r: int(drops[DROP_REASONS.index(r)]) for r in LOSS_REASONS if drops[DROP_REASONS.index(r)]}
        if found:
            out[stage] = found
    return out


def incomplete(views: Mapping[str, StageView], first_stage: str = "capture") -> list[str]:
    """Why a file-mode run did not process its files completely (empty: it did)."""
    why = [f"{stage} {reason}={n}" for stage, d in losses(views).items() for reason, n in d.items()]
    cap = views.get(first_stage)
    if cap is not None:
        early = totals(cap).counts.get(ENDED_EARLY, 0)
        if early:
            why.append(f"{first_stage} ended early ({early})")
    return why


def latency_ms(view: StageView) -> tuple[float, float]:
    """(p50, p99) per-item processing time of a stage's worst process, live or exited, milliseconds (each
    process's last published window of recent items, rounded to 0.01 ms)."""
    p50 = max([view.retired.latency_p50_ms] + [p.counters.latency_p50_ms for p in view.live])
    p99 = max([view.retired.latency_p99_ms] + [p.counters.latency_p99_ms for p in view.live])
    return round(p50, 2), round(p99, 2)


def run_summary(run_id: str, wall_s: float, views: Mapping[str, StageView], active_s: float | None = None,
                failure: str | None = None, exit_code: int | None = None, file_mode: bool = False,
                interrupted: bool = False) -> dict:
    """The run summary (``last_run.json``): per-stage totals, rates over ``wall_s``, drops, restarts, peak RSS.

    Keys: ``run_id``, ``wall_s``, ``active_s`` (when given), ``stages`` → per stage ``frames_in``,
    ``frames_out``, ``sent``, ``rate_fps``, ``dropped`` (non-zero reasons), ``restarts``,
    ``peak_rss_mb``, ``counts``, ``latency_p50_ms`` / ``latency_p99_ms`` (:func:`latency_ms`); then ``restarts`` (stage → n), ``losses`` (:func:`losses`),
    ``complete`` (file mode: :func:`incomplete` is empty; None otherwise), ``incomplete``,
    ``interrupted`` (stopped by a signal before the sources ended: frames not yet read were not lost),
    ``exit_code`` and ``failure`` when given.
    """
    out: dict = {"run_id": run_id, "wall_s": round(wall_s, 2), "stages": {}}
    if active_s is not None:
        out["active_s"] = round(active_s, 3)
    for stage, view in views.items():
        t = totals(view)
        out["stages"][stage] = {
            "frames_in": t.frames_in, "frames_out": t.frames_out, "sent": t.sent,
            "rate_fps": round(t.frames_out / wall_s, 2) if wall_s else 0.0,
            "dropped": {r: int(n) for r, n in zip(DROP_REASONS, t.drops) if n},
            "restarts": view.restarts, "peak_rss_mb": {k: round(v, 1) for k, v in view.retired.peak_rss_mb.items()},
            "counts": dict(t.counts),
        }
        out["stages"][stage]["latency_p50_ms"], out["stages"][stage]["latency_p99_ms"] = latency_ms(view)
    out["restarts"] = {stage: view.restarts for stage, view in views.items()}
    out["losses"] = losses(views)
    why = incomplete(views) if file_mode else []
    out["complete"] = (not why) if file_mode else None
    out["incomplete"] = why
    out["interrupted"] = interrupted
    if exit_code is not None:
        out["exit_code"] = exit_code
    if failure:
        out["failure"] = failure
    return out


def batch_summary(counts: Mapping[str, int]) -> str:
    """One line on a stage's batching from its summed counts (``detection.batch`` or ``recognition.batch`` > 1), or
    ``""`` without it.

    Uses the runner's ``batches`` / ``batch_frames`` / ``batch_timeouts``, the detection stage's
    ``detector_batches`` / ``detector_batch_frames`` / ``detector_runs`` / ``detector_discarded`` and the
    recognition stage's ``face_detector_runs`` / ``face_analyses``, ``face_embed_runs`` / ``face_embeddings``
    and ``reid_runs`` / ``reid_crops``; mean sizes are frames per batch, images or crops per model run.
    """
    batches = counts.get("batches", 0)
    if not batches:
        return ""
    line = (f"batches: {batches}, mean {counts.get('batch_frames', 0) / batches:.2f} frames, "
            f"{counts.get('batch_timeouts', 0)} closed by the timeout")
    det = counts.get("detector_batches", 0)
    if det:
        line += (f"; to the detector: {det}, mean {counts.get('detector_batch_frames', 0) / det:.2f} frames, "
                 f"{counts.get('detector_runs', 0)} model runs, {counts.get('detector_discarded', 0)} discarded")
    for runs, items, what, unit in (("face_detector_runs", "face_analyses", "face detector", "images"),
                                    ("face_embed_runs", "face_embeddings", "face embedder", "crops"),
                                    ("reid_runs", "reid_crops", "Re-ID", "crops")):
        if counts.get(runs, 0):
            line += f"; {what}: {counts[runs]} runs, mean {counts.get(items, 0) / counts[runs]:.2f} {unit}"
    return line
