"""The MQTT outbox: event changes written with the transaction that commits them, read by the publisher.

Writing (the storage process, inside :meth:`storage.writer.EventWriter.flush`'s
transaction): :func:`event_states` reads the batch's events before and after
the upsert, :func:`record_changes` turns the difference into ``mqtt_outbox``
rows, so a row exists exactly when its change is committed (an outbox row
never describes a state the database does not hold, and a committed change
always has its row). One event yields:

- ``new``: the first commit of the event (``after.end_time`` is null);
- ``update``: a later commit that changed what a subscriber acts on: the
  identity (``sub_label``), the method, ``has_snapshot`` or the label;
- ``end``: the commit that ended it (an ended event never reopens, so nothing follows).

An event first committed already ended gets ``new`` and ``end`` in the same
transaction. Re-sent or older updates (at-least-once delivery to storage)
change nothing and write nothing.

Payload (JSON text, published verbatim on ``<prefix>/events``), in the shape
of Frigate's ``frigate/events`` messages (https://docs.frigate.video/integrations/mqtt,
``frigate/events``) where they overlap::

    {"type": "new" | "update" | "end",
     "before": EVENT, "after": EVENT}
    EVENT = {"id": 32 hex, "camera": str, "label": str, "score": float [0, 1],
             "top_score": float, "start_time": epoch seconds (float), "end_time": epoch seconds or null,
             "box": [x1, y1, x2, y2] frame pixels, "identity": str or null,
             "sub_label": [identity, similarity] or null, "method": "face" | "reid" | "gait" or null,
             "has_snapshot": bool, "unknown": "unknown-<n>" or null, "box_id": str, "seq": int >= 1,
             "track_id": int, "first_frame": int, "last_frame": int, "identity_score": float}

``unknown`` is the anonymous identity of a face nobody enrolled (:mod:`storage.unknowns`); it is set when the
track ends, so it arrives with the ``end`` message. ``identity`` stays null for it: an identity is always
an enrolled name (Home Assistant's per-identity sensors follow ``identity`` only).

``before`` is the event's committed state just before the change (``new``:
the same as ``after``; its ``seq`` is the previous message's, 0 if none);
``after`` the state the change committed. ``seq`` numbers the messages of
one event from 1, so ``(after.id, after.seq)`` identifies a message:
subscribers drop repeats by it. The last four keys (FacePro's own, beyond
Frigate's shape) let the fleet hub (:mod:`storage.hub`) store the same row as
the box; ``identity_score`` is the cosine similarity behind the identity
decision, also when no identity was given.

Reading (the ``mqtt`` process): :class:`OutboxStore` lists unsent rows in
``id`` order and sets ``sent_at`` once the broker acknowledged a row. That
``UPDATE`` of its own rows' ``sent_at`` is the only database write outside
the storage process while a pipeline runs; it waits at most
``busy_timeout_ms`` for the lock and is retried by the caller otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Iterator, Sequence

from sqlalchemy import Connection, Engine, func, insert, select, update

from storage.db import storage_errors
from storage.models import Camera, Event, Identity, MqttOutbox, utcnow

_IN_CHUNK = 500


@dataclass(frozen=True)
class EventState:
    """One committed ``events`` row, with its camera and identity names (times: aware UTC)."""

    id: str
    camera: str
    label: str
    score: float
    started_at: datetime
    ended_at: datetime
    ended: bool
    box: tuple[float, float, float, float]
    identity: str | None
    identity_score: float
    method: str | None
    has_snapshot: bool
    track_id: int = 0
    first_frame: int = 0
    last_frame: int = 0
    unknown: str | None = None  # the anonymous cluster, unknown-<n>

    def key(self) -> tuple[Any, ...]:
        """What a subscriber acts on: an ``update`` is written when this changes."""
        return (self.label, self.identity, self.method, self.has_snapshot, self.unknown)


def _chunks(values: Iterable[str], size: int = _IN_CHUNK) -> Iterator[list[str]]:
    ordered = sorted(set(values))
    for i in range(0, len(ordered), size):
        yield ordered[i : i + size]


def event_states(conn: Connection, ids: Iterable[str]) -> dict[str, EventState]:
    """The stored state of the events ``ids`` (those without a row are absent), read in ``conn``'s transaction."""
    stmt = (
        select(Event.id, Camera.name, Event.label, Event.best_score, Event.started_at, Event.ended_at, Event.ended,
               Event.x1, Event.y1, Event.x2, Event.y2, Identity.name, Event.identity_score, Event.method,
               Event.snapshot_path, Event.track_id, Event.first_frame, Event.last_frame, Event.unknown_id)
        .join(Camera, Camera.id == Event.camera_id)
        .outerjoin(Identity, Identity.id == Event.identity_id)
    )
    out: dict[str, EventState] = {}
    for part in _chunks(ids):
        for r in conn.execute(stmt.where(Event.id.in_(part))):
            out[r[0]] = EventState(r[0], r[1], r[2], float(r[3]), r[4], r[5], bool(r[6]),
                                   (float(r[7]), float(r[8]), float(r[9]), float(r[10])), r[11], float(r[12]), r[13],
                                   r[14] is not None, int(r[15]), int(r[16]), int(r[17]),
                                   f"unknown-{r[18]}" if r[18] is not None else None)
    return out


def event_json(state: EventState, box_id: str, seq: int, ended: bool | None = None) -> dict[str, Any]:
    """``state`` as the ``before``/``after`` object of an event message (module docstring).

    ``ended`` overrides ``state.ended`` (a ``new`` message of an event committed already ended shows it open).
    """
    open_ = not (state.ended if ended is None else ended)
    return {
        "id": state.id, "camera": state.camera, "label": state.label, "score": round(state.score, 6),
        "top_score": round(state.score, 6), "start_time": round(state.started_at.timestamp(), 6),
        "end_time": None if open_ else round(state.ended_at.timestamp(), 6),
        "box": [round(v, 2) for v in state.box], "identity": state.identity,
        "sub_label": [state.identity, round(state.identity_score, 6)] if state.identity is not None else None,
        "method": state.method, "has_snapshot": state.has_snapshot, "unknown": state.unknown, "box_id": box_id,
        "seq": seq, "track_id": state.track_id, "first_frame": state.first_frame, "last_frame": state.last_frame,
        "identity_score": round(state.identity_score, 6),
    }


@dataclass(frozen=True)
class Change:
    """One outbox row to write: ``kind`` is ``new``, ``update`` or ``end``."""

    event_id: str
    seq: int
    kind: str
    payload: str


def _message(kind: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    return json.dumps({"type": kind, "before": before, "after": after}, separators=(",", ":"))


def changes(before: dict[str, EventState], after: dict[str, EventState], last_seq: dict[str, int],
            box_id: str) -> list[Change]:
    """The outbox rows for one committed batch (rules in the module docstring), in event-id order.

    Args:
        before: states before the batch's upsert; after: states after it (same transaction).
        last_seq: event id → the largest ``seq`` already in the outbox.
        box_id: the config's ``box_id``, carried in every payload.
    """
    out: list[Change] = []
    for event_id in sorted(after):
        new, old, seq = after[event_id], before.get(event_id), last_seq.get(event_id, 0)
        if old is None:
            shown = event_json(new, box_id, seq + 1, ended=False)
            out.append(Change(event_id, seq + 1, "new", _message("new", shown, shown)))
            if new.ended:
                out.append(Change(event_id, seq + 2, "end", _message("end", shown, event_json(new, box_id, seq + 2))))
            continue
        if old.ended:
            continue  # an ended event never reopens: a re-sent update changed nothing
        kind = "end" if new.ended else ("update" if new.key() != old.key() else None)
        if kind is not None:
            prev = event_json(old, box_id, seq)  # seq 0: no earlier message (mqtt configured mid-event)
            out.append(Change(event_id, seq + 1, kind, _message(kind, prev, event_json(new, box_id, seq + 1))))
    return out


def last_seqs(conn: Connection, ids: Iterable[str]) -> dict[str, int]:
    """Event id → largest ``seq`` in the outbox, for the events of ``ids`` that have rows."""
    out: dict[str, int] = {}
    for part in _chunks(ids):
        stmt = select(MqttOutbox.event_id, func.max(MqttOutbox.seq)).where(MqttOutbox.event_id.in_(part))
        out.update({e: int(s) for e, s in conn.execute(stmt.group_by(MqttOutbox.event_id))})
    return out


def record_changes(conn: Connection, ids: Iterable[str], before: dict[str, EventState], box_id: str) -> int:
    """Write the outbox rows of a batch whose events ``ids`` were just upserted in ``conn``'s transaction.

    Args:
        before: :func:`event_states` of ``ids``, read in the same transaction before the upsert.

    Returns:
        Rows written.
    """
    ids = set(ids)
    rows = changes(before, event_states(conn, ids), last_seqs(conn, ids), box_id)
    if rows:
        now = utcnow()
        conn.execute(insert(MqttOutbox), [{"event_id": c.event_id, "seq": c.seq, "type": c.kind,
                                           "payload": c.payload, "created_at": now} for c in rows])
    return len(rows)


# ------------------------------------------------------------------ reading (the mqtt process)


@dataclass(frozen=True)
class OutboxRow:
    """An unsent outbox row: ``payload`` is the JSON text to publish."""

    id: int
    event_id: str
    seq: int
    kind: str
    payload: str


class OutboxStore:
    """The publisher's view of the outbox and the gallery (injected into :class:`pipeline.mqtt.MqttPublisher`).

    Args:
        engine: from :func:`storage.db.open_engine` (a short ``busy_timeout_ms``: a locked database makes
            :meth:`mark_sent` raise instead of waiting; the publisher retries it).
        since: only rows created at or after this aware UTC time count for :meth:`open_events`
            (the run's start: events a killed earlier run left open are not "in view").

    Raises (every method):
        StorageError: locked or unreachable database.
    """

    def __init__(self, engine: Engine, since: datetime | None = None) -> None:
        self.engine = engine
        self.since = since

    def unsent(self, after_id: int, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` unsent rows with ``id > after_id``, in ``id`` order."""
        stmt = (select(MqttOutbox.id, MqttOutbox.event_id, MqttOutbox.seq, MqttOutbox.type, MqttOutbox.payload)
                .where(MqttOutbox.sent_at.is_(None), MqttOutbox.id > after_id).order_by(MqttOutbox.id).limit(limit))
        with storage_errors(self.engine.url, "reading the MQTT outbox"), self.engine.connect() as conn:
            return [OutboxRow(int(i), e, int(s), k, p) for i, e, s, k, p in conn.execute(stmt)]

    def mark_sent(self, ids: Sequence[int]) -> None:
        """Set ``sent_at`` of the rows ``ids`` (already sent rows keep their time)."""
        if not ids:
            return
        now = utcnow()
        with storage_errors(self.engine.url, "marking MQTT outbox rows sent"), self.engine.begin() as conn:
            for i in range(0, len(ids), _IN_CHUNK):
                part = list(ids[i : i + _IN_CHUNK])
                conn.execute(update(MqttOutbox).where(MqttOutbox.id.in_(part), MqttOutbox.sent_at.is_(None))
                             .values(sent_at=now))

    def pending(self) -> int:
        """Unsent rows."""
        stmt = select(func.count()).select_from(MqttOutbox).where(MqttOutbox.sent_at.is_(None))
        with storage_errors(self.engine.url, "counting the MQTT outbox"), self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def open_events(self) -> list[str]:
        """Payloads of the last *sent* row of each event whose last sent row is not ``end`` (created since
        :attr:`since`): what subscribers were last told is in view."""
        last = select(func.max(MqttOutbox.id)).where(MqttOutbox.sent_at.is_not(None))
        if self.since is not None:
            last = last.where(MqttOutbox.created_at >= self.since)
        last = last.group_by(MqttOutbox.event_id)
        stmt = select(MqttOutbox.payload).where(MqttOutbox.id.in_(last), MqttOutbox.type != "end")
        with storage_errors(self.engine.url, "reading open events from the MQTT outbox"), self.engine.connect() as conn:
            return list(conn.execute(stmt).scalars())

    def identities(self) -> list[str]:
        """Names of the enrolled identities, sorted."""
        with storage_errors(self.engine.url, "listing identities"), self.engine.connect() as conn:
            return list(conn.execute(select(Identity.name).order_by(Identity.name)).scalars())
