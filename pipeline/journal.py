"""Append-only record files that let a restarted process continue where a killed one stopped.

Two uses, both in file mode, both in the run's runtime directory (removed with
the run; they only need to survive the death of a process, not of the machine,
so nothing is fsynced):

- :class:`FrameJournal`, one per camera: after recognition handled a frame it
  appends the frame's :class:`~pipeline.messages.Detections` and what the stage
  changed while handling it (its own bytes, :class:`Resumable`), *before* the
  frame's ring slot is released. A successor replays the journal through the
  stage without pixels, which rebuilds the tracker and the per-track state
  exactly (same track ids, same event ids, the votes so far), and continues at
  the next frame: every frame after the journal's last one is still unreleased
  in the ring and is replayed to it (:mod:`pipeline.ring`).
- :class:`Outbox`, one per recognition process index: every item handed to
  storage is appended before it is sent, every acknowledgement after it
  arrives, so a successor re-sends what storage never acknowledged (the
  at-least-once delivery of :class:`~pipeline.transport.ReliableSender`
  survives the sender's death; storage writes are idempotent).

Record layout (little endian): ``u32 length`` of the body, ``u8 kind``,
``u32 crc32`` of the body, then the body. A record cut short by a kill, or one
whose checksum does not match, ends the file for the reader (everything before
it is intact). A body that holds several byte strings (a multipart message) is
packed as ``u16 count``, ``count x u32 lengths``, then the strings.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np

from pipeline.codec import MalformedMessage, decode, encode
from pipeline.messages import Detections, FrameRef

_HEAD = struct.Struct("<IBI")
_COUNT = struct.Struct("<H")


def pack_parts(parts: Sequence[bytes | memoryview]) -> bytes:
    """Pack byte strings into one body (see the module docstring)."""
    raw = [bytes(p) for p in parts]
    return _COUNT.pack(len(raw)) + struct.pack(f"<{len(raw)}I", *map(len, raw)) + b"".join(raw)


def unpack_parts(body: bytes) -> list[bytes]:
    """Inverse of :func:`pack_parts`.

    Raises:
        ValueError: the body is not a packed list.
    """
    if len(body) < _COUNT.size:
        raise ValueError("packed parts: body too short")
    (n,) = _COUNT.unpack_from(body)
    offset = _COUNT.size + 4 * n
    if len(body) < offset:
        raise ValueError("packed parts: truncated lengths")
    sizes = struct.unpack_from(f"<{n}I", body, _COUNT.size)
    if offset + sum(sizes) != len(body):
        raise ValueError("packed parts: lengths do not match the body")
    parts = []
    for size in sizes:
        parts.append(body[offset:offset + size])
        offset += size
    return parts


class RecordLog:
    """One append-only record file (created owner-only).

    Args:
        path: the file; its folder is created if missing.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.size = os.fstat(self._fd).st_size

    def append(self, kind: int, body: bytes) -> None:
        """Append one record with a single ``write`` (a kill leaves at most a torn last record)."""
        record = _HEAD.pack(len(body), kind, zlib.crc32(body)) + body
        os.write(self._fd, record)
        self.size += len(record)

    def truncate(self) -> None:
        """Forget every record."""
        os.ftruncate(self._fd, 0)
        self.size = 0

    def close(self) -> None:
        os.close(self._fd)

    @staticmethod
    def read(path: Path) -> Iterator[tuple[int, bytes]]:
        """``(kind, body)`` of every intact record, in order; stops at the first torn or corrupt one."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return
        offset = 0
        while offset + _HEAD.size <= len(data):
            size, kind, crc = _HEAD.unpack_from(data, offset)
            body = data[offset + _HEAD.size:offset + _HEAD.size + size]
            if len(body) != size or zlib.crc32(body) != crc:
                return
            yield kind, body
            offset += _HEAD.size + size


class Resumable(Protocol):
    """A stage whose per-frame state changes can be journaled and replayed without pixels."""

    def checkpoint(self, det: Detections) -> list[bytes]:
        """What handling ``det`` changed beyond what the detections themselves determine (then forgotten)."""

    def restore(self, det: Detections, parts: list[bytes]) -> None:
        """Re-apply a journaled frame: feed ``det`` (no pixels) and the changes :meth:`checkpoint` returned."""


_FRAME, _FINISH = 1, 2


class FrameJournal:
    """The journal of one camera's handled frames (see the module docstring).

    Args:
        folder: the run's journal folder.
        camera: camera name (the file is ``<folder>/<camera>.journal``).
    """

    def __init__(self, folder: Path, camera: str) -> None:
        self.camera = camera
        self.path = Path(folder) / f"{camera}.journal"
        self._log: RecordLog | None = None
        self.last: tuple[str, int] | None = None  # (ring, frame index) of the newest journaled frame

    def append(self, det: Detections, parts: list[bytes]) -> None:
        """Record a handled frame: its detections (fixed layout, :func:`_pack_detections`) and the stage's changes."""
        if self._log is None:
            self._log = RecordLog(self.path)
        self._log.append(_FRAME, pack_parts([*_pack_detections(det), *parts]))
        self.last = (det.frame.ring, det.frame.frame_index)

    def finish(self) -> None:
        """Every track was closed after the last journaled frame (a clean stop): a successor starts with no
        open track, at the next frame."""
        if self.last is None:
            return
        if self._log is None:
            self._log = RecordLog(self.path)
        self._log.append(_FINISH, json.dumps({"ring": self.last[0], "last_frame": self.last[1]}).encode())

    def replay(self, stage: Resumable) -> tuple[str, int] | None:
        """Re-apply the frames journaled since the last clean finish to ``stage``.

        Returns:
            ``(ring, next frame index)`` to resume the camera's sequence at, or
            None when nothing was journaled.

        Raises:
            MalformedMessage: a journaled record does not decode (a journal of another version).
        """
        resume: tuple[str, int] | None = None
        pending: list[tuple[Detections, list[bytes]]] = []
        for kind, body in RecordLog.read(self.path):
            if kind == _FINISH:
                doc = json.loads(body)
                resume, pending = (doc["ring"], int(doc["last_frame"]) + 1), []
                continue
            det, parts = _decode_frame(body)
            pending.append((det, parts))
            resume = (det.frame.ring, det.frame.frame_index + 1)
        for det, parts in pending:
            stage.restore(det, parts)
        if resume is not None:
            self.last = (resume[0], resume[1] - 1)
        return resume

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


_DET_FLAGS = struct.Struct("<BBd")  # motion, valid, detect_ms


def _pack_detections(det: Detections) -> list[bytes]:
    """A frame's detections as 5 parts: the FrameRef (the codec's fixed layout), flags, then the raw
    ``(n, 4) float32`` boxes, ``(n,) float32`` scores and ``(n,) int32`` class ids (several times cheaper
    than the codec's JSON header for every handled frame)."""
    (ref,) = encode(det.frame)
    return [ref, _DET_FLAGS.pack(det.motion, det.valid, det.detect_ms),
            np.ascontiguousarray(det.xyxy, np.float32).tobytes(), np.ascontiguousarray(det.confidence, np.float32).tobytes(),
            np.ascontiguousarray(det.class_id, np.int32).tobytes()]


def _decode_frame(body: bytes) -> tuple[Detections, list[bytes]]:
    try:
        parts = unpack_parts(body)
        ref = decode([parts[0]])
        if not isinstance(ref, FrameRef):
            raise ValueError(f"holds a {type(ref).__name__}, expected a FrameRef")
        motion, valid, detect_ms = _DET_FLAGS.unpack(parts[1])
        det = Detections(frame=ref, xyxy=np.frombuffer(parts[2], np.float32).reshape(-1, 4),  # type: ignore[arg-type]
                         confidence=np.frombuffer(parts[3], np.float32), class_id=np.frombuffer(parts[4], np.int32),
                         motion=bool(motion), valid=bool(valid), detect_ms=detect_ms)
    except (ValueError, struct.error, IndexError, TypeError) as err:
        raise MalformedMessage(f"journal record: {err}") from None
    return det, parts[5:]


_ITEM, _ACK = 1, 2


class Outbox:
    """Storage items a recognition process sent and storage has not acknowledged yet, on disk.

    Args:
        path: the outbox file (one per recognition process index).
        compact_bytes: rewrite the file with only the unacknowledged items once
            it grows past this size (it is emptied whenever nothing is pending).

    Attributes:
        inherited: a predecessor's items that storage never acknowledged, in
            the order they were sent (the new owner re-sends them, then calls
            :meth:`rewrite`).
    """

    def __init__(self, path: Path, compact_bytes: int = 16 * 2**20) -> None:
        self.path = Path(path)
        self.compact_bytes = compact_bytes
        self.inherited = self._load()
        self._log = RecordLog(self.path)

    def _load(self) -> list[object]:
        items: dict[tuple[str, int], object] = {}
        for kind, body in RecordLog.read(self.path):
            try:
                if kind == _ITEM:
                    item = decode(unpack_parts(body))
                    items[(item.producer, item.seq)] = item  # type: ignore[attr-defined]
                elif kind == _ACK:
                    producer, _, seqs = body.partition(b"\0")
                    for seq in np.frombuffer(seqs, np.int64).tolist():
                        items.pop((producer.decode(), seq), None)
            except (MalformedMessage, ValueError):
                break
        return list(items.values())

    def sent(self, item: object) -> None:
        """Record an item before it is sent."""
        self._log.append(_ITEM, pack_parts(encode(item)))

    def acked(self, producer: str, seqs: np.ndarray, pending: int) -> None:
        """Record an acknowledgement; ``pending`` items remain unacknowledged after it."""
        if pending == 0:
            self._log.truncate()
        else:
            self._log.append(_ACK, producer.encode() + b"\0" + np.ascontiguousarray(seqs, np.int64).tobytes())

    def rewrite(self, pending: Sequence[object]) -> None:
        """Replace the file, atomically, by one holding only ``pending`` (the inherited items are then gone)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        log = RecordLog(tmp)
        for item in pending:
            log.append(_ITEM, pack_parts(encode(item)))
        log.close()
        os.replace(tmp, self.path)
        self._log.close()
        self._log = RecordLog(self.path)
        self.inherited = []

    def compact(self, pending: Sequence[object]) -> None:
        """:meth:`rewrite` once the file has grown past ``compact_bytes``."""
        if self._log.size >= self.compact_bytes:
            self.rewrite(pending)

    def close(self) -> None:
        self._log.close()
