"""Frigate companion mode, the pure part (:mod:`pipeline.frigate`), the config section, and the companion's
threads and retries (:class:`pipeline.companion.FrigateCompanion`) with a fake broker client and a fake Frigate
(no sockets: the real HTTP and broker path is tests/integration/test_frigate.py)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import ConfigError, parse_config
from pipeline.frigate import (Backoff, EventError, EventTracker, FrigateEvent, Outcome, Phase, Verdict, WorkQueue,
                              attribute, frigate_score, parse_event, person_box, result_message)


def frigate_message(kind: str = "new", id: str = "1607123955.475377-mxklsc", camera: str = "front_door",
                    label: str = "person", frame_time: float | None = 1607123961.8, box: list | None = None,
                    old_schema: bool = False, **after: object) -> bytes:
    """A ``frigate/events`` message in Frigate's documented shape (docs "MQTT"; ``old_schema``: 0.13's
    ``snapshot_time`` instead of the ``snapshot`` object)."""
    obj = {"id": id, "camera": camera, "frame_time": frame_time, "label": label, "sub_label": None,
           "top_score": 0.95, "false_positive": False, "start_time": 1607123955.47, "end_time": None, "score": 0.87,
           "box": [424, 500, 536, 712], "area": 23744, "ratio": 2.1, "region": [264, 450, 667, 853],
           "current_zones": [], "entered_zones": [], "thumbnail": None, "has_snapshot": True, "has_clip": False,
           "stationary": False, "motionless_count": 0, "position_changes": 0, "attributes": {}, "current_attributes": []}
    if old_schema:
        obj["snapshot_time"] = frame_time
    else:
        obj["snapshot"] = None if frame_time is None else {
            "frame_time": frame_time, "box": box or [415, 489, 528, 700], "area": 12728,
            "region": [260, 446, 660, 846], "score": 0.77, "attributes": []}
    obj.update(after)
    return json.dumps({"type": kind, "before": dict(obj), "after": obj}).encode()


# ------------------------------------------------------------------ parsing
def test_parse_the_documented_shapes() -> None:
    ev = parse_event(frigate_message(sub_label=["Barack Obama", 0.8], box=[10, 20, 110, 220]))
    assert ev == FrigateEvent("new", "1607123955.475377-mxklsc", "front_door", "person", False, True, 1607123961.8,
                              (10.0, 20.0, 110.0, 220.0), 0.95, "Barack Obama")
    old = parse_event(frigate_message("update", old_schema=True, frame_time=12.5, sub_label="Joe"))
    assert (old.kind, old.mark, old.box, old.sub_label) == ("update", 12.5, None, "Joe")  # 0.13: no snapshot box
    bare = parse_event(json.dumps({"type": "end", "after": {"id": "e1", "camera": "c", "label": "person"}}))
    assert (bare.mark, bare.box, bare.top_score, bare.has_snapshot, bare.false_positive) == (None, None, None, False, False)


@pytest.mark.parametrize("payload, error", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (json.dumps({"type": "begin", "after": {}}), "type: expected one of new, update, end"),
    (json.dumps({"type": "new"}), "after: expected the tracked object"),
    (frigate_message(id="../../api/restart"), "after.id"),  # becomes a URL path: Frigate's ids only
    (frigate_message(camera="front/door"), "after.camera"),  # becomes a topic level
    (frigate_message(camera=None), "after.camera"),
    (frigate_message(top_score="high"), "after.top_score: expected a number"),
    (frigate_message(top_score=True), "after.top_score: expected a number"),
    (frigate_message(box=[5, 5, 1, 1]), "after.snapshot.box: expected x1 < x2"),
    (frigate_message(box=[1, 2, 3]), r"after.snapshot.box: expected \[x1, y1, x2, y2\]"),
    (frigate_message(sub_label=7), "after.sub_label"),
    (frigate_message(snapshot="yes"), "after.snapshot: expected an object"),
])
def test_parse_rejects_what_is_not_a_frigate_event(payload: bytes | str, error: str) -> None:
    with pytest.raises(EventError, match=error):
        parse_event(payload)


# ------------------------------------------------------------------ decisions
E1, E2 = "1700000000.1-aaaaaa", "1700000000.2-bbbbbb"

# (message, verdict): one event tracker fed in order (cameras: front_door, back_yard)
SEQUENCE = [
    (frigate_message("new", E1, frame_time=1.0), Verdict.ANALYSE),
    (frigate_message("update", E1, frame_time=1.0, current_zones=["porch"]), Verdict.SAME_SNAPSHOT),  # zone change
    (frigate_message("update", E1, frame_time=1.0, sub_label=["Barack Obama", 0.77]), Verdict.SAME_SNAPSHOT),  # ours
    (frigate_message("update", E1, frame_time=2.0), Verdict.ANALYSE),  # a better snapshot
    (frigate_message("update", E1, frame_time=2.0), Verdict.SAME_SNAPSHOT),  # a repeat
    (frigate_message("end", E1, frame_time=2.0), Verdict.SAME_SNAPSHOT),  # ends on the snapshot analysed
    (frigate_message("new", E2, label="car"), Verdict.OTHER_LABEL),
    (frigate_message("new", E2, camera="garage"), Verdict.OTHER_CAMERA),
    (frigate_message("new", E2, false_positive=True), Verdict.FALSE_POSITIVE),
    (frigate_message("update", E2, camera="back_yard", frame_time=5.0), Verdict.ANALYSE),  # started late: first seen
    (frigate_message("end", "1700000000.3-cccccc", has_snapshot=True), Verdict.ANALYSE),  # only its end was seen
    (frigate_message("end", "1700000000.4-dddddd", has_snapshot=False), Verdict.NO_SNAPSHOT),  # nothing to fetch
    (frigate_message("new", "1700000000.5-eeeeee", frame_time=None, top_score=0.7), Verdict.ANALYSE),
    (frigate_message("update", "1700000000.5-eeeeee", frame_time=None, top_score=0.7), Verdict.SAME_SNAPSHOT),
    (frigate_message("update", "1700000000.5-eeeeee", frame_time=None, top_score=0.9), Verdict.ANALYSE),  # no mark: score
    (frigate_message("update", "1700000000.6-ffffff", old_schema=True, frame_time=3.0), Verdict.ANALYSE),
    (frigate_message("update", "1700000000.6-ffffff", old_schema=True, frame_time=3.0), Verdict.SAME_SNAPSHOT),
    (frigate_message("update", "1700000000.6-ffffff", old_schema=True, frame_time=4.0), Verdict.ANALYSE),
]


def test_which_messages_are_analysed() -> None:
    tracker = EventTracker(cameras=("front_door", "back_yard"))
    got = [tracker.decide(parse_event(msg)) for msg, _ in SEQUENCE]
    assert got == [verdict for _, verdict in SEQUENCE]
    assert tracker.phase(E1) is Phase.ANALYSING and tracker.phase(E2) is Phase.ANALYSING


def test_no_cameras_means_every_camera_and_the_tracker_forgets_the_oldest() -> None:
    tracker = EventTracker(keep=2)
    for i in range(3):
        assert tracker.decide(parse_event(frigate_message("new", f"e{i}", camera=f"cam{i}"))) is Verdict.ANALYSE
    assert len(tracker) == 2 and tracker.phase("e0") is None
    assert tracker.decide(parse_event(frigate_message("new", "e0"))) is Verdict.ANALYSE  # forgotten: analysed again


def face(x: float, identity: str | None, similarity: float, quality: str | None = None) -> dict:
    return {"bbox": [x, 100.0, x + 80, 200.0], "identity": identity, "similarity": similarity, "quality": quality}


OBAMA, BIDEN = "Barack Obama", "Joe Biden"


@pytest.mark.parametrize("faces, box, expected", [
    ([], None, (Outcome.NO_FACE, None, None)),
    ([face(0, OBAMA, 0.77)], None, (Outcome.MATCH, OBAMA, 0.77)),
    ([face(0, None, 0.21)], None, (Outcome.UNKNOWN, None, None)),  # never the nearest name
    ([face(0, OBAMA, 0.6), face(200, OBAMA, 0.7)], None, (Outcome.MATCH, OBAMA, 0.7)),
    ([face(0, OBAMA, 0.77), face(200, BIDEN, 0.8)], None, (Outcome.AMBIGUOUS, None, None)),
    ([face(0, OBAMA, 0.77), face(200, None, 0.1)], None, (Outcome.AMBIGUOUS, None, None)),  # whose face is it?
    ([face(0, OBAMA, 0.77), face(200, None, 0.1)], (0, 0, 150, 400), (Outcome.MATCH, OBAMA, 0.77)),  # the box decides
    ([face(0, OBAMA, 0.77), face(200, None, 0.1)], (150, 0, 400, 400), (Outcome.UNKNOWN, None, None)),
    ([face(0, OBAMA, 0.77)], (500, 0, 900, 400), (Outcome.NO_FACE, None, None)),  # a bystander's face only
    ([face(0, None, 0.77, "pose"), face(200, None, 0.1, "blurry")], None, (Outcome.NO_FACE, None, None)),  # gated out
    ([face(0, None, 0.5, "blurry"), face(200, BIDEN, 0.6)], None, (Outcome.MATCH, BIDEN, 0.6)),
])
def test_who_the_events_person_is(faces: list[dict], box: tuple | None, expected: tuple) -> None:
    assert attribute(faces, box) == expected


def _named(tracker: EventTracker, outcome: Outcome, name: str | None = None, sim: float | None = None):
    return tracker.named(E1, outcome, name, sim)


def test_sub_labels_are_sent_once_per_name_and_only_for_a_better_other_name() -> None:
    tracker = EventTracker()
    tracker.decide(parse_event(frigate_message("new", E1)))
    assert _named(tracker, Outcome.UNKNOWN) is None and tracker.phase(E1) is Phase.UNNAMED
    assert _named(tracker, Outcome.MATCH, OBAMA, 0.61234) == (OBAMA, 0.6123) and tracker.phase(E1) is Phase.NAMED
    assert _named(tracker, Outcome.MATCH, OBAMA, 0.9) is None  # the same name again: not re-POSTed
    assert _named(tracker, Outcome.UNKNOWN) is None and tracker.phase(E1) is Phase.NAMED  # a worse snapshot keeps it
    assert _named(tracker, Outcome.MATCH, BIDEN, 0.55) is None  # another name, less similar
    assert _named(tracker, Outcome.MATCH, BIDEN, 0.7) == (BIDEN, 0.7)
    tracker.decide(parse_event(frigate_message("update", E1, sub_label=[OBAMA, 0.61])))  # Frigate echoes our first
    assert _named(tracker, Outcome.MATCH, OBAMA, 0.95) == (OBAMA, 0.95)  # ours, not foreign: a better name replaces it
    tracker.not_sent(E1, OBAMA)  # that POST was given up
    assert tracker.phase(E1) is Phase.UNNAMED and _named(tracker, Outcome.MATCH, OBAMA, 0.8) == (OBAMA, 0.8)


def test_a_sub_label_set_by_someone_else_is_left_alone_and_long_names_are_not_sent() -> None:
    tracker = EventTracker()
    tracker.decide(parse_event(frigate_message("new", E1, sub_label="Grandma")))  # set by hand in Frigate's UI
    assert _named(tracker, Outcome.MATCH, OBAMA, 0.9) is None
    tracker.decide(parse_event(frigate_message("new", E2)))
    assert tracker.named(E2, Outcome.MATCH, "x" * 101, 0.9) is None and tracker.named(E2, Outcome.MATCH, "x" * 100, 0.9)


@pytest.mark.parametrize("similarity, score", [(0.77123, 0.7712), (1.2, 1.0), (0.0, 0.001), (-0.3, 0.001)])
def test_frigate_scores_stay_in_frigates_range(similarity: float, score: float) -> None:
    assert frigate_score(similarity) == score


@pytest.mark.parametrize("box, size, expected", [
    ((10, 20, 110, 220), (640, 480), (10, 20, 110, 220)),
    ((10, 20, 700, 220), (640, 480), None),  # an ended event's snapshot, cropped or resized: the box does not apply
    (None, (640, 480), None),
])
def test_the_person_box_applies_only_to_a_snapshot_it_fits(box: tuple | None, size: tuple, expected: tuple | None) -> None:
    assert person_box(FrigateEvent("new", "e", "c", "person", box=box), *size) == expected


def test_the_published_result_says_unknown_instead_of_a_name() -> None:
    ev = parse_event(frigate_message("new", E1, box=[0, 0, 150, 400]))
    faces = [face(0, None, 0.31), face(200, OBAMA, 0.8)]
    outcome, name, sim = attribute(faces, ev.box)
    doc = result_message(ev, faces, ev.box, outcome, name, sim, "box-1", 1700000000.123456)
    assert doc == {"frigate_event_id": E1, "camera": "front_door", "label": "person", "type": "new",
                   "snapshot_time": 1607123961.8, "box": [0.0, 0.0, 150.0, 400.0], "result": "unknown", "identity": None,
                   "similarity": None, "faces": [dict(faces[0], in_box=True), dict(faces[1], in_box=False)],
                   "box_id": "box-1", "time": 1700000000.123}


# ------------------------------------------------------------------ retrying
@pytest.mark.parametrize("attempt, delay, gives_up", [(1, 0.5, False), (2, 1.0, False), (3, 2.0, False),
                                                      (4, 3.0, False), (5, 3.0, True)])
def test_backoff_doubles_up_to_its_cap(attempt: int, delay: float, gives_up: bool) -> None:
    b = Backoff(0.5, 3.0, retries=4)
    assert (b.delay(attempt), b.gives_up(attempt)) == (delay, gives_up)


def test_work_queue_supersedes_drops_the_oldest_and_hands_out_what_is_due() -> None:
    q: WorkQueue[str] = WorkQueue(3)
    assert q.put("a", "a1", due=0.0) == (None, None)
    assert q.put("b", "b1", due=5.0) == (None, None)
    assert q.put("a", "a2", due=1.0) == ("a1", None)  # a newer snapshot of the same event
    assert q.put("c", "c1", due=0.5) == (None, None)
    assert q.put("d", "d1", due=0.0) == (None, "b1")  # full: the oldest queued goes
    assert len(q) == 3 and "b" not in q and q.next_due() == 0.0
    assert [q.pop_due(0.7), q.pop_due(0.7), q.pop_due(0.7)] == [("d", "d1"), ("c", "c1"), None]
    assert q.pop_due(1.0) == ("a", "a2") and q.next_due() is None and q.pop_due(99) is None
    with pytest.raises(ValueError, match="capacity"):
        WorkQueue(0)


# ------------------------------------------------------------------ config
BASE = {"cameras": [], "detection": {"detector": {"path": "d.onnx", "layout": "yolox"}},
        "recognition": {"face": {"detector": {"path": "f.onnx"}, "embedder": {"path": "e.onnx"}}}}


@pytest.mark.parametrize("change, error", [
    ({"frigate": {"url": "http://frigate:5000"}}, "frigate: needs the mqtt section"),
    ({"mqtt": {}}, "cameras: at least one camera is needed"),
    ({"mqtt": {}, "frigate": {"url": "frigate:5000"}}, "frigate.url: .*expected http"),
    ({"mqtt": {}, "frigate": {"url": "ftp://frigate"}}, "frigate.url: .*expected http"),
    ({"mqtt": {}, "frigate": {"url": "http://admin:pw@frigate:5000"}}, "frigate.url: .*no credentials"),
    ({"mqtt": {}, "frigate": {"url": "http://frigate:5000?x=1"}}, "frigate.url: .*no credentials, query"),
    ({"mqtt": {}, "frigate": {"url": "http://frigate:99999"}}, "frigate.url: .*not a URL"),
    ({"mqtt": {}, "frigate": {"url": "http://f", "cameras": ["front door"]}}, "frigate.cameras: .*'front door'"),
    ({"mqtt": {}, "frigate": {"url": "http://f", "timeout_s": 0}}, "frigate.timeout_s"),
    ({"mqtt": {}, "frigate": {"url": "http://f", "timeout_s": 600}}, "frigate.timeout_s"),
    ({"mqtt": {}, "frigate": {"url": "http://f", "retry_min_s": 5, "retry_max_s": 1}}, "retry_max_s .* >= retry_min_s"),
    ({"mqtt": {}, "frigate": {"url": "http://f", "queue": 0}}, "frigate.queue"),
    ({"mqtt": {}, "frigate": {"url": "http://f", "mqtt_prefix": "frigate/#"}}, "frigate.mqtt_prefix"),
    ({"mqtt": {}, "frigate": {"url": "http://f", "sub_label": True}}, "frigate.sub_label: Extra inputs"),
    ({"mqtt": {"topic_prefix": "frigate"}, "frigate": {"url": "http://f"}}, "both 'frigate'.*another topic_prefix"),
])
def test_frigate_config_errors_name_the_key(change: dict, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config({**BASE, **change})


def test_a_companion_only_config() -> None:
    cfg = parse_config({**BASE, "mqtt": {}, "frigate": {"url": "https://nvr.lan/frigate/", "cameras": ["front_door"]}})
    f = cfg.frigate
    assert f is not None and cfg.cameras == () and f.url == "https://nvr.lan/frigate"  # no trailing slash
    assert (f.mqtt_prefix, f.cameras, f.timeout_s, f.retries, f.queue) == ("frigate", ("front_door",), 5.0, 4, 32)
