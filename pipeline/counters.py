"""Per-process counter blocks: a small shared-memory segment per stage process that the supervisor reads.

The supervisor creates one block before it spawns a process and passes its
name to the child; the child's :class:`~pipeline.metrics.StageCounters`
writes straight into it, so every increment is visible at once and survives
the process being killed (SIGKILL included) between two heartbeats. After the
process exited the supervisor books its final counts from the block and
unlinks it. (The design of ZoneMinder's ``SharedData``: counters live where
both sides can see them, not in messages that die with the sender.)

Name: ``facepro_<run_id>_ctr_<stage>_<index>_<n>`` (``n`` counts the blocks of
the run), so the stale-run cleanup by the ``facepro_<run_id>_`` prefix covers
it.

Layout (:data:`BLOCK_BYTES` = 4096 bytes, one page, native little-endian)::

    int64 words 0..15   header and scalar counters (indices below)
    int64 words 16..31  drops per reason, DROP_REASONS order (MAX_DROPS slots)
    int64 words 32..63  named extra counters (MAX_EXTRA slots), values
    bytes 512..2559     extra counter names, MAX_EXTRA x NAME_BYTES (64), UTF-8, NUL padded
    bytes 2560..3583    last error, UTF-8, NUL padded (longer text is cut at 1023 bytes)
    int64 word 448      GO (bytes 3584..3591): written by the supervisor only; a live capture starts
                        delivering once it is 1 (every other stage process reported ``ready``)
    bytes 3592..4095    reserved (zero)

Header words: ``MAGIC`` ("FPCTR001"), ``VERSION``, ``OWNER_PID`` (the
supervisor), ``PID`` (the child, 0 until it attached), ``HEARTBEAT_NS``
(``time.monotonic_ns()`` of the last beat; CLOCK_MONOTONIC is system wide),
``FRAMES_IN``, ``FRAMES_OUT``, ``SENT``, ``BACKLOG``, ``MAX_RSS_KB``,
``N_EXTRA`` (extra slots in use), then float64 words ``P50_MS``, ``P99_MS``,
``OLDEST_WAIT_MS``, and ``STARTED_NS``.

Concurrency: one writer (the child; its heartbeat thread writes only
``HEARTBEAT_NS``, the percentiles and ``MAX_RSS_KB``), any number of readers.
Aligned 8-byte words are never torn on x86-64/arm64; a reader may see one
counter a step ahead of another, never a torn value. An extra name is written
before ``N_EXTRA`` grows, so a reader never sees an unnamed slot.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.messages import DROP_REASONS

log = logging.getLogger("facepro.counters")

SHM_DIR = Path("/dev/shm")
MAGIC = 0x46504354_52303031  # "FPCTR001"
VERSION = 1
BLOCK_BYTES = 4096
MAX_DROPS = 16
MAX_EXTRA = 32
NAME_BYTES = 64
ERROR_BYTES = 1024

# int64 word indices
(W_MAGIC, W_VERSION, W_OWNER_PID, W_PID, W_HEARTBEAT_NS, W_FRAMES_IN, W_FRAMES_OUT, W_SENT, W_BACKLOG,
 W_MAX_RSS_KB, W_N_EXTRA, W_P50_MS, W_P99_MS, W_OLDEST_WAIT_MS, W_STARTED_NS) = range(15)
FLOAT_WORDS = (W_P50_MS, W_P99_MS, W_OLDEST_WAIT_MS)
DROPS_AT = 16
EXTRA_AT = DROPS_AT + MAX_DROPS
NAMES_AT = (EXTRA_AT + MAX_EXTRA) * 8  # byte offset
ERROR_AT = NAMES_AT + MAX_EXTRA * NAME_BYTES
W_GO = 3584 // 8  # the supervisor's word (see the layout)
assert ERROR_AT + ERROR_BYTES + 512 == BLOCK_BYTES and len(DROP_REASONS) <= MAX_DROPS


class CounterBlockError(RuntimeError):
    """A counter block that cannot be created or attached, or is full (message names it)."""


def block_name(run_id: str, stage: str, index: int, n: int) -> str:
    """``facepro_<run_id>_ctr_<stage>_<index>_<n>``."""
    return f"facepro_{run_id}_ctr_{stage}_{index}_{n}"


@dataclass(frozen=True)
class BlockSnapshot:
    """A copy of one block's counters (see the module docstring for the meaning of each field).

    ``drops`` is ``(len(DROP_REASONS),) int64``; ``extra`` maps counter name → value;
    ``max_rss_mb`` is MiB; ``heartbeat_ns`` is ``time.monotonic_ns()``, 0 before the first beat.
    """

    pid: int
    owner_pid: int
    heartbeat_ns: int
    frames_in: int
    frames_out: int
    sent: int
    backlog: int
    drops: np.ndarray
    extra: dict
    latency_p50_ms: float
    latency_p99_ms: float
    oldest_wait_ms: float
    max_rss_mb: float
    last_error: str


class CounterBlock:
    """Views onto one counter block (shared memory, or private memory for a process without a supervisor).

    Use :meth:`create` (supervisor), :meth:`attach` (child, readers) or :meth:`private` (tests, tools).

    Attributes:
        name: segment name, None for a private block.
        ints: ``(BLOCK_BYTES // 8,) int64`` view of the whole block.
        floats: ``float64`` view of the same memory.
        drops: ``(len(DROP_REASONS),) int64`` view.
    """

    def __init__(self, buf: object, name: str | None = None, shm: shared_memory.SharedMemory | None = None) -> None:
        self.name = name
        self._shm = shm
        self._buf = buf
        self.ints = np.ndarray((BLOCK_BYTES // 8,), np.int64, buffer=buf)  # type: ignore[call-overload]
        self.floats = np.ndarray((BLOCK_BYTES // 8,), np.float64, buffer=buf)  # type: ignore[call-overload]
        self.bytes = np.ndarray((BLOCK_BYTES,), np.uint8, buffer=buf)  # type: ignore[call-overload]
        self.drops = self.ints[DROPS_AT:DROPS_AT + len(DROP_REASONS)]
        self._slots: dict[str, int] = {}

    @classmethod
    def create(cls, name: str, owner_pid: int | None = None) -> CounterBlock:
        """Create block ``name`` (zeroed, header written).

        Raises:
            CounterBlockError: the name exists or shared memory is exhausted.
        """
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=BLOCK_BYTES)
        except (FileExistsError, OSError) as err:
            raise CounterBlockError(f"cannot create counter block {name}: {err}") from None
        _untrack(shm)
        block = cls(shm.buf, name, shm)
        block.ints[W_VERSION] = VERSION
        block.ints[W_OWNER_PID] = os.getpid() if owner_pid is None else owner_pid
        block.ints[W_MAGIC] = MAGIC
        return block

    @classmethod
    def attach(cls, name: str) -> CounterBlock:
        """Attach an existing block.

        Raises:
            CounterBlockError: missing, too small, or not a counter block (bad magic/version).
        """
        try:
            shm = shared_memory.SharedMemory(name=name, create=False)
        except (FileNotFoundError, OSError) as err:
            raise CounterBlockError(f"cannot attach counter block {name}: {err}") from None
        _untrack(shm)
        if shm.size < BLOCK_BYTES:
            shm.close()
            raise CounterBlockError(f"counter block {name}: {shm.size} bytes, expected {BLOCK_BYTES}")
        block = cls(shm.buf, name, shm)
        if block.ints[W_MAGIC] != MAGIC or block.ints[W_VERSION] != VERSION:
            block.close()
            raise CounterBlockError(f"{name} is not a version-{VERSION} FacePro counter block")
        return block

    @classmethod
    def private(cls) -> CounterBlock:
        """A block in this process's memory only (same layout)."""
        block = cls(bytearray(BLOCK_BYTES))
        block.ints[W_VERSION], block.ints[W_OWNER_PID], block.ints[W_MAGIC] = VERSION, os.getpid(), MAGIC
        return block

    # ------------------------------------------------------------ writing
    def beat(self) -> None:
        """Stamp the heartbeat time (``time.monotonic_ns()``)."""
        self.ints[W_HEARTBEAT_NS] = time.monotonic_ns()

    def slot(self, name: str, create: bool = True) -> int | None:
        """Word index of extra counter ``name``; allocated on first use when ``create``.

        Raises:
            CounterBlockError: all MAX_EXTRA slots are taken, or the name is longer than NAME_BYTES in UTF-8.
        """
        idx = self._slots.get(name)
        if idx is not None:
            return idx
        names = self.extra_names()
        if name in names:
            self._slots[name] = EXTRA_AT + names.index(name)
            return self._slots[name]
        if not create:
            return None
        raw = name.encode()
        if not raw or len(raw) > NAME_BYTES:
            raise CounterBlockError(f"extra counter name {name!r}: 1..{NAME_BYTES} UTF-8 bytes")
        n = len(names)
        if n >= MAX_EXTRA:
            raise CounterBlockError(f"counter block full: {MAX_EXTRA} extra counters, cannot add {name!r}")
        at = NAMES_AT + n * NAME_BYTES
        self.bytes[at:at + NAME_BYTES] = 0
        self.bytes[at:at + len(raw)] = np.frombuffer(raw, np.uint8)
        self.ints[EXTRA_AT + n] = 0
        self.ints[W_N_EXTRA] = n + 1  # published after the name
        self._slots[name] = EXTRA_AT + n
        return self._slots[name]

    @property
    def last_error(self) -> str:
        raw = self.bytes[ERROR_AT:ERROR_AT + ERROR_BYTES].tobytes()
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    @last_error.setter
    def last_error(self, text: str) -> None:
        raw = text.encode()[:ERROR_BYTES - 1].decode("utf-8", "ignore").encode()  # cut on a character boundary
        self.bytes[ERROR_AT:ERROR_AT + ERROR_BYTES] = 0
        self.bytes[ERROR_AT:ERROR_AT + len(raw)] = np.frombuffer(raw, np.uint8)

    # ------------------------------------------------------------ reading
    def extra_names(self) -> list[str]:
        n = min(int(self.ints[W_N_EXTRA]), MAX_EXTRA)
        raw = self.bytes[NAMES_AT:NAMES_AT + n * NAME_BYTES].tobytes()
        return [raw[i * NAME_BYTES:(i + 1) * NAME_BYTES].split(b"\0", 1)[0].decode("utf-8", "replace") for i in range(n)]

    def read(self) -> BlockSnapshot:
        """A consistent-enough copy of every counter (see the module docstring)."""
        w, f = self.ints.copy(), self.floats.copy()
        names = self.extra_names()
        return BlockSnapshot(
            pid=int(w[W_PID]), owner_pid=int(w[W_OWNER_PID]), heartbeat_ns=int(w[W_HEARTBEAT_NS]),
            frames_in=int(w[W_FRAMES_IN]), frames_out=int(w[W_FRAMES_OUT]), sent=int(w[W_SENT]),
            backlog=int(w[W_BACKLOG]), drops=w[DROPS_AT:DROPS_AT + len(DROP_REASONS)].copy(),
            extra={n: int(w[EXTRA_AT + i]) for i, n in enumerate(names)},
            latency_p50_ms=float(f[W_P50_MS]), latency_p99_ms=float(f[W_P99_MS]),
            oldest_wait_ms=float(f[W_OLDEST_WAIT_MS]), max_rss_mb=int(w[W_MAX_RSS_KB]) / 1024.0,
            last_error=self.last_error)

    # ----------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Drop this process's mapping (the segment stays until :meth:`unlink`)."""
        shm, self._shm = self._shm, None
        self.ints = self.floats = self.bytes = self.drops = None  # type: ignore[assignment]
        if shm is not None:
            try:
                shm.close()
            except BufferError:  # a caller still holds a view; the mapping goes with the last one
                pass

    def unlink(self) -> bool:
        """Remove the segment; False if it was already gone or the block is private."""
        return unlink_block(self.name) if self.name else False


class ExtraCounters(MutableMapping):
    """The block's named extra counters as a ``dict``-like view (name → int, up to MAX_EXTRA names)."""

    def __init__(self, block: CounterBlock) -> None:
        self._block = block
        self.left_out: set[str] = set()  # counters that did not fit in the block

    def __getitem__(self, name: str) -> int:
        idx = self._block.slot(name, create=False)
        if idx is None:
            raise KeyError(name)
        return int(self._block.ints[idx])

    def __setitem__(self, name: str, value: int) -> None:
        """Set counter ``name`` (allocated on first use). A counter that finds the block full is left out, with
        one warning per name, rather than failing the process that reports it."""
        try:
            idx = self._block.slot(name)
        except CounterBlockError as err:
            if name not in self.left_out:
                self.left_out.add(name)
                log.warning("%s; the counter is not reported", err)
            return
        self._block.ints[idx] = int(value)

    def __delitem__(self, name: str) -> None:
        raise TypeError("extra counters are cumulative and cannot be removed")

    def __iter__(self) -> Iterator[str]:
        return iter(self._block.extra_names())

    def __len__(self) -> int:
        return len(self._block.extra_names())


def unlink_block(name: str) -> bool:
    """Remove counter block ``name`` without the resource tracker; False if it was gone."""
    from pipeline.ring import unlink_segments

    return unlink_segments([name]) == 1


def owner_of(name: str, shm_dir: Path = SHM_DIR) -> int | None:
    """The supervisor pid recorded in block ``name``, or None when it is not a readable counter block."""
    try:
        with open(shm_dir / name, "rb") as fh:
            head = np.frombuffer(fh.read(8 * (W_OWNER_PID + 1)), np.int64)
    except OSError:
        return None
    if len(head) <= W_OWNER_PID or head[W_MAGIC] != MAGIC:
        return None
    return int(head[W_OWNER_PID])


def _untrack(shm: shared_memory.SharedMemory) -> None:
    # The resource tracker would unlink the block when an attaching process exits.
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - tracker not running
        pass
