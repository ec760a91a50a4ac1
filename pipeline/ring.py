"""Shared-memory frame rings: one per camera, fixed slots, seqlock-checked reads.

Layout of one ring segment (``multiprocessing.shared_memory``)::

    [ring header: 64 B][slot headers: slots x 64 B][slot 0 pixels][slot 1 pixels]...

Ring header (int64 words): magic, slots, height, width, channels, slot
stride in bytes, data offset. Slot header (int64 words):

- ``seq``: ``0`` empty, ``-s`` while the writer copies frame ``s`` into the slot
  (busy), ``s`` once frame ``s`` is published;
- ``released``: the last ``seq`` its current owner released;
- ``captured_at_ns`` and ``frame_index`` of the frame in the slot.

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
has been released (so every frame of a file is processed; a slot not released
within ``release_timeout_s``, e.g. because its owner was killed, is reclaimed
and counted). In **live** mode the writer never waits: the oldest slot is
reused and late readers see the overwrite. Because capture decodes straight
into the slot, the slot is busy for the whole decode (for a network camera,
also while it waits for the camera's next frame), so in live mode a reader
holding the oldest frame loses it up to one frame period earlier than with a
copy: the usable depth is ``slots - 1`` frames.

Lifecycle. Segment names are ``facepro_<run_id>_<camera>_<pid>_<k>``: the run id
lets a new run remove what a killed run left behind (only its own
``facepro_`` prefix); ``k`` grows when a camera's resolution changes, so a
reader never reattaches to a stale ring of another size. The creating process
unlinks its rings; the supervisor unlinks whatever is left at exit. Python's
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
_MAGIC = 0x46505249_4E473031  # "FPRING01"
_HEADER_BYTES = 64
_SLOT_HEADER_WORDS = 8
_SLOT_HEADER_BYTES = _SLOT_HEADER_WORDS * 8
_ALIGN = 4096
# slot header word indices
_SEQ, _RELEASED, _CAPTURED, _INDEX = 0, 1, 2, 3


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
        self.reclaimed = 0
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
        head = np.ndarray((8,), dtype=np.int64, buffer=shm.buf)
        head[:] = (_MAGIC, layout.slots, layout.height, layout.width, layout.channels, layout.slot_stride, layout.data_offset, 0)
        return cls(shm, layout, wait_for_release, release_timeout_s)

    def _slot_free(self, slot: int) -> bool:
        seq = self._headers[slot, _SEQ]
        return seq == 0 or self._headers[slot, _RELEASED] == seq

    def wait_slot(self, stop: object = None, idle: object = None) -> bool:
        """File mode: block until the next slot is released (or reclaimed ``release_timeout_s`` after it was published).

        Args:
            stop: optional object with ``is_set()``; returning True aborts the wait.
            idle: optional callable run while waiting (e.g. answering flow-control messages).

        Returns:
            False if ``stop`` aborted the wait, True when the slot may be written.
        """
        slot = (self.next_seq - 1) % self.layout.slots
        if not self.wait_for_release or self._slot_free(slot):
            return True
        # The timeout counts from when the frame was published, so a burst of orphaned
        # slots (their owner was killed) is reclaimed within one timeout, not one each.
        published_ns = int(self._headers[slot, _CAPTURED])
        deadline = time.monotonic() + self.release_timeout_s - max(0.0, (time.time_ns() - published_ns) / 1e9)
        pause = 0.00002  # poll fast at first (a slot is usually released within a frame time), then back off
        while not self._slot_free(slot):
            if stop is not None and stop.is_set():  # type: ignore[attr-defined]
                return False
            if time.monotonic() > deadline:
                self.reclaimed += 1
                log.warning("ring %s: slot %d (frame seq %d) not released within %.1f s; reclaimed",
                            self.name, slot, int(self._headers[slot, _SEQ]), self.release_timeout_s)
                return True
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
        hdr[_SEQ] = seq  # publish: the last store, after the pixels
        self.next_seq = seq + 1
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

    def close(self, unlink: bool = True) -> None:
        """Detach and (by default) unlink the segment; readers already attached keep their mapping."""
        self._drop_views()
        try:
            self.shm.close()
        finally:
            if unlink:
                _unlink(self.name)


class RingReader(_Ring):
    """A reader attached to an existing ring (detection, recognition processes)."""

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
        head = np.ndarray((8,), dtype=np.int64, buffer=shm.buf).copy()
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

    def close(self) -> None:
        self._drop_views()
        self.shm.close()


class RingCache:
    """Readers by segment name, attached on first use, oldest detached past ``max_rings``."""

    def __init__(self, max_rings: int = 16) -> None:
        self._rings: dict[str, RingReader] = {}
        self.max_rings = max_rings

    def get(self, name: str) -> RingReader:
        ring = self._rings.get(name)
        if ring is None:
            ring = RingReader.attach(name)
            self._rings[name] = ring
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
