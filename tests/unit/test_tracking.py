"""Per-camera tracking and event lifecycle: synthetic boxes that prove each rule, then real video."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import NamedTuple

import cv2
import numpy as np
import pytest

from pipeline.config import OnnxDetectorConfig, TrackingConfig
from pipeline.messages import Detections, FrameRef, TrackUpdate
from stages.detector import COCO80, ObjectDetector
from stages.runtime import SessionOptions
from stages.detector import DetectionResult
from stages.recognition import objects_of
from stages.tracking import ActiveTrack, CameraTracks, TrackState, Transition

CAM = "cam0"
CFG = TrackingConfig()  # lost buffer 30 frames, 3 consecutive frames to confirm
BACKPACK = COCO80.index("backpack")


def _ns(index: int) -> int:
    return 1_700_000_000_000_000_000 + index * 100_000_000  # 10 fps


class _Frame(NamedTuple):
    """The tracker's input for one frame: ``CameraTracks.update(*frame)``."""

    index: int
    captured_at_ns: int
    objects: DetectionResult


def _objects(boxes=(), conf: float = 0.9, classes=None) -> DetectionResult:
    xyxy = np.array(boxes, np.float32).reshape(-1, 4)
    class_id = np.zeros(len(xyxy), np.int32) if classes is None else np.array(classes, np.int32)
    return DetectionResult(xyxy, np.full(len(xyxy), conf, np.float32), class_id)


def _dets(index: int, boxes=(), conf: float = 0.9, classes=None) -> _Frame:
    return _Frame(index, _ns(index), _objects(boxes, conf, classes))


def _walker(index: int) -> list[float]:
    x = 20.0 + 4 * index
    return [x, 100.0, x + 40, 200.0]


def _feed(tracks: CameraTracks, frames) -> list[tuple[int, TrackUpdate]]:
    """Feed Detections in order; return (frame fed, update) pairs."""
    return [(d.index, t.message) for d in frames for t in tracks.update(*d)]


def _msgs(transitions: list[Transition]) -> list[TrackUpdate]:
    """The wire messages of transitions."""
    return [t.message for t in transitions]


# ------------------------------------------------------------------ lifecycle


@pytest.mark.parametrize(
    "every, expected_emit_frames",
    [
        (10, [2, 12, 22, 60]),  # start at confirmation (3rd frame), then every 10 frames, end after 31 misses
        (1, list(range(2, 30)) + [60]),
    ],
)
def test_linear_walker_is_one_track_with_one_start_and_one_end(every, expected_emit_frames):
    tracks = CameraTracks(CAM, CFG, COCO80, update_every_frames=every)
    frames = [_dets(i, [_walker(i)]) for i in range(30)] + [_dets(i) for i in range(30, 70)]
    out = _feed(tracks, frames)
    assert [frame for frame, _ in out] == expected_emit_frames
    updates = [u for _, u in out]
    assert {u.track_id for u in updates} == {1}
    assert len({u.event_id for u in updates}) == 1 and len(updates[0].event_id) == 32
    assert [u.ended for u in updates] == [False] * (len(updates) - 1) + [True]
    start, end = updates[0], updates[-1]
    assert (start.first_frame, start.first_seen_ns) == (0, _ns(0))  # first sighting, not confirmation
    assert (start.last_frame, start.label, start.camera) == (2, "person", CAM)
    assert (end.first_frame, end.last_frame, end.last_seen_ns) == (0, 29, _ns(29))
    np.testing.assert_allclose(end.xyxy, _walker(29))
    assert end.xyxy.dtype == np.float32 and end.best_score == pytest.approx(0.9)
    assert end.identity is None and end.method is None
    assert _msgs(tracks.finish()) == []  # nothing left open


def test_two_separated_walkers_are_two_tracks():
    tracks = CameraTracks(CAM, CFG, COCO80)
    other = lambda i: [400.0 - 3 * i, 150.0, 440.0 - 3 * i, 260.0]  # noqa: E731 - walks the other way
    out = _feed(tracks, [_dets(i, [_walker(i), other(i)]) for i in range(20)])
    active = sorted(tracks.active(), key=lambda a: a.track_id)
    ended = _msgs(tracks.finish())
    updates = [u for _, u in out] + ended
    assert {u.track_id for u in updates} == {1, 2}
    assert len({u.event_id for u in updates}) == 2
    assert sorted(u.track_id for u in ended) == [1, 2] and all(u.ended for u in ended)
    assert [type(a) for a in active] == [ActiveTrack, ActiveTrack]
    boxes = {tuple(a.xyxy.tolist()) for a in active}
    assert boxes == {tuple(_walker(19)), tuple(other(19))}


def test_classes_are_tracked_separately():
    """ByteTrack ignores class ids; CameraTracks runs one tracker per class.

    A backpack box taking over a person's position must start its own track,
    not continue the person's (which a single class-blind tracker would do).
    """
    tracks = CameraTracks(CAM, CFG, COCO80)
    _feed(tracks, [_dets(i, [_walker(i)]) for i in range(10)])
    _feed(tracks, [_dets(i, [_walker(i)], classes=[BACKPACK]) for i in range(10, 20)])
    assert [(a.track_id, a.label) for a in tracks.active()] == [(2, "backpack")]
    ended = {u.track_id: u for u in _msgs(tracks.finish())}
    assert (ended[1].label, ended[1].first_frame, ended[1].last_frame) == ("person", 0, 9)
    assert (ended[2].label, ended[2].first_frame, ended[2].last_frame) == ("backpack", 10, 19)


def test_same_box_of_two_classes_gives_two_labelled_tracks():
    tracks = CameraTracks(CAM, CFG, COCO80)
    _feed(tracks, [_dets(i, [_walker(i), _walker(i)], classes=[0, BACKPACK]) for i in range(10)])
    assert sorted((a.track_id, a.label) for a in tracks.active()) == [(1, "person"), (2, "backpack")]


@pytest.mark.parametrize("flags", [{"motion": False}, {"valid": False}])
def test_skipped_or_invalid_frames_count_as_empty(flags):
    """At the process edge (recognition) a flagged wire message becomes an empty detections container."""
    tracks = CameraTracks(CAM, CFG, COCO80)
    _feed(tracks, [_dets(i, [_walker(i)]) for i in range(5)])

    def flagged(i: int) -> _Frame:  # the box is still there, but the frame is flagged: its detections must be ignored
        obj = _objects([_walker(5)])
        ref = FrameRef(camera=CAM, ring="ring", slot=0, seq=i + 1, frame_index=i, captured_at_ns=_ns(i), height=360, width=480)
        wire = Detections(frame=ref, xyxy=obj.xyxy, confidence=obj.confidence, class_id=obj.class_id, **flags)
        return _Frame(i, _ns(i), objects_of(wire))

    out = _feed(tracks, [flagged(i) for i in range(5, 40)])
    assert [(frame, u.ended, u.last_frame) for frame, u in out] == [(35, True, 4)]
    assert tracks.active() == []


@pytest.mark.parametrize(
    "next_frame, boxes, expect_ended",
    [
        (7, [_walker(7)], False),  # 3 frames lost upstream: the track coasts and is matched again
        (60, [], True),  # 55 frames lost: the gap is filled with empty frames and the track ends
    ],
)
def test_gap_in_frame_index_ages_tracks(next_frame, boxes, expect_ended):
    tracks = CameraTracks(CAM, CFG, COCO80, update_every_frames=1)
    _feed(tracks, [_dets(i, [_walker(i)]) for i in range(5)])
    out = _msgs(tracks.update(*_dets(next_frame, boxes)))
    assert [u.track_id for u in out] == [1]
    assert out[0].ended is expect_ended
    assert out[0].last_frame == (4 if expect_ended else next_frame)


def test_held_frames_neither_move_nor_age_tracks():
    """A frame the detector skipped for a stable scene (Detections.held) is no tracker step: 40 held frames (more
    than the 30-frame lost buffer) end nothing, the active boxes stay those of the last detector frame, and a track
    confirmed across held frames starts at its first sighting."""
    tracks = CameraTracks(CAM, CFG, COCO80, update_every_frames=1)
    frames = []
    for i in range(0, 10, 2):  # detector every other frame, held in between
        frames.append(("det", _dets(i, [_walker(i)])))
        frames.append(("held", i + 1))
    out = []
    for kind, f in frames:
        out += _msgs(tracks.update(*f) if kind == "det" else tracks.hold(f, _ns(f)))
    assert out[0].first_frame == 0 and out[0].first_seen_ns == _ns(0)  # confirmed at frame 4 (3rd detector frame)
    held = [m for i in range(10, 50) for m in _msgs(tracks.hold(i, _ns(i)))]
    assert held == [] and [a.track_id for a in tracks.active()] == [1]
    np.testing.assert_allclose(tracks.active()[0].xyxy, _walker(8))
    after = _msgs(tracks.update(*_dets(50, [_walker(9)])))
    assert [(u.track_id, u.ended, u.last_frame) for u in after] == [(1, False, 50)]
    with pytest.raises(ValueError, match="not after the previous frame"):
        tracks.hold(50, _ns(50))


def test_identity_and_snapshot_ride_on_the_next_update():
    tracks = CameraTracks(CAM, CFG, COCO80, update_every_frames=100)
    _feed(tracks, [_dets(i, [_walker(i)]) for i in range(4)])
    (track,) = tracks.active()
    assert track.identity is None
    assert tracks.set_identity(track.track_id, "obama", "face", 0.71) is True
    assert tracks.set_snapshot(track.track_id, "/tmp/snap.jpg") is True
    (update,) = _msgs(tracks.update(*_dets(4, [_walker(4)])))  # inside the 100-frame throttle window
    assert [t.identity for t in tracks.active()] == ["obama"]  # the live view's name from the next frame on
    assert (update.identity, update.method, update.identity_score, update.snapshot_path) == ("obama", "face", pytest.approx(0.71), "/tmp/snap.jpg")
    assert _msgs(tracks.update(*_dets(5, [_walker(5)]))) == []  # nothing new: throttled
    tracks.set_identity(track.track_id, "obama", "face", 0.71)  # same decision again
    assert _msgs(tracks.update(*_dets(6, [_walker(6)]))) == []
    (end,) = _msgs(tracks.finish())
    assert end.ended and end.identity == "obama" and end.event_id == update.event_id
    assert tracks.set_identity(track.track_id, "biden", "face", 0.9) is False  # already ended


def test_identity_change_of_a_track_missed_in_this_frame_is_still_sent():
    tracks = CameraTracks(CAM, CFG, COCO80, update_every_frames=100)
    _feed(tracks, [_dets(i, [_walker(i)]) for i in range(4)])
    tracks.set_identity(1, None, "reid", 0.2)
    (update,) = _msgs(tracks.update(*_dets(4)))  # the person is missed by the detector in this frame
    assert (update.track_id, update.method, update.last_frame, update.ended) == (1, "reid", 3, False)


def test_transitions_say_new_tracked_lost_and_removed():
    """A walker confirmed at frame 2 (NEW), seen (TRACKED, throttled), renamed while the detector misses it (LOST),
    dropped after the lost-track buffer (REMOVED, the wire message ended)."""
    tracks = CameraTracks(CAM, CFG, COCO80, update_every_frames=10)
    states = [(d.index, t.state) for d in [_dets(i, [_walker(i)]) for i in range(15)] for t in tracks.update(*d)]
    assert states == [(2, TrackState.NEW), (12, TrackState.TRACKED)]
    tracks.set_identity(1, "obama", "face", 0.7)
    (lost,) = tracks.update(*_dets(15))
    assert lost.state is TrackState.LOST and lost.message.identity == "obama" and not lost.message.ended
    gone = [t for i in range(16, 60) for t in tracks.update(*_dets(i))]
    assert [t.state for t in gone] == [TrackState.REMOVED] and gone[0].message.ended
    assert tracks.finish() == []


def test_finish_ends_every_open_track_once():
    tracks = CameraTracks(CAM, CFG, COCO80)
    _feed(tracks, [_dets(i, [_walker(i), [300, 50, 340, 150]]) for i in range(6)])
    ended = _msgs(tracks.finish())
    assert sorted(u.track_id for u in ended) == [1, 2] and all(u.ended for u in ended)
    assert _msgs(tracks.finish()) == [] and tracks.active() == []


@pytest.mark.parametrize(
    "first, second, message",
    [
        (_dets(5), _dets(5), "frame_index 5 is not after the previous frame 5"),
        (_dets(5), _dets(3), "frame_index 3 is not after the previous frame 5; feed frames in order"),
        (_dets(0), _dets(1, [[0, 0, 10, 10]], classes=[80]), r"class_id outside 0\.\.79"),
    ],
)
def test_bad_input_is_rejected(first, second, message):
    tracks = CameraTracks(CAM, CFG, COCO80)
    tracks.update(*first)
    with pytest.raises(ValueError, match=message):
        tracks.update(*second)


@pytest.mark.parametrize(
    "names, every, message",
    [((), 10, "class_names: empty"), (COCO80, 0, "update_every_frames: must be >= 1")],
)
def test_bad_constructor_arguments(names, every, message):
    with pytest.raises(ValueError, match=message):
        CameraTracks(CAM, CFG, names, update_every_frames=every)


def test_set_identity_rejects_unknown_method():
    with pytest.raises(ValueError, match="method: expected one of"):
        CameraTracks(CAM, CFG, COCO80).set_identity(1, "x", "iris", 0.5)


# ------------------------------------------------------------------ real video


def test_yolox_and_bytetrack_on_vtest(models, videos):
    """First 150 frames of vtest.avi (3-9 pedestrians): a plausible number of stable person tracks."""
    detector = ObjectDetector(OnnxDetectorConfig(path=models / "yolox_nano.onnx", layout="yolox"), SessionOptions(threads=1))
    tracks = CameraTracks(CAM, CFG, detector.class_names)
    cap = cv2.VideoCapture(str(videos / "vtest.avi"))
    updates, detected, active = [], 0, 0
    for i in range(150):
        ok, frame = cap.read()
        assert ok
        result = detector.detect(frame)
        updates += _msgs(tracks.update(i, _ns(i), result))
        detected, active = detected + len(result), active + len(tracks.active())
    cap.release()
    updates += _msgs(tracks.finish())

    per_track = defaultdict(list)
    for u in updates:
        per_track[u.track_id].append(u)
    assert 3 <= len(per_track) <= 30
    assert all(u.label == "person" for u in updates)
    assert all(Counter(u.ended for u in us)[True] == 1 and us[-1].ended for us in per_track.values())
    assert len({us[0].event_id for us in per_track.values()}) == len(per_track)
    # stable ids: most person-frames belong to tracks that last at least 3 s (30 frames)
    spans = np.array([us[-1].last_frame - us[-1].first_frame + 1 for us in per_track.values()])
    assert spans[spans >= 30].sum() >= 0.8 * spans.sum(), spans
    # almost every detection is part of a confirmed track
    assert active >= 0.85 * detected
