"""The supervisor: starts the stage processes, watches them, answers ``status``, shuts down cleanly.

Process layout (each a separate OS process started with ``python -m
pipeline.worker``; nothing is pickled to start them, they read the run's
``config.json``):

- one **capture** process per camera,
- ``detection.processes`` **motion/detection** processes,
- ``recognition.processes`` **recognition** processes (cameras are partitioned
  across them so each camera's tracker lives in exactly one process),
- one **storage** process, the only database writer.

Every process sends a heartbeat with cumulative counters every
``runtime.stats_interval_s``. A process that exits with an error or stops
beating for ``runtime.heartbeat_timeout_s`` is restarted with exponential
backoff; more than ``MAX_RESTARTS`` restarts of one stage within
``RESTART_WINDOW_S`` stop the pipeline with a message naming the stage and
its last error.

Shutdown (end of all file sources, or SIGINT/SIGTERM) goes stage by stage in
pipeline order: capture stops (a file capture first waits until all its
frames were released downstream), then detection, recognition and storage
each drain their inbox and exit; storage commits last. A second signal kills
everything at once. Whatever happens, the run's shared-memory segments and
runtime directory are removed at exit.

This module wires ``stages``/``storage`` together only through
:mod:`pipeline.worker` and the injected ``prepare_database`` callable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import psutil

from pipeline.config import AppConfig
from pipeline.metrics import AlertTracker, StatusCollector, start_exporter
from pipeline.messages import DROP_REASONS, ScaleRequest, StageStats, StageStatus, StatusReply, StatusRequest, Ack
from pipeline.ring import list_segments, run_id_of, unlink_segments
from pipeline.transport import Transport, make_runtime_dir, socket_dir_for

log = logging.getLogger("facepro.supervisor")

STAGES: tuple[str, ...] = ("capture", "detection", "recognition", "storage")
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
STOP_TIMEOUT_S = 60.0


class SupervisorError(RuntimeError):
    """The pipeline cannot start or had to stop (message names the stage and reason)."""


def runs_dir(data_dir: Path) -> Path:
    return data_dir / "run"


def current_run_file(data_dir: Path) -> Path:
    """JSON file describing the running pipeline (``run_id``, ``pid``, ``runtime_dir``, ``socket_dir``)."""
    return runs_dir(data_dir) / "current.json"


def read_current_run(data_dir: Path) -> dict | None:
    """The running pipeline's description, or None when none is running (stale files are ignored)."""
    path = current_run_file(data_dir)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not psutil.pid_exists(int(info.get("pid", -1))):
        return None
    return info


def cleanup_stale_runs(data_dir: Path) -> int:
    """Remove segments and runtime dirs left by killed runs (``facepro_`` prefix only).

    A run is alive while the supervisor pid recorded in its ``run.json`` exists.
    Returns the number of segments removed.
    """
    alive = set()
    base = runs_dir(data_dir)
    for run_json in base.glob("*/run.json") if base.is_dir() else []:
        try:
            info = json.loads(run_json.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("pid") and psutil.pid_exists(int(info["pid"])):
            alive.add(info["run_id"])
        else:
            shutil.rmtree(run_json.parent, ignore_errors=True)
    stale = [s for s in list_segments() if run_id_of(s) not in alive and _segment_owner_dead(s)]
    return unlink_segments(stale)


def _segment_owner_dead(segment: str) -> bool:
    """A segment whose creating capture process no longer exists (name carries its pid)."""
    try:
        pid = int(segment.rsplit("_", 2)[-2])
    except (ValueError, IndexError):
        return True
    return not psutil.pid_exists(pid)


@dataclass
class Child:
    stage: str
    index: int
    popen: subprocess.Popen
    started_at: float
    stats: StageStats | None = None
    last_beat: float = 0.0
    proc: psutil.Process | None = None
    peak_rss_mb: float = 0.0
    stopping: bool = False

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class StageBook:
    """Per-stage bookkeeping across process restarts."""

    restarts: int = 0
    restart_times: deque = field(default_factory=deque)
    retired_in: int = 0
    retired_out: int = 0
    retired_sent: int = 0
    retired_drops: np.ndarray = field(default_factory=lambda: np.zeros(len(DROP_REASONS), np.int64))
    last_error: str = ""
    rate_samples: deque = field(default_factory=lambda: deque(maxlen=64))
    peak_rss_mb: dict = field(default_factory=dict)  # "stage-index pid" -> MiB
    retired_counts: dict = field(default_factory=dict)  # stage-specific counters of exited processes
    done: bool = False


class Supervisor:
    """Runs one pipeline until its file sources end or it is signalled.

    Args:
        cfg: validated config.
        data_dir: FACEPRO_DATA_DIR (database, snapshots, ``run/``).
        prepare_database: called once before any process starts (applies
            migrations); raises to abort the start.
    """

    def __init__(self, cfg: AppConfig, data_dir: Path, prepare_database: Callable[[], object] | None = None) -> None:
        self.cfg = cfg
        self.data_dir = data_dir
        self.prepare_database = prepare_database
        self.run_id = uuid.uuid4().hex[:8]
        self.runtime_dir = runs_dir(data_dir) / self.run_id
        self.children: list[Child] = []
        self.books = {s: StageBook() for s in STAGES}
        self.counts = {"capture": len(cfg.cameras), "detection": cfg.detection.processes,
                       "recognition": cfg.recognition.processes, "storage": 1}
        self.started = time.monotonic()
        self.signals = 0
        self.shutdown_phase: int | None = None
        self.phase_started = 0.0
        self.failure: str | None = None
        self.transport: Transport | None = None
        self.metrics_port: int | None = None
        self.first_frame_at: float | None = None  # monotonic time the first frame was captured
        self.sources_done_at: float | None = None  # monotonic time every file source had ended
        self.pending: list[tuple[float, str, int]] = []
        self.repartition: tuple[int, int] | None = None  # (phase, target recognition processes) while rescaling  # (due, stage, index) restarts waiting for their backoff

    # ----------------------------------------------------------------- start
    def _claim_run(self) -> None:
        other = read_current_run(self.data_dir)
        if other is not None:
            raise SupervisorError(f"a pipeline is already running with data dir {self.data_dir} (pid {other['pid']}, run {other['run_id']}); "
                                  "stop it first or use another FACEPRO_DATA_DIR")
        removed = cleanup_stale_runs(self.data_dir)
        if removed:
            log.warning("removed %d shared-memory segment(s) left by a killed run", removed)
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.runtime_dir, 0o700)
        self.socket_dir = make_runtime_dir(socket_dir_for(self.runtime_dir, self.run_id))
        info = {"run_id": self.run_id, "pid": os.getpid(), "runtime_dir": str(self.runtime_dir),
                "socket_dir": str(self.socket_dir), "started_at": time.time()}
        (self.runtime_dir / "run.json").write_text(json.dumps(info))
        (self.runtime_dir / "config.json").write_text(self.cfg.model_dump_json())
        current_run_file(self.data_dir).write_text(json.dumps(info))

    def _spawn(self, stage: str, index: int) -> Child:
        env = dict(os.environ)
        env.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "FACEPRO_DATA_DIR": str(self.data_dir)})
        cmd = [sys.executable, "-m", "pipeline.worker", str(self.runtime_dir), stage, str(index),
               str(self.counts["recognition"])]
        popen = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        child = Child(stage, index, popen, time.monotonic(), last_beat=time.monotonic())
        try:
            child.proc = psutil.Process(popen.pid)
            child.proc.cpu_percent(None)
        except psutil.Error:
            child.proc = None
        self.children.append(child)
        log.info("started %s-%d (pid %d)", stage, index, popen.pid)
        return child

    def start(self) -> None:
        """Claim the data dir, prepare the database and start every process.

        Raises:
            SupervisorError: another run is active, or preparation failed.
        """
        self._claim_run()
        if self.prepare_database is not None:
            self.prepare_database()
        self._start_metrics()
        self.transport = Transport(self.socket_dir)
        self.stats_in = self.transport.receiver("stats", bind=True, hwm=10_000)
        self.control = self.transport.server("control")
        for stage in reversed(STAGES):  # downstream first: their endpoints are bound before upstream sends
            for i in range(self.counts[stage]):
                self._spawn(stage, i)

    def _start_metrics(self) -> None:
        a = self.cfg.runtime.alerts
        self.alerts = AlertTracker(a.min_rate_fps, a.backlog_frames, a.max_rss_mb, a.grace_s)
        self.collector = StatusCollector(self.alerts)
        if self.cfg.runtime.metrics_port is None:
            return
        try:
            self.metrics_port = start_exporter(self.collector, self.cfg.runtime.metrics_port)
        except OSError as err:
            raise SupervisorError(str(err)) from None
        log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", self.metrics_port)
        info = json.loads((self.runtime_dir / "run.json").read_text())
        info["metrics_port"] = self.metrics_port
        for path in (self.runtime_dir / "run.json", current_run_file(self.data_dir)):
            path.write_text(json.dumps(info))

    def _refresh_status(self) -> None:
        """Recompute the status snapshot for the exporter and log alert changes (once a second)."""
        reply = self.status()
        self.collector.reply = reply
        for stage, alert, on in self.alerts.update(reply):
            if on:
                log.warning("alert %s on stage %s (see facepro status)", alert, stage)
            else:
                log.info("alert %s on stage %s cleared", alert, stage)

    # ------------------------------------------------------------ monitoring
    def _collect_stats(self) -> None:
        while True:
            msg = self.stats_in.recv(timeout_ms=0)
            if msg is None:
                return
            if isinstance(msg, StageStats):
                if self.first_frame_at is None and msg.stage == "capture" and msg.frames_out > 0:
                    self.first_frame_at = time.monotonic()
                for c in self.children:
                    if c.popen.pid == msg.pid:
                        c.stats = msg
                        c.last_beat = time.monotonic()
                        c.peak_rss_mb = max(c.peak_rss_mb, msg.max_rss_mb)
                        if msg.last_error:
                            self.books[c.stage].last_error = msg.last_error

    def _collect_final_stats(self, child: Child, quiet_s: float = 0.05) -> None:
        """Read heartbeats still queued before ``child``'s exit is booked.

        A child flushes its final heartbeat before exiting (stats socket linger), so
        once the stats socket has been quiet for ``quiet_s`` its final counts are in.
        """
        last = child.stats
        while True:
            time.sleep(quiet_s)
            self._collect_stats()
            if child.stats is last:
                return
            last = child.stats

    def _retire(self, child: Child) -> None:
        book = self.books[child.stage]
        if child.stats is not None:
            book.retired_in += child.stats.frames_in
            book.retired_out += child.stats.frames_out
            book.retired_sent += child.stats.sent
            book.retired_drops += child.stats.drop_counts
            for name, n in zip(child.stats.count_names, child.stats.counts):
                book.retired_counts[name] = book.retired_counts.get(name, 0) + int(n)
        book.peak_rss_mb[f"{child.stage}-{child.index} (pid {child.popen.pid})"] = child.peak_rss_mb
        self.children.remove(child)

    def _restart(self, child: Child, reason: str) -> None:
        book = self.books[child.stage]
        now = time.monotonic()
        book.restart_times.append(now)
        while book.restart_times and now - book.restart_times[0] > RESTART_WINDOW_S:
            book.restart_times.popleft()
        book.restarts += 1
        book.last_error = book.last_error or reason
        if len(book.restart_times) > MAX_RESTARTS:
            self.failure = (f"stage {child.stage} failed {len(book.restart_times)} times in {RESTART_WINDOW_S:.0f} s; "
                            f"last error: {book.last_error or reason}")
            self._begin_shutdown()
            return
        delay = min(10.0, 0.5 * 2 ** (len(book.restart_times) - 1))
        log.warning("%s-%d %s; restarting in %.1f s", child.stage, child.index, reason, delay)
        self.pending.append((time.monotonic() + delay, child.stage, child.index))

    def _start_pending(self) -> None:
        now = time.monotonic()
        for item in [p for p in self.pending if p[0] <= now]:
            self.pending.remove(item)
            if self.shutdown_phase is None:
                self._spawn(item[1], item[2])

    def _check_children(self) -> None:
        now = time.monotonic()
        for child in list(self.children):
            code = child.popen.poll()
            if code is None:
                if (not child.stopping and self.shutdown_phase is None
                        and now - child.last_beat > self.cfg.runtime.heartbeat_timeout_s):
                    log.error("%s-%d sent no heartbeat for %.0f s; killing it", child.stage, child.index, now - child.last_beat)
                    child.popen.kill()
                continue
            self._collect_final_stats(child)
            self._retire(child)
            if code == 0 and (child.stage == "capture" or child.stopping):
                continue  # a file source ended, or a requested stop
            if child.stopping:
                continue
            reason = f"exited with code {code}"
            if self.shutdown_phase is None:
                self._restart(child, reason)
            else:
                self.books[child.stage].last_error = self.books[child.stage].last_error or reason

    # ------------------------------------------------------------- shutdown
    def _begin_shutdown(self) -> None:
        if self.shutdown_phase is None:
            self.shutdown_phase = 0
            self.phase_started = time.monotonic()

    def _stage_children(self, stage: str) -> list[Child]:
        return [c for c in self.children if c.stage == stage]

    def _advance_shutdown(self) -> bool:
        """Stop stages one by one in pipeline order; True when all have exited."""
        while self.shutdown_phase is not None and self.shutdown_phase < len(STAGES):
            stage = STAGES[self.shutdown_phase]
            kids = self._stage_children(stage)
            for c in kids:
                if not c.stopping:
                    c.stopping = True
                    c.popen.send_signal(signal.SIGTERM)
                    if self.failure:  # a stage is gone for good: nobody will drain, stop hard (second signal)
                        time.sleep(0.05)
                        c.popen.send_signal(signal.SIGTERM)
            if kids:
                if time.monotonic() - self.phase_started > STOP_TIMEOUT_S:
                    log.error("%s did not stop within %.0f s; killing it", stage, STOP_TIMEOUT_S)
                    for c in kids:
                        c.popen.kill()
                return False
            self.shutdown_phase += 1
            self.phase_started = time.monotonic()
        return True

    def _files_done(self) -> bool:
        """True once every camera is a file source whose capture has finished."""
        if any(cam.resolved_mode() != "file" for cam in self.cfg.cameras):
            return False
        return not self._stage_children("capture")

    def handle_signal(self, signum: int, _frame: object = None) -> None:
        self.signals += 1
        if self.signals == 1:
            log.warning("signal %d: draining and shutting down (send again to force)", signum)
            self._begin_shutdown()
        else:
            log.error("second signal: killing all processes")
            for c in self.children:
                c.popen.kill()

    # --------------------------------------------------------------- status
    def _stage_status(self, stage: str, now: float) -> StageStatus:
        kids = self._stage_children(stage)
        book = self.books[stage]
        stats = [c.stats for c in kids if c.stats is not None]
        total_out = book.retired_out + sum(s.frames_out for s in stats)
        book.rate_samples.append((now, total_out))
        while len(book.rate_samples) > 2 and now - book.rate_samples[0][0] > 5.0:
            book.rate_samples.popleft()
        t0, n0 = book.rate_samples[0]
        rate = (total_out - n0) / (now - t0) if now > t0 else 0.0
        drops = book.retired_drops + sum((s.drop_counts for s in stats), np.zeros(len(DROP_REASONS), np.int64))
        cpu, rss = 0.0, 0.0
        for c in kids:
            try:
                if c.proc is not None:
                    cpu += c.proc.cpu_percent(None)
                    rss += c.proc.memory_info().rss / 2**20
            except psutil.Error:
                pass
        extra: dict[str, int] = dict(book.retired_counts)
        for st in stats:
            for name, n in zip(st.count_names, st.counts):
                extra[name] = extra.get(name, 0) + int(n)
        state = "running" if kids else ("done" if self.books[stage].done or stage == "capture" else "stopped")
        if self.failure and stage in self.failure:
            state = "failed"
        return StageStatus(
            stage=stage, processes=len(kids), pids=np.array([c.popen.pid for c in kids], np.int64),
            rate_fps=round(rate, 2), queue_depth=self._queue_depth(stage),
            oldest_wait_ms=max((s.oldest_wait_ms for s in stats), default=0.0), drop_counts=drops,
            latency_p50_ms=max((s.latency_p50_ms for s in stats), default=0.0),
            latency_p99_ms=max((s.latency_p99_ms for s in stats), default=0.0),
            cpu_percent=round(cpu, 1), rss_mb=round(rss, 1), restarts=book.restarts, state=state,
            last_error=book.last_error, count_names=tuple(extra), counts=np.array(list(extra.values()), np.int64),
        )

    def _totals(self, stage: str) -> tuple[int, int, int, int]:
        """(frames_in, frames_out, sent, backlog) of a stage, retired processes included."""
        book = self.books[stage]
        stats = [c.stats for c in self._stage_children(stage) if c.stats is not None]
        return (book.retired_in + sum(s.frames_in for s in stats), book.retired_out + sum(s.frames_out for s in stats),
                book.retired_sent + sum(s.sent for s in stats), sum(s.backlog for s in stats))

    def _queue_depth(self, stage: str) -> int:
        """Items waiting for ``stage``: upstream sent − received here + held inside its processes."""
        idx = STAGES.index(stage)
        received, _, _, backlog = self._totals(stage)
        if idx == 0:
            return 0
        upstream_sent = self._totals(STAGES[idx - 1])[2]
        return max(0, upstream_sent - received) + backlog

    def status(self) -> StatusReply:
        now = time.monotonic()
        return StatusReply(run_id=self.run_id, uptime_s=round(now - self.started, 2),
                           stages=tuple(self._stage_status(s, now) for s in STAGES))

    def _serve_control(self) -> None:
        req = self.control.poll_request(timeout_ms=50)
        if req is None:
            return
        if isinstance(req, StatusRequest):
            self.control.reply(self.status())
        elif isinstance(req, ScaleRequest):
            self.control.reply(self.scale(req.stage, req.processes))
        else:
            self.control.reply(Ack(ok=False, message=f"unsupported request {type(req).__name__}"))

    def scale(self, stage: str, processes: int) -> Ack:
        """Grow or shrink the detection or recognition stage to ``processes`` processes.

        Detection processes are added or removed directly (credit-based input:
        a removed process finishes exactly the frames it received). Recognition
        owns each camera's tracker, so a new process count repartitions the
        cameras: detection drains and stops, then recognition finishes its
        frames and closes its tracks, then both restart with the new camera
        map (:meth:`_advance_repartition`). Capture and storage keep running.
        """
        if self.shutdown_phase is not None or self.repartition is not None:
            return Ack(ok=False, message="the pipeline is busy (shutting down or already rescaling); try again")
        if stage == "recognition":
            old = self.counts["recognition"]
            self.repartition = (0, processes)
            return Ack(ok=True, message=f"recognition: {old} -> {processes} processes (cameras repartitioned; detection and recognition restart)")
        if stage != "detection":
            return Ack(ok=False, message=f"scaling {stage} at run time is not supported ({stage} runs one process per camera or one in all)")
        kids = [c for c in self._stage_children(stage) if not c.stopping]
        for i in range(len(kids), processes):
            self._spawn(stage, i)
        for c in kids[processes:]:
            c.stopping = True
            c.popen.send_signal(signal.SIGTERM)
        self.counts[stage] = processes
        return Ack(ok=True, message=f"{stage}: {len(kids)} -> {processes} processes")

    def _advance_repartition(self) -> None:
        """One step of a recognition rescale: stop detection, then recognition, then start both anew."""
        phase, target = self.repartition  # type: ignore[misc]
        stage = ("detection", "recognition")[phase] if phase < 2 else None
        if stage is not None:
            kids = self._stage_children(stage)
            for c in kids:
                if not c.stopping:
                    c.stopping = True
                    c.popen.send_signal(signal.SIGTERM)
            if not kids:
                self.repartition = (phase + 1, target)
            return
        self.counts["recognition"] = target
        for i in range(target):
            self._spawn("recognition", i)
        for i in range(self.counts["detection"]):
            self._spawn("detection", i)
        self.repartition = None
        log.info("recognition rescaled to %d process(es)", target)

    # ----------------------------------------------------------------- loop
    def run(self) -> int:
        """Start, supervise until done, clean up. Returns the exit code (0 on success)."""
        old = {s: signal.signal(s, self.handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            next_log = time.monotonic() + 5.0
            next_refresh = time.monotonic()
            while True:
                self._collect_stats()
                self._serve_control()
                self._check_children()
                self._start_pending()
                if self.repartition is not None and self.shutdown_phase is None:
                    self._advance_repartition()
                if self.shutdown_phase is None and not self.pending and self._files_done():
                    log.info("all file sources finished; draining")
                    self.sources_done_at = time.monotonic()
                    self._begin_shutdown()
                if self.shutdown_phase is not None and self._advance_shutdown():
                    break
                if time.monotonic() >= next_refresh:
                    self._refresh_status()
                    next_refresh = time.monotonic() + 1.0
                if time.monotonic() >= next_log:
                    self._log_progress()
                    next_log = time.monotonic() + 5.0
            self._collect_stats()
            if self.signals >= 2:
                return 130  # forced: in-flight frames were abandoned
            return 1 if self.failure else 0
        finally:
            self._cleanup()
            for s, h in old.items():
                signal.signal(s, h)

    def _log_progress(self) -> None:
        for st in self.status().stages:
            log.info("%-11s procs=%d rate=%.1f/s queue=%d dropped=%d", st.stage, st.processes, st.rate_fps, st.queue_depth, st.dropped)

    def summary(self) -> dict:
        """Totals of the finished run: frames, wall time, per-stage rates, drops, peak memory."""
        wall = time.monotonic() - self.started
        out: dict = {"run_id": self.run_id, "wall_s": round(wall, 2), "stages": {}}
        if self.first_frame_at is not None and self.sources_done_at is not None:
            out["active_s"] = round(self.sources_done_at - self.first_frame_at, 3)  # first frame → all frames processed
        for stage in STAGES:
            frames_in, frames_out, sent, _ = self._totals(stage)
            book = self.books[stage]
            out["stages"][stage] = {
                "frames_in": frames_in, "frames_out": frames_out, "sent": sent,
                "rate_fps": round(frames_out / wall, 2) if wall else 0.0,
                "dropped": {r: int(n) for r, n in zip(DROP_REASONS, book.retired_drops) if n},
                "restarts": book.restarts, "peak_rss_mb": {k: round(v, 1) for k, v in book.peak_rss_mb.items()},
                "counts": dict(book.retired_counts),
            }
        if self.failure:
            out["failure"] = self.failure
        return out

    def _cleanup(self) -> None:
        for c in list(self.children):
            if c.alive:
                c.popen.kill()
            c.popen.wait()
            self._retire(c)
        if self.transport is not None:
            self.transport.close()
        unlink_segments(list_segments(self.run_id))
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if getattr(self, "socket_dir", self.runtime_dir) != self.runtime_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        cur = read_current_run(self.data_dir)
        if cur is None or cur.get("run_id") == self.run_id:
            current_run_file(self.data_dir).unlink(missing_ok=True)
