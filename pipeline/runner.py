"""The generic runner loop that wires a pure stage to the transport inside a child process.

A stage is a plain object with no sockets, files or database (see
:class:`Stage`). The runner receives messages, optionally puts them back in
per-camera frame order (:class:`Reorderer`), copies the referenced frame out
of its ring with the seqlock check when the stage wants it, calls
``stage.process(frame, meta)``, releases the ring slot if this process is the
frame's last owner, routes the results, and sends heartbeats.

With a :class:`Batcher` (detection with ``detection.batch`` > 1) the runner
collects up to ``size`` in-order messages, or what arrived within ``timeout_s``
of the first one, and hands them to ``stage.process_batch(frames, metas)``
together; each frame is still checked, answered, sent and counted on its own.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from pipeline.messages import DROP_REASONS, Detections, FrameRef
from pipeline.metrics import Heartbeat, StageCounters
from pipeline.ring import RingCache, RingError
from pipeline.transport import CreditInbox, Dispatcher, Receiver, Sender


_MALFORMED = DROP_REASONS.index("malformed")
_LOST = DROP_REASONS.index("lost")
_DUPLICATE = DROP_REASONS.index("duplicate")


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

    # optional: ``warmup()``, run once before the loop (and before the process reports ready)
    # optional, required with a Batcher: ``process_batch(frames, metas) -> list[Sequence[object]]``, what
    # ``process`` returns for each frame in turn (a frame may be None, as in ``process``), one entry per message


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

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for a stop; True once set."""
        return self._event.wait(timeout_s)

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
    order. The first item of a new ring (a new resolution) starts a new sequence.

    Live mode (``strict=False``): a missing index is waited for at most
    ``timeout_s`` (its worker may have been killed), then skipped and counted
    as ``lost``; a camera's sequence starts at the first index seen.

    File mode (``strict=True``): every frame arrives, if need be again (a frame
    whose owner died is replayed, see :mod:`pipeline.ring`), so a gap is waited
    for as long as it takes and a camera's sequence starts at frame 0 (or where
    :meth:`resume` says). An item whose index was already released, or that is
    already held, is a duplicate: counted in ``duplicates``; the first kind is
    handed back in ``late`` (its slot may still need releasing), the second is dropped.
    """

    def __init__(self, timeout_s: float, key: Callable[[object], FrameRef | None] = frame_ref,
                 strict: bool = False) -> None:
        self.timeout_s = timeout_s
        self.strict = strict
        self._key = key
        self._next: dict[str, int] = {}
        self._ring: dict[str, str] = {}
        self._held: dict[str, dict[int, _Held]] = {}
        self.lost = 0
        self.duplicates = 0
        self.late: list[object] = []  # items older than the expected index (delivered for release only)

    def resume(self, camera: str, ring: str, next_index: int) -> None:
        """Continue ``camera``'s sequence at ``next_index`` of ``ring`` (a restarted process that already
        handled the frames before it)."""
        self._ring[camera] = ring
        self._next[camera] = next_index
        self._held[camera] = {}

    def push(self, item: object) -> list[object]:
        """Add ``item``; return the items now ready, in order."""
        ref = self._key(item)
        if ref is None:
            return [item]
        cam = ref.camera
        if self._ring.get(cam) != ref.ring:
            self._ring[cam] = ref.ring
            self._next[cam] = 0 if self.strict and cam not in self._next else ref.frame_index
            self._held[cam] = {}
        if ref.frame_index < self._next[cam]:
            self.duplicates += self.strict
            self.late.append(item)
            return []
        if ref.frame_index in self._held[cam]:
            self.duplicates += 1
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
        """Skip gaps that have waited longer than ``timeout_s`` (never in strict mode); return items released by that."""
        out: list[object] = []
        if self.strict:
            return out
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

    def waiting_for(self) -> int:
        """The frame index a camera that holds items waits for (the oldest such wait), -1 when none waits."""
        waits = [(min(h.since for h in held.values()), self._next[cam]) for cam, held in self._held.items() if held]
        return min(waits)[1] if waits else -1

    def oldest_wait_ms(self) -> float:
        times = [h.since for held in self._held.values() for h in held.values()]
        return (time.monotonic() - min(times)) * 1000.0 if times else 0.0


class Batcher:
    """Collects in-order items into batches, like DeepStream's stream muxer (``batch-size``, ``batched-push-timeout``).

    A batch is closed when it holds ``size`` items (:meth:`add` returns it) or
    when ``timeout_s`` have passed since its first item (:meth:`due` returns it),
    whichever comes first; :meth:`take` closes it at once (end of input).

    Args:
        size: items per full batch, >= 1.
        timeout_s: longest wait for a batch to fill, seconds from its first item, >= 0.
        clock: monotonic seconds (tests inject a fake one).

    Attributes:
        batches: batches closed so far; ``frames``: items in them;
        timeouts: batches closed by the timeout (or :meth:`take`) before they were full.

    Raises:
        ValueError: ``size`` < 1 or ``timeout_s`` < 0.
    """

    def __init__(self, size: int, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if size < 1 or timeout_s < 0:
            raise ValueError(f"Batcher: size must be >= 1 and timeout_s >= 0, got {size} and {timeout_s}")
        self.size = size
        self.timeout_s = timeout_s
        self._clock = clock
        self._items: list[object] = []
        self._since = 0.0
        self.batches = 0
        self.frames = 0
        self.timeouts = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: object) -> list[object] | None:
        """Add ``item`` to the open batch; the batch if that filled it, else None."""
        if not self._items:
            self._since = self._clock()
        self._items.append(item)
        return self.take() if len(self._items) >= self.size else None

    def due(self) -> list[object] | None:
        """The open batch if its timeout has passed, else None."""
        if self._items and self._clock() - self._since >= self.timeout_s:
            return self.take()
        return None

    def wait_ms(self, longest_ms: int) -> int:
        """How long a receive may block without missing the open batch's timeout: ``longest_ms`` when none is open."""
        if not self._items:
            return longest_ms
        left_ms = (self._since + self.timeout_s - self._clock()) * 1000.0
        return max(0, min(longest_ms, math.ceil(left_ms)))

    def take(self) -> list[object]:
        """Close the open batch now and return it (empty if none is open)."""
        items, self._items = self._items, []
        if items:
            self.batches += 1
            self.frames += len(items)
            self.timeouts += len(items) < self.size
        return items


@dataclass
class RunnerIO:
    """The runner's connections.

    Attributes:
        inbox: where messages arrive (a PULL :class:`Receiver`, or the detection
            stage's :class:`CreditInbox`, which withdraws its credits when stopping).
        route: maps an output message to the sender it goes to (None: drop it).
        heartbeat: stats sender.
        release: True if this process is the last owner of the frames it receives
            (recognition): it marks each received frame *accepted* in its ring,
            claims the camera in the ring header, and releases a frame only
            after its results were sent and ``after_frame`` ran.
        forwarder: True for a process that passes frames on without owning them
            (detection): it marks each frame *forwarded* once its results were
            sent and counts it in ``frames_out`` only the first time (a replayed
            frame another process already forwarded counts as ``replayed_frames``).
        zero_copy: hand the stage a read-only view of the ring slot instead of a
            copy, and re-check the slot afterwards; if it was overwritten meanwhile
            the result is discarded and the stage called again with ``frame=None``.
            For stages whose ``process`` has no side effect a torn frame could spoil
            beyond its return value (detection).
        services: called on every loop turn (e.g. reading storage acknowledgements).
        on_exit: called after the stage's final messages were sent (e.g. wait for
            storage to acknowledge them).
        after_frame: called with each handled in-order item after its results
            were sent and before its slot is released (recognition's journal).
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
    forwarder: bool = False
    after_frame: Callable[[object], None] | None = None


class Runner:
    """Runs ``stage`` until ``stop`` is set and the inbox has been idle for ``drain_idle_s``.

    With a ``batcher`` the in-order items go to ``stage.process_batch`` in its batches (:meth:`handle_batch`).

    Raises:
        TypeError: a ``batcher`` for a stage without ``process_batch``.
        ValueError: (:meth:`handle_batch`) ``process_batch`` answered another number of messages than it was given.
    """

    def __init__(self, stage: Stage, io: RunnerIO, counters: StageCounters, stop: StopFlag,
                 reorderer: Reorderer | None = None, drain_idle_s: float = 0.5, batcher: Batcher | None = None) -> None:
        if batcher is not None and not hasattr(stage, "process_batch"):
            raise TypeError(f"{type(stage).__name__} has no process_batch: it cannot be given a Batcher")
        self.stage = stage
        self.io = io
        self.counters = counters
        self.stop = stop
        self.reorderer = reorderer
        self.batcher = batcher
        self.drain_idle_s = drain_idle_s
        self._idle_since = time.monotonic()
        self.pid = os.getpid()
        claim = (lambda ring: ring.claim_recognizer(self.pid)) if io.release else None
        self.rings = RingCache(on_attach=claim)
        self.duplicates = 0  # replayed frames that had already taken effect (file mode)
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
                    self.io.heartbeat.beat()  # waiting for a slow stage downstream is not being dead
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

    def _process(self, ref: FrameRef | None, item: object) -> Sequence[object] | None:
        """Run the stage on a private copy (or a re-checked zero-copy view) of the frame.

        Returns None for a frame whose slot was rewritten in file mode: there a
        slot is only rewritten after its frame was released, so this was a
        replayed copy of a frame that had already taken effect (a duplicate).
        """
        if ref is None or not self.stage.wants_frame(item):
            return self.stage.process(None, item)
        file_mode = self.io.blocking_send
        if not self.io.zero_copy:
            frame = self._read_frame(ref)
            if frame is None and file_mode:
                return None
            if frame is None:
                self.counters.drop("overwritten")
            return self.stage.process(frame, item)
        view, ring = self._view(ref)
        if view is not None:
            outputs = self.stage.process(view, item)
            del view
            if ring.published(ref.slot, ref.seq):  # type: ignore[union-attr]
                return outputs
        if file_mode:
            return None
        self.counters.drop("overwritten")  # rewritten before or while the stage used it: result discarded
        return self.stage.process(None, item)

    def handle(self, item: object) -> None:
        """Process one in-order item: frame copy or checked view, stage, send, journal, release."""
        ref = frame_ref(item)
        t0 = time.perf_counter()
        outputs = self._process(ref, item)
        self.counters.observe_ms((time.perf_counter() - t0) * 1000.0)
        self._deliver(ref, item, outputs)

    def handle_batch(self, items: Sequence[object]) -> None:
        """Process in-order items together (``stage.process_batch``), then deliver each in order as :meth:`handle`
        does; each frame's latency is the whole batch's."""
        t0 = time.perf_counter()
        outputs = self._process_batch(items)
        ms = (time.perf_counter() - t0) * 1000.0
        for item, out in zip(items, outputs):
            self.counters.observe_ms(ms)
            self._deliver(frame_ref(item), item, out)

    def _process_batch(self, items: Sequence[object]) -> list[Sequence[object] | None]:
        """:meth:`_process` for several items with one ``stage.process_batch`` call; per item the same checks:
        an unreadable frame is a duplicate (None) in file mode and ``overwritten`` (frame None) in live mode,
        a zero-copy view is re-checked after the stage used it."""
        file_mode = self.io.blocking_send
        frames: list[np.ndarray | None] = [None] * len(items)
        check: list[object] = [None] * len(items)  # the ring of each zero-copy view to re-check
        given = []  # positions handed to the stage
        for k, item in enumerate(items):
            ref = frame_ref(item)
            if ref is not None and self.stage.wants_frame(item):
                frames[k], ring = self._view(ref) if self.io.zero_copy else (self._copy_frame(ref), None)
                if frames[k] is None and file_mode:
                    continue
                if frames[k] is None:
                    self.counters.drop("overwritten")
                elif ring is not None:
                    check[k] = ring
            given.append(k)
        outs = self.stage.process_batch([frames[k] for k in given], [items[k] for k in given])  # type: ignore[attr-defined]
        frames.clear()  # the views
        if len(outs) != len(given):
            raise ValueError(f"{type(self.stage).__name__}.process_batch answered {len(outs)} of {len(given)} messages")
        results: list[Sequence[object] | None] = [None] * len(items)
        for k, out in zip(given, outs):
            ref = frame_ref(items[k])
            if check[k] is not None and not check[k].published(ref.slot, ref.seq):  # type: ignore[union-attr, attr-defined]
                if file_mode:
                    continue
                self.counters.drop("overwritten")
                out = self.stage.process(None, items[k])
            results[k] = out
        return results

    def _copy_frame(self, ref: FrameRef) -> np.ndarray | None:
        try:
            return self.rings.get(ref.ring).read(ref.slot, ref.seq)
        except RingError:
            return None

    def _deliver(self, ref: FrameRef | None, item: object, outputs: Sequence[object] | None) -> None:
        if outputs is None:
            self.duplicates += 1
            return
        self._send(outputs)
        if self.io.after_frame is not None:
            self.io.after_frame(item)
        self._release(ref)
        self._count_out(ref)

    def _count_out(self, ref: FrameRef | None) -> None:
        if not self.io.forwarder or ref is None:
            self.counters.frames_out += 1
            return
        try:
            first = self.rings.get(ref.ring).mark_forwarded(ref.slot, ref.seq)
        except RingError:
            first = not ref.replay
        if first:
            self.counters.frames_out += 1
        else:
            self.counters.extra["replayed_frames"] = self.counters.extra.get("replayed_frames", 0) + 1

    def _accept(self, msg: object) -> None:
        """Owner: mark the frame of a received message as accepted by this process (see :mod:`pipeline.ring`)."""
        ref = frame_ref(msg)
        if ref is None:
            return
        try:
            self.rings.get(ref.ring).mark_accepted(ref.slot, ref.seq, self.pid)
        except RingError:
            pass

    def _ready(self, msg: object | None) -> list[object]:
        if self.reorderer is None:
            return [msg] if msg is not None else []
        ready = self.reorderer.push(msg) if msg is not None else []
        ready += self.reorderer.expire()
        for late in self.reorderer.late:  # too late to be used in order (strict: already handled): release
            self._release(frame_ref(late))
            if not self.reorderer.strict:
                self.reorderer.lost += 1
        self.reorderer.late.clear()
        return ready

    def _receive(self, timeout_ms: int) -> object | None:
        msg = self.io.inbox.recv(timeout_ms=timeout_ms)
        if msg is not None:
            self.counters.frames_in += 1
            self._idle_since = time.monotonic()
            if self.io.release:
                self._accept(msg)
        return msg

    def _take(self, item: object) -> None:
        """An in-order item: handled now, or added to the open batch (handled when that is full)."""
        if self.batcher is None:
            self.handle(item)
        elif (batch := self.batcher.add(item)) is not None:
            self.handle_batch(batch)

    def _fill(self, msg: object | None) -> None:
        """Batching: add the messages already waiting to the open batch; hand it over if full or due."""
        assert self.batcher is not None
        for _ in range(self.batcher.size):  # bounded: a reorder buffer may absorb messages without filling the batch
            if msg is None or not len(self.batcher):
                break
            msg = self._receive(0)
            for item in self._ready(msg):
                self._take(item)
        if (batch := self.batcher.due()) is not None:
            self.handle_batch(batch)

    def run(self) -> None:
        warmup = getattr(self.stage, "warmup", None)
        if warmup is not None:
            warmup()  # the first inference is slow: not on a live camera's first frames
        self._idle_since = time.monotonic()
        self.counters.extra["ready"] = 1  # models loaded and warm, sockets bound: live cameras may start (pipeline.gate)
        while True:
            msg = self._receive(50 if self.batcher is None else self.batcher.wait_ms(50))
            now = time.monotonic()
            for item in self._ready(msg):
                self._take(item)
            if self.batcher is not None:
                self._fill(msg)
            self._send(self.stage.tick(time.time_ns()))
            for service in self.io.services:
                service()
            self._update_gauges()
            self.io.heartbeat.beat()
            if self.stop.is_set():
                self.io.inbox.stop_receiving()
                if self.io.inbox.drained(now - self._idle_since, self.drain_idle_s):
                    break
        self._finish()

    def _update_gauges(self) -> None:
        c = self.counters
        stage_drops = getattr(self.stage, "drops", {})  # counts the stage keeps itself
        for reason, n in stage_drops.items():
            c.drops[DROP_REASONS.index(reason)] = n
        c.drops[_MALFORMED] = self.io.inbox.malformed + stage_drops.get("malformed", 0)
        c.backlog = int(getattr(self.stage, "backlog", 0))
        c.drops[_DUPLICATE] = self.duplicates + (self.reorderer.duplicates if self.reorderer is not None else 0)
        if self.reorderer is not None:
            c.drops[_LOST] = self.reorderer.lost
            c.backlog += self.reorderer.backlog
            c.oldest_wait_ms = self.reorderer.oldest_wait_ms()
            if self.reorderer.strict:
                c.extra["reorder_waiting_for"] = self.reorderer.waiting_for()  # a file run stuck on a gap says where
        c.extra.update(getattr(self.stage, "counts", {}))
        if self.batcher is not None:
            c.backlog += len(self.batcher)
            c.extra.update(batches=self.batcher.batches, batch_frames=self.batcher.frames,
                           batch_timeouts=self.batcher.timeouts)
        error = getattr(self.stage, "last_error", "")
        if error:
            c.last_error = error

    def _finish(self) -> None:
        rest = self.reorderer.flush() if self.reorderer is not None else []
        for item in rest:
            self._take(item)
        if self.batcher is not None and len(self.batcher):
            self.handle_batch(self.batcher.take())
        self._send(self.stage.finish())
        if self.io.on_exit is not None:
            self.io.on_exit()
        self._update_gauges()
        self.io.heartbeat.beat(force=True)
        self.rings.close()


# The capture loop lives in pipeline.capture; re-exported for existing imports.
from pipeline.capture import CaptureLoop, CaptureSettings, FrameSource  # noqa: E402,F401
