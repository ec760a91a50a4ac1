"""The generic runner loop that wires a pure stage to the transport inside a child process.

A stage is a plain object with no sockets, files or database (see
:class:`Stage`). The runner receives messages, optionally puts them back in
per-camera frame order (:class:`Reorderer`), copies the referenced frame out
of its ring with the seqlock check when the stage wants it, calls
``stage.process(frame, meta)``, releases the ring slot if this process is the
frame's last owner, routes the results, and sends heartbeats.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from pipeline.messages import DROP_REASONS, Detections, FrameRef
from pipeline.metrics import Heartbeat, StageCounters
from pipeline.ring import RingCache, RingError
from pipeline.transport import Receiver, Sender


_MALFORMED = DROP_REASONS.index("malformed")
_LOST = DROP_REASONS.index("lost")


class Stage(Protocol):
    """What the runner needs from a stage."""

    def wants_frame(self, meta: object) -> bool:
        """True if :meth:`process` needs the pixels of the frame ``meta`` refers to."""

    def process(self, frame: np.ndarray | None, meta: object) -> Sequence[object]:
        """Handle one message; ``frame`` is a private copy (or None). Returns messages to send."""

    def tick(self, now_ns: int) -> Sequence[object]:
        """Periodic work (flush a batch...). Returns messages to send."""

    def finish(self) -> Sequence[object]:
        """End of input: returns final messages."""


def frame_ref(meta: object) -> FrameRef | None:
    """The :class:`FrameRef` a message refers to, if any."""
    if isinstance(meta, FrameRef):
        return meta
    if isinstance(meta, Detections):
        return meta.frame
    return None


class StopFlag:
    """Set by SIGTERM/SIGINT; :meth:`install` wires the handlers in a child process."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._event.set())
        return self


@dataclass
class _Held:
    item: object
    since: float


class Reorderer:
    """Puts messages back in frame order per ``(camera, ring)``.

    Messages of one camera may arrive out of order when several detection
    processes work on its frames. Items are released in ``frame_index``
    order; a missing index is waited for at most ``timeout_s`` (its worker
    may have been killed), then skipped and counted as ``lost``. The first
    item of a new ring (a new capture process or resolution) starts a new
    sequence.
    """

    def __init__(self, timeout_s: float, key: Callable[[object], FrameRef | None] = frame_ref) -> None:
        self.timeout_s = timeout_s
        self._key = key
        self._next: dict[str, int] = {}
        self._ring: dict[str, str] = {}
        self._held: dict[str, dict[int, _Held]] = {}
        self.lost = 0
        self.late: list[object] = []  # items older than the expected index (delivered for release only)

    def push(self, item: object) -> list[object]:
        """Add ``item``; return the items now ready, in order."""
        ref = self._key(item)
        if ref is None:
            return [item]
        cam = ref.camera
        if self._ring.get(cam) != ref.ring:
            self._ring[cam] = ref.ring
            self._next[cam] = ref.frame_index
            self._held[cam] = {}
        if ref.frame_index < self._next[cam]:
            self.late.append(item)
            return []
        self._held[cam][ref.frame_index] = _Held(item, time.monotonic())
        return self._drain(cam)

    def _drain(self, cam: str) -> list[object]:
        out = []
        held = self._held[cam]
        while self._next[cam] in held:
            out.append(held.pop(self._next[cam]).item)
            self._next[cam] += 1
        return out

    def expire(self) -> list[object]:
        """Skip gaps that have waited longer than ``timeout_s``; return items released by that."""
        out: list[object] = []
        now = time.monotonic()
        for cam, held in self._held.items():
            if held and now - min(h.since for h in held.values()) > self.timeout_s:
                first = min(held)
                self.lost += first - self._next[cam]
                self._next[cam] = first
                out.extend(self._drain(cam))
        return out

    def flush(self) -> list[object]:
        """End of input: everything held, in order (gaps counted as lost)."""
        out: list[object] = []
        for cam, held in self._held.items():
            for idx in sorted(held):
                self.lost += idx - self._next[cam]
                self._next[cam] = idx + 1
                out.append(held.pop(idx).item)
        return out

    @property
    def backlog(self) -> int:
        return sum(len(h) for h in self._held.values())

    def oldest_wait_ms(self) -> float:
        times = [h.since for held in self._held.values() for h in held.values()]
        return (time.monotonic() - min(times)) * 1000.0 if times else 0.0


@dataclass
class RunnerIO:
    """The runner's connections.

    Attributes:
        inbox: where messages arrive.
        route: maps an output message to the sender it goes to (None: drop it).
        heartbeat: stats sender.
        release: True if this process is the last owner of the frames it receives.
        blocking_send: True in file mode (wait for downstream), False in live mode
            (a full queue drops the message and counts ``queue_full``).
    """

    inbox: Receiver
    route: Callable[[object], Sender | None]
    heartbeat: Heartbeat
    release: bool
    blocking_send: bool


class Runner:
    """Runs ``stage`` until ``stop`` is set and the inbox has been idle for ``drain_idle_s``."""

    def __init__(self, stage: Stage, io: RunnerIO, counters: StageCounters, stop: StopFlag,
                 reorderer: Reorderer | None = None, drain_idle_s: float = 0.5) -> None:
        self.stage = stage
        self.io = io
        self.counters = counters
        self.stop = stop
        self.reorderer = reorderer
        self.drain_idle_s = drain_idle_s
        self.rings = RingCache()
        self._hard_stop = False
        self._buffers: dict[tuple[int, ...], np.ndarray] = {}

    def _read_frame(self, ref: FrameRef) -> np.ndarray | None:
        try:
            ring = self.rings.get(ref.ring)
        except RingError:
            return None
        shape = (ring.layout.height, ring.layout.width, ring.layout.channels)
        buf = self._buffers.get(shape)
        if buf is None:
            buf = self._buffers[shape] = np.empty(shape, np.uint8)
        return ring.read(ref.slot, ref.seq, out=buf)

    def _release(self, ref: FrameRef | None) -> None:
        if ref is None or not self.io.release:
            return
        try:
            self.rings.get(ref.ring).release(ref.slot, ref.seq)
        except RingError:
            pass

    def _send(self, outputs: Sequence[object]) -> None:
        for out in outputs:
            sender = self.io.route(out)
            if sender is None:
                continue
            if self.io.blocking_send:
                # Never abandon a frame in file mode; give up only when asked to stop hard.
                while not sender.send(out, timeout_ms=200):
                    if self.stop.is_set() and self._hard_stop:
                        self.counters.drop("queue_full")
                        break
            elif not sender.send(out, timeout_ms=0):
                self.counters.drop("queue_full")

    def handle(self, item: object) -> None:
        """Process one in-order item: frame copy, stage, release, send."""
        ref = frame_ref(item)
        frame = None
        t0 = time.perf_counter()
        if ref is not None and self.stage.wants_frame(item):
            frame = self._read_frame(ref)
            if frame is None:
                self.counters.drop("overwritten")
        try:
            outputs = self.stage.process(frame, item)
        finally:
            self._release(ref)
        self.counters.observe_ms((time.perf_counter() - t0) * 1000.0)
        self.counters.frames_out += 1
        self._send(outputs)

    def _ready(self, msg: object | None) -> list[object]:
        if self.reorderer is None:
            return [msg] if msg is not None else []
        ready = self.reorderer.push(msg) if msg is not None else []
        ready += self.reorderer.expire()
        for late in self.reorderer.late:  # too late to be used in order: release and count
            self._release(frame_ref(late))
            self.reorderer.lost += 1
        self.reorderer.late.clear()
        return ready

    def run(self) -> None:
        idle_since = time.monotonic()
        while True:
            msg = self.io.inbox.recv(timeout_ms=50)
            now = time.monotonic()
            if msg is not None:
                self.counters.frames_in += 1
                idle_since = now
            for item in self._ready(msg):
                self.handle(item)
            self._send(self.stage.tick(time.time_ns()))
            self._update_gauges()
            self.io.heartbeat.beat()
            if self.stop.is_set() and now - idle_since >= self.drain_idle_s:
                break
        self._finish()

    def _update_gauges(self) -> None:
        c = self.counters
        c.drops[_MALFORMED] = self.io.inbox.malformed
        if self.reorderer is not None:
            c.drops[_LOST] = self.reorderer.lost
            c.backlog = self.reorderer.backlog
            c.oldest_wait_ms = self.reorderer.oldest_wait_ms()

    def _finish(self) -> None:
        rest = self.reorderer.flush() if self.reorderer is not None else []
        for item in rest:
            self.handle(item)
        self._hard_stop = True
        self._send(self.stage.finish())
        self._update_gauges()
        self.io.heartbeat.beat(force=True)
        self.rings.close()
