"""The start gate: live cameras deliver only once the stages behind them can take frames.

A live camera's frames cannot wait: a capture that starts reading while the
detection and recognition processes are still loading their models loses
its first seconds (queue full at capture and detection, "behind" in
recognition). So every stage process reports ``ready`` (extra counter ``ready``
= 1, set by :class:`~pipeline.runner.Runner` once its loop runs, i.e. its models are
loaded and its sockets bound) and the supervisor sets the ``GO`` word
(:data:`pipeline.counters.W_GO`) in every capture's counter block once each
non-capture stage has all its processes ready. The gate stays open after
that (a restarted process's frames are dropped and counted, the live-mode
rule); a capture started later (a restart) gets ``GO`` at once. File sources
need no gate: they wait for free ring slots anyway.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Mapping

from pipeline.counters import W_GO, CounterBlock


class StartGate:
    """Opens the captures' ``GO`` words once every non-capture stage process is ready.

    Args:
        capture_stage: name of the capture stage (its processes wait for the gate).
        stages: the other stages that must be ready, each with at least one process.
        interval_s: seconds between two looks (a look reads the blocks' extra counters).
        clock: monotonic seconds (tests inject one).

    Attributes:
        opened_at: clock time the gate opened (None while closed).
    """

    def __init__(self, capture_stage: str, stages: Iterable[str], interval_s: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capture_stage = capture_stage
        self.stages = tuple(stages)
        self.interval_s = interval_s
        self.clock = clock
        self.opened_at: float | None = None
        self._due = 0.0

    def update(self, procs: Iterable[tuple[str, int]], blocks: Mapping[int, CounterBlock]) -> bool:
        """Look at ``(stage, pid)`` of the running processes; open the gate when ready. True once open."""
        now = self.clock()
        if self.opened_at is None and now < self._due:
            return False
        self._due = now + self.interval_s
        procs = list(procs)
        if self.opened_at is None and self._ready(procs, blocks):
            self.opened_at = now
        if self.opened_at is not None:
            for stage, pid in procs:
                block = blocks.get(pid)
                if stage == self.capture_stage and block is not None and not block.ints[W_GO]:
                    block.ints[W_GO] = 1
        return self.opened_at is not None

    def _ready(self, procs: list[tuple[str, int]], blocks: Mapping[int, CounterBlock]) -> bool:
        for stage in self.stages:
            pids = [pid for s, pid in procs if s == stage]
            if not pids or any(pid not in blocks or not blocks[pid].read().extra.get("ready") for pid in pids):
                return False
        return True
