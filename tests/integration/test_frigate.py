"""Frigate companion mode end to end: ``facepro run`` with a companion-only config (no cameras) against a
stand-in Frigate (an HTTP server in this test that serves the asset face photos as event snapshots and records
the sub_label POSTs; some requests answered 500 or too slowly) and real ``frigate/events`` messages in Frigate's
documented shape published on a private Mosquitto.

The enrolled person's events get his sub_label with a score; the unknown faces' events (six strangers, Biden,
and Biden's person box in a photo where Obama stands beside him) get none and are published as unknown;
500s and a timeout are retried with backoff and counted in ``facepro status``; nothing else runs (no capture,
detection, recognition or storage process). Also :class:`pipeline.companion.FrigateApi` alone against the
stand-in and a closed port: which failures are retried, and the one line each gives.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.conftest import facepro, finish_run, pipeline_config, save_config, start_run, wait_status
from tests.mqtt_broker import Broker, Recorder, free_port, wait_until
from tests.unit.test_frigate import frigate_message

OBAMA = "Barack Obama"
SLOW_S = 2.5  # the stand-in's slow answer; the companion's frigate.timeout_s is 1 s


class StandInFrigate:
    """Frigate's two endpoints the companion uses, on 127.0.0.1:<free port>.

    ``GET /api/events/<id>/snapshot.jpg`` answers the bytes of ``snapshots[id]`` (404 for an unknown id), after
    the failures scripted in ``script[id]`` (``"500"``: a server error; ``"slow"``: the image after
    :data:`SLOW_S`), one per request. ``POST /api/events/<id>/sub_label`` records the JSON body and answers
    Frigate's ``{"success": true, ...}``.
    """

    def __init__(self, snapshots: dict[str, Path]) -> None:
        self.snapshots = {k: p.read_bytes() for k, p in snapshots.items()}
        self.script: dict[str, list[str]] = {}
        self.gets: list[tuple[str, str]] = []  # (event id, query)
        self.posts: list[tuple[str, dict, str]] = []  # (event id, body, content type)
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"frigate": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def got(self, event_id: str) -> int:
        with self.lock:
            return sum(1 for e, _ in self.gets if e == event_id)

    def posted(self) -> dict[str, list[dict]]:
        with self.lock:
            out: dict[str, list[dict]] = {}
            for e, body, _ in self.posts:
                out.setdefault(e, []).append(body)
            return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    frigate: StandInFrigate

    def log_message(self, *args: object) -> None:
        pass

    def _event(self, suffix: str) -> str | None:
        path, _, _ = self.path.partition("?")
        parts = path.split("/")
        if len(parts) == 5 and parts[:3] == ["", "api", "events"] and parts[4] == suffix:
            return parts[3]
        return None

    def _answer(self, code: int, body: bytes, kind: str) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the companion gave up waiting (the slow mode)
            pass

    def do_GET(self) -> None:
        f = self.frigate
        event = self._event("snapshot.jpg")
        with f.lock:
            if event is not None:
                f.gets.append((event, self.path.partition("?")[2]))
            step = f.script.get(event, []).pop(0) if f.script.get(event) else None
        if event is None or event not in f.snapshots:
            return self._answer(404, b'{"success": false, "message": "Event not found"}', "application/json")
        if step == "500":
            return self._answer(500, b'{"success": false}', "application/json")
        if step == "slow":
            time.sleep(SLOW_S)
        self._answer(200, f.snapshots[event], "image/jpeg")

    def do_POST(self) -> None:
        f = self.frigate
        event = self._event("sub_label")
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
        if event is None or event not in f.snapshots:
            return self._answer(404, b'{"success": false}', "application/json")
        with f.lock:
            f.posts.append((event, body, self.headers.get("Content-Type", "")))
        self._answer(200, json.dumps({"success": True, "message": f"Event {event} sub label set to {body.get('subLabel')}"}).encode(),
                     "application/json")


def ev_id(n: int, tag: str) -> str:
    return f"17000001{n:02d}.000001-{tag}"


def _publisher(port: int):
    from paho.mqtt.client import CallbackAPIVersion, Client

    client = Client(CallbackAPIVersion.VERSION2, client_id=f"frigate-standin-{uuid.uuid4().hex[:6]}")
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    return client


def _frigate_counts(doc: dict) -> dict:
    (stage,) = [s for s in doc["stages"] if s["stage"] == "frigate"]
    return stage["counts"]


def test_the_enrolled_persons_events_get_his_sub_label_and_unknown_faces_none(
        models: Path, faces: Path, short_data_dir: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    photos = {  # event → the snapshot the stand-in serves, and its person box (None: the whole photo)
        "obama": (faces / "obama/obama2.jpg", None),
        "strangers": (faces / "_multi/t1.jpg", None),
        "biden": (faces / "biden/biden2.jpg", None),
        "beside_biden": (faces / "_multi/obama_and_biden.jpg", [600, 200, 1100, 1428]),  # Biden's person box
        "beside_obama": (faces / "_multi/obama_and_biden.jpg", [1050, 200, 1450, 1428]),  # Obama's person box
        "flaky": (faces / "obama/obama3.jpg", None),  # two 500s first
        "slow": (faces / "obama/obama1.jpg", None),  # the first answer comes after the timeout
        "car": (faces / "obama/obama.jpg", None),
        "garage": (faces / "obama/obama.jpg", None),
    }
    ids = {name: ev_id(i, name.replace("_", "-")) for i, name in enumerate(photos)}
    frigate = StandInFrigate({ids[n]: p for n, (p, _) in photos.items()})
    frigate.script = {ids["flaky"]: ["500", "500"], ids["slow"]: ["slow"]}
    broker = Broker(short_data_dir / "broker").start()
    prefix = f"fpf-{tag}"
    tree = pipeline_config(models, {})  # cameras: [] (a companion-only box)
    tree.update(box_id=f"box-{tag}", mqtt={"url": broker.url, "topic_prefix": prefix, "discovery": False,
                                           "reconnect_min_s": 0.2, "reconnect_max_s": 1},
                frigate={"url": frigate.url, "cameras": ["front_door", "back_yard"], "timeout_s": 1, "retries": 4,
                         "retry_min_s": 0.3, "retry_max_s": 1.0})
    cfg = save_config(tree, short_data_dir / "frigate.yaml")
    res = facepro("enroll", "--config", str(cfg), OBAMA, str(faces / "obama/obama.jpg"), timeout=120)
    assert res.returncode == 0, res.stderr
    rec = Recorder(broker.port, (f"{prefix}/frigate/#",))
    pub = _publisher(broker.port)
    proc, ok = start_run(cfg), False
    try:
        doc = wait_status(proc, 120, lambda d: _frigate_counts(d).get("ready") == 1
                          and _frigate_counts(d).get("frigate_mqtt_connected") == 1)
        assert [s["stage"] for s in doc["stages"]] == ["mqtt", "frigate"]  # a companion-only box: nothing else runs

        def send(name: str, kind: str = "new", frame_time: float = 1.0, **after: object) -> None:
            camera = after.pop("camera", "back_yard" if name == "strangers" else "front_door")
            msg = frigate_message(kind, ids[name], camera=camera, frame_time=frame_time, box=photos[name][1] or
                                  [0, 0, 10_000, 10_000], **after)
            pub.publish("frigate/events", msg, qos=1).wait_for_publish(5)

        for name in ("obama", "strangers", "biden", "beside_biden", "beside_obama", "flaky", "slow"):
            send(name)
        send("car", label="car")
        send("garage", camera="garage")
        send("obama", "update", current_zones=["porch"])  # a zone change: same snapshot, not fetched again
        wait_until(lambda: len(frigate.posted()) == 4, 90, "the sub_labels of the four events showing Obama")
        send("obama", "update", frame_time=2.0)  # a better snapshot: fetched and analysed again, no second POST
        wait_until(lambda: frigate.got(ids["obama"]) == 2 and len(rec.all()) >= 8, 60, "the better snapshot analysed")
        doc = wait_status(proc, 30, lambda d: _frigate_counts(d)["frigate_queued"] == 0
                          and _frigate_counts(d)["frigate_published"] == 8)
        ok = True
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            if ok:
                summary = finish_run(proc, short_data_dir, timeout_s=90)
            else:  # show the run's log with the failure
                print(proc.communicate(timeout=90)[0][-6000:])
        finally:
            rec.close()
            pub.disconnect()
            pub.loop_stop()
            broker.stop()
            frigate.close()

    posted = frigate.posted()
    assert set(posted) == {ids[n] for n in ("obama", "beside_obama", "flaky", "slow")}  # one POST each, no repeat
    for event, bodies in posted.items():
        (body,) = bodies
        assert set(body) == {"subLabel", "subLabelScore"} and body["subLabel"] == OBAMA
        assert 0.6 < body["subLabelScore"] <= 1.0, (event, body)  # same person across photos: cosine 0.75-0.81
    assert all(kind == "application/json" for _, _, kind in frigate.posts)

    assert frigate.got(ids["car"]) == frigate.got(ids["garage"]) == 0  # not a person / not a served camera
    assert frigate.got(ids["flaky"]) == 3 and frigate.got(ids["slow"]) == 2  # retried after the 500s / the timeout
    assert all(q == "bbox=0&timestamp=0&crop=0" for _, q in frigate.gets)

    results = {}
    for m in rec.all():
        results.setdefault(m.json()["frigate_event_id"], []).append((m.topic, m.json()))
    for name in ("strangers", "biden", "beside_biden"):  # unknown: published as unknown, never a name
        ((topic, msg),) = results[ids[name]]
        assert topic == f"{prefix}/frigate/{'back_yard' if name == 'strangers' else 'front_door'}"
        assert (msg["result"], msg["identity"], msg["similarity"]) == ("unknown", None, None), msg
        assert msg["box_id"] == f"box-{tag}"
    strangers = results[ids["strangers"]][0][1]["faces"]
    assert len(strangers) == 6 and all(f["identity"] is None for f in strangers)  # six faces, none enrolled
    beside = results[ids["beside_biden"]][0][1]
    assert [f["identity"] for f in beside["faces"] if f["in_box"]] == [None]  # Biden's face decides, not Obama's
    assert OBAMA in [f["identity"] for f in beside["faces"] if not f["in_box"]]
    for name in ("beside_obama", "flaky", "slow"):
        ((_, msg),) = results[ids[name]]
        assert (msg["result"], msg["identity"]) == ("match", OBAMA) and msg["similarity"] > 0.6
    assert [m["result"] for _, m in results[ids["obama"]]] == ["match", "match"]

    (row,) = [s for s in doc["stages"] if s["stage"] == "frigate"]
    assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]  # per analysed snapshot: fetch + naming
    print(f"frigate: {row['latency_p50_ms']} ms p50, {row['latency_p99_ms']} ms p99 per snapshot (fetch + naming)")
    c = _frigate_counts(doc)
    assert (c["frigate_sub_labels"], c["frigate_matches"], c["frigate_unknown"], c["frigate_given_up"]) == (4, 5, 3, 0)
    assert c["frigate_http_errors"] == 3 and c["frigate_retries"] == 3  # two 500s, one timeout
    assert c["frigate_events_seen"] == 11 and c["frigate_snapshots_fetched"] == 8 and c["frigate_up"] == 1
    assert list(summary["stages"]) == ["mqtt", "frigate"] and summary["stages"]["frigate"]["frames_out"] == 8


def test_frigate_api_retries_only_what_may_help(tmp_path: Path, faces: Path) -> None:
    from pipeline.companion import FrigateApi, HttpFailure

    frigate = StandInFrigate({"e1": faces / "obama/obama2.jpg"})
    frigate.script = {"e1": ["500", "slow"]}
    api = FrigateApi(frigate.url, timeout_s=1.0)
    try:
        cases = []
        for call in (lambda: api.snapshot("e1"), lambda: api.snapshot("e1"), lambda: api.snapshot("nope"),
                     lambda: FrigateApi(f"http://127.0.0.1:{free_port()}", 1.0).snapshot("e1")):
            with pytest.raises(HttpFailure) as err:
                call()
            cases.append((err.value.status, err.value.retryable, err.value.line))
        assert api.snapshot("e1") == (faces / "obama/obama2.jpg").read_bytes()
        api.set_sub_label("e1", OBAMA, 0.7712)
        small = FrigateApi(frigate.url, timeout_s=1.0, max_bytes=1000)
        with pytest.raises(HttpFailure, match="answer over 1000 bytes; not retried"):
            small.snapshot("e1")
    finally:
        frigate.close()
    (s500, r500, l500), (s_slow, r_slow, l_slow), (s404, r404, l404), (s_down, r_down, l_down) = cases
    assert (s500, r500) == (500, True) and l500.endswith("GET /api/events/e1/snapshot.jpg answered 500 Internal Server Error")
    assert (s_slow, r_slow) == (None, True) and "no answer within 1 s (frigate.timeout_s)" in l_slow
    assert (s404, r404) == (404, True)  # Frigate may not have written the event yet
    assert (s_down, r_down) == (None, True) and "unreachable" in l_down and "check frigate.url" in l_down
    assert frigate.posts == [("e1", {"subLabel": OBAMA, "subLabelScore": 0.7712}, "application/json")]
