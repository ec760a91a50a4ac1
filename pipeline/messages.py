"""Message types that cross process boundaries over ZeroMQ.

One frozen dataclass per message type. Array fields hold one row per item
(``xyxy: (n, 4) float32`` pixels, ``confidence: (n,) float32``...) and are
validated in ``__post_init__``; scalar fields carry their unit in the name
(``captured_at_ns``, ``latency_ms``). Pixels never travel in a message: a
:class:`FrameRef` names the ring segment, slot and sequence number of a frame
held in shared memory (see :mod:`pipeline.ring`).

Every type here is encoded by :mod:`pipeline.codec` (header + raw array
buffers, never pickle). Field types are restricted to ``int``, ``float``,
``str``, ``bool``, ``None``-able scalars, ``numpy.ndarray``, nested message
dataclasses and tuples of them, so the codec can carry them generically.

Raises:
    ValueError: from ``__post_init__`` when a field has the wrong shape,
        dtype or range; the message names the field.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import uuid6

import numpy as np

#: Drop reasons counted by every stage (``StageStats.drop_counts`` follows this order).
DROP_REASONS: tuple[str, ...] = (
    "overwritten",  # the ring slot was rewritten before the reader finished copying
    "motion_skipped",  # no motion: the detector did not run for this frame
    "queue_full",  # a downstream queue was full and the message was not sent
    "malformed",  # a message that failed to decode
    "lost",  # a frame that never arrived (e.g. its worker was killed)
    "behind",  # recognition skipped the frame because it was too far behind
    "duplicate",  # a replayed frame that had already taken effect (file mode): skipped, not lost
)

#: Labels for :attr:`TrackUpdate.method`.
ID_METHODS: tuple[str, ...] = ("face", "reid", "gait")


def check_array(name: str, value: np.ndarray, dtype: type, ndim: int, width: int | None = None) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an ndarray of ``dtype`` with ``ndim`` dimensions
    (and last dimension ``width`` when given)."""
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name}: expected numpy.ndarray, got {type(value).__name__}")
    if value.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype)}, got {value.dtype}")
    if value.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {value.shape}")
    if width is not None and value.shape[-1] != width:
        raise ValueError(f"{name}: expected last dimension {width}, got shape {value.shape}")


def check_rows(owner: str, rows: int, **arrays: np.ndarray) -> None:
    """Raise ValueError naming ``owner.<array>`` unless every array has ``rows`` rows."""
    for name, arr in arrays.items():
        if arr.shape[0] != rows:
            raise ValueError(f"{owner}.{name}: expected {rows} rows, got {arr.shape[0]}")


@dataclass(frozen=True)
class FrameRef:
    """A frame published in a camera's shared-memory ring.

    Attributes:
        camera: camera name from the config.
        ring: shared-memory segment name of the ring (changes when the
            camera's resolution changes, so a stale ring is never read).
        slot: slot index in the ring, ``0 <= slot``.
        seq: sequence number the writer published in that slot (>= 1).
        frame_index: 0-based index of the frame in its source.
        captured_at_ns: ``time.time_ns()`` when the frame was read.
        height, width: frame size in pixels (the frame is ``(height, width, 3)`` uint8 BGR).
        replay: True when capture sends the frame again because the process
            that held it died (file mode; see :mod:`pipeline.ring`).
    """

    camera: str
    ring: str
    slot: int
    seq: int
    frame_index: int
    captured_at_ns: int
    height: int
    width: int
    replay: bool = False

    def __post_init__(self) -> None:
        if self.slot < 0 or self.seq < 1 or self.frame_index < 0:
            raise ValueError(f"FrameRef: slot={self.slot}, seq={self.seq}, frame_index={self.frame_index} out of range")
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"FrameRef: frame size {self.width}x{self.height} must be positive")


@dataclass(frozen=True)
class Detections:
    """Objects found in one frame by the motion/detection stage.

    Attributes:
        frame: the frame the detections belong to; ownership of its ring slot
            passes with this message to the recognition stage, which releases it.
        xyxy: ``(n, 4) float32`` boxes, pixels of the frame, ``x1, y1, x2, y2``.
        confidence: ``(n,) float32`` detector scores in [0, 1].
        class_id: ``(n,) int32`` COCO class ids.
        motion: False when the motion gate skipped the detector for this frame
            (``n`` is then 0).
        detect_ms: wall time of motion gate + detector for this frame, milliseconds.
        valid: False when the frame was overwritten in the ring before the
            detector could copy it (counted as ``overwritten``; ``n`` is 0).
        held: True when the detector skipped this moving frame because the
            camera's scene was stable (``detection.stable_skip``; ``n`` is 0):
            the tracker holds its tracks over it instead of ageing them.
    """

    frame: FrameRef
    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray
    motion: bool = True
    detect_ms: float = 0.0
    valid: bool = True
    held: bool = False

    def __post_init__(self) -> None:
        check_array("Detections.xyxy", self.xyxy, np.float32, 2, 4)
        check_array("Detections.confidence", self.confidence, np.float32, 1)
        check_array("Detections.class_id", self.class_id, np.int32, 1)
        check_rows("Detections", self.xyxy.shape[0], confidence=self.confidence, class_id=self.class_id)

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])


def new_event_id() -> str:
    """A new event id: a UUIDv7 (RFC 9562, from the ``uuid6`` package) as 32 lowercase hex characters.

    The first 48 bits are the Unix time in milliseconds, so ids made later sort
    later (monotonic within a process): the database's primary-key and
    ``(event_id, ...)`` indexes grow at their right edge instead of at random
    pages, which keeps each commit to a few dirty index pages (with random
    UUID4 keys every batch rewrote most of the index: ~1.5-2x slower writes,
    scripts/bench_storage.py). The remaining 74 bits are random, so ids from
    several processes or boxes do not collide.
    """
    return uuid6.uuid7().hex


def event_id_for(run_id: str, camera: str, track_id: int, first_frame: int, first_seen_ns: int) -> str:
    """The event id of a track, derived from where it started: a UUIDv7 layout (RFC 9562) as 32 hex characters.

    The 48-bit time field is ``first_seen_ns`` in milliseconds (so ids stay
    time-ordered, see :func:`new_event_id`); the 74 other bits come from
    SHA-256 of ``run_id``, ``camera``, ``track_id`` and ``first_frame``. A
    recognition process that rebuilds a camera's tracks from its journal
    (:mod:`pipeline.journal`) therefore gives a resumed track the very id its
    killed predecessor gave it, and storage keeps one event.
    """
    ms = (int(first_seen_ns) // 1_000_000) & ((1 << 48) - 1)
    digest = hashlib.sha256(f"{run_id}\0{camera}\0{int(track_id)}\0{int(first_frame)}".encode()).digest()
    rand = int.from_bytes(digest[:10], "big")
    rand_a, rand_b = (rand >> 62) & 0xFFF, rand & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return f"{value:032x}"


@dataclass(frozen=True)
class TrackUpdate:
    """The current state of one tracked object's event, sent to storage.

    Storage upserts by ``event_id`` (from :func:`new_event_id`), so re-sending
    an update is idempotent.

    Attributes:
        event_id: 32-character hex UUID of the event.
        camera: camera name.
        track_id: tracker id, unique per camera and run.
        label: class name (``"person"``...).
        first_seen_ns, last_seen_ns: capture time of first/last frame, ``time.time_ns()`` units.
        first_frame, last_frame: frame indices of first/last sighting.
        best_score: highest detector confidence seen, [0, 1].
        xyxy: ``(4,) float32`` last box, frame pixels.
        identity: enrolled identity name, or None when unknown.
        method: how the identity was decided (``"face"``, ``"reid"``, ``"gait"``) or None.
        identity_score: cosine similarity behind the identity decision (0 when unknown).
        snapshot_path: path of a JPEG snapshot on disk, or None.
        ended: True when the tracker dropped the track (final update).
    """

    event_id: str
    camera: str
    track_id: int
    label: str
    first_seen_ns: int
    last_seen_ns: int
    first_frame: int
    last_frame: int
    best_score: float
    xyxy: np.ndarray
    identity: str | None = None
    method: str | None = None
    identity_score: float = 0.0
    snapshot_path: str | None = None
    ended: bool = False

    def __post_init__(self) -> None:
        if len(self.event_id) != 32:
            raise ValueError(f"TrackUpdate.event_id: expected 32 hex characters, got {self.event_id!r}")
        check_array("TrackUpdate.xyxy", self.xyxy, np.float32, 1, 4)
        if self.method is not None and self.method not in ID_METHODS:
            raise ValueError(f"TrackUpdate.method: expected one of {ID_METHODS} or None, got {self.method!r}")
        if self.last_frame < self.first_frame:
            raise ValueError(f"TrackUpdate: last_frame {self.last_frame} < first_frame {self.first_frame}")


@dataclass(frozen=True)
class EmbeddingRecord:
    """An embedding computed for an event's track (face, Re-ID or gait).

    Attributes:
        event_id: event the embedding belongs to (32-hex UUID).
        kind: ``"face"``, ``"reid"`` or ``"gait"``.
        model: model name (file stem), e.g. ``"mobilefacenet_128d"``.
        vector: ``(d,) float32`` L2-normalised embedding.
        frame_index: frame it was computed on (-1 for a track-level aggregate).
        quality: quality score in [0, 1] (detector score for faces).
    """

    event_id: str
    kind: str
    model: str
    vector: np.ndarray
    frame_index: int = -1
    quality: float = 0.0

    def __post_init__(self) -> None:
        check_array("EmbeddingRecord.vector", self.vector, np.float32, 1)
        if self.kind not in ID_METHODS:
            raise ValueError(f"EmbeddingRecord.kind: expected one of {ID_METHODS}, got {self.kind!r}")


@dataclass(frozen=True)
class StorageItem:
    """Envelope of one message to storage, numbered per producer for acknowledged delivery.

    Attributes:
        producer: sending process's delivery id (unique per process life).
        seq: 1, 2, 3... per producer, in send order.
        update, embedding: exactly one of them is set.
    """

    producer: str
    seq: int
    update: TrackUpdate | None = None
    embedding: EmbeddingRecord | None = None

    def __post_init__(self) -> None:
        if self.seq < 1:
            raise ValueError(f"StorageItem.seq: must be >= 1, got {self.seq}")
        if (self.update is None) == (self.embedding is None):
            raise ValueError("StorageItem: exactly one of update and embedding must be set")

    @property
    def payload(self) -> TrackUpdate | EmbeddingRecord:
        return self.update if self.update is not None else self.embedding  # type: ignore[return-value]


@dataclass(frozen=True)
class StorageAck:
    """Storage → producers, after a commit: these items of ``producer`` are in the database.

    Attributes:
        producer: the producer's delivery id.
        seqs: ``(n,) int64`` sequence numbers committed (exact, not cumulative: after a
            storage restart, re-sent old items and new items interleave).
    """

    producer: str
    seqs: np.ndarray

    def __post_init__(self) -> None:
        check_array("StorageAck.seqs", self.seqs, np.int64, 1)


@dataclass(frozen=True)
class LiveTracks:
    """Recognition → api, once per frame of a camera: its confirmed tracks for the live view (lossy, PUB/SUB).

    Attributes:
        camera: camera name.
        frame_index, captured_at_ns: the frame's index in its source and capture time (``time.time_ns()`` units).
        ring, slot, seq: where the frame lies (as in :class:`FrameRef`); the api reads it from there as a
            checked reader while the slot still holds ``seq``.
        track_ids: ``(n,) int64`` per-camera track ids.
        xyxy: ``(n, 4) float32`` boxes ``x1, y1, x2, y2``, frame pixels.
        labels: ``n`` class names.
        names: ``n`` identity names, None for an unknown track.
    """

    camera: str
    frame_index: int
    captured_at_ns: int
    ring: str
    slot: int
    seq: int
    track_ids: np.ndarray
    xyxy: np.ndarray
    labels: tuple[str, ...] = ()
    names: tuple[str | None, ...] = ()

    def __post_init__(self) -> None:
        check_array("LiveTracks.track_ids", self.track_ids, np.int64, 1)
        check_array("LiveTracks.xyxy", self.xyxy, np.float32, 2, 4)
        n = self.track_ids.shape[0]
        check_rows("LiveTracks", n, xyxy=self.xyxy)
        if len(self.labels) != n or len(self.names) != n:
            raise ValueError(f"LiveTracks: {n} tracks but {len(self.labels)} labels and {len(self.names)} names")

    def __len__(self) -> int:
        return int(self.track_ids.shape[0])


@dataclass(frozen=True)
class StageStats:
    """Heartbeat and counters one process sends to the supervisor (cumulative since start).

    Attributes:
        stage: stage name (``capture``, ``detection``, ``recognition``, ``storage``).
        index: process index within the stage.
        pid: OS process id.
        sent_at_ns: ``time.time_ns()`` when sent.
        frames_in: messages/frames received.
        frames_out: messages/frames fully processed.
        sent: messages sent downstream (the next stage's queue depth is
            upstream ``sent`` − its ``frames_in``).
        drop_counts: ``(len(DROP_REASONS),) int64`` drops per reason, in ``DROP_REASONS`` order.
        latency_p50_ms, latency_p99_ms: processing time per item over the last window, milliseconds.
        backlog: items held inside the process waiting to be processed (reorder buffer, pending batch).
        oldest_wait_ms: age of the oldest item waiting in ``backlog``, milliseconds.
        max_rss_mb: peak resident memory of the process so far, MiB (``getrusage``).
        last_error: last error message, empty when none.
        count_names, counts: stage-specific cumulative counters (e.g. ``face_rejected_blurry``),
            ``counts`` is ``(len(count_names),) int64``.
    """

    stage: str
    index: int
    pid: int
    sent_at_ns: int
    frames_in: int
    frames_out: int
    drop_counts: np.ndarray
    sent: int = 0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    backlog: int = 0
    oldest_wait_ms: float = 0.0
    max_rss_mb: float = 0.0
    last_error: str = ""
    count_names: tuple[str, ...] = ()
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        check_array("StageStats.drop_counts", self.drop_counts, np.int64, 1, len(DROP_REASONS))
        check_array("StageStats.counts", self.counts, np.int64, 1)
        if len(self.count_names) != len(self.counts):
            raise ValueError(f"StageStats: {len(self.count_names)} count_names for {len(self.counts)} counts")

    @property
    def dropped(self) -> int:
        return int(self.drop_counts.sum())


@dataclass(frozen=True)
class StatusRequest:
    """Ask the supervisor for the pipeline status (REQ → REP)."""

    detail: bool = True


@dataclass(frozen=True)
class StageStatus:
    """Aggregated status of one stage, as printed by ``facepro status``.

    Attributes:
        stage: stage name.
        processes: number of live processes.
        pids: ``(processes,) int64`` process ids.
        rate_fps: frames (items) passed on per second over the last window.
        queue_depth: frames waiting for this stage (sent by upstream − received
            here, plus items held inside its processes).
        oldest_wait_ms: age of the oldest frame waiting inside the stage, ms.
        drop_counts: ``(len(DROP_REASONS),) int64`` drops per reason.
        latency_p50_ms, latency_p99_ms: worst process's processing latency, ms.
        cpu_percent: CPU use summed over the stage's processes (100 = one core).
        rss_mb: resident memory summed over the stage's processes, MiB.
        restarts: process restarts since the run began.
        state: ``running``, ``starting``, ``done`` or ``failed``.
        last_error: last error reported by a process of this stage.
        count_names, counts: stage-specific counters summed over its processes.
    """

    stage: str
    processes: int
    pids: np.ndarray
    rate_fps: float
    queue_depth: int
    oldest_wait_ms: float
    drop_counts: np.ndarray
    latency_p50_ms: float
    latency_p99_ms: float
    cpu_percent: float
    rss_mb: float
    restarts: int
    state: str
    last_error: str = ""
    count_names: tuple[str, ...] = ()
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        check_array("StageStatus.pids", self.pids, np.int64, 1)
        check_array("StageStatus.counts", self.counts, np.int64, 1)
        check_array("StageStatus.drop_counts", self.drop_counts, np.int64, 1, len(DROP_REASONS))

    @property
    def dropped(self) -> int:
        return int(self.drop_counts.sum())


@dataclass(frozen=True)
class StatusReply:
    """The supervisor's answer to :class:`StatusRequest`.

    Attributes:
        run_id: id of the running pipeline.
        uptime_s: seconds since the supervisor started.
        stages: one entry per stage, in pipeline order.
    """

    run_id: str
    uptime_s: float
    stages: tuple[StageStatus, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ScaleRequest:
    """Ask the supervisor to run ``processes`` processes of ``stage``."""

    stage: str
    processes: int

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ValueError(f"ScaleRequest.processes: must be >= 1, got {self.processes}")


@dataclass(frozen=True)
class Credit:
    """Flow control, detection → capture: ``frames`` > 0 grants that many more frames; < 0 revokes unused ones.

    A revoke is answered by :class:`CreditAck` on the same connection, after
    every frame already sent against this worker's credits (ZeroMQ keeps one
    connection's messages in order), so a worker that is scaled down can finish
    exactly the frames it was given.
    """

    frames: int

    def __post_init__(self) -> None:
        if self.frames == 0:
            raise ValueError("Credit.frames: must not be 0")


@dataclass(frozen=True)
class CreditAck:
    """Capture → detection: ``revoked`` unused credits were withdrawn; no more frames follow."""

    revoked: int


@dataclass(frozen=True)
class Ack:
    """Generic reply: ``ok`` and a human-readable ``message``."""

    ok: bool
    message: str = ""
