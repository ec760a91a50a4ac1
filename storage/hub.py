"""Fleet hub: the event messages of many boxes (MQTT) in one database, idempotently by event id.

Each box publishes its committed event changes on ``<prefix>/events`` at least once (:mod:`storage.outbox`
gives the payload; ``box_id`` is a payload key and the MQTT 5 user property ``box_id``). The hub
(``facepro hub``; its MQTT side is :mod:`pipeline.hub`) turns them into rows of its own ``events`` table:

- :func:`parse_message` checks one message (payload JSON + user properties) and gives the
  :class:`EventVersion` it carries: the event's whole state at that message's ``seq``, or raises
  :class:`MessageError` naming what is wrong;
- :class:`HubMerge` (pure) collects the messages of one batch and keeps the newest version of each event;
- :class:`HubStore` writes a batch in one transaction with a conditional upsert: a row is inserted, or
  replaced only by a newer version of the same box (:meth:`EventVersion.newer_than`: an ``end`` over what is
  not one, else a larger ``seq``; ``events.box_seq`` holds the stored one). So a repeat (an at-least-once
  re-delivery, a hub restarted before it acknowledged) and a late message (an ``end`` that arrived before its
  ``new``, a batch of another hub instance) change nothing: the row is the newest version whatever order the
  messages come in, as the box's last message describes it. An ended event never reopens.

Why whole states: every message's ``after`` is the event's full committed state, so the newest ``seq``
alone decides the row (no field-by-field merge, no need for the earlier messages).

A box's event row and the hub's row agree on every column but these: the hub's ``ended_at`` of an event
still open is its ``started_at`` (the box publishes no message for a mere new sighting; the ``end`` brings
the last one), ``snapshot_path`` is ``box:<box_id>`` when the box has a snapshot (the JPEG stays on the box;
the hub serves none), NULL otherwise, and ``job_id`` is NULL. Identities are created by name on first
sight (no gallery vectors: the hub recognises nobody itself); cameras by name, shared by boxes that use the
same camera name (``box_id`` tells their events apart).

``unknown`` (the box's anonymous identity ``unknown-<n>`` of a face nobody enrolled, :mod:`storage.unknowns`)
is stored as the box sent it, in ``events.unknown_id``: the hub's row keeps what the box's row holds. The number
is the box's own, so on a hub it names one person only together with ``box_id`` (``unknown-5`` of two boxes are
two clusterings); the hub has no clusters of its own (its ``unknown_clusters`` stays empty, so naming and
corrections happen on the box). A box's later naming of a cluster reaches the hub with no message (an ended
event is never re-sent), so the hub keeps the ``unknown-<n>`` its ``end`` carried.

Event ids are random 128-bit UUIDs, unique across boxes; a message whose event id is already stored for
another box is not applied and counted as a conflict (:attr:`WriteResult.conflicts`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import Engine, and_, not_, or_, select

from storage.db import StorageError, dialect_insert, is_transient, storage_errors
from storage.unknowns import parse_unknown
from storage.models import (BOX_ID_LEN, EVENT_ID_LEN, LABEL_LEN, METHODS, NAME_LEN, Camera, Event, Identity,
                            utcnow)

#: Largest payload accepted, bytes (a FacePro event message is under 1 KiB).
MAX_PAYLOAD = 64 * 1024
#: Rows per INSERT statement (keeps SQLite under its bound-parameter limit).
CHUNK = 500
#: Attempts of one batch on a transient error (deadlock, serialization failure, SQLite busy).
ATTEMPTS = 3

_Name = Annotated[str, Field(min_length=1, max_length=NAME_LEN)]
_Score = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
_Time = Annotated[float, Field(ge=0.0, lt=32503680000.0, allow_inf_nan=False)]  # epoch seconds before year 3000
_Frame = Annotated[int, Field(ge=0, lt=2**63)]
_Coord = Annotated[float, Field(allow_inf_nan=False)]


class MessageError(ValueError):
    """A message the hub cannot store; the text says what is wrong in one line."""


class _After(BaseModel):
    """``after`` of an event message (:mod:`storage.outbox`). Unknown keys are ignored: a newer box may add some."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(pattern=rf"^[0-9a-f]{{{EVENT_ID_LEN}}}$")
    camera: _Name
    label: str = Field(min_length=1, max_length=LABEL_LEN)
    score: _Score
    start_time: _Time
    end_time: _Time | None
    box: tuple[_Coord, _Coord, _Coord, _Coord]
    identity: _Name | None
    sub_label: tuple[_Name, float] | None = None
    method: Literal[METHODS] | None  # type: ignore[valid-type]
    has_snapshot: bool
    box_id: str = Field(pattern=rf"^[A-Za-z0-9_.-]{{1,{BOX_ID_LEN}}}$")
    seq: int = Field(ge=1, lt=2**31)
    # FacePro's own keys; absent from boxes older than the hub (0 then)
    track_id: int = Field(0, ge=-(2**63), lt=2**63)
    first_frame: _Frame = 0
    last_frame: _Frame = 0
    identity_score: float | None = Field(None, allow_inf_nan=False)
    unknown: str | None = None  # the box's anonymous identity unknown-<n>; absent from boxes without clustering

    @field_validator("unknown")
    @classmethod
    def _unknown_name(cls, value: str | None) -> str | None:
        if value is not None and not 0 < (parse_unknown(value) or 0) < 2**31:  # events.unknown_id is an INTEGER
            raise ValueError(f"expected unknown-<n> with 1 <= n < 2**31, got {value[:40]!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> _After:
        if self.last_frame < self.first_frame:
            raise ValueError(f"last_frame {self.last_frame} is before first_frame {self.first_frame}")
        if self.end_time is not None and self.end_time < self.start_time:
            raise ValueError(f"end_time {self.end_time} is before start_time {self.start_time}")
        return self


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["new", "update", "end"]
    after: _After


@dataclass(frozen=True)
class EventVersion:
    """One box's event as one message describes it: the row the hub stores for ``seq``.

    Attributes:
        event_id: 32 hex digits; box_id: the reporting box; seq: the message's number within the event (>= 1).
        camera, label, track_id: as on the box.
        started_at, ended_at: aware UTC datetimes (``ended_at`` = ``started_at`` while the event is open).
        first_frame, last_frame: frame indices (0 when the box's messages do not carry them).
        best_score: highest detector confidence, [0, 1].
        xyxy: last box ``(x1, y1, x2, y2)``, frame pixels.
        identity, method, identity_score: the identity decision (name or None, ``face``/``reid``/``gait`` or
            None, cosine similarity).
        has_snapshot: the box stored a snapshot of the event.
        ended: the message is the event's ``end``.
        unknown_id: the ``<n>`` of the box's ``unknown-<n>`` (module docstring), None when it sent none.
    """

    event_id: str
    box_id: str
    seq: int
    camera: str
    label: str
    track_id: int
    started_at: datetime
    ended_at: datetime
    first_frame: int
    last_frame: int
    best_score: float
    xyxy: tuple[float, float, float, float]
    identity: str | None
    method: str | None
    identity_score: float
    has_snapshot: bool
    ended: bool
    unknown_id: int | None = None

    def newer_than(self, other: EventVersion) -> bool:
        """This version replaces ``other`` (same event): an ``end`` replaces what is not one, else the larger
        ``seq`` wins. A box sends nothing after an event's ``end``, so this is "the larger ``seq``" for what boxes
        send; it also makes the stored row the maximum of one order, whatever order the messages come in."""
        return (self.ended, self.seq) > (other.ended, other.seq)


def _when(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, timezone.utc)


def _box_property(properties: Sequence[tuple[str, str]]) -> str | None:
    values = {v for k, v in properties if k == "box_id"}
    if len(values) > 1:
        raise MessageError(f"user properties name several boxes {sorted(values)}")
    return values.pop() if values else None


def parse_message(payload: bytes, properties: Sequence[tuple[str, str]] = ()) -> EventVersion:
    """The event version carried by one ``<prefix>/events`` message.

    Args:
        payload: the message's JSON payload (UTF-8), the shape of :mod:`storage.outbox`'s module docstring.
        properties: the MQTT 5 user properties ``(name, value)``; a ``box_id`` there must equal the payload's.

    Raises:
        MessageError: not JSON, a missing or out-of-range field (named by its key path), an ``end`` without
            ``end_time``, or a ``box_id`` property that contradicts the payload.
    """
    if len(payload) > MAX_PAYLOAD:
        raise MessageError(f"payload of {len(payload)} bytes, more than {MAX_PAYLOAD}")
    try:
        msg = _Message.model_validate_json(payload)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise MessageError(f"{where}: {first['msg']} ({err.error_count()} error(s))") from None
    a = msg.after
    prop = _box_property(properties)
    if prop is not None and prop != a.box_id:
        raise MessageError(f"user property box_id {prop!r} differs from after.box_id {a.box_id!r}")
    ended = msg.type == "end"
    if ended and a.end_time is None:
        raise MessageError("an 'end' message without after.end_time")
    score = a.identity_score if a.identity_score is not None else (a.sub_label[1] if a.sub_label else 0.0)
    started = _when(a.start_time)
    return EventVersion(
        event_id=a.id, box_id=a.box_id, seq=a.seq, camera=a.camera, label=a.label, track_id=a.track_id,
        started_at=started, ended_at=_when(a.end_time) if ended and a.end_time is not None else started,
        first_frame=a.first_frame, last_frame=a.last_frame, best_score=a.score, xyxy=a.box,
        identity=a.identity, method=a.method, identity_score=float(score), has_snapshot=a.has_snapshot, ended=ended,
        unknown_id=parse_unknown(a.unknown) if a.unknown is not None else None)


class HubMerge:
    """The messages of one batch, reduced to the newest version of each event (pure: no database).

    :meth:`add` takes each received message; :meth:`take` hands over the batch for :meth:`HubStore.write`.
    Reducing first keeps one row per event in a statement (PostgreSQL refuses to upsert a row twice in one
    ``INSERT``) and writes only what the newest message says.

    Attributes:
        received, rejected: messages given to :meth:`add` so far, and those :func:`parse_message` refused.
        superseded: messages dropped because a newer version of their event was in the same batch.
        conflicts: ``(event id, box kept, box dropped)`` of messages dropped because another box's message
            with that event id came first in the batch (the first box keeps the id, as in the database).
    """

    def __init__(self) -> None:
        self._newest: dict[str, EventVersion] = {}
        self.received = self.rejected = self.superseded = 0
        self.conflicts: list[tuple[str, str, str]] = []

    def __len__(self) -> int:
        return len(self._newest)

    def add(self, payload: bytes, properties: Sequence[tuple[str, str]] = ()) -> EventVersion:
        """Parse one message and keep it when it is the newest of its event in this batch.

        Returns:
            The message's version (kept or not).

        Raises:
            MessageError: as :func:`parse_message` (counted in :attr:`rejected`; the batch is unchanged).
        """
        self.received += 1
        try:
            version = parse_message(payload, properties)
        except MessageError:
            self.rejected += 1
            raise
        held = self._newest.get(version.event_id)
        if held is not None and held.box_id != version.box_id:
            self.conflicts.append((version.event_id, held.box_id, version.box_id))
        elif held is None or version.newer_than(held):
            self._newest[version.event_id] = version
            self.superseded += held is not None
        else:
            self.superseded += 1
        return version

    def take(self) -> list[EventVersion]:
        """The batch's versions in event-id order (the lock order of every writer: no deadlock between two
        hubs writing the same events), and an empty batch to go on with (the counts go on adding up)."""
        out = [self._newest[k] for k in sorted(self._newest)]
        self._newest = {}
        return out


@dataclass(frozen=True)
class WriteResult:
    """What one :meth:`HubStore.write` did.

    Attributes:
        applied: versions written (a new row, or a stored row replaced by a larger ``seq``).
        stale: versions not written because the stored row is as new or newer (repeats, late messages).
        conflicts: ``(event id, stored box, message's box)`` of versions not written because another box (or
            the database's own pipeline, box None) owns that event id.
    """

    applied: int
    stale: int
    conflicts: tuple[tuple[str, str | None, str], ...] = field(default=())


class HubStore:
    """Writes batches of :class:`EventVersion` to the hub's database (module docstring).

    Args:
        engine: from :func:`storage.db.open_engine`, at head revision (SQLite or PostgreSQL).

    Several hub processes may write to one PostgreSQL database at once: each row is decided by the
    conditional upsert under the row's lock, so the larger ``seq`` wins whichever commits last.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def write(self, versions: Sequence[EventVersion]) -> WriteResult:
        """Store ``versions`` (at most one per event, e.g. from :meth:`HubMerge.take`) in one transaction;
        retried up to :data:`ATTEMPTS` times on a transient error.

        Raises:
            ValueError: two versions of one event.
            StorageError: the database failed (nothing of the batch is stored; write it again).
        """
        if len({v.event_id for v in versions}) != len(versions):
            raise ValueError("write: several versions of one event in a batch; reduce it with HubMerge first")
        if not versions:
            return WriteResult(0, 0)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return self._write(versions)
            except StorageError as err:
                if attempt == ATTEMPTS or not is_transient(err.__cause__ or err):
                    raise
                time.sleep(0.05 * attempt)
        raise AssertionError("unreachable")

    def _write(self, versions: Sequence[EventVersion]) -> WriteResult:
        with storage_errors(self.engine.url, f"storing {len(versions)} hub event(s)"), \
                self.engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
            insert = dialect_insert(conn)
            now = utcnow()
            cameras = self._ids(conn, insert, Camera, {v.camera for v in versions}, now)
            identities = self._ids(conn, insert, Identity, {v.identity for v in versions if v.identity}, now)
            rows = [_row(v, cameras, identities) for v in versions]
            applied = set(conn.execute(_upsert(insert), rows).scalars())  # one cached statement, batched VALUES
            rest = {v.event_id: v.box_id for v in versions if v.event_id not in applied}
            conflicts = _conflicts(conn, rest)
        return WriteResult(len(applied), len(rest) - len(conflicts), conflicts)

    @staticmethod
    def _ids(conn: Any, insert: Any, table: Any, names: set[str], now: datetime) -> dict[str, int]:
        """Name → id of ``cameras`` or ``identities`` rows, created on demand (sorted: a fixed lock order)."""
        if not names:
            return {}
        ordered = sorted(names)
        conn.execute(insert(table).on_conflict_do_nothing(index_elements=["name"]),
                     [{"name": n, "created_at": now} for n in ordered])
        ids: dict[str, int] = {}
        for i in range(0, len(ordered), CHUNK):
            part = ordered[i:i + CHUNK]
            ids.update({n: i for n, i in conn.execute(select(table.name, table.id).where(table.name.in_(part)))})
        return ids


def _row(v: EventVersion, cameras: dict[str, int], identities: dict[str, int]) -> dict[str, Any]:
    x1, y1, x2, y2 = v.xyxy
    return {"id": v.event_id, "camera_id": cameras[v.camera], "track_id": v.track_id, "label": v.label,
            "started_at": v.started_at, "ended_at": v.ended_at, "first_frame": v.first_frame,
            "last_frame": v.last_frame, "best_score": v.best_score, "x1": x1, "y1": y1, "x2": x2, "y2": y2,
            "identity_id": identities.get(v.identity) if v.identity else None, "method": v.method,
            "identity_score": v.identity_score, "snapshot_path": f"box:{v.box_id}" if v.has_snapshot else None,
            "ended": v.ended, "job_id": None, "box_id": v.box_id, "box_seq": v.seq, "unknown_id": v.unknown_id}


#: Columns a newer version replaces (everything but the id).
_REPLACED = ("camera_id", "track_id", "label", "started_at", "ended_at", "first_frame", "last_frame", "best_score",
             "x1", "y1", "x2", "y2", "identity_id", "method", "identity_score", "snapshot_path", "ended", "box_seq",
             "unknown_id")


def _upsert(insert: Any) -> Any:
    """INSERT a row; on an existing id replace the row only with a newer version of the same box
    (:meth:`EventVersion.newer_than`, in SQL); RETURNING the id when written. Executed with many rows,
    SQLAlchemy sends them in multi-row VALUES pages ("insertmanyvalues") and gathers the returned ids."""
    stmt = insert(Event)
    new = stmt.excluded
    newer = or_(and_(new.ended, not_(Event.ended)), and_(Event.ended == new.ended, Event.box_seq < new.box_seq))
    return stmt.on_conflict_do_update(
        index_elements=[Event.id],
        set_={c: getattr(new, c) for c in _REPLACED},
        where=and_(Event.box_id == new.box_id, newer),
    ).returning(Event.id)


def _conflicts(conn: Any, rest: dict[str, str]) -> tuple[tuple[str, str | None, str], ...]:
    """The versions of ``rest`` (event id → box) whose stored row belongs to another box (or to no box)."""
    out: list[tuple[str, str | None, str]] = []
    ids = sorted(rest)
    for i in range(0, len(ids), CHUNK):
        stmt = select(Event.id, Event.box_id).where(Event.id.in_(ids[i:i + CHUNK]))
        out.extend((e, b, rest[e]) for e, b in conn.execute(stmt) if b != rest[e])
    return tuple(out)


def describe_version(v: EventVersion) -> str:
    """``box/camera event <id> seq <n>`` for log lines."""
    return f"{v.box_id}/{v.camera} event {v.event_id} seq {v.seq}"


def payload_box(payload: bytes) -> str:
    """The ``after.box_id`` of a payload if it can be read, else ``?`` (for the log line of a refused message)."""
    try:
        return str(json.loads(payload)["after"]["box_id"])[:BOX_ID_LEN]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "?"
