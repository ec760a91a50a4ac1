"""The supervisor: starts the stage processes of the stage table, watches them, answers ``status``, shuts down.

What runs is declared once, in :data:`pipeline.topology.STAGES` (one row per
process kind, with its process count, endpoints, drain order and restart
behaviour). Each process is ``python -m pipeline.worker RUNTIME_DIR STAGE
INDEX COUNTS BLOCK`` (nothing is pickled; it reads the run's ``config.json``):
``COUNTS`` are the live process counts at spawn time (the thread budget is
computed from them), ``BLOCK`` the name of the shared-memory counter block
the supervisor created for it (:mod:`pipeline.counters`).

Health. The process table (:mod:`pipeline.processes`) restarts a process
that exits on its own with exponential backoff (0.5 s, 1 s, 2 s..., capped
at 10 s); more than ``MAX_RESTARTS`` restarts of one stage within
``RESTART_WINDOW_S`` stop the pipeline with a message naming the stage and
its last error. A process whose block has not been stamped for
``runtime.heartbeat_timeout_s`` is killed (and so restarted). Counts are
exact: status and the run summary read the blocks, and a dead process's
final counts are booked from its block before the block is unlinked.

Shutdown (:class:`ShutdownState`; end of all file sources, SIGINT/SIGTERM,
or a failure) stops the stages one by one in table order, each draining its
inbox; storage commits last of the data path, then the mqtt publisher (when
configured) sends what storage committed, then the Frigate companion (when
configured), and the api (when enabled) goes last, answering health and status while the others drain. A second signal kills everything at once (exit
130). Rescaling (:class:`RescaleState`) follows the row's
:class:`~pipeline.topology.Rescale`. Whatever happens, the run's segments
(rings and counter blocks) and runtime directory are removed at exit.

Exit codes (:meth:`Supervisor.run`): 0 done; 1 a stage failed; 3 a file-mode
run lost frames (any ``lost``/``overwritten``/``queue_full`` drop, or a
capture that reported it ended early; see
:func:`pipeline.status.incomplete`); 130 forced stop.

Children die with the supervisor: each sets ``PR_SET_PDEATHSIG`` and watches
its parent (:mod:`pipeline.worker`), and ``run.json`` records each child's
pid and command line so a later run can stop leftovers (:mod:`pipeline.runs`).

This module wires ``stages``/``storage`` together only through
:mod:`pipeline.worker` and the injected ``prepare_database`` callable.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import psutil

from pipeline import topology
from pipeline.config import AppConfig
from pipeline.counters import W_FRAMES_OUT, W_HEARTBEAT_NS, CounterBlock, block_name
from pipeline.messages import Ack, ScaleRequest, StatusReply, StatusRequest
from pipeline.metrics import AlertTracker, StatusCollector, start_exporter
from pipeline.processes import Proc, ProcessTable, RestartPolicy
from pipeline.ring import list_segments, unlink_segments
from pipeline.runs import cleanup_stale_runs, current_run_file, read_current_run, runs_dir, write_json
from pipeline.status import LiveProc, RateWindow, Retired, StageView, incomplete, run_summary, status_reply
from pipeline.gate import StartGate
from pipeline.topology import STAGE_NAMES, Rescale
from pipeline.transport import Transport, make_runtime_dir, socket_dir_for

__all__ = ["Supervisor", "SupervisorError", "ShutdownState", "RescaleState", "cleanup_stale_runs",
           "current_run_file", "read_current_run", "runs_dir", "EXIT_OK", "EXIT_FAILED", "EXIT_INCOMPLETE", "EXIT_FORCED"]

log = logging.getLogger("facepro.supervisor")

STAGES = STAGE_NAMES
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
STOP_TIMEOUT_S = 60.0
EXIT_OK, EXIT_FAILED, EXIT_INCOMPLETE, EXIT_FORCED = 0, 1, 3, 130


class SupervisorError(RuntimeError):
    """The pipeline cannot start or had to stop (message names the stage and reason)."""


class ShutdownState(enum.Enum):
    """Where the shutdown is: stages are drained one by one in table order."""

    RUNNING = "running"
    DRAINING_CAPTURE = "draining capture"
    DRAINING_DETECTION = "draining detection"
    DRAINING_RECOGNITION = "draining recognition"
    DRAINING_STORAGE = "draining storage"
    DRAINING_MQTT = "draining mqtt"
    DRAINING_FRIGATE = "draining frigate"
    DRAINING_API = "draining api"
    DONE = "done"

    @classmethod
    def draining(cls, stage: str) -> ShutdownState:
        return cls[f"DRAINING_{stage.upper()}"]

    @property
    def stage(self) -> str | None:
        """The stage being drained, None for RUNNING/DONE."""
        return self.name[len("DRAINING_"):].lower() if self.name.startswith("DRAINING_") else None

    def next(self) -> ShutdownState:
        """The state after this stage has drained."""
        i = STAGE_NAMES.index(self.stage) if self.stage else -1
        return ShutdownState.draining(STAGE_NAMES[i + 1]) if i + 1 < len(STAGE_NAMES) else ShutdownState.DONE


class RescaleState(enum.Enum):
    """A repartitioning rescale: the upstream stage drains, then the stage, then both restart with the new count."""

    IDLE = "idle"
    DRAINING_UPSTREAM = "draining upstream"
    DRAINING_STAGE = "draining stage"
    RESTARTING = "restarting"


class Launcher:
    """Starts worker processes (the process table's spawner) and owns their counter blocks and run.json entries."""

    def __init__(self, run_id: str, runtime_dir: Path, data_dir: Path, counts: dict[str, int]) -> None:
        self.run_id = run_id
        self.runtime_dir = runtime_dir
        self.data_dir = data_dir
        self.counts = counts  # live process counts, shared with the supervisor
        self.blocks: dict[int, CounterBlock] = {}  # pid -> block
        self.procs: dict[int, psutil.Process | None] = {}
        self.children: dict[int, dict] = {}  # pid -> run.json entry
        self.info: dict = {}
        self._n = 0

    def __call__(self, stage: str, index: int) -> subprocess.Popen:
        self._n += 1
        block = CounterBlock.create(block_name(self.run_id, stage, index, self._n))
        cmd = [sys.executable, "-m", "pipeline.worker", str(self.runtime_dir), stage, str(index),
               topology.format_counts(self.counts), str(block.name)]
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   FACEPRO_DATA_DIR=str(self.data_dir), FACEPRO_SUPERVISOR_PID=str(os.getpid()))
        try:
            popen = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        except OSError:
            block.close()
            block.unlink()
            raise
        self.blocks[popen.pid] = block
        try:
            self.procs[popen.pid] = psutil.Process(popen.pid)
            self.procs[popen.pid].cpu_percent(None)  # type: ignore[union-attr]
        except psutil.Error:
            self.procs[popen.pid] = None
        self.children[popen.pid] = {"stage": stage, "index": index, "pid": popen.pid, "cmdline": cmd}
        self.write_info()
        return popen

    def write_info(self, **extra: object) -> None:
        """Rewrite run.json and current.json (``extra`` keys are kept for later writes)."""
        self.info.update(extra)
        doc = dict(self.info, children=list(self.children.values()))
        write_json(self.runtime_dir / "run.json", doc)
        write_json(current_run_file(self.data_dir), doc)

    def usage(self, pid: int) -> tuple[float, float]:
        """(CPU percent, RSS MiB) of a live child; zeros when unknown."""
        proc = self.procs.get(pid)
        try:
            return (proc.cpu_percent(None), proc.memory_info().rss / 2**20) if proc is not None else (0.0, 0.0)
        except psutil.Error:
            return 0.0, 0.0

    def release(self, pid: int) -> CounterBlock | None:
        """Forget an exited child; returns its block (the caller reads, closes and unlinks it)."""
        self.procs.pop(pid, None)
        if self.children.pop(pid, None) is not None and self.info:
            self.write_info()
        return self.blocks.pop(pid, None)


class Rescaler:
    """``facepro scale``: changes a stage's process count by its row's :class:`~pipeline.topology.Rescale`.

    ``DIRECT`` (detection): processes are added or removed at once (credit-based
    input: a removed process finishes exactly the frames it received).
    ``REPARTITION`` (recognition owns each camera's tracker): the upstream stage
    drains and stops, then the stage finishes its frames and closes its tracks,
    then both restart with the new count (:class:`RescaleState`, :meth:`advance`).
    ``counts`` (the live counts, shared with the launcher) change before the new
    processes are spawned, so they are sized for the new count.
    """

    def __init__(self, table: ProcessTable, counts: dict[str, int], active: tuple[str, ...] = STAGE_NAMES) -> None:
        self.table = table
        self.counts = counts
        self.active = active  # the rows the config runs
        self.state = RescaleState.IDLE
        self.target: tuple[str, int] | None = None

    def scale(self, stage: str, processes: int) -> Ack:
        if self.state is not RescaleState.IDLE:
            return Ack(ok=False, message="the pipeline is busy (shutting down or already rescaling); try again")
        try:
            row = topology.spec(stage)
        except KeyError as err:
            return Ack(ok=False, message=str(err.args[0]))
        if stage not in self.active:
            return Ack(ok=False, message=f"{stage} does not run with this config (running: {', '.join(self.active)})")
        old = self.counts.get(stage, 0)
        if row.rescale is Rescale.REPARTITION:
            self.state, self.target = RescaleState.DRAINING_UPSTREAM, (stage, processes)
            return Ack(ok=True, message=f"{stage}: {old} -> {processes} processes (cameras repartitioned; "
                                        f"{topology.upstream(stage)} and {stage} restart)")
        if row.rescale is not Rescale.DIRECT:
            return Ack(ok=False, message=f"scaling {stage} at run time is not supported "
                                         f"({stage} runs {row.count.value.replace('_', ' ')} process(es))")
        kids = [p for p in self.table.of(stage) if not p.stopping]
        self.counts[stage] = processes
        for i in range(len(kids), processes):
            self.table.spawn(stage, i)
        for p in kids[processes:]:
            self.table.stop(p)
        return Ack(ok=True, message=f"{stage}: {len(kids)} -> {processes} processes")

    def _stop_all(self, stage: str | None) -> bool:
        """Ask every process of ``stage`` to stop; True once none is left."""
        kids = self.table.of(stage) if stage else []
        for p in kids:
            if not p.stopping:
                self.table.stop(p)
        return not kids

    def advance(self) -> None:
        """One step of a repartitioning rescale."""
        if self.state is RescaleState.IDLE:
            return
        stage, target = self.target  # type: ignore[misc]
        up = topology.upstream(stage)
        if self.state is RescaleState.DRAINING_UPSTREAM and self._stop_all(up):
            self.state = RescaleState.DRAINING_STAGE
        if self.state is RescaleState.DRAINING_STAGE and self._stop_all(stage):
            self.state = RescaleState.RESTARTING
        if self.state is RescaleState.RESTARTING:
            self.counts[stage] = target
            for name in (stage, up):  # downstream first
                for i in range(self.counts[name] if name else 0):
                    self.table.spawn(name, i)  # type: ignore[arg-type]
            self.state, self.target = RescaleState.IDLE, None
            log.info("%s rescaled to %d process(es)", stage, target)


class Supervisor:
    """Runs one pipeline until its file sources end or it is signalled.

    Args:
        cfg: validated config.
        data_dir: FACEPRO_DATA_DIR (database, snapshots, ``run/``).
        prepare_database: called once before any process starts (applies
            migrations); raises to abort the start.
        clock: monotonic seconds (the process table's clock too).
        config_path: the config file, recorded in run.json (the api process puts it into backups).
    """

    def __init__(self, cfg: AppConfig, data_dir: Path, prepare_database: Callable[[], object] | None = None,
                 clock: Callable[[], float] = time.monotonic, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.data_dir = data_dir
        self.config_path = str(config_path.resolve()) if config_path else None  # run.json: the api puts it in backups
        self.stages = topology.active_names(cfg)  # the rows this config runs (status, summary)
        self.prepare_database = prepare_database
        self.clock = clock
        self.run_id = uuid.uuid4().hex[:8]
        self.runtime_dir = runs_dir(data_dir) / self.run_id
        self.socket_dir = self.runtime_dir
        self.counts = topology.initial_counts(cfg)
        self.launcher = Launcher(self.run_id, self.runtime_dir, data_dir, self.counts)
        ends = [s.name for s in topology.STAGES if s.ends_with_source]
        self.table = ProcessTable(self.launcher, clock, cfg.runtime.heartbeat_timeout_s,
                                  RestartPolicy(MAX_RESTARTS, RESTART_WINDOW_S), ends)
        self.retired, self.rates = {s: Retired() for s in STAGE_NAMES}, {s: RateWindow() for s in STAGE_NAMES}
        self.peak_rss: dict[int, float] = {}
        self.started = clock()
        self.signals = 0
        self.shutdown = ShutdownState.RUNNING
        self.stage_since = 0.0
        self.rescaler = Rescaler(self.table, self.counts, self.stages)
        self.gate = StartGate(topology.DATA_PATH[0], topology.DATA_PATH[1:], clock=self.clock)
        self.transport: Transport | None = None
        self.metrics_port: int | None = None
        self.first_frame_at: float | None = None  # first frame captured (monotonic)
        self.sources_done_at: float | None = None  # every file source had ended (monotonic)
        self.exit_code: int | None = None

    @property
    def failure(self) -> str | None:
        return self.table.failure

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
        (self.runtime_dir / "config.json").write_text(self.cfg.model_dump_json())
        self.launcher.write_info(run_id=self.run_id, pid=os.getpid(), runtime_dir=str(self.runtime_dir),
                                 socket_dir=str(self.socket_dir), started_at=time.time(), config_path=self.config_path)

    def start(self) -> None:
        """Claim the data dir, prepare the database and start every process (downstream first).

        Raises:
            SupervisorError: another run is active, or preparation failed.
        """
        self._claim_run()
        if self.prepare_database is not None:
            self.prepare_database()
        self._start_metrics()
        self.transport = Transport(self.socket_dir)
        self.control = self.transport.server(topology.control())
        for row in topology.start_order():
            for i in range(self.counts[row.name]):
                self.table.spawn(row.name, i)

    def _start_metrics(self) -> None:
        a = self.cfg.runtime.alerts
        self.alerts = AlertTracker(a.min_rate_fps, a.backlog_frames, a.max_rss_mb, a.grace_s, rate_stages=topology.DATA_PATH)
        self.collector = StatusCollector(self.alerts)
        if self.cfg.runtime.metrics_port is None:
            return
        try:
            self.metrics_port = start_exporter(self.collector, self.cfg.runtime.metrics_port)
        except OSError as err:
            raise SupervisorError(str(err)) from None
        log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", self.metrics_port)
        self.launcher.write_info(metrics_port=self.metrics_port)

    # ------------------------------------------------------------ monitoring
    def _read_beats(self) -> None:
        """Feed the blocks' heartbeat times to the process table; note the first captured frame."""
        for p in self.table.procs:
            block = self.launcher.blocks.get(p.pid)
            if block is None:
                continue
            beat_ns = int(block.ints[W_HEARTBEAT_NS])  # two words, not a full read: this runs every turn
            if beat_ns:
                self.table.beat(p, beat_ns / 1e9)
            if self.first_frame_at is None and p.stage == STAGE_NAMES[0] and block.ints[W_FRAMES_OUT] > 0:
                self.first_frame_at = self.clock()

    def _book(self, p: Proc) -> str:
        """Book an exited process's final counts from its block, unlink the block; returns its last error."""
        block = self.launcher.release(p.pid)
        if block is None:
            return ""
        snap = block.read()
        self.retired[p.stage].add(snap, f"{p.stage}-{p.index} (pid {p.pid})", self.peak_rss.pop(p.pid, None))
        block.close()
        block.unlink()
        return snap.last_error

    def _refresh_status(self) -> None:
        """Recompute the status snapshot for the exporter and log alert changes (once a second)."""
        reply = self.status()
        self.collector.reply = reply
        for stage, alert, on in self.alerts.update(reply):
            if on:
                log.warning("alert %s on stage %s (see facepro status)", alert, stage)
            else:
                log.info("alert %s on stage %s cleared", alert, stage)

    # --------------------------------------------------------------- status
    def _state(self, stage: str, live: bool) -> str:
        if self.table.failed_stage == stage:
            return "failed"
        if live:
            return "running"
        return "done" if topology.spec(stage).ends_with_source else "stopped"

    def _views(self, with_usage: bool = True) -> dict[str, StageView]:
        views = {}
        for stage in self.stages:
            live = []
            for p in self.table.of(stage):
                block = self.launcher.blocks.get(p.pid)
                if block is None:
                    continue
                snap = block.read()
                cpu, rss = self.launcher.usage(p.pid) if with_usage else (0.0, 0.0)
                self.peak_rss[p.pid] = max(self.peak_rss.get(p.pid, 0.0), rss)
                live.append(LiveProc(p.pid, snap, cpu, rss))
            rec = self.table.record(stage)
            last_error = next((lp.counters.last_error for lp in reversed(live) if lp.counters.last_error), "")
            views[stage] = StageView(tuple(live), self.retired[stage], rec.restarts, last_error or rec.last_error,
                                     self._state(stage, bool(live)))
        return views

    def status(self) -> StatusReply:
        now = self.clock()
        return status_reply(self.run_id, now - self.started, self._views(), self.rates, now, chain=topology.DATA_PATH)

    def summary(self) -> dict:
        """Totals of the run: frames, wall time, per-stage rates, drops, restarts, losses, peak memory."""
        active = None
        if self.first_frame_at is not None and self.sources_done_at is not None:
            active = self.sources_done_at - self.first_frame_at  # first frame → all frames processed
        return run_summary(self.run_id, self.clock() - self.started, self._views(with_usage=False), active,
                           self.failure, self.exit_code, self._file_mode(),
                           interrupted=self.signals > 0 and self.sources_done_at is None)

    def _log_progress(self) -> None:
        for st in self.status().stages:
            log.info("%-11s procs=%d rate=%.1f/s queue=%d dropped=%d", st.stage, st.processes, st.rate_fps, st.queue_depth, st.dropped)

    # ------------------------------------------------------------- control
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
        """Change the process count of a scalable stage (:meth:`Rescaler.scale`); refused while shutting down."""
        if self.shutdown is not ShutdownState.RUNNING:
            return Ack(ok=False, message="the pipeline is busy (shutting down or already rescaling); try again")
        return self.rescaler.scale(stage, processes)

    # ------------------------------------------------------------- shutdown
    def _begin_shutdown(self) -> None:
        if self.shutdown is ShutdownState.RUNNING:
            self.shutdown = ShutdownState.draining(STAGE_NAMES[0])
            self.stage_since = self.clock()
            self.table.hold = True
            self.table.pending.clear()

    def _advance_shutdown(self) -> bool:
        """Stop stages one by one in table order; True when all have exited (:class:`ShutdownState`)."""
        while self.shutdown is not ShutdownState.DONE:
            kids = self.table.of(self.shutdown.stage)  # type: ignore[arg-type]
            for p in kids:
                if not p.stopping:
                    self.table.stop(p)
                    if self.failure:  # a stage is gone for good: nobody will drain, stop hard (second signal)
                        time.sleep(0.05)
                        self.table.stop(p)
            if kids:
                if self.clock() - self.stage_since > STOP_TIMEOUT_S:
                    log.error("%s did not stop within %.0f s; killing it", self.shutdown.stage, STOP_TIMEOUT_S)
                    for p in kids:
                        p.handle.kill()
                return False
            log.debug("%s drained in %.2f s", self.shutdown.stage, self.clock() - self.stage_since)
            self.shutdown, self.stage_since = self.shutdown.next(), self.clock()
        return True

    def _file_mode(self) -> bool:  # no cameras (a companion-only box): not file mode, it runs until signalled
        return bool(self.cfg.cameras) and all(cam.resolved_mode() == "file" for cam in self.cfg.cameras)

    def _files_done(self) -> bool:
        """True once every camera is a file source whose capture has finished (none waiting for a restart)."""
        first = STAGE_NAMES[0]
        return self._file_mode() and not self.table.of(first) and not self.table.waiting(first)

    def handle_signal(self, signum: int, _frame: object = None) -> None:
        self.signals += 1
        if self.signals == 1:
            log.warning("signal %d: draining and shutting down (send again to force)", signum)
            self._begin_shutdown()
        else:
            log.error("second signal: killing all processes")
            self.table.hold = True
            self.table.kill_all()

    # ----------------------------------------------------------------- loop
    def _step(self) -> bool:
        """One supervision turn; True when the shutdown is complete."""
        self._read_beats()
        self._serve_control()
        self.table.check_heartbeats()
        self.table.reap(self._book)
        if self.failure:
            self._begin_shutdown()
        self.table.start_due()
        self.gate.update(((p.stage, p.pid) for p in self.table.procs), self.launcher.blocks)
        if self.shutdown is ShutdownState.RUNNING:
            self.rescaler.advance()
        if self.shutdown is ShutdownState.RUNNING and self._files_done():
            log.info("all file sources finished; draining")
            self.sources_done_at = self.clock()
            self._begin_shutdown()
        return self.shutdown is not ShutdownState.RUNNING and self._advance_shutdown()

    def run(self) -> int:
        """Start, supervise until done, clean up. Returns the exit code (module docstring)."""
        old = {s: signal.signal(s, self.handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            next_log, next_refresh = self.clock() + 5.0, self.clock()
            while not self._step():
                if self.clock() >= next_refresh:
                    self._refresh_status()
                    next_refresh = self.clock() + 1.0
                if self.clock() >= next_log:
                    self._log_progress()
                    next_log = self.clock() + 5.0
            self.exit_code = self._exit_code()
            return self.exit_code
        finally:
            self._cleanup()
            for s, h in old.items():
                signal.signal(s, h)

    def _exit_code(self) -> int:
        if self.signals >= 2:
            return EXIT_FORCED  # in-flight frames were abandoned
        if self.failure:
            return EXIT_FAILED
        if self._file_mode():
            why = incomplete(self._views(with_usage=False))
            if why:
                log.error("file sources were not processed completely: %s", "; ".join(why))
                return EXIT_INCOMPLETE
        return EXIT_OK

    def _cleanup(self) -> None:
        self.table.hold = True
        self.table.kill_all()
        for p in self.table.procs:
            p.handle.wait()  # type: ignore[attr-defined]
        self.table.reap(self._book)
        for block in self.launcher.blocks.values():  # spawned but never reaped (start failed midway)
            block.close()
        if self.transport is not None:
            self.transport.close()
        unlink_segments(list_segments(self.run_id))  # rings of killed captures, any block left
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if self.socket_dir != self.runtime_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        cur = read_current_run(self.data_dir)
        if cur is None or cur.get("run_id") == self.run_id:
            current_run_file(self.data_dir).unlink(missing_ok=True)
