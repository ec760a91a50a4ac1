"""Frigate companion mode, the pure part: which ``frigate/events`` messages to analyse, which name goes back to
Frigate, what is published, and the bounded retry queue. No sockets, threads or files here; the ``frigate``
process (:mod:`pipeline.companion`) wires it to the broker, Frigate's HTTP API and the gallery.

Frigate's event messages (Frigate docs, docs/docs/integrations/mqtt.md, topic ``frigate/events``): JSON
``{"type": "new" | "update" | "end", "before": {...}, "after": {...}}``, ``after`` the tracked object now: ``id`` (e.g.
``"1607123955.475377-mxklsc"``), ``camera``, ``label``, ``sub_label`` (null, a name, or ``[name, score]`` since
0.14), ``top_score``, ``false_positive``, ``has_snapshot``, and the snapshot Frigate keeps for it: since 0.14
``snapshot: {"frame_time", "box": [x1, y1, x2, y2] (detect-resolution pixels), "area", "region", "score",
"attributes"}``, before that ``snapshot_time`` alone. Frigate publishes an ``update`` when it finds a better
snapshot *or* when the object changes zones; only the first shows a new snapshot (a new ``frame_time``).

What is analysed (:class:`EventTracker`): person events of the configured cameras (all when none are
configured) that are not false positives, whenever their snapshot is one not analysed yet: the ``new`` message,
every ``update`` whose snapshot frame time changed (without snapshot fields: whose ``top_score`` rose), and an
``end`` with a saved snapshot not analysed yet (e.g. a companion started mid-event). Zone changes,
repeats and the updates that report a ``sub_label`` (ours included) show no new snapshot and are skipped.

Who is named (:func:`attribute`): the faces of the snapshot that pass the quality gate and whose box centre lies
in the event's person box (``snapshot.box``; without one, every face of the snapshot) decide. All of them
matched to one enrolled identity: a match with the best similarity. None of them matched: unknown. Several names,
or a name and an unknown face: ambiguous, nobody is named (the face may not be the tracked person's). No usable
face: no_face. Unknown faces are never given the nearest name: the gallery's threshold
(``recognition.face.match_threshold``) decides, as everywhere in FacePro.

Sub labels (:meth:`EventTracker.named`): an event's match is POSTed to ``/api/events/<id>/sub_label`` as
``{"subLabel": name, "subLabelScore": similarity}`` (Frigate's API, ``EventsSubLabelBody`` of
frigate/api/defs/request/events_body.py: ``subLabel`` at most 100 characters, ``subLabelScore`` in (0, 1]) once;
again only for another name with a higher similarity from a better snapshot. A sub_label FacePro did not send
(set by hand or by another tool) is left alone.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Generic, Mapping, Sequence, TypeVar

EVENT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
CAMERA = re.compile(r"[A-Za-z0-9_-]{1,64}")
EVENT_TYPES = ("new", "update", "end")
#: Frigate's limit on ``subLabel`` (``EventsSubLabelBody``), characters.
SUB_LABEL_MAX = 100

Box = tuple[float, float, float, float]


class EventError(ValueError):
    """A ``frigate/events`` message that is not Frigate's event shape (the message says which field)."""


@dataclass(frozen=True)
class FrigateEvent:
    """The fields of one ``frigate/events`` message the companion uses.

    Attributes:
        kind: ``"new"``, ``"update"`` or ``"end"``.
        id, camera, label: ``after.id``, ``after.camera``, ``after.label``.
        false_positive, has_snapshot: ``after``'s flags (False when absent).
        mark: epoch seconds of the frame Frigate's snapshot shows (``after.snapshot.frame_time``, or the older
            ``after.snapshot_time``); None when the message has neither.
        box: the object's box in that snapshot, ``(x1, y1, x2, y2)`` pixels of Frigate's detect resolution
            (``after.snapshot.box``); None without one.
        top_score: ``after.top_score`` or None.
        sub_label: the name of ``after.sub_label`` (``"name"`` or ``["name", score]``), None when unset.
    """

    kind: str
    id: str
    camera: str
    label: str
    false_positive: bool = False
    has_snapshot: bool = False
    mark: float | None = None
    box: Box | None = None
    top_score: float | None = None
    sub_label: str | None = None


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EventError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _text(after: Mapping[str, Any], key: str, pattern: re.Pattern[str] | None = None) -> str:
    value = after.get(key)
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        raise EventError(f"after.{key}: expected {'a string' if pattern is None else pattern.pattern}, got {value!r}")
    return value


def _box(value: Any, where: str) -> Box | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise EventError(f"{where}: expected [x1, y1, x2, y2], got {value!r}")
    x1, y1, x2, y2 = (_number(v, where) for v in value)
    if None in (x1, y1, x2, y2) or x2 <= x1 or y2 <= y1:  # type: ignore[operator]
        raise EventError(f"{where}: expected x1 < x2 and y1 < y2, got {value!r}")
    return (x1, y1, x2, y2)  # type: ignore[return-value]


def _sub_label(value: Any) -> str | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise EventError(f"after.sub_label: expected null, a name or [name, score], got {value!r}")
    return value


def parse_event(payload: bytes | str) -> FrigateEvent:
    """One ``frigate/events`` message (module docstring) as a :class:`FrigateEvent`.

    Raises:
        EventError: not JSON, not an object, an unknown ``type``, no ``after`` object, an ``id`` or ``camera``
            outside ``[A-Za-z0-9._-]`` / ``[A-Za-z0-9_-]`` (they become URL paths and topic levels), or a field
            of the wrong type.
    """
    try:
        msg = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as err:
        raise EventError(f"not JSON: {err}") from None
    if not isinstance(msg, dict):
        raise EventError(f"expected a JSON object, got {type(msg).__name__}")
    kind, after = msg.get("type"), msg.get("after")
    if kind not in EVENT_TYPES:
        raise EventError(f"type: expected one of {', '.join(EVENT_TYPES)}, got {kind!r}")
    if not isinstance(after, dict):
        raise EventError("after: expected the tracked object (a JSON object)")
    snap = after.get("snapshot")
    if snap is not None and not isinstance(snap, dict):
        raise EventError(f"after.snapshot: expected an object, got {snap!r}")
    if snap:
        mark, box = _number(snap.get("frame_time"), "after.snapshot.frame_time"), _box(snap.get("box"), "after.snapshot.box")
    else:
        mark, box = _number(after.get("snapshot_time"), "after.snapshot_time"), None
    return FrigateEvent(kind=kind, id=_text(after, "id", EVENT_ID), camera=_text(after, "camera", CAMERA),
                        label=_text(after, "label"), false_positive=after.get("false_positive") is True,
                        has_snapshot=after.get("has_snapshot") is True, mark=mark, box=box,
                        top_score=_number(after.get("top_score"), "after.top_score"),
                        sub_label=_sub_label(after.get("sub_label")))


# ------------------------------------------------------------------ decisions
class Verdict(enum.Enum):
    """What to do with one event message."""

    ANALYSE = "analyse"  # fetch its snapshot and name its faces
    OTHER_LABEL = "other_label"  # not a person
    OTHER_CAMERA = "other_camera"  # a camera outside frigate.cameras
    FALSE_POSITIVE = "false_positive"
    SAME_SNAPSHOT = "same_snapshot"  # zone change, repeat, a sub_label update: nothing new to look at
    NO_SNAPSHOT = "no_snapshot"  # ended without a saved snapshot: Frigate has none to serve


class Phase(enum.Enum):
    """Where one Frigate event is for the companion."""

    ANALYSING = "analysing"  # a snapshot of it is queued or being analysed
    UNNAMED = "unnamed"  # its last snapshot was analysed: unknown, no face or ambiguous
    NAMED = "named"  # a name was chosen for it (POSTed, or being POSTed, as its sub_label)


@dataclass
class _Seen:
    mark: float | None
    top_score: float | None
    phase: Phase = Phase.ANALYSING
    name: str | None = None  # the sub_label FacePro sent (or is sending)
    score: float = 0.0
    frigate_label: str | None = None  # the sub_label in Frigate's last message about it
    sent: set[str] = field(default_factory=set)  # every sub_label FacePro sent for it


class Outcome(enum.Enum):
    """Who the snapshot's person is (:func:`attribute`)."""

    MATCH = "match"
    UNKNOWN = "unknown"
    AMBIGUOUS = "ambiguous"
    NO_FACE = "no_face"


class EventTracker:
    """Per Frigate event: which snapshot was analysed and which sub_label was sent (module docstring).

    Args:
        cameras: Frigate camera names to serve; empty: all.
        label: the object label analysed.
        keep: events remembered (the least recently seen is forgotten beyond; Frigate ends events within
            minutes, so 1024 covers many busy cameras).
    """

    def __init__(self, cameras: Sequence[str] = (), label: str = "person", keep: int = 1024) -> None:
        self.cameras, self.label, self.keep = frozenset(cameras), label, keep
        self._seen: OrderedDict[str, _Seen] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def phase(self, event_id: str) -> Phase | None:
        """The event's :class:`Phase`, None when it is not (or no longer) remembered."""
        seen = self._seen.get(event_id)
        return seen.phase if seen is not None else None

    def decide(self, ev: FrigateEvent) -> Verdict:
        """The :class:`Verdict` for one message; ANALYSE records its snapshot as analysed (a repeat is then
        SAME_SNAPSHOT)."""
        if ev.label != self.label:
            return Verdict.OTHER_LABEL
        if self.cameras and ev.camera not in self.cameras:
            return Verdict.OTHER_CAMERA
        if ev.false_positive:
            return Verdict.FALSE_POSITIVE
        seen = self._seen.get(ev.id)
        if seen is not None:
            self._seen.move_to_end(ev.id)
            seen.frigate_label = ev.sub_label
        if ev.kind == "end" and not ev.has_snapshot:
            return Verdict.NO_SNAPSHOT
        if seen is not None and not self._better(seen, ev):
            return Verdict.SAME_SNAPSHOT
        if seen is None:
            seen = self._seen[ev.id] = _Seen(ev.mark, ev.top_score, frigate_label=ev.sub_label)
            while len(self._seen) > self.keep:
                self._seen.popitem(last=False)
        else:
            seen.mark, seen.top_score = ev.mark, ev.top_score
            if seen.phase is not Phase.NAMED:
                seen.phase = Phase.ANALYSING
        return Verdict.ANALYSE

    @staticmethod
    def _better(seen: _Seen, ev: FrigateEvent) -> bool:
        if ev.mark is not None or seen.mark is not None:
            return ev.mark != seen.mark  # Frigate replaces its snapshot only by a better one
        return ev.top_score is not None and (seen.top_score is None or ev.top_score > seen.top_score)

    def named(self, event_id: str, outcome: Outcome, name: str | None, similarity: float | None) -> tuple[str, float] | None:
        """Record the analysis of one of the event's snapshots.

        Returns:
            ``(subLabel, subLabelScore)`` to POST to Frigate, or None: not a match, the name was sent already,
            a name with a higher similarity was sent, a name longer than Frigate accepts, or Frigate holds a
            sub_label FacePro did not send.
        """
        seen = self._seen.get(event_id)
        if seen is None:  # forgotten meanwhile (a very busy Frigate): a fresh record
            seen = self._seen[event_id] = _Seen(None, None)
        if seen.phase is Phase.ANALYSING:
            seen.phase = Phase.UNNAMED
        if outcome is not Outcome.MATCH or name is None or similarity is None:
            return None
        foreign = seen.frigate_label is not None and seen.frigate_label not in seen.sent
        if foreign or len(name) > SUB_LABEL_MAX:
            return None
        if seen.phase is Phase.NAMED and (name == seen.name or similarity <= seen.score):
            return None
        seen.phase, seen.name, seen.score = Phase.NAMED, name, similarity
        seen.sent.add(name)
        return name, frigate_score(similarity)

    def not_sent(self, event_id: str, name: str) -> None:
        """The POST of ``name`` was given up: the event is unnamed again (a later snapshot may name it)."""
        seen = self._seen.get(event_id)
        if seen is not None and seen.name == name and seen.phase is Phase.NAMED:
            seen.phase, seen.name, seen.score = Phase.UNNAMED, None, 0.0  # (it stays in ``sent``: an earlier POST
            # of the same name may have reached Frigate, whose echo is then not foreign)


def frigate_score(similarity: float) -> float:
    """A cosine similarity as Frigate's ``subLabelScore`` (in (0, 1]): clipped to [0.001, 1], 4 decimals."""
    return round(min(1.0, max(0.001, float(similarity))), 4)


def _centre_in(bbox: Sequence[float], box: Box) -> bool:
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


def attribute(faces: Sequence[Mapping[str, Any]], box: Box | None) -> tuple[Outcome, str | None, float | None]:
    """Who the event's person is, from the faces of its snapshot (module docstring).

    Args:
        faces: ``{"bbox": [x1, y1, x2, y2] (pixels), "identity": name | None, "similarity": cosine,
            "quality": None | rejection reason}`` per face (:func:`pipeline.services.identify_doc`).
        box: the person's box in the snapshot's pixels; None: every face counts.

    Returns:
        ``(outcome, name, similarity)``: name and similarity only for :attr:`Outcome.MATCH` (the best
        similarity of the faces that name it).
    """
    usable = [f for f in faces if f.get("quality") is None and (box is None or _centre_in(f["bbox"], box))]
    if not usable:
        return Outcome.NO_FACE, None, None
    names = {f["identity"] for f in usable}
    if names == {None}:
        return Outcome.UNKNOWN, None, None
    if len(names) > 1:
        return Outcome.AMBIGUOUS, None, None
    (name,) = names
    return Outcome.MATCH, name, max(float(f["similarity"]) for f in usable)


def result_message(ev: FrigateEvent, faces: Sequence[Mapping[str, Any]], box: Box | None, outcome: Outcome,
                   name: str | None, similarity: float | None, box_id: str, now: float) -> dict[str, Any]:
    """The message published on ``<prefix>/frigate/<camera>`` for one analysed snapshot.

    Returns:
        ``{"frigate_event_id", "camera", "label", "type" (the Frigate message analysed), "snapshot_time"
        (epoch s or None), "box" (the person box used, snapshot pixels, or None), "result" (match | unknown |
        ambiguous | no_face), "identity" (name or None: never a guess), "similarity" (of the match, or None),
        "faces": [{"bbox", "identity", "similarity", "quality", "in_box"}], "box_id", "time" (epoch s)}``.
    """
    return {
        "frigate_event_id": ev.id, "camera": ev.camera, "label": ev.label, "type": ev.kind,
        "snapshot_time": ev.mark, "box": list(box) if box is not None else None, "result": outcome.value,
        "identity": name, "similarity": round(similarity, 4) if similarity is not None else None,
        "faces": [{"bbox": list(f["bbox"]), "identity": f["identity"], "similarity": f["similarity"],
                   "quality": f.get("quality"), "in_box": box is None or _centre_in(f["bbox"], box)} for f in faces],
        "box_id": box_id, "time": round(now, 3),
    }


def person_box(ev: FrigateEvent, width: int, height: int) -> Box | None:
    """The event's person box when it fits the snapshot of ``width`` x ``height`` pixels, else None (an ended
    event's snapshot follows Frigate's snapshot config: cropped or resized, the detect-resolution box no longer
    applies, and every face of the snapshot counts)."""
    b = ev.box
    if b is None or b[2] > width + 1 or b[3] > height + 1 or b[0] < -1 or b[1] < -1:
        return None
    return b


# ---------------------------------------------------------------- retrying
@dataclass(frozen=True)
class Backoff:
    """Retries with exponential backoff: attempt ``n`` (1-based) waits ``min_s * 2**(n-1)``, at most ``max_s``;
    after ``retries`` retries a request is given up."""

    min_s: float
    max_s: float
    retries: int

    def delay(self, attempt: int) -> float:
        """Seconds before retry ``attempt`` (1 = the first retry)."""
        return min(self.max_s, self.min_s * 2.0 ** max(0, attempt - 1))

    def gives_up(self, attempt: int) -> bool:
        """True when retry ``attempt`` is past the budget."""
        return attempt > self.retries


T = TypeVar("T")


class WorkQueue(Generic[T]):
    """A bounded queue of keyed items, each due at a time (a retry waits for its backoff; new items are due
    at once). Not thread-safe: the caller locks.

    ``put`` of a key already queued replaces that item (a newer snapshot of the same event supersedes the one
    still waiting); ``put`` into a full queue drops the oldest item. ``pop_due`` hands out the earliest due
    item whose time has come.

    Args:
        capacity: items queued at most (>= 1).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"WorkQueue: capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[Any, tuple[float, T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def put(self, key: Any, item: T, due: float = 0.0) -> tuple[T | None, T | None]:
        """Queue ``item`` under ``key``, due at ``due`` (clock seconds).

        Returns:
            ``(superseded, dropped)``: the item it replaced under the same key, and the oldest item dropped to
            make room (each None when none).
        """
        superseded = self._items.pop(key)[1] if key in self._items else None
        dropped = None
        if len(self._items) >= self.capacity:
            dropped = self._items.popitem(last=False)[1][1]
        self._items[key] = (due, item)
        return superseded, dropped

    def pop_due(self, now: float) -> tuple[Any, T] | None:
        """The earliest due ``(key, item)`` with ``due <= now`` (first queued among equals), removed; None when
        nothing is due."""
        best = None
        for key, (due, _) in self._items.items():
            if due <= now and (best is None or due < self._items[best][0]):
                best = key
        if best is None:
            return None
        return best, self._items.pop(best)[1]

    def next_due(self) -> float | None:
        """The earliest due time queued, None when empty."""
        return min((due for due, _ in self._items.values()), default=None)

    def clear(self) -> list[T]:
        """Remove and return every item."""
        items = [item for _, item in self._items.values()]
        self._items.clear()
        return items
