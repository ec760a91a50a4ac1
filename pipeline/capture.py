"""The capture loop: decode a camera's frames into its shared-memory ring and announce them.

One capture process per camera runs :class:`CaptureLoop`. Each frame is
decoded straight into the next ring slot and announced with a
:class:`~pipeline.messages.FrameRef` to a detection process that granted a
credit (:class:`~pipeline.transport.Dispatcher`); the slot records which
process it went to.

Crash recovery in **file** mode (the protocol is described in :mod:`pipeline.ring`):

- A capture process started for a camera whose ring already exists in this
  run (its predecessor was killed) *adopts* that ring instead of creating a
  second one, re-sends the frames its predecessor may never have delivered
  (:meth:`~pipeline.ring.RingWriter.unconfirmed`),
  and resumes the source right after the last published frame (the frames
  before it are decoded and discarded, which is exact where seeking is not).
- While running (also while waiting for a free slot or for the last
  releases at end of file), every ``WATCH_INTERVAL_S`` it looks for frames
  whose owner died (:meth:`~pipeline.ring.RingWriter.replays`) and sends them
  again, marked ``replay``; recognition drops the ones that had already taken
  effect. A frame detection passed on that no recognition process accepts
  while a later frame was accepted (``UNACCEPTED_REPLAY_S`` seconds; 10 s when
  nothing later was) is sent again too, with a doubling wait
  (:class:`TransitWatch`): ZeroMQ drops messages queued towards a process
  that died, also ones sent around its death, before its successor binds.
- Waiting never stops the heartbeat: a capture blocked by a slow stage
  downstream is not a dead one.

In **live** mode none of this applies: a dead owner's frames are overwritten
(counted downstream), the source is reopened after ``reconnect_s`` when it fails.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipeline.counters import W_GO
from pipeline.messages import FrameRef
from pipeline.metrics import Heartbeat, StageCounters
from pipeline.ring import PREFIX, PendingFrame, RingError, RingLayout, RingWriter, list_segments, pid_alive, ring_name
from pipeline.transport import Dispatcher

log = logging.getLogger("facepro.capture")

#: Seconds between two looks for frames whose owner died (file mode).
WATCH_INTERVAL_S = 0.05
#: Longest wait between two attempts to reopen a failed live source, seconds.
MAX_RECONNECT_S = 30.0
#: A forwarded frame no recognition process accepted while a later one was is sent again after this long (file mode).
UNACCEPTED_REPLAY_S = 2.0


class TransitWatch:
    """Finds frames lost between detection and recognition: forwarded, yet accepted by nobody for too long.

    Messages from detection reach recognition in order, so a forwarded frame
    still not accepted while a later frame of the ring was accepted was lost
    on the way: it is due ``first_s`` seconds after it was first seen waiting
    (slack for several detection processes, whose messages interleave). A
    waiting frame with no later frame accepted is due only after ``idle_s``
    (everything on the way may have been lost; a slow recognition process
    accepts its queue well within that). Then it is due again after twice the
    previous wait (at most ``max_s``) while it still waits. A frame accepted or
    released is forgotten. Sending one again is safe: recognition drops a frame
    it already holds or handled (counted ``duplicate``).

    Args:
        first_s: wait of an overtaken frame before it is first due, seconds, > 0.
        idle_s: wait of a frame nothing overtook before it is first due, seconds, >= first_s.
        max_s: longest wait between two sends of one frame, seconds.
        clock: monotonic seconds (tests inject a fake one).
    """

    def __init__(self, first_s: float = UNACCEPTED_REPLAY_S, idle_s: float = 10.0, max_s: float = 30.0,
                 clock=time.monotonic) -> None:
        self.first_s, self.idle_s, self.max_s, self._clock = first_s, idle_s, max_s, clock
        self._seen: dict[tuple[int, int], float] = {}  # (slot, seq) -> when first seen waiting
        self._due: dict[tuple[int, int], tuple[float, float]] = {}  # (slot, seq) -> (next due time, last wait)

    def due(self, pending: list[PendingFrame]) -> list[PendingFrame]:
        """The frames of ``pending`` (the ring's unreleased frames) to send again now."""
        now = self._clock()
        newest_accepted = max((f.seq for f in pending if f.accepted), default=0)
        waiting = {(f.slot, f.seq): f for f in pending if f.forwarded and f.accepted == 0}
        self._seen = {key: self._seen.get(key, now) for key in waiting}
        self._due = {key: v for key, v in self._due.items() if key in waiting}
        out = []
        for key, f in waiting.items():
            if key in self._due:
                due_at, wait = self._due[key]
            else:
                wait = self.first_s if f.seq < newest_accepted else self.idle_s
                due_at = self._seen[key] + wait
            if now >= due_at:
                wait = min(self.max_s, 2 * wait)
                self._due[key] = (now + wait, wait)
                out.append(f)
        return out


class FrameSource(Protocol):
    """What :class:`CaptureLoop` needs from a video source (see ``stages.capture.VideoSource``)."""

    is_file: bool

    def read(self, out: np.ndarray | None = None) -> np.ndarray | None:
        """Next ``(H, W, 3) uint8`` BGR frame or None (end of file, read failure).

        With ``out`` (a ring slot), decode straight into it and return ``out``
        itself when the frame has its shape; otherwise return a new array
        (``out``'s content is then undefined)."""
        ...

    def skip(self, frames: int) -> int:
        """Decode and discard ``frames`` frames; returns how many there were (fewer at end of file)."""
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
        release_timeout_s: file mode: warn about a frame not released downstream after this long.
        wait_for_release: file mode (every frame processed) vs live mode (never wait).
        max_fps: pace reads to at most this rate (None: as fast as the source gives).
        reconnect_s: live mode: wait before reopening a failed source.
        start_gate: deliver nothing before the supervisor opened the start gate (:mod:`pipeline.gate`):
            in live mode no frame is lost while the other stages load and warm their models; in file mode
            the first frames' latency and the run's active time leave that out (on a GPU, each new input
            shape's first run takes about a second).
        owner_pid: pid written into ring names (the supervisor's: a ring lives as long as its run, across
            capture restarts; another run's clean-up removes it only once that pid is gone). 0: this process.
    """

    run_id: str
    camera: str
    slots: int
    release_timeout_s: float
    wait_for_release: bool
    max_fps: float | None = None
    reconnect_s: float = 2.0
    owner_pid: int = 0
    start_gate: bool = False


def camera_rings(run_id: str, camera: str) -> list[str]:
    """Ring segments of ``camera`` in run ``run_id``, oldest generation first."""
    head = f"{PREFIX}{run_id}_{camera}_"
    found = []
    for name in list_segments(run_id):
        match = re.fullmatch(r"(\d+)_(\d+)", name[len(head):]) if name.startswith(head) else None
        if match:
            found.append((int(match.group(2)), name))
    return [name for _, name in sorted(found)]


class CaptureLoop:
    """Reads a source, writes each frame into the camera's ring and announces it with a FrameRef.

    A new ring is created when the frame size changes (never a stale ring of
    another size). At end of file it waits until every frame has been released
    downstream (replaying frames of dead owners meanwhile), so the pipeline can
    drain. The ring itself stays until the run ends (the supervisor removes
    it), so a successor started at any moment finds it; a ring replaced by a
    new resolution is unlinked at once.

    Attributes:
        resumed_from: frame index the source resumed at after adopting a
            predecessor's ring (None for a fresh start).
    """

    def __init__(self, source: FrameSource, settings: CaptureSettings, sender: Dispatcher,
                 counters: StageCounters, heartbeat: Heartbeat, stop: object) -> None:
        self.source = source
        self.s = settings
        self.sender = sender
        self.counters = counters
        self.heartbeat = heartbeat
        self.stop = stop
        self.writer: RingWriter | None = None
        self.generation = 0
        self.frame_index = 0
        self.resumed_from: int | None = None
        self._watch_due = 0.0
        self._recognizer = 0  # recognition pid last seen in the ring header
        self._replayed_for: set[int] = set()  # recognition pids whose frames were replayed
        self._transit = TransitWatch()
        self._failures = 0  # live mode: failed reads in a row (reconnect backoff)

    # ----------------------------------------------------------------- rings
    def _ring_for(self, frame: np.ndarray) -> RingWriter:
        w = self.writer
        if w is not None and (w.layout.height, w.layout.width) == frame.shape[:2]:
            return w
        if w is not None:
            w.close()  # readers already attached keep their mapping until they detach
        layout = RingLayout(slots=self.s.slots, height=frame.shape[0], width=frame.shape[1], channels=frame.shape[2])
        name = ring_name(self.s.run_id, self.s.camera, self.s.owner_pid or os.getpid(), self.generation)
        self.generation += 1
        self.writer = RingWriter.create(name, layout, wait_for_release=self.s.wait_for_release,
                                        release_timeout_s=self.s.release_timeout_s)
        return self.writer

    def adopt(self) -> bool:
        """File mode: take over a dead predecessor's ring, re-send what it never sent, skip the source ahead.

        Returns:
            True when a ring was adopted (the source then continues after its
            last published frame).
        """
        names = camera_rings(self.s.run_id, self.s.camera) if self.s.wait_for_release else []
        if not names:
            return False
        try:
            self.writer = RingWriter.adopt(names[-1], wait_for_release=True, release_timeout_s=self.s.release_timeout_s)
        except RingError:
            return False
        self.generation = int(names[-1].rsplit("_", 1)[1]) + 1
        self.frame_index = self.writer.last_frame_index + 1
        self.resumed_from = self.frame_index
        self._recognizer = self.writer.recognizer_pid()
        for f in self.writer.unconfirmed():
            self._resend(self.writer, f, first_time=f.dispatched == 0)
        skipped = self.source.skip(self.frame_index)
        self.counters.extra["resumed_at_frame"] = self.frame_index
        if skipped < self.frame_index:
            self.counters.last_error = f"source ended at frame {skipped} before the resume point {self.frame_index}"
        return True

    # ----------------------------------------------------------------- sending
    def _idle(self) -> None:
        """While waiting: answer credits, beat, replay frames of dead owners."""
        self.sender.service()
        self.heartbeat.beat()
        self._watch()

    def _watch(self) -> None:
        """Replay the frames whose owner died (file mode, at most every ``WATCH_INTERVAL_S``)."""
        w = self.writer
        now = time.monotonic()
        if w is None or not self.s.wait_for_release or now < self._watch_due:
            return
        self._watch_due = now + WATCH_INTERVAL_S
        current, previous = w.recognizers()
        # a dead owner is known from the header (now or when last looked at), from the successor's claim
        # (it may have claimed before this loop ever saw its predecessor) or from a frame it accepted
        owners = {self._recognizer, current, previous, *(f.accepted for f in w.pending())}
        dead = frozenset(pid for pid in owners if pid and pid not in self._replayed_for and not pid_alive(pid))
        self._recognizer = current
        for f in w.replays(dead):
            self._resend(w, f)
        self._replayed_for |= dead
        for f in self._transit.due(w.pending()):  # lost on the way to recognition: send it again
            self._resend(w, f)
            self.counters.extra["resent_unaccepted"] = self.counters.extra.get("resent_unaccepted", 0) + 1

    def _resend(self, ring: RingWriter, f: PendingFrame, first_time: bool = False) -> None:
        """Send a pending frame again (``replay``), or for the first time when a dead predecessor published
        it but never sent it (then it counts as this process's frame)."""
        lay = ring.layout
        ref = FrameRef(camera=self.s.camera, ring=ring.name, slot=f.slot, seq=f.seq, frame_index=f.frame_index,
                       captured_at_ns=f.captured_at_ns, height=lay.height, width=lay.width, replay=not first_time)
        if self.sender.send_until(ref, self.stop, idle=self.heartbeat.beat):
            ring.mark_dispatched(f.slot, f.seq, _peer_pid(self.sender))
            self.counters.sent += 1
            if first_time:
                self.counters.frames_in += 1
                self.counters.frames_out += 1
            else:
                self.counters.extra["replayed"] = self.counters.extra.get("replayed", 0) + 1

    def _publish(self, frame: np.ndarray) -> bool:
        """Copy ``frame`` into the camera's ring (a new ring if its size changed) and announce it."""
        ring = self._ring_for(frame)
        if not ring.wait_slot(self.stop, idle=self._idle):
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
            if not self.sender.send_until(ref, self.stop, idle=self.heartbeat.beat):
                return False
            ring.mark_dispatched(slot, seq, _peer_pid(self.sender))
            self.counters.sent += 1
        elif self.sender.send(ref, timeout_ms=0):
            ring.mark_dispatched(slot, seq, _peer_pid(self.sender))
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
        if not ring.wait_slot(self.stop, idle=self._idle):
            return "stopped", None
        view = ring.begin_write()
        frame = self.source.read(out=view)
        if frame is view:
            now_ns = time.time_ns()
            announced = self._announce(ring, ring.publish(self.frame_index, now_ns), now_ns)
            return ("published" if announced else "stopped"), None
        ring.abort()
        return "frame", frame

    # ----------------------------------------------------------------- loop
    def _reconnect(self) -> None:
        """Live mode: reopen a failed source after ``reconnect_s``, doubling the wait after every failed
        attempt up to ``MAX_RECONNECT_S`` (reset by the next frame); heartbeats go on meanwhile."""
        wait = min(MAX_RECONNECT_S, self.s.reconnect_s * 2 ** self._failures)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not self.stop.is_set():  # type: ignore[attr-defined]
            self.heartbeat.beat()
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        self._failures += 1
        self.counters.extra["reconnects"] = self.counters.extra.get("reconnects", 0) + 1
        try:
            self.source.open()
        except Exception as err:  # SourceError; keep trying while live
            self.counters.last_error = str(err)

    def _wait_for_gate(self, timeout_s: float = 300.0) -> None:
        """Beat until the supervisor sets ``GO`` in this process's counter block (or ``timeout_s``)."""
        block = getattr(self.counters, "block", None)
        deadline = time.monotonic() + timeout_s
        while block is not None and not block.ints[W_GO] and time.monotonic() < deadline:
            if self.stop.is_set():  # type: ignore[attr-defined]
                return
            self.heartbeat.beat()
            time.sleep(0.02)
        self.counters.extra["waited_for_gate_ms"] = int((time.monotonic() - deadline + timeout_s) * 1000)

    def run(self) -> None:
        """Capture until end of file (then drain) or until stopped."""
        if self.s.start_gate:
            self._wait_for_gate()
        self.adopt()
        period = 1.0 / self.s.max_fps if self.s.max_fps else 0.0
        next_t = time.monotonic()
        while not self.stop.is_set():  # type: ignore[attr-defined]
            outcome, frame = ("frame", self.source.read()) if self.writer is None else self._read_in_place()
            if outcome == "stopped":
                break
            if outcome == "frame":
                if frame is None:
                    if self.source.is_file:
                        self._check_complete()
                        break
                    self.counters.extra["offline"] = 1  # shown by status until the camera delivers again
                    self._reconnect()
                    continue
                if not self._publish(frame):
                    break
            if self._failures:
                self._failures = 0
                self.counters.extra["offline"] = 0
            self.heartbeat.beat()
            self._watch()
            if period:
                # never catch up after a stall (a reopen, a slow decode): a burst of frames would exceed the
                # credits detection granted and be dropped in live mode
                next_t = max(next_t + period, time.monotonic())
                time.sleep(max(0.0, next_t - time.monotonic()))
        self._drain()

    def _check_complete(self) -> None:
        """End of a file: a container that announced more frames than decoded is reported (``ended_early``)."""
        expected = int(getattr(self.source, "frame_count", 0) or 0)
        if expected and self.frame_index < expected:
            self.counters.extra["ended_early"] = 1
            self.counters.extra["container_frames"] = expected
            self.counters.last_error = (f"camera {self.s.camera}: decoding stopped at frame {self.frame_index} of the "
                                        f"{expected} the file announces (truncated or damaged file); the rest is not processed")
            log.warning("%s", self.counters.last_error)

    def _drain(self) -> None:
        """File mode: wait (replaying) until downstream released every frame, or until stopped."""
        w = self.writer
        while w is not None and self.s.wait_for_release and not w.all_released():
            if self.stop.is_set():  # type: ignore[attr-defined]
                break
            self._idle()
            self.sender.service(10)
        self.sender.finish()  # detection drains at once: no more frames follow on this connection
        self.heartbeat.beat(force=True)
        self.source.close()
        if w is not None:
            w.close(unlink=not self.s.wait_for_release)  # file mode: the supervisor removes it with the run


def _peer_pid(sender: Dispatcher) -> int:
    """The pid of the process the dispatcher's last message went to (its routing id), or 0."""
    peer = getattr(sender, "last_peer", b"")
    return int(peer) if peer.isdigit() else 0
