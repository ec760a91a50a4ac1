"""Per-camera multi-object tracking and event lifecycle on top of ByteTrack.

Tracking uses ``trackers.ByteTrackTracker`` (Roboflow ``trackers``), an
implementation of ByteTrack (Zhang et al., "ByteTrack: Multi-Object Tracking
by Associating Every Detection Box", ECCV 2022): Kalman-predicted boxes
matched to high-, then low-confidence detections by IoU.

ByteTrack associates boxes by IoU only and ignores ``class_id``, so one
tracker runs per class id: a person can never be continued by a
same-position backpack box. The trackers' own ids (which restart at 0 per
tracker) are replaced by one per-camera ``track_id`` sequence starting at 1.

Each confirmed track (ByteTrack gives it a tracker id after
``minimum_consecutive_frames`` consecutive detections) is an *event* with a
time-ordered ``event_id`` (by default a fresh :func:`pipeline.messages.new_event_id`; the pipeline derives
it from the track's start, :func:`pipeline.messages.event_id_for`, so a rebuilt tracker names a resumed track
the same); :class:`CameraTracks` reports its life as explicit
:class:`Transition` s, each a :class:`TrackState` and the track's wire message
(:class:`pipeline.messages.TrackUpdate`): ``NEW`` when it is confirmed,
``TRACKED`` every ``update_every_frames`` frames while it is seen, ``TRACKED``
or ``LOST`` (not matched in that frame) when recognition sets its identity or
snapshot, and ``REMOVED`` (the message has ``ended=True``) when ByteTrack drops
it (more than ``lost_track_buffer_frames`` frames without a matching
detection) or the stream ends (:meth:`CameraTracks.finish`). The start update is sent in
the frame the track is confirmed, but its ``first_frame``/``first_seen_ns``
are those of the track's first detection (``minimum_consecutive_frames - 1``
frames earlier); ``best_score`` and ``xyxy`` come from the detections matched
once it is confirmed. ``xyxy`` is the matched detection box, not the Kalman
estimate.

Frames are counted, not timed: the tracker runs in fixed-rate mode (one
Kalman step per frame) with ``lost_track_buffer_frames`` used as is. A gap in
``frame_index`` (frames lost upstream) is filled with empty updates (at most
``lost_track_buffer_frames + 1`` of them), so tracks age correctly.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import supervision as sv
from trackers import ByteTrackTracker

from pipeline.config import TrackingConfig
from pipeline.messages import ID_METHODS, TrackUpdate, new_event_id
from stages.detector import DetectionResult

#: ByteTrack scales its lost-track buffer by ``frame_rate / 30``; 30 keeps it in frames.
_BYTETRACK_REFERENCE_FPS = 30.0


class TrackState(enum.Enum):
    """What a :class:`Transition` says happened to a track in a frame (after Ultralytics' tracker
    ``TrackState``: New, Tracked, Lost, Removed)."""

    NEW = "new"  # confirmed in this frame: its event starts
    TRACKED = "tracked"  # matched to a detection in this frame
    LOST = "lost"  # not matched in this frame but still kept by ByteTrack
    REMOVED = "removed"  # dropped by ByteTrack, or the stream ended: its event ends


@dataclass(frozen=True)
class Transition:
    """One emitted change of a track: its state and its wire message (``ended`` is True for ``REMOVED``)."""

    state: TrackState
    message: TrackUpdate


@dataclass(frozen=True)
class ActiveTrack:
    """A confirmed track matched to a detection in the latest frame.

    Attributes:
        track_id: per-camera track id.
        event_id: 32-hex event id of the track.
        xyxy: ``(4,) float32`` detection box ``x1, y1, x2, y2``, frame pixels.
        label: class name.
        identity: the track's identity as decided before this frame (None: unknown).
    """

    track_id: int
    event_id: str
    xyxy: np.ndarray
    label: str
    identity: str | None = None


@dataclass
class _Event:
    """Mutable state of one open track; ``message`` is the latest TrackUpdate."""

    message: TrackUpdate
    class_id: int
    tracker_id: int
    sent_frame: int = -1  # last_frame of the last update returned (-1: none yet, the next one is NEW)
    dirty: bool = True  # identity/snapshot changed since the last update returned


def _make_tracker(cfg: TrackingConfig) -> ByteTrackTracker:
    return ByteTrackTracker(
        lost_track_buffer=cfg.lost_track_buffer_frames,
        frame_rate=_BYTETRACK_REFERENCE_FPS,
        track_activation_threshold=cfg.track_activation_threshold,
        minimum_consecutive_frames=cfg.minimum_consecutive_frames,
        minimum_iou_threshold=cfg.minimum_iou_threshold,
        high_conf_det_threshold=cfg.high_conf_det_threshold,
    )


class CameraTracks:
    """Tracks and events of one camera (one instance per camera).

    Args:
        camera: camera name (checked against ``Detections.frame.camera``).
        cfg: ByteTrack parameters.
        class_names: detector class names, index = class id (e.g.
            ``ObjectDetector.class_names``); used for ``TrackUpdate.label``.
        update_every_frames: emit an update for a continuing track at most
            every this many frames (start, end and identity/snapshot changes
            are always emitted).
        event_ids: ``(camera, track_id, first_frame, first_seen_ns) -> event id``;
            None gives every event a fresh :func:`~pipeline.messages.new_event_id`.

    Raises:
        ValueError: ``class_names`` is empty or ``update_every_frames < 1``.
    """

    def __init__(self, camera: str, cfg: TrackingConfig, class_names: tuple[str, ...], update_every_frames: int = 10,
                 event_ids: Callable[[str, int, int, int], str] | None = None) -> None:
        if not class_names:
            raise ValueError("CameraTracks class_names: empty; pass the detector's class_names")
        if update_every_frames < 1:
            raise ValueError(f"CameraTracks update_every_frames: must be >= 1, got {update_every_frames}")
        self.camera = camera
        self._event_ids = event_ids or (lambda *_: new_event_id())
        self._cfg = cfg
        self._names = tuple(class_names)
        self._every = update_every_frames
        self._trackers: dict[int, ByteTrackTracker] = {}
        self._events: dict[int, _Event] = {}  # track_id -> open event
        self._by_tracker: dict[tuple[int, int], int] = {}  # (class_id, tracker id) -> track_id
        self._active: list[ActiveTrack] = []
        self._next_track_id = 1
        self._last_frame: int | None = None
        self._captured_ns: dict[int, int] = {}  # frame_index -> captured_at_ns of recent frames
        self._stepped: deque[int] = deque(maxlen=cfg.minimum_consecutive_frames + 2)  # recent frames the trackers stepped

    # ------------------------------------------------------------------ public

    def update(self, frame_index: int, captured_at_ns: int, objects: DetectionResult) -> list[Transition]:
        """Feed one frame's detections (frames in increasing ``frame_index`` order).

        Args:
            frame_index: the frame's index in its camera's stream (0-based).
            captured_at_ns: its capture time, Unix nanoseconds (the events' first/last seen times).
            objects: its detections; an empty one for a frame the motion gate
                skipped or that could not be read (tracks age by one frame).

        Returns:
            Transitions of tracks that started (``NEW``), continue (``TRACKED``,
            throttled to every ``update_every_frames`` frames), changed
            identity/snapshot (``TRACKED`` or ``LOST``), or ended (``REMOVED``).

        Raises:
            ValueError: ``frame_index`` not after the previous frame's, or a
                ``class_id`` outside ``class_names``.
        """
        index = self._check_frame(frame_index, objects)
        updates = [u for i in self._gap_frames(index) for u in self._step(self._empty_detections(), i)]
        self._remember_capture_time(index, captured_at_ns)
        sv_det = self._to_supervision(objects) if len(objects) else self._empty_detections()
        updates += self._step(sv_det, index)
        self._last_frame = index
        return updates

    def hold(self, frame_index: int, captured_at_ns: int) -> list[Transition]:
        """A frame the detector skipped because the scene was stable (``Detections.held``): the trackers are not
        stepped, so tracks neither move nor age; :meth:`active` keeps the boxes of the last detector frame.

        Returns:
            Transitions of frames missing before this one (aged as in :meth:`update`), usually none.

        Raises:
            ValueError: ``frame_index`` not after the previous frame's.
        """
        index = self._check_frame(frame_index, DetectionResult.empty())
        updates = [u for i in self._gap_frames(index) for u in self._step(self._empty_detections(), i)]
        self._captured_ns[index] = captured_at_ns
        self._last_frame = index
        return updates

    def active(self) -> list[ActiveTrack]:
        """Confirmed tracks matched to a detection in the latest frame fed to :meth:`update`."""
        return list(self._active)

    def finish(self) -> list[Transition]:
        """End every open track (end of stream); returns their ``REMOVED`` transitions.

        Frames fed afterwards must still continue the ``frame_index`` order;
        use a new :class:`CameraTracks` for a new stream.
        """
        ended = [self._close(track_id) for track_id in sorted(self._events)]
        self._trackers.clear()
        self._by_tracker.clear()
        self._active = []
        return ended

    def set_identity(self, track_id: int, identity: str | None, method: str | None, score: float) -> bool:
        """Record who a track is; the next update for the track carries it.

        Setting the same values again does not cause an extra update.

        Args:
            track_id: per-camera track id (``ActiveTrack.track_id``).
            identity: enrolled identity name, or None for unknown.
            method: ``"face"``, ``"reid"``, ``"gait"`` or None.
            score: cosine similarity behind the decision.

        Returns:
            False when the track has already ended (nothing recorded).

        Raises:
            ValueError: ``method`` is not one of ``ID_METHODS`` or None.
        """
        if method is not None and method not in ID_METHODS:
            raise ValueError(f"set_identity method: expected one of {ID_METHODS} or None, got {method!r}")
        return self._amend(track_id, identity=identity, method=method, identity_score=float(score))

    def set_snapshot(self, track_id: int, path: str) -> bool:
        """Record the snapshot file of a track; False when the track has already ended."""
        return self._amend(track_id, snapshot_path=str(path))

    # ------------------------------------------------------------------ steps

    def _check_frame(self, index: int, det: DetectionResult) -> int:
        if self._last_frame is not None and index <= self._last_frame:
            raise ValueError(
                f"CameraTracks({self.camera!r}).update: frame_index {index} is not after the previous frame "
                f"{self._last_frame}; feed frames in order (reorder them first)"
            )
        if len(det) and (det.class_id.min() < 0 or det.class_id.max() >= len(self._names)):
            raise ValueError(f"CameraTracks({self.camera!r}).update: class_id outside 0..{len(self._names) - 1} (class_names has {len(self._names)} entries)")
        return index

    def _gap_frames(self, index: int) -> range:
        if self._last_frame is None:
            return range(0)
        start = max(self._last_frame + 1, index - self._cfg.lost_track_buffer_frames - 1)
        return range(start, index)

    def _remember_capture_time(self, index: int, captured_at_ns: int) -> None:
        """Keep capture times of the last stepped frames a new track's first sighting can lie in."""
        self._captured_ns[index] = captured_at_ns
        self._stepped.append(index)
        horizon = self._stepped[0]
        for old in [i for i in self._captured_ns if i < horizon]:
            del self._captured_ns[old]

    def _step(self, sv_det: sv.Detections, index: int) -> list[Transition]:
        """Run every class's tracker on one frame and turn the result into updates."""
        class_ids = set(self._trackers) | set(np.unique(sv_det.class_id).tolist() if len(sv_det) else [])
        self._active = []
        updates: list[Transition] = []
        for class_id in sorted(class_ids):
            tracker = self._trackers.setdefault(class_id, _make_tracker(self._cfg))
            out = tracker.update(sv_det[sv_det.class_id == class_id] if len(sv_det) else sv_det)
            updates += self._seen(class_id, tracker, out, index)
            updates += self._dropped(class_id, tracker)
        return updates

    def _seen(self, class_id: int, tracker: ByteTrackTracker, out: sv.Detections, index: int) -> list[Transition]:
        updates = []
        for box, conf, tracker_id in zip(out.xyxy, out.confidence, out.tracker_id):
            if tracker_id == -1:
                continue
            track_id = self._by_tracker.get((class_id, int(tracker_id)))
            if track_id is None:
                track_id = self._open(class_id, tracker, int(tracker_id), index)
            event = self._events[track_id]
            event.message = _observed(event.message, box, float(conf), index, self._captured_ns[index])
            self._active.append(ActiveTrack(track_id, event.message.event_id, event.message.xyxy, event.message.label,
                                            event.message.identity))
            if event.dirty or index - event.sent_frame >= self._every:
                updates.append(self._emit(event, TrackState.NEW if event.sent_frame < 0 else TrackState.TRACKED))
        for event in self._events.values():  # identity changes of tracks not seen in this frame
            if event.dirty and event.class_id == class_id and event.message.last_frame != index:
                updates.append(self._emit(event, TrackState.LOST))
        return updates

    def _dropped(self, class_id: int, tracker: ByteTrackTracker) -> list[Transition]:
        alive = {int(t.tracker_id) for t in tracker.tracks if t.tracker_id != -1}
        gone = [key for key in self._by_tracker if key[0] == class_id and key[1] not in alive]
        return [self._close(self._by_tracker[key]) for key in gone]

    # ------------------------------------------------------------------ events

    def _open(self, class_id: int, tracker: ByteTrackTracker, tracker_id: int, index: int) -> int:
        # An unconfirmed ByteTrack tracklet is dropped on its first miss, so at
        # confirmation its consecutive-update count spans every frame since it
        # was born: the event starts at that first sighting.
        # Held frames (see hold) are not steps: count back over the stepped frames.
        tracklet = next(t for t in tracker.tracks if t.tracker_id == tracker_id)
        back = max(1, tracklet.number_of_successful_consecutive_updates)
        first = self._stepped[-back] if back <= len(self._stepped) else index
        first = first if first in self._captured_ns else index
        track_id = self._next_track_id
        self._next_track_id += 1
        self._by_tracker[(class_id, tracker_id)] = track_id
        message = TrackUpdate(
            event_id=self._event_ids(self.camera, track_id, first, self._captured_ns[first]),
            camera=self.camera,
            track_id=track_id,
            label=self._names[class_id],
            first_seen_ns=self._captured_ns[first],
            last_seen_ns=self._captured_ns[first],
            first_frame=first,
            last_frame=first,
            best_score=0.0,
            xyxy=np.zeros(4, dtype=np.float32),
        )
        self._events[track_id] = _Event(message=message, class_id=class_id, tracker_id=tracker_id)
        return track_id

    def _emit(self, event: _Event, state: TrackState) -> Transition:
        event.sent_frame = event.message.last_frame
        event.dirty = False
        return Transition(state, event.message)

    def _close(self, track_id: int) -> Transition:
        event = self._events.pop(track_id)
        self._by_tracker.pop((event.class_id, event.tracker_id), None)
        return Transition(TrackState.REMOVED, replace(event.message, ended=True))

    def _amend(self, track_id: int, **fields: object) -> bool:
        event = self._events.get(track_id)
        if event is None:
            return False
        if any(getattr(event.message, name) != value for name, value in fields.items()):
            event.message = replace(event.message, **fields)
            event.dirty = True  # unchanged identity/snapshot: no extra update
        return True

    # ------------------------------------------------------------------ conversions

    def _to_supervision(self, det: DetectionResult) -> sv.Detections:
        return sv.Detections(xyxy=det.xyxy.astype(np.float32), confidence=det.confidence.astype(np.float32), class_id=det.class_id.astype(int))

    @staticmethod
    def _empty_detections() -> sv.Detections:
        return sv.Detections(xyxy=np.empty((0, 4), np.float32), confidence=np.empty(0, np.float32), class_id=np.empty(0, int))


def _observed(message: TrackUpdate, box: np.ndarray, confidence: float, index: int, captured_at_ns: int) -> TrackUpdate:
    """The event's message after one more matched detection."""
    return replace(
        message,
        last_seen_ns=captured_at_ns,
        last_frame=index,
        best_score=max(message.best_score, confidence),
        xyxy=np.asarray(box, dtype=np.float32).reshape(4).copy(),
    )
