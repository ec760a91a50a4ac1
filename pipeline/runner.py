"""The generic runner loop that wires a pure stage to the transport inside a child process.

A stage is a plain object with no sockets, files or database (see
:class:`Stage`). The runner receives messages, optionally puts them back in
per-camera frame order (:class:`Reorderer`), copies the referenced frame out
of its ring with the seqlock check when the stage wants it, calls
``stage.process(frame, meta)``, releases the ring slot if this process is the
frame's last owner, routes the results, and sends heartbeats.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from pipeline.messages import DROP_REASONS, Detections, FrameRef
from pipeline.metrics import Heartbeat, StageCounters
from pipeline.ring import RingCache, RingError, RingLayout, RingWriter, ring_name
from pipeline.transport import CreditInbox, Dispatcher, Receiver, Sender


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
    """Set by SIGTERM/SIGINT: the first asks for a drain, a second for a hard stop.

    :meth:`install` wires the handlers in a child process.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signals = 0

    def is_set(self) -> bool:
        return self._event.is_set()

    def hard(self) -> bool:
        """True after a second signal: stop waiting for downstream."""
        return self.signals >= 2

    def set(self) -> None:
        self.signals += 1
        self._event.set()

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.set())
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
        inbox: where messages arrive (a PULL :class:`Receiver`, or the detection
            stage's :class:`CreditInbox`, which withdraws its credits when stopping).
        route: maps an output message to the sender it goes to (None: drop it).
        heartbeat: stats sender.
        release: True if this process is the last owner of the frames it receives.
        zero_copy: hand the stage a read-only view of the ring slot instead of a
            copy, and re-check the slot afterwards; if it was overwritten meanwhile
            the result is discarded and the stage called again with ``frame=None``.
            For stages whose ``process`` has no side effect a torn frame could spoil
            beyond its return value (detection).
        services: called on every loop turn (e.g. reading storage acknowledgements).
        on_exit: called after the stage's final messages were sent (e.g. wait for
            storage to acknowledge them).
        blocking_send: True in file mode (wait for downstream), False in live mode
            (a full queue drops the message and counts ``queue_full``).
    """

    inbox: Receiver | CreditInbox
    route: Callable[[object], Sender | None]
    heartbeat: Heartbeat
    release: bool
    blocking_send: bool
    zero_copy: bool = False
    services: tuple[Callable[[], None], ...] = ()
    on_exit: Callable[[], None] | None = None


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
                # Never abandon a message in file mode; give up only when stopping hard.
                sent = sender.send(out, timeout_ms=200)
                while not sent and not self.stop.hard():
                    sent = sender.send(out, timeout_ms=200)
            else:
                sent = sender.send(out, timeout_ms=0)
            if sent:
                self.counters.sent += 1
            else:
                self.counters.drop("queue_full")

    def _view(self, ref: FrameRef) -> tuple[np.ndarray | None, object]:
        try:
            ring = self.rings.get(ref.ring)
        except RingError:
            return None, None
        return ring.view(ref.slot, ref.seq), ring

    def _process(self, ref: FrameRef | None, item: object) -> Sequence[object]:
        """Run the stage on a private copy (or a re-checked zero-copy view) of the frame."""
        if ref is None or not self.stage.wants_frame(item):
            return self.stage.process(None, item)
        if not self.io.zero_copy:
            frame = self._read_frame(ref)
            if frame is None:
                self.counters.drop("overwritten")
            return self.stage.process(frame, item)
        view, ring = self._view(ref)
        if view is not None:
            outputs = self.stage.process(view, item)
            del view
            if ring.published(ref.slot, ref.seq):  # type: ignore[union-attr]
                return outputs
        self.counters.drop("overwritten")  # rewritten before or while the stage used it: result discarded
        return self.stage.process(None, item)

    def handle(self, item: object) -> None:
        """Process one in-order item: frame copy or checked view, stage, release, send."""
        ref = frame_ref(item)
        t0 = time.perf_counter()
        try:
            outputs = self._process(ref, item)
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
            for service in self.io.services:
                service()
            self._update_gauges()
            self.io.heartbeat.beat()
            if self.stop.is_set():
                self.io.inbox.stop_receiving()
                if self.io.inbox.drained(now - idle_since, self.drain_idle_s):
                    break
        self._finish()

    def _update_gauges(self) -> None:
        c = self.counters
        stage_drops = getattr(self.stage, "drops", {})  # counts the stage keeps itself
        for reason, n in stage_drops.items():
            c.drops[DROP_REASONS.index(reason)] = n
        c.drops[_MALFORMED] = self.io.inbox.malformed + stage_drops.get("malformed", 0)
        c.backlog = int(getattr(self.stage, "backlog", 0))
        if self.reorderer is not None:
            c.drops[_LOST] = self.reorderer.lost
            c.backlog += self.reorderer.backlog
            c.oldest_wait_ms = self.reorderer.oldest_wait_ms()
        c.extra.update(getattr(self.stage, "counts", {}))
        error = getattr(self.stage, "last_error", "")
        if error:
            c.last_error = error

    def _finish(self) -> None:
        rest = self.reorderer.flush() if self.reorderer is not None else []
        for item in rest:
            self.handle(item)
        self._send(self.stage.finish())
        if self.io.on_exit is not None:
            self.io.on_exit()
        self._update_gauges()
        self.io.heartbeat.beat(force=True)
        self.rings.close()


class FrameSource(Protocol):
    """What :class:`CaptureLoop` needs from a video source (see ``stages.capture.VideoSource``)."""

    is_file: bool

    def read(self, out: np.ndarray | None = None) -> np.ndarray | None:
        """Next ``(H, W, 3) uint8`` BGR frame or None (end of file, read failure).

        With ``out`` (a ring slot), decode straight into it and return ``out``
        itself when the frame has its shape; otherwise return a new array
        (``out``'s content is then undefined)."""
        ...

    def open(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class CaptureSettings:
    """Capture loop parameters.

    Attributes:
        run_id: run id for ring names.
        camera: camera name.
        slots: ring slots.
        release_timeout_s: file mode: reclaim an unreleased slot after this long.
        wait_for_release: file mode (every frame processed) vs live mode (never wait).
        max_fps: pace reads to at most this rate (None: as fast as the source gives).
        reconnect_s: live mode: wait before reopening a failed source.
    """

    run_id: str
    camera: str
    slots: int
    release_timeout_s: float
    wait_for_release: bool
    max_fps: float | None = None
    reconnect_s: float = 2.0


class CaptureLoop:
    """Reads a source, writes each frame into the camera's ring and announces it with a FrameRef.

    A new ring is created when the frame size changes (never a stale ring of
    another size). At end of file it waits until every frame has been released
    downstream, so the pipeline can drain, then unlinks its ring.
    """

    def __init__(self, source: FrameSource, settings: CaptureSettings, sender: Dispatcher,
                 counters: StageCounters, heartbeat: Heartbeat, stop: StopFlag) -> None:
        self.source = source
        self.s = settings
        self.sender = sender
        self.counters = counters
        self.heartbeat = heartbeat
        self.stop = stop
        self.writer: RingWriter | None = None
        self.generation = 0
        self.frame_index = 0

    def _ring_for(self, frame: np.ndarray) -> RingWriter:
        w = self.writer
        if w is not None and (w.layout.height, w.layout.width) == frame.shape[:2]:
            return w
        if w is not None:
            w.close()  # readers already attached keep their mapping until they detach
        layout = RingLayout(slots=self.s.slots, height=frame.shape[0], width=frame.shape[1], channels=frame.shape[2])
        name = ring_name(self.s.run_id, self.s.camera, os.getpid(), self.generation)
        self.generation += 1
        self.writer = RingWriter.create(name, layout, wait_for_release=self.s.wait_for_release,
                                        release_timeout_s=self.s.release_timeout_s)
        return self.writer

    def _publish(self, frame: np.ndarray) -> bool:
        """Copy ``frame`` into the camera's ring (a new ring if its size changed) and announce it."""
        ring = self._ring_for(frame)
        if not ring.wait_slot(self.stop, idle=self.sender.service):
            return False
        now_ns = time.time_ns()
        return self._announce(ring, ring.write(frame, self.frame_index, now_ns), now_ns)

    def _announce(self, ring: RingWriter, slot_seq: tuple[int, int], captured_at_ns: int) -> bool:
        """Send the FrameRef of a just-published slot; False when stopped while waiting (file mode)."""
        slot, seq = slot_seq
        lay = ring.layout
        ref = FrameRef(camera=self.s.camera, ring=ring.name, slot=slot, seq=seq, frame_index=self.frame_index,
                       captured_at_ns=captured_at_ns, height=lay.height, width=lay.width)
        self.counters.frames_in += 1
        if self.s.wait_for_release:
            if not self.sender.send_until(ref, self.stop):
                return False
            self.counters.sent += 1
        elif self.sender.send(ref, timeout_ms=0):
            self.counters.sent += 1
        else:
            self.counters.drop("queue_full")
        self.counters.frames_out += 1
        self.frame_index += 1
        return True

    def _read_in_place(self) -> tuple[str, np.ndarray | None]:
        """Decode the next frame straight into the ring's next slot (no copy).

        Returns:
            ``("published", None)`` when the frame landed in the slot and was
            announced; ``("stopped", None)`` when stopped while waiting;
            ``("frame", frame)`` otherwise: the slot was given back and
            ``frame`` is a frame of another size for the copying path, or None
            at the end of a file / on a read failure.
        """
        ring = self.writer
        assert ring is not None
        if not ring.wait_slot(self.stop, idle=self.sender.service):
            return "stopped", None
        view = ring.begin_write()
        frame = self.source.read(out=view)
        if frame is view:
            now_ns = time.time_ns()
            announced = self._announce(ring, ring.publish(self.frame_index, now_ns), now_ns)
            return ("published" if announced else "stopped"), None
        ring.abort()
        return "frame", frame

    def _reconnect(self) -> None:
        time.sleep(self.s.reconnect_s)
        try:
            self.source.open()
        except Exception as err:  # SourceError; keep trying while live
            self.counters.last_error = str(err)

    def run(self) -> None:
        period = 1.0 / self.s.max_fps if self.s.max_fps else 0.0
        next_t = time.monotonic()
        while not self.stop.is_set():
            outcome, frame = ("frame", self.source.read()) if self.writer is None else self._read_in_place()
            if outcome == "stopped":
                break
            if outcome == "frame":
                if frame is None:
                    if self.source.is_file:
                        break
                    self._reconnect()
                    continue
                if not self._publish(frame):
                    break
            self.heartbeat.beat()
            if period:
                next_t += period
                time.sleep(max(0.0, next_t - time.monotonic()))
        self._drain()

    def _drain(self) -> None:
        """Wait (file mode) until downstream released every frame, then unlink the ring."""
        w = self.writer
        deadline = time.monotonic() + self.s.release_timeout_s
        while w is not None and self.s.wait_for_release and not w.all_released():
            if self.stop.is_set() or time.monotonic() > deadline:
                break
            self.heartbeat.beat()
            self.sender.service(10)
        self.counters.drops[_LOST] += 0 if w is None else w.reclaimed
        self.heartbeat.beat(force=True)
        self.source.close()
        if w is not None:
            w.close()
