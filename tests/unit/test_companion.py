"""The Frigate companion's wiring (:class:`pipeline.companion.FrigateCompanion`) with a fake paho client and a
fake Frigate, each made to prove one property: what is fetched, published and sent back, how failures are
retried and counted, and that a slow Frigate never holds the MQTT loop. The real broker and HTTP path:
tests/integration/test_frigate.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.companion import CompanionSettings, FrigateCompanion, HttpFailure
from pipeline.discovery import Topics
from pipeline.frigate import Backoff, Phase
from tests.unit.test_frigate import E1, E2, OBAMA, frigate_message

#: Snapshot width → the faces the fake recognizer finds (one face box at x 100..180, y 100..200).
FACES = {100: [(OBAMA, 0.77)], 120: [(None, 0.21)], 140: [], 160: [(OBAMA, 0.91)]}


def jpeg(width: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((300, width, 3), 90, np.uint8))
    assert ok
    return buf.tobytes()


def recognize(image: np.ndarray) -> dict:
    return {"faces": [{"bbox": [10.0, 100.0, 60.0, 200.0], "identity": name, "similarity": sim, "quality": None}
                      for name, sim in FACES[image.shape[1]]]}


class FakeClient:
    """What the companion uses of a paho client; ``connect`` / ``deliver`` play paho's network thread."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict, int, bool]] = []
        self.subscribed: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def connect_async(self, host: str, port: int, keepalive: int) -> None:
        self.address = (host, port, keepalive)

    def loop_start(self) -> None: ...
    def loop_stop(self) -> None: ...
    def disconnect(self) -> None: ...

    def subscribe(self, topic: str, qos: int) -> None:
        self.subscribed.append((topic, qos))

    def publish(self, topic: str, payload: str, qos: int, retain: bool, props: Any) -> Any:
        import json

        with self.lock:
            self.published.append((topic, json.loads(payload), qos, retain))
        return SimpleNamespace(rc=0)

    def connect(self) -> None:
        self.on_connect(self, None, None, SimpleNamespace(is_failure=False), None)

    def deliver(self, payload: bytes) -> None:
        self.on_message(self, None, SimpleNamespace(topic="frigate/events", payload=payload))


class FakeFrigate:
    """Snapshots by event id; ``failures[(kind, id)]``: errors raised first, one per request."""

    def __init__(self, snapshots: dict[str, bytes]) -> None:
        self.snapshots, self.failures = snapshots, {}
        self.gets: list[str] = []
        self.posts: list[tuple[str, str, float]] = []
        self.hold: threading.Event | None = None  # set: requests wait for it

    def _fail(self, kind: str, event_id: str) -> None:
        if self.hold is not None:
            self.hold.wait(10)
        errors = self.failures.get((kind, event_id))
        if errors:
            raise errors.pop(0)

    def snapshot(self, event_id: str) -> bytes:
        self.gets.append(event_id)
        self._fail("snapshot", event_id)
        return self.snapshots[event_id]

    def set_sub_label(self, event_id: str, name: str, score: float) -> None:
        self._fail("sub_label", event_id)
        self.posts.append((event_id, name, score))


SERVER_ERROR = HttpFailure("Frigate http://f: GET /api/events/x/snapshot.jpg answered 500 Internal Server Error", 500, True)
TIMEOUT = HttpFailure("Frigate http://f: POST /api/events/x/sub_label: no answer within 1 s", None, True)
UNAUTHORIZED = HttpFailure("Frigate http://f: POST /api/events/x/sub_label answered 401 Unauthorized; not retried", 401, False)


def settings(capacity: int = 32, retries: int = 3, cameras: tuple[str, ...] = ()) -> CompanionSettings:
    return CompanionSettings("frigate/events", Topics("facepro", "homeassistant", "box-1"), 1, cameras,
                             Backoff(0.01, 0.04, retries), capacity, "127.0.0.1", 1883, 30, "mqtt://127.0.0.1:1883")


@pytest.fixture()
def rig():
    made: list[FrigateCompanion] = []

    def build(snapshots: dict[str, bytes], **kw: Any) -> tuple[FrigateCompanion, FakeClient, FakeFrigate]:
        client, api = FakeClient(), FakeFrigate(snapshots)
        comp = FrigateCompanion(client, api, recognize, settings(**kw), wall=lambda: 1700000000.0)
        comp.start()
        client.connect()
        comp.step()
        made.append(comp)
        return comp, client, api

    yield build
    for comp in made:
        comp.stop(join_s=2)


def settle(comp: FrigateCompanion, until, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        comp.step()
        assert time.monotonic() < deadline, f"not settled: {comp.snapshot_counts()} {comp.gauges()}"
        time.sleep(0.005)


def idle(comp: FrigateCompanion) -> bool:
    return comp.gauges()["frigate_queued"] == 0


def test_a_match_is_published_and_sent_back_once(rig) -> None:
    comp, client, api = rig({E1: jpeg(100)})
    assert client.subscribed == [("frigate/events", 1)] and comp.gauges()["frigate_mqtt_connected"] == 1
    client.deliver(frigate_message("new", E1, frame_time=1.0))
    settle(comp, lambda: api.posts)
    client.deliver(frigate_message("update", E1, frame_time=1.0, current_zones=["porch"]))  # zone change: nothing new
    client.deliver(frigate_message("update", E1, frame_time=1.0, sub_label=[OBAMA, 0.77]))  # our sub_label's echo
    api.snapshots[E1] = jpeg(160)
    client.deliver(frigate_message("update", E1, frame_time=2.0))  # a better snapshot: analysed, same name: no POST
    settle(comp, lambda: comp.snapshot_counts()["frigate_snapshots_fetched"] == 2 and idle(comp))
    assert api.gets == [E1, E1] and api.posts == [(E1, OBAMA, 0.77)]
    docs = [doc for topic, doc, qos, retain in client.published if topic == "facepro/frigate/front_door" and not retain]
    assert [(d["frigate_event_id"], d["result"], d["identity"], d["similarity"]) for d in docs] == [
        (E1, "match", OBAMA, 0.77), (E1, "match", OBAMA, 0.91)]
    c = comp.snapshot_counts()
    assert (c["frigate_events_seen"], c["frigate_snapshots_queued"], c["frigate_matches"], c["frigate_sub_labels"],
            c["frigate_published"], c["frigate_http_errors"]) == (4, 2, 2, 1, 2, 0)
    assert comp.gauges() == {"frigate_mqtt_connected": 1, "frigate_up": 1, "frigate_queued": 0}


@pytest.mark.parametrize("width, result", [(120, "unknown"), (140, "no_face")])
def test_unknown_faces_get_no_sub_label(rig, width: int, result: str) -> None:
    comp, client, api = rig({E2: jpeg(width)})
    client.deliver(frigate_message("new", E2))
    settle(comp, lambda: comp.snapshot_counts()["frigate_published"] == 1)
    (topic, doc, _, _), = client.published
    assert topic == "facepro/frigate/front_door" and (doc["result"], doc["identity"]) == (result, None)
    assert api.posts == [] and comp.snapshot_counts()[f"frigate_{result}"] == 1
    assert all(f["identity"] is None for f in doc["faces"]) and comp.tracker.phase(E2) is Phase.UNNAMED


def test_failures_are_retried_with_backoff_and_counted(rig, caplog: pytest.LogCaptureFixture) -> None:
    comp, client, api = rig({E1: jpeg(100), E2: jpeg(100)})
    api.failures = {("snapshot", E1): [SERVER_ERROR, SERVER_ERROR], ("sub_label", E1): [TIMEOUT],
                    ("sub_label", E2): [UNAUTHORIZED]}
    client.deliver(frigate_message("new", E1))
    client.deliver(frigate_message("new", E2))
    settle(comp, lambda: api.posts and comp.snapshot_counts()["frigate_given_up"] == 1 and idle(comp))
    assert api.gets.count(E1) == 3 and api.posts == [(E1, OBAMA, 0.77)]  # the POST retried alone, no new fetch
    c = comp.snapshot_counts()
    assert (c["frigate_http_errors"], c["frigate_retries"], c["frigate_given_up"], c["frigate_sub_labels"]) == (4, 3, 1, 1)
    assert comp.tracker.phase(E2) is Phase.UNNAMED  # the 401 was given up at once: a later snapshot may name it
    lines = [r.getMessage() for r in caplog.records if r.name == "facepro.frigate"]
    assert any("answered 500" in line and "retry 1 of 3 in 0.01 s" in line for line in lines)
    assert any("401 Unauthorized; not retried" in line and "given up" in line for line in lines)
    assert comp.last_error == "" and comp.gauges()["frigate_up"] == 1  # Frigate answers again: the fault is over


def test_an_unreachable_frigate_is_given_up_after_the_retries(rig) -> None:
    comp, client, api = rig({E1: jpeg(100)}, retries=2)
    down = HttpFailure("Frigate http://f: GET /api/events/x/snapshot.jpg: unreachable (Connection refused)", None, True)
    api.failures = {("snapshot", E1): [down] * 10}
    client.deliver(frigate_message("new", E1))
    settle(comp, lambda: comp.snapshot_counts()["frigate_given_up"] == 1 and idle(comp))
    assert api.gets == [E1] * 3 and client.published == [] and api.posts == []
    c = comp.snapshot_counts()
    assert (c["frigate_http_errors"], c["frigate_retries"]) == (3, 2) and comp.gauges()["frigate_up"] == 0
    assert "unreachable" in comp.last_error and "given up" in comp.last_error


def test_a_stuck_frigate_never_holds_the_mqtt_loop_and_the_queue_stays_bounded(rig) -> None:
    ids = [f"1700000001.{i}-ev" for i in range(12)]
    comp, client, api = rig({i: jpeg(120) for i in ids}, capacity=4)
    api.hold = threading.Event()  # every request hangs until released
    client.deliver(frigate_message("new", ids[0]))
    settle(comp, lambda: api.gets == ids[:1])  # the worker is stuck in the first request
    t0 = time.perf_counter()
    for i in ids[1:]:
        client.deliver(frigate_message("new", i))
    comp.step()
    assert time.perf_counter() - t0 < 0.5  # the loop handled 11 messages while Frigate hangs
    c, g = comp.snapshot_counts(), comp.gauges()
    assert (c["frigate_snapshots_queued"], c["frigate_dropped"], g["frigate_queued"]) == (12, 7, 5)  # 4 queued + 1 stuck
    api.hold.set()
    settle(comp, lambda: idle(comp))
    assert api.gets == ids[:1] + ids[-4:]  # the oldest waiting were dropped, the newest analysed


def test_invalid_messages_are_counted_and_stop_abandons_what_waits(rig) -> None:
    comp, client, api = rig({E1: jpeg(120), E2: jpeg(120)})
    client.deliver(b"{\"type\": \"new\", \"after\": {\"id\": \"../x\"}}")
    api.hold = threading.Event()
    client.deliver(frigate_message("new", E1))
    client.deliver(frigate_message("new", E2))
    settle(comp, lambda: api.gets == [E1])
    assert comp.snapshot_counts()["frigate_events_invalid"] == 1 and "after.id" in comp.last_error
    api.hold.set()
    comp.stop(join_s=2)
    assert comp.snapshot_counts()["frigate_abandoned"] in (0, 1)  # E2, unless the worker took it before the stop
    assert api.gets[0] == E1 and comp.connected is False


def test_other_cameras_are_not_served(rig) -> None:
    comp, client, api = rig({E1: jpeg(100)}, cameras=("back_yard",))
    client.deliver(frigate_message("new", E1, camera="front_door"))
    comp.step()
    time.sleep(0.05)
    assert api.gets == [] and comp.snapshot_counts()["frigate_events_seen"] == 1


class Refused:
    is_failure = True

    def __str__(self) -> str:
        return "Not authorized"


def test_broker_faults_are_one_line_until_the_connection_is_back(rig) -> None:
    comp, client, api = rig({})
    client.on_disconnect(client, None, None, "Unspecified error", None)
    comp.step()
    assert comp.gauges()["frigate_mqtt_connected"] == 0
    assert comp.last_error == "connection to mqtt://127.0.0.1:1883 lost (Unspecified error); reconnecting"
    client.on_connect(client, None, None, Refused(), None)
    comp.step()
    assert comp.last_error.startswith("broker mqtt://127.0.0.1:1883 refused the connection: Not authorized; retrying")
    assert client.subscribed == [("frigate/events", 1)]  # no subscription on a refused connection
    client.connect()
    comp.step()
    assert comp.gauges()["frigate_mqtt_connected"] == 1 and comp.last_error == ""
    assert client.subscribed == [("frigate/events", 1)] * 2  # subscribed again on the new connection
