"""The process table: spawn, reap and restart stage processes, with the clock and the spawner injected.

Nothing here starts a real process or reads a real clock by itself: the
supervisor injects a spawner (``(stage, index) -> handle`` with ``pid``,
``poll()``, ``kill()``, ``send_signal(sig)``) and ``time.monotonic``; tests
inject fakes.

Rules:

- A process that exits on its own is restarted after a backoff of
  ``first_delay_s * 2**(k-1)`` seconds (0.5 s, 1 s, 2 s..., capped at
  ``max_delay_s``) where ``k`` is the number of restarts of its stage within
  ``window_s``.
- More than ``max_restarts`` restarts of one stage within ``window_s`` is a
  failure: :attr:`ProcessTable.failure` names the stage and its last error,
  and nothing is restarted any more.
- Not restarted: a process whose stop was requested (:meth:`ProcessTable.stop`),
  and a process of a stage in ``ends_with_source`` that exited 0 (a file source
  ended).
- Only a process whose last heartbeat (:meth:`ProcessTable.beat`, or its start)
  is older than ``heartbeat_timeout_s`` is killed for silence, and never one
  that is stopping or while restarts are on hold (shutdown).
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

log = logging.getLogger("facepro.processes")


class Handle(Protocol):
    """What the table needs from a started process (``subprocess.Popen`` has it)."""

    pid: int

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...

    def send_signal(self, sig: int) -> None: ...


Spawner = Callable[[str, int], Handle]


@dataclass(frozen=True)
class RestartPolicy:
    """Backoff and restart budget (seconds)."""

    max_restarts: int = 5
    window_s: float = 60.0
    first_delay_s: float = 0.5
    max_delay_s: float = 10.0

    def delay(self, recent: int) -> float:
        """Backoff before the ``recent``-th restart within the window (1-based)."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** max(0, recent - 1))


@dataclass
class Proc:
    """One started process. ``last_beat`` is in the table's clock; ``silent_kill`` is set when killed for silence."""

    stage: str
    index: int
    handle: Handle
    started_at: float
    last_beat: float
    stopping: bool = False
    silent_kill: str = ""

    @property
    def pid(self) -> int:
        return int(self.handle.pid)


@dataclass(frozen=True)
class Exit:
    """A reaped process: exit ``code`` (negative: killed by that signal); ``restart_in`` seconds, None if not restarted."""

    proc: Proc
    code: int
    reason: str
    restart_in: float | None


@dataclass
class StageRecord:
    """Restarts of one stage."""

    restarts: int = 0
    recent: deque = field(default_factory=deque)  # restart times within the window
    last_error: str = ""


class ProcessTable:
    """Every process of a run and the restart rules (module docstring).

    Args:
        spawner: starts process ``(stage, index)`` and returns its handle.
        clock: monotonic seconds.
        heartbeat_timeout_s: silence after which a process is killed.
        policy: backoff and restart budget.
        ends_with_source: stages whose exit 0 is a finished source.
    """

    def __init__(self, spawner: Spawner, clock: Callable[[], float] = time.monotonic, heartbeat_timeout_s: float = 30.0,
                 policy: RestartPolicy = RestartPolicy(), ends_with_source: Iterable[str] = ("capture",)) -> None:
        self.spawner = spawner
        self.clock = clock
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.policy = policy
        self.ends_with_source = frozenset(ends_with_source)
        self.procs: list[Proc] = []
        self.pending: list[tuple[float, str, int]] = []  # (due, stage, index)
        self.records: dict[str, StageRecord] = {}
        self.failure: str | None = None
        self.failed_stage: str | None = None
        self.hold = False  # True: no restarts are started, nobody is killed for silence (shutdown)

    # ------------------------------------------------------------- queries
    def of(self, stage: str) -> list[Proc]:
        """Live (not yet reaped) processes of ``stage``, in start order."""
        return [p for p in self.procs if p.stage == stage]

    def record(self, stage: str) -> StageRecord:
        return self.records.setdefault(stage, StageRecord())

    def restarts(self, stage: str) -> int:
        return self.record(stage).restarts

    def waiting(self, stage: str | None = None) -> int:
        """Restarts scheduled but not started yet (of ``stage``, or of all)."""
        return sum(1 for _, s, _ in self.pending if stage is None or s == stage)

    # ------------------------------------------------------------- actions
    def spawn(self, stage: str, index: int) -> Proc:
        """Start process ``index`` of ``stage`` now."""
        now = self.clock()
        proc = Proc(stage, index, self.spawner(stage, index), started_at=now, last_beat=now)
        self.procs.append(proc)
        log.info("started %s-%d (pid %d)", stage, index, proc.pid)
        return proc

    def beat(self, proc: Proc, at: float) -> None:
        """Record a heartbeat of ``proc`` at ``at`` (table clock); older beats are ignored."""
        proc.last_beat = max(proc.last_beat, at)

    def stop(self, proc: Proc, sig: int = signal.SIGTERM) -> None:
        """Ask ``proc`` to stop (its exit is then never a failure); a repeated call signals again."""
        proc.stopping = True
        proc.handle.send_signal(sig)

    def kill_all(self) -> None:
        """SIGKILL every live process (they are reaped by the next :meth:`reap`)."""
        for p in self.procs:
            if p.handle.poll() is None:
                p.handle.kill()

    def check_heartbeats(self) -> list[Proc]:
        """Kill processes silent for longer than ``heartbeat_timeout_s``; returns them."""
        if self.hold:
            return []
        now = self.clock()
        killed = []
        for p in self.procs:
            silent = now - p.last_beat
            if p.stopping or p.silent_kill or silent <= self.heartbeat_timeout_s or p.handle.poll() is not None:
                continue
            p.silent_kill = f"sent no heartbeat for {silent:.0f} s"
            log.error("%s-%d %s; killing it", p.stage, p.index, p.silent_kill)
            p.handle.kill()
            killed.append(p)
        return killed

    def reap(self, error_of: Callable[[Proc], str] = lambda p: "") -> list[Exit]:
        """Remove exited processes and schedule their restarts.

        Args:
            error_of: called once per exited process before its restart is decided
                (the supervisor books its final counts there); returns its last error.
        """
        exits = []
        for p in list(self.procs):
            code = p.handle.poll()
            if code is None:
                continue
            self.procs.remove(p)
            exits.append(self._settle(p, int(code), error_of(p)))
        return exits

    def _settle(self, p: Proc, code: int, error: str) -> Exit:
        rec = self.record(p.stage)
        if error:
            rec.last_error = error
        if p.stopping or (code == 0 and p.stage in self.ends_with_source):
            return Exit(p, code, "stopped" if p.stopping else "source ended", None)
        reason = p.silent_kill or f"exited with code {code}"
        rec.last_error = rec.last_error or reason
        if self.hold or self.failure:
            return Exit(p, code, reason, None)
        return Exit(p, code, reason, self._schedule(p, reason))

    def _schedule(self, p: Proc, reason: str) -> float | None:
        rec = self.record(p.stage)
        now = self.clock()
        rec.restarts += 1
        rec.recent.append(now)
        while rec.recent and now - rec.recent[0] > self.policy.window_s:
            rec.recent.popleft()
        if len(rec.recent) > self.policy.max_restarts:
            self.failure = (f"stage {p.stage} failed {len(rec.recent)} times in {self.policy.window_s:.0f} s; "
                            f"last error: {rec.last_error}")
            self.failed_stage = p.stage
            log.error("%s", self.failure)
            return None
        delay = self.policy.delay(len(rec.recent))
        log.warning("%s-%d %s; restarting in %.1f s", p.stage, p.index, reason, delay)
        self.pending.append((now + delay, p.stage, p.index))
        return delay

    def start_due(self) -> list[Proc]:
        """Start the restarts whose backoff has passed (none while on hold or failed)."""
        if self.hold or self.failure:
            return []
        now = self.clock()
        due = [item for item in self.pending if item[0] <= now]
        for item in due:
            self.pending.remove(item)
        return [self.spawn(stage, index) for _, stage, index in due]
