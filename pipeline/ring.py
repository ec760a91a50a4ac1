"""Shared-memory frame rings: one per camera, fixed slots, seqlock-checked reads.

Layout of one ring segment (``multiprocessing.shared_memory``)::

    [ring header: 128 B][slot headers: slots x 64 B][slot 0 pixels][slot 1 pixels]...

Ring header (int64 words): magic, slots, height, width, channels, slot
stride in bytes, data offset, the pid of the recognition process that
currently owns the camera and the pid it took the camera over from (both
written by that process when it claims the camera, read by capture). Slot
header (int64 words):

- ``seq``: ``0`` empty, ``-s`` while the writer copies frame ``s`` into the slot
  (busy), ``s`` once frame ``s`` is published;
- ``released``: the last ``seq`` its current owner released;
- ``captured_at_ns`` and ``frame_index`` of the frame in the slot;
- ``dispatched``: pid of the detection process the frame was sent to (``0``:
  not sent yet), written by capture;
- ``forwarded``: ``seq`` once a detection process passed the frame's
  detections on (detection counts a frame only the first time);
- ``accepted``: pid of the recognition process that received it (``0``: not
  yet), written by that process.

Seqlock protocol. The single writer (the camera's capture process) marks the
slot busy (``seq = -s``), fills the pixels (capture decodes straight into the
slot, :meth:`RingWriter.begin_write`; :meth:`RingWriter.write` copies a frame
in), writes the timestamp, then publishes ``seq = s``. A message over ZeroMQ names ``(ring, slot, seq)``. A
reader checks ``seq == s`` before copying and again after: if the slot was
rewritten in between (a late reader in live mode), the copy is discarded and
counted as an ``overwritten`` drop. No torn or stale frame is ever handed to
a stage. The checks rely on stores becoming visible in program order
(guaranteed on x86-64; on weakly ordered CPUs such as ARM the interpreter's
own synchronisation between the numpy calls makes a reordering there
practically, not formally, impossible).

Ownership and release. Each published frame has exactly one owner at a time,
and ownership travels with the message: capture → the detection process that
received the :class:`~pipeline.messages.FrameRef` → the recognition process
that received its :class:`~pipeline.messages.Detections`, which copies what it
needs and then *releases* the slot (``released = s``). Only the current owner
writes ``released``, so no atomic operations are needed. Because detection
never releases, the frame recognition reads is the very frame detection saw.

Modes. In **file** mode the writer waits until the slot it is about to reuse
has been released, so every frame of a file is processed; it never takes a
slot back by itself (a warning is logged every ``release_timeout_s``). A
frame whose owner was killed is *replayed* instead (:meth:`RingWriter.replays`):
its FrameRef is sent again, marked ``replay``, when the detection process it
was dispatched to is gone and no recognition process has accepted it yet, or
when the recognition process that owns the camera (ring header) is gone and
the frame was accepted by it or by nobody yet. Recognition drops the frames
it has already handled (by ``frame_index``), so each frame takes effect
exactly once. A restarted capture process adopts its predecessor's ring
(:meth:`RingWriter.adopt`): frames in flight stay valid, the ring is never
held twice in ``/dev/shm``, and it resumes after the last published frame. In **live** mode the writer never waits: the oldest slot is
reused and late readers see the overwrite. Because capture decodes straight
into the slot, the slot is busy for the whole decode (for a network camera,
also while it waits for the camera's next frame), so in live mode a reader
holding the oldest frame loses it up to one frame period earlier than with a
copy: the usable depth is ``slots - 1`` frames.

Lifecycle. Segment names are ``facepro_<run_id>_<camera>_<pid>_<k>`` with the
supervisor's pid: the run id lets a new run remove what a killed run left
behind (only its own ``facepro_`` prefix), and a run of another data dir
removes it only once that pid is gone; ``k`` grows when a camera's resolution
changes, so a reader never reattaches to a stale ring of another size. In file
mode a ring lives as long as its run (a restarted capture adopts it); the
supervisor unlinks whatever is left at exit. A live-mode capture unlinks its
ring when it stops. Python's
resource tracker is kept out of it (it would unlink segments when the first
*attaching* process exits). Space is reserved with ``posix_fallocate`` at
creation, so a full ``/dev/shm`` is a clear error at start, never a SIGBUS
mid-run.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np

log = logging.getLogger("facepro.ring")

SHM_DIR = Path("/dev/shm")
PREFIX = "facepro_"
_MAGIC = 0x46505249_4E473032  # "FPRING02" (01: 64-byte header without the previous owner)
_HEADER_BYTES = 128
_HEADER_WORDS = _HEADER_BYTES // 8
_SLOT_HEADER_WORDS = 8
_SLOT_HEADER_BYTES = _SLOT_HEADER_WORDS * 8
_ALIGN = 4096
# slot header word indices
_SEQ, _RELEASED, _CAPTURED, _INDEX, _DISPATCHED, _FORWARDED, _ACCEPTED = 0, 1, 2, 3, 4, 5, 6
# ring header word indices: pid of the recognition process owning the camera, and of its predecessor
_HEAD_RECOGNIZER, _HEAD_PREVIOUS = 7, 8


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie (a killed child not yet reaped counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): os.kill is all we know
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


@dataclass(frozen=True)
class PendingFrame:
    """A published frame its owner has not released yet (see :meth:`RingWriter.pending`).

    Attributes:
        slot, seq, frame_index, captured_at_ns: as in :class:`~pipeline.messages.FrameRef`.
        dispatched: pid of the detection process it was sent to (0: never sent).
        accepted: pid of the recognition process that received it (0: none yet).
        forwarded: a detection process passed its detections on.
    """

    slot: int
    seq: int
    frame_index: int
    captured_at_ns: int
    dispatched: int
    accepted: int
    forwarded: bool = False


class RingError(RuntimeError):
    """A ring that cannot be created or attached (space, name, layout)."""


class ShmSpaceError(RingError):
    """``/dev/shm`` has less free space than the rings need."""


@dataclass(frozen=True)
class RingLayout:
    """Geometry of a ring: ``slots`` frames of ``(height, width, channels)`` uint8."""

    slots: int
    height: int
    width: int
    channels: int = 3

    @property
    def frame_bytes(self) -> int:
        return self.height * self.width * self.channels

    @property
    def slot_stride(self) -> int:
        return -(-self.frame_bytes // _ALIGN) * _ALIGN

    @property
    def data_offset(self) -> int:
        raw = _HEADER_BYTES + self.slots * _SLOT_HEADER_BYTES
        return -(-raw // _ALIGN) * _ALIGN

    @property
    def total_bytes(self) -> int:
        return self.data_offset + self.slots * self.slot_stride


def ring_name(run_id: str, camera: str, pid: int, generation: int) -> str:
    """Segment name for a camera's ring (see module docstring)."""
    return f"{PREFIX}{run_id}_{camera}_{pid}_{generation}"


def run_id_of(segment: str) -> str | None:
    """The run id embedded in a FacePro segment name, or None for foreign names."""
    if not segment.startswith(PREFIX):
        return None
    parts = segment[len(PREFIX):].split("_", 1)
    return parts[0] if len(parts) == 2 else None


def _unlink(name: str) -> bool:
    """Unlink segment ``name`` without the resource tracker (which never tracked it). False if gone."""
    try:
        os.unlink(SHM_DIR / name.lstrip("/"))
        return True
    except FileNotFoundError:
        return False


def _untrack(shm: shared_memory.SharedMemory) -> None:
    # The resource tracker would unlink the segment when an attaching process exits.
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - tracker not running
        pass


def check_free_space(needed_bytes: int, what: str, shm_dir: Path = SHM_DIR) -> None:
    """Raise :class:`ShmSpaceError` if ``shm_dir`` has less than ``needed_bytes`` free.

    The message names both sizes and the config keys that change the need.
    """
    try:
        free = shutil.disk_usage(shm_dir).free
    except OSError:
        return  # no /dev/shm to inspect (non-Linux); creation will report errors
    if free < needed_bytes:
        raise ShmSpaceError(
            f"{shm_dir} has {free / 2**20:.1f} MiB free but {what} needs {needed_bytes / 2**20:.1f} MiB; "
            "lower ring.slots in the config (or the camera resolution), or enlarge /dev/shm "
            "(docker: --shm-size, systemd: RuntimeDirectorySize)"
        )


class _Ring:
    def __init__(self, shm: shared_memory.SharedMemory, layout: RingLayout) -> None:
        self.shm = shm
        self.name = shm.name
        self.layout = layout
        self._headers = np.ndarray((layout.slots, _SLOT_HEADER_WORDS), dtype=np.int64, buffer=shm.buf, offset=_HEADER_BYTES)
        self._frames = [
            np.ndarray((layout.height, layout.width, layout.channels), dtype=np.uint8, buffer=shm.buf,
                       offset=layout.data_offset + i * layout.slot_stride)
            for i in range(layout.slots)
        ]

    def _drop_views(self) -> None:
        self._headers = None  # type: ignore[assignment]
        self._frames = []

    def occupancy(self) -> int:
        """Slots holding a published frame that its owner has not released yet."""
        seq = self._headers[:, _SEQ]
        return int(np.count_nonzero((seq > 0) & (self._headers[:, _RELEASED] != seq)))


class RingWriter(_Ring):
    """The single writer of a camera's ring (the capture process).

    Create with :meth:`create`; :meth:`write` publishes frames; :meth:`close`
    unlinks the segment.
    """

    def __init__(self, shm: shared_memory.SharedMemory, layout: RingLayout, wait_for_release: bool, release_timeout_s: float) -> None:
        super().__init__(shm, layout)
        self.wait_for_release = wait_for_release
        self.release_timeout_s = release_timeout_s
        self.next_seq = 1
        self.last_frame_index = -1  # frame_index of the newest published frame (see adopt)
        self._busy = False  # between begin_write and publish/abort

    @classmethod
    def create(cls, name: str, layout: RingLayout, *, wait_for_release: bool, release_timeout_s: float = 10.0) -> RingWriter:
        """Create and zero a ring segment.

        Raises:
            ShmSpaceError: not enough free space in ``/dev/shm``.
            RingError: a segment of that name exists, or the OS refused.
        """
        check_free_space(layout.total_bytes, f"ring {name} ({layout.slots} slots of {layout.width}x{layout.height})")
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=layout.total_bytes)
        except FileExistsError:
            raise RingError(f"shared-memory segment {name} already exists; is another run using this run id?") from None
        except OSError as err:
            raise RingError(f"cannot create shared-memory segment {name} ({layout.total_bytes} bytes): {err}") from None
        _untrack(shm)
        fallocate = getattr(os, "posix_fallocate", None)  # absent on macOS/Windows: no reservation there
        if fallocate is not None:
            try:
                fallocate(shm._fd, 0, layout.total_bytes)  # type: ignore[attr-defined]
            except OSError as err:
                shm.close()
                _unlink(name)
                raise ShmSpaceError(f"/dev/shm cannot hold ring {name} ({layout.total_bytes / 2**20:.1f} MiB): {err.strerror}; "
                                    "lower ring.slots or enlarge /dev/shm") from None
        head = np.ndarray((_HEADER_WORDS,), dtype=np.int64, buffer=shm.buf)
        head[:] = 0
        head[:7] = (_MAGIC, layout.slots, layout.height, layout.width, layout.channels, layout.slot_stride, layout.data_offset)
        return cls(shm, layout, wait_for_release, release_timeout_s)

    @classmethod
    def adopt(cls, name: str, *, wait_for_release: bool, release_timeout_s: float = 10.0) -> RingWriter:
        """Take over the ring of a capture process that died (same camera, same run).

        Frames its predecessor published stay where they are (downstream may
        hold them); a slot it was writing is emptied; writing continues with
        the next ``seq``. :attr:`last_frame_index` tells where the source resumes.

        Raises:
            RingError: no such segment, or not a FacePro ring.
        """
        reader = RingReader.attach(name)
        writer = cls(reader.shm, reader.layout, wait_for_release, release_timeout_s)
        seq = writer._headers[:, _SEQ]
        seq[seq < 0] = 0  # a frame the dead writer had not finished: never published
        if seq.max() > 0:
            newest = int(np.argmax(seq))
            writer.next_seq = int(seq[newest]) + 1
            writer.last_frame_index = int(writer._headers[newest, _INDEX])
        return writer

    def _slot_free(self, slot: int) -> bool:
        seq = self._headers[slot, _SEQ]
        return seq == 0 or self._headers[slot, _RELEASED] == seq

    def wait_slot(self, stop: object = None, idle: object = None) -> bool:
        """File mode: block until the next slot is released.

        A slot is never taken back while waiting: a frame whose owner died is
        replayed by the capture loop (:meth:`replays`, run from ``idle``) and
        released by its new owner. Every ``release_timeout_s`` of waiting a
        warning names the slot and its frame.

        Args:
            stop: optional object with ``is_set()``; returning True aborts the wait.
            idle: optional callable run while waiting (answer flow-control
                messages, beat, replay the frames of dead owners).

        Returns:
            False if ``stop`` aborted the wait, True when the slot may be written.
        """
        slot = (self.next_seq - 1) % self.layout.slots
        if not self.wait_for_release or self._slot_free(slot):
            return True
        warn_at = time.monotonic() + self.release_timeout_s
        pause = 0.00002  # poll fast at first (a slot is usually released within a frame time), then back off
        while not self._slot_free(slot):
            if stop is not None and stop.is_set():  # type: ignore[attr-defined]
                return False
            if time.monotonic() > warn_at:
                log.warning("ring %s: waiting %.0f s for frame %d (slot %d) to be released downstream", self.name,
                            self.release_timeout_s, int(self._headers[slot, _INDEX]), slot)
                warn_at += self.release_timeout_s
            if idle is not None:
                idle()  # type: ignore[operator]
            time.sleep(pause)
            pause = min(pause * 1.5, 0.002)
        return True

    def begin_write(self) -> np.ndarray:
        """Mark the next slot busy and return it as a writable ``(H, W, C) uint8`` view.

        For producers that create the frame in place (capture decodes straight
        into the slot with ``cv2.VideoCapture.read(image=view)``, so the frame
        is never copied). Follow with :meth:`publish` once the pixels are
        complete, or :meth:`abort` if no frame came. While the slot is busy a
        reader holding an older frame of that slot sees the overwrite. In file
        mode call :meth:`wait_slot` first.

        Raises:
            RingError: a write is already in progress.
        """
        if self._busy:
            raise RingError(f"ring {self.name}: begin_write while slot {(self.next_seq - 1) % self.layout.slots} is busy")
        seq = self.next_seq
        slot = (seq - 1) % self.layout.slots
        self._headers[slot, _SEQ] = -seq  # busy
        self._busy = True
        return self._frames[slot]

    def publish(self, frame_index: int, captured_at_ns: int) -> tuple[int, int]:
        """Publish the slot opened by :meth:`begin_write`.

        Args:
            frame_index: 0-based index of the frame in its source.
            captured_at_ns: ``time.time_ns()`` when the frame was read.

        Returns:
            ``(slot, seq)`` to name in the :class:`~pipeline.messages.FrameRef`.

        Raises:
            RingError: no write in progress.
        """
        if not self._busy:
            raise RingError(f"ring {self.name}: publish without begin_write")
        seq = self.next_seq
        slot = (seq - 1) % self.layout.slots
        hdr = self._headers[slot]
        hdr[_CAPTURED] = captured_at_ns
        hdr[_INDEX] = frame_index
        hdr[_DISPATCHED] = hdr[_FORWARDED] = hdr[_ACCEPTED] = 0
        hdr[_SEQ] = seq  # publish: the last store, after the pixels
        self.next_seq = seq + 1
        self.last_frame_index = frame_index
        self._busy = False
        return slot, seq

    def abort(self) -> None:
        """Give up the write opened by :meth:`begin_write`: the slot becomes empty (its old frame is gone)."""
        if self._busy:
            self._headers[(self.next_seq - 1) % self.layout.slots, _SEQ] = 0
            self._busy = False

    def write(self, frame: np.ndarray, frame_index: int, captured_at_ns: int) -> tuple[int, int]:
        """Copy ``frame`` ((H, W, C) uint8, the ring's shape) into the next slot and publish it.

        In file mode call :meth:`wait_slot` first.

        Returns:
            ``(slot, seq)`` to name in the :class:`~pipeline.messages.FrameRef`.

        Raises:
            ValueError: the frame's shape or dtype differs from the ring's
                (create a new ring for a new resolution).
        """
        lay = self.layout
        if frame.shape != (lay.height, lay.width, lay.channels) or frame.dtype != np.uint8:
            raise ValueError(f"frame {frame.shape} {frame.dtype} does not fit ring {self.name} of {(lay.height, lay.width, lay.channels)} uint8")
        np.copyto(self.begin_write(), frame)
        return self.publish(frame_index, captured_at_ns)

    def all_released(self) -> bool:
        """True when no published frame is still owned by a reader."""
        return self.occupancy() == 0

    def pending(self) -> list[PendingFrame]:
        """Published frames not released yet, oldest first."""
        h = self._headers
        rows = np.flatnonzero((h[:, _SEQ] > 0) & (h[:, _RELEASED] != h[:, _SEQ]))
        frames = [PendingFrame(int(i), int(h[i, _SEQ]), int(h[i, _INDEX]), int(h[i, _CAPTURED]),
                               int(h[i, _DISPATCHED]), int(h[i, _ACCEPTED]), bool(h[i, _FORWARDED] == h[i, _SEQ]))
                  for i in rows]
        return sorted(frames, key=lambda f: f.seq)

    def mark_dispatched(self, slot: int, seq: int, pid: int) -> None:
        """Record the detection process frame ``seq`` was sent to (capture, after the send); a new
        dispatch also forgets a recognition process that accepted an earlier copy."""
        if self._headers[slot, _SEQ] == seq:
            self._headers[slot, _ACCEPTED] = 0
            self._headers[slot, _DISPATCHED] = pid

    def recognizer_pid(self) -> int:
        """Pid the recognition process owning this camera wrote into the ring header (0: none yet)."""
        return int(np.ndarray((_HEADER_WORDS,), dtype=np.int64, buffer=self.shm.buf)[_HEAD_RECOGNIZER])

    def recognizers(self) -> tuple[int, int]:
        """``(current, previous)``: the pid of the recognition process owning this camera and the pid it
        took the camera over from (0: none). The capture learns of a dead owner from either, so a
        successor that claims the camera before the capture ever saw its predecessor hides nothing."""
        head = np.ndarray((_HEADER_WORDS,), dtype=np.int64, buffer=self.shm.buf)
        return int(head[_HEAD_RECOGNIZER]), int(head[_HEAD_PREVIOUS])

    def replays(self, dead_recognizers: frozenset[int], alive: object = pid_alive) -> list[PendingFrame]:
        """Pending frames whose owner is gone, to be sent again (file mode; see the module docstring).

        Args:
            dead_recognizers: pids of recognition processes known to have died
                whose frames were not replayed yet.
            alive: ``pid -> bool`` (injected in tests).

        Returns:
            Frames dispatched to a detection process that is gone and accepted by
            no recognition process, plus frames accepted by a dead recognition
            process or by none while the camera's recognition process is gone.
        """
        out = []
        cache: dict[int, bool] = {}
        for f in self.pending():
            if f.dispatched == 0:
                continue  # not sent yet (the capture is about to send it)
            if f.accepted == 0 and f.dispatched not in cache:
                cache[f.dispatched] = alive(f.dispatched)  # type: ignore[operator]
            lost_in_detection = f.accepted == 0 and not cache.get(f.dispatched, True)
            lost_in_recognition = bool(dead_recognizers) and (f.accepted == 0 or f.accepted in dead_recognizers)
            if lost_in_detection or lost_in_recognition:
                out.append(f)
        return out

    def unconfirmed(self) -> list[PendingFrame]:
        """For an adopted ring: pending frames its dead writer may never have delivered (not sent, or sent
        but neither forwarded by detection nor accepted by recognition: the message may have died in the
        writer's own socket queue). Sending them again may duplicate a frame detection already holds;
        recognition drops the copy."""
        return [f for f in self.pending() if f.dispatched == 0 or (f.accepted == 0 and not f.forwarded)]

    def close(self, unlink: bool = True) -> None:
        """Detach and (by default) unlink the segment; readers already attached keep their mapping."""
        self._drop_views()
        try:
            self.shm.close()
        finally:
            if unlink:
                _unlink(self.name)


@dataclass(frozen=True)
class LatestFrame:
    """The newest published frame of a ring (:meth:`RingReader.latest`).

    Attributes:
        frame: ``(H, W, C) uint8`` copy (BGR), or None when only the header was asked for.
        seq, frame_index, captured_at_ns: as in :class:`~pipeline.messages.FrameRef`
            (``captured_at_ns``: wall-clock nanoseconds since the epoch).
        slot: the slot that held it (for :meth:`RingReader.view`).
    """

    frame: np.ndarray | None
    seq: int
    frame_index: int
    captured_at_ns: int
    slot: int = -1


class RingReader(_Ring):
    """A reader attached to an existing ring (detection, recognition processes, the api's live view)."""

    @classmethod
    def attach(cls, name: str) -> RingReader:
        """Attach to the ring segment ``name`` and validate its header.

        Raises:
            RingError: no such segment (its camera stopped), or not a FacePro ring.
        """
        try:
            shm = shared_memory.SharedMemory(name=name, create=False)
        except FileNotFoundError:
            raise RingError(f"ring {name} does not exist (its capture process has stopped)") from None
        _untrack(shm)
        head = np.ndarray((_HEADER_WORDS,), dtype=np.int64, buffer=shm.buf).copy()
        if head[0] != _MAGIC:
            shm.close()
            raise RingError(f"segment {name} is not a FacePro ring (bad magic)")
        layout = RingLayout(slots=int(head[1]), height=int(head[2]), width=int(head[3]), channels=int(head[4]))
        return cls(shm, layout)

    def published(self, slot: int, seq: int) -> bool:
        """True while ``slot`` still holds frame ``seq``."""
        return bool(self._headers[slot, _SEQ] == seq)

    def read(self, slot: int, seq: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """Copy frame ``seq`` out of ``slot``; None if it was overwritten (never a torn frame).

        Args:
            out: optional ``(H, W, C) uint8`` buffer to copy into (avoids an allocation).

        Returns:
            The copied frame, or None when the slot no longer holds ``seq``
            before or after the copy.
        """
        if not 0 <= slot < self.layout.slots:
            raise ValueError(f"slot {slot} outside ring {self.name} of {self.layout.slots} slots")
        if self._headers[slot, _SEQ] != seq:
            return None
        src = self._frames[slot]
        if out is None:
            out = src.copy()
        else:
            np.copyto(out, src)
        if self._headers[slot, _SEQ] != seq:
            return None
        return out

    def latest(self, copy: bool = True, attempts: int = 3) -> LatestFrame | None:
        """The newest published frame, checked like :meth:`read` (never torn); the ring is not touched.

        A frame overwritten while it is copied is discarded and the then newest one tried, up to
        ``attempts`` times. The reader owns nothing: it never releases or marks a slot.

        Args:
            copy: False reads only the header (``frame`` None): frame index and capture time.
            attempts: frames tried before giving up, >= 1.

        Returns:
            A :class:`LatestFrame`, or None when nothing is published yet or every attempt was overwritten.
        """
        for _ in range(max(1, attempts)):
            seqs = self._headers[:, _SEQ].copy()
            slot = int(np.argmax(seqs))
            seq = int(seqs[slot])
            if seq <= 0:
                return None
            index, captured = int(self._headers[slot, _INDEX]), int(self._headers[slot, _CAPTURED])
            frame = self.read(slot, seq) if copy else None
            if (frame is not None or not copy) and self.published(slot, seq):
                return LatestFrame(frame, seq, index, captured, slot)
        return None

    def view(self, slot: int, seq: int) -> np.ndarray | None:
        """A read-only zero-copy view of frame ``seq`` in ``slot``, or None if the slot no longer holds it.

        The caller *uses* the frame in place and must then confirm with
        :meth:`published` that the slot still holds ``seq``; if not, whatever
        it computed from the view is discarded and the frame counted as
        ``overwritten`` (seqlock read without the copy). In file mode a slot is
        never rewritten while its owner holds it, so the check always passes.
        """
        if not 0 <= slot < self.layout.slots:
            raise ValueError(f"slot {slot} outside ring {self.name} of {self.layout.slots} slots")
        if self._headers[slot, _SEQ] != seq:
            return None
        view = self._frames[slot].view()
        view.flags.writeable = False
        return view

    def release(self, slot: int, seq: int) -> None:
        """Give slot ``slot`` back to the writer (only the current owner of ``seq`` calls this)."""
        if self._headers[slot, _SEQ] == seq:
            self._headers[slot, _RELEASED] = seq

    def mark_forwarded(self, slot: int, seq: int) -> bool:
        """Detection: the detections of frame ``seq`` were sent on. True the first time for this frame
        (a replayed frame that an earlier detection process already forwarded gives False)."""
        hdr = self._headers[slot]
        if hdr[_SEQ] != seq:
            return False
        first = hdr[_FORWARDED] != seq
        hdr[_FORWARDED] = seq
        return bool(first)

    def mark_accepted(self, slot: int, seq: int, pid: int) -> None:
        """Recognition: process ``pid`` received frame ``seq`` and now owns it."""
        if self._headers[slot, _SEQ] == seq:
            self._headers[slot, _ACCEPTED] = pid

    def claim_recognizer(self, pid: int) -> None:
        """Recognition: process ``pid`` owns this camera from now on (ring header); the owner it replaces,
        if any, is kept as the previous owner (see :meth:`RingWriter.recognizers`)."""
        head = np.ndarray((_HEADER_WORDS,), dtype=np.int64, buffer=self.shm.buf)
        if head[_HEAD_RECOGNIZER] not in (0, pid):
            head[_HEAD_PREVIOUS] = head[_HEAD_RECOGNIZER]
        head[_HEAD_RECOGNIZER] = pid

    def close(self) -> None:
        self._drop_views()
        self.shm.close()


class RingCache:
    """Readers by segment name, attached on first use, oldest detached past ``max_rings``.

    Args:
        max_rings: rings kept attached at once.
        on_attach: called with each newly attached reader (recognition claims the camera).
    """

    def __init__(self, max_rings: int = 16, on_attach: object = None) -> None:
        self._rings: dict[str, RingReader] = {}
        self.max_rings = max_rings
        self.on_attach = on_attach

    def get(self, name: str) -> RingReader:
        ring = self._rings.get(name)
        if ring is None:
            ring = RingReader.attach(name)
            self._rings[name] = ring
            if self.on_attach is not None:
                self.on_attach(ring)  # type: ignore[operator]
            if len(self._rings) > self.max_rings:
                oldest = next(iter(self._rings))
                self._rings.pop(oldest).close()
        return ring

    def close(self) -> None:
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()


def list_segments(run_id: str | None = None, shm_dir: Path = SHM_DIR) -> list[str]:
    """FacePro segment names in ``shm_dir`` (all runs, or one ``run_id``)."""
    if not shm_dir.is_dir():
        return []
    names = [p.name for p in shm_dir.iterdir() if p.name.startswith(PREFIX)]
    return sorted(n for n in names if run_id is None or run_id_of(n) == run_id)


def unlink_segments(names: list[str]) -> int:
    """Unlink the named segments; returns how many were removed."""
    return sum(_unlink(name) for name in names)
