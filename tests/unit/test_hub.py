"""The fleet hub without a broker: message checks, the merge of one event's messages in any order, batch or
not (real SQLite and PostgreSQL), a box's outbox payloads stored as the box's own rows, the subscriber's
acknowledgements after the commit (a stand-in paho client), the hub's options, and ``/api/events?box=``."""

from __future__ import annotations

import argparse
import itertools
import json
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from sqlalchemy import Engine, text

from pipeline.hub import HubSettings, HubSubscriber
from pipeline.mqtt import BrokerSettings
from storage.db import StorageError, open_engine, upgrade
from storage.hub import HubMerge, HubStore, MessageError, WriteResult, parse_message
from storage.queries import enroll, get_event, list_events
from storage.writer import EventWriter
from tests.unit.test_storage import T0, pg_url, update  # noqa: F401  (pg_url: fixture)

START = 1_700_000_000.123456


def payload(kind: str, event: str, seq: int, *, box: str = "box-a", camera: str = "room", identity: str | None = None,
            end: float | None = None, score: float = 0.8, snapshot: bool = False, last: int = 10,
            drop: tuple[str, ...] = (), **extra: object) -> bytes:
    """An event message as :mod:`storage.outbox` writes it."""
    after = {"id": event, "camera": camera, "label": "person", "score": score, "top_score": score,
             "start_time": START, "end_time": end if kind == "end" else None, "box": [1.5, 2.5, 30.25, 60.75],
             "identity": identity, "sub_label": [identity, 0.7] if identity else None,
             "method": "face" if identity else None, "has_snapshot": snapshot, "box_id": box, "seq": seq,
             "track_id": 7, "first_frame": 2, "last_frame": last, "identity_score": 0.7 if identity else 0.25}
    after.update(extra)
    for key in drop:
        del after[key]
    return json.dumps({"type": kind, "before": after, "after": after}).encode()


E1, E2 = "1" * 32, "2" * 32


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(url)
    eng = open_engine(url)
    yield eng
    eng.dispose()


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize("data, props, error", [
    (b"not json", (), "Invalid JSON"),
    (payload("new", "xyz", 1), (), "after.id"),
    (payload("new", E1, 0), (), "after.seq"),
    (payload("gone", E1, 1), (), "type"),
    (payload("new", E1, 1, drop=("camera",)), (), "after.camera: Field required"),
    (payload("new", E1, 1, score=1.5), (), "after.score"),
    (payload("new", E1, 1, method="typing"), (), "after.method"),
    (payload("new", E1, 1, box="a/b"), (), "after.box_id"),
    (payload("new", E1, 1, first_frame=20), (), "last_frame 10 is before first_frame 20"),
    (payload("end", E1, 2, end=None), (), "an 'end' message without after.end_time"),
    (payload("end", E1, 2, end=START - 5), (), "end_time"),
    (payload("end", E1, 2, end=START + 1, unknown="Bob"), (), "after.unknown"),  # a box's unknown-<n> only
    (payload("end", E1, 2, end=START + 1, unknown="unknown-0"), (), "after.unknown"),
    (payload("end", E1, 2, end=START + 1, unknown=f"unknown-{2**31}"), (), "after.unknown"),  # events.unknown_id: INTEGER
    (payload("end", E1, 2, end=START + 1, unknown=5), (), "after.unknown"),
    (payload("new", E1, 1), (("box_id", "box-b"),), "user property box_id 'box-b' differs from after.box_id 'box-a'"),
    (payload("new", E1, 1), (("box_id", "box-a"), ("box_id", "box-b")), "several boxes"),
    (b"{" + b" " * 70_000 + b"}", (), "more than 65536"),
])
def test_a_bad_message_is_refused_with_one_line_naming_the_field(data: bytes, props: tuple, error: str) -> None:
    with pytest.raises(MessageError, match=error.replace("(", r"\(").replace(")", r"\)")) as info:
        parse_message(data, props)
    assert "\n" not in str(info.value)


def test_a_message_gives_the_whole_row_and_older_boxes_keys_default() -> None:
    v = parse_message(payload("end", E1, 3, identity="alice", end=START + 4.5, snapshot=True), (("box_id", "box-a"),))
    assert (v.event_id, v.box_id, v.seq, v.camera, v.track_id, v.first_frame, v.last_frame) == (E1, "box-a", 3, "room", 7, 2, 10)
    assert v.started_at == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=timezone.utc)
    assert (v.ended_at - v.started_at).total_seconds() == 4.5 and v.ended
    assert (v.identity, v.method, v.identity_score, v.has_snapshot) == ("alice", "face", 0.7, True)
    old = parse_message(payload("new", E1, 1, identity="bob", drop=("track_id", "first_frame", "last_frame", "identity_score"),
                                unknown_new_key=1))
    assert (old.track_id, old.first_frame, old.last_frame, old.identity_score) == (0, 0, 0, 0.7)  # from sub_label
    assert old.ended_at == old.started_at and not old.ended  # open: the last sighting is not in the message
    assert (v.unknown_id, old.unknown_id) == (None, None)  # no unknown key (older box) or null: no anonymous id
    assert parse_message(payload("end", E1, 3, end=START + 1, unknown="unknown-17")).unknown_id == 17


# ------------------------------------------------------------ merge / upsert
def _stored(engine: Engine) -> dict[str, tuple]:
    sql = ("SELECT e.id, e.box_id, e.box_seq, c.name, i.name, e.ended, e.best_score, e.snapshot_path FROM events e "
           "JOIN cameras c ON c.id = e.camera_id LEFT JOIN identities i ON i.id = e.identity_id")
    with engine.connect() as conn:
        return {r[0]: (r[1], r[2], r[3], r[4], bool(r[5]), round(r[6], 6), r[7]) for r in conn.execute(text(sql))}


def _apply(engine: Engine, messages: list[bytes], batch: int) -> list[WriteResult]:
    store, out = HubStore(engine), []
    for i in range(0, len(messages), batch):
        merge = HubMerge()
        for m in messages[i:i + batch]:
            merge.add(m)
        out.append(store.write(merge.take()))
    return out


NEW = payload("new", E1, 1)
UPD = payload("update", E1, 2, identity="alice", score=0.9)
END = payload("end", E1, 3, identity="alice", score=0.95, end=START + 9, snapshot=True)
ENDED = ("box-a", 3, "room", "alice", True, 0.95, "box:box-a")

CASES = {
    # name: (messages, expected rows)
    "one new": ([NEW], {E1: ("box-a", 1, "room", None, False, 0.8, None)}),
    "duplicate new": ([NEW, NEW], {E1: ("box-a", 1, "room", None, False, 0.8, None)}),
    "in order": ([NEW, UPD, END], {E1: ENDED}),
    "every message twice": ([NEW, NEW, UPD, UPD, END, END], {E1: ENDED}),
    "end before new": ([END, NEW], {E1: ENDED}),
    "end, update, new": ([END, UPD, NEW], {E1: ENDED}),
    "update before new": ([UPD, NEW], {E1: ("box-a", 2, "room", "alice", False, 0.9, None)}),
    "an ended event never reopens": ([END, payload("update", E1, 4)], {E1: ENDED}),  # (no box sends this)
    "two boxes, same camera name": (
        [NEW, payload("new", E2, 1, box="box-b", score=0.6), payload("end", E2, 2, box="box-b", score=0.6, end=START + 1)],
        {E1: ("box-a", 1, "room", None, False, 0.8, None), E2: ("box-b", 2, "room", None, True, 0.6, None)}),
}


def _orders(messages: list[bytes]) -> list[list[bytes]]:
    """The messages as sent, reversed, and (up to 4 messages) in every order."""
    if len(messages) <= 4:
        return [list(p) for p in itertools.permutations(messages)]
    return [messages, messages[::-1]]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batch", [1, 2, 100], ids=["one per batch", "pairs", "one batch"])
def test_the_row_is_the_newest_message_whatever_the_order_duplicates_and_batches(engine: Engine, case: str,
                                                                                 batch: int) -> None:
    messages, expected = CASES[case]
    for order in _orders(messages):
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM events"))
        _apply(engine, order, batch)
        assert _stored(engine) == expected, [json.loads(m)["after"]["seq"] for m in order]


@pytest.mark.postgres
@pytest.mark.parametrize("case", ["every message twice", "end, update, new", "two boxes, same camera name"])
def test_postgres_rows_follow_the_same_rules(pg_url: str, case: str) -> None:  # noqa: F811
    upgrade(pg_url)
    engine = open_engine(pg_url)
    try:
        messages, expected = CASES[case]
        for batch in (1, 100):
            for order in (messages, messages[::-1]):
                with engine.begin() as conn:
                    conn.execute(text("DELETE FROM events"))
                _apply(engine, order, batch)
                assert _stored(engine) == expected
    finally:
        engine.dispose()


def test_write_counts_applied_stale_and_conflicts(engine: Engine) -> None:
    store = HubStore(engine)
    with engine.begin() as conn:  # this database's own pipeline stored E2 (box_id NULL)
        conn.execute(text("INSERT INTO cameras (id, name, created_at) VALUES (1, 'own', '2024-01-01 00:00:00')"))
        conn.execute(text("INSERT INTO events (id, camera_id, track_id, label, started_at, ended_at, first_frame, "
                          "last_frame, best_score, x1, y1, x2, y2, identity_score, ended) VALUES (:id, 1, 1, 'person', "
                          "'2024-01-01 00:00:00', '2024-01-01 00:00:00', 0, 1, 0.5, 0, 0, 1, 1, 0, 0)"), {"id": E2})
    first = HubMerge()
    for m in (NEW, UPD, payload("new", E2, 1)):
        first.add(m)
    assert first.superseded == 1
    assert store.write(first.take()) == WriteResult(1, 0, ((E2, None, "box-a"),))
    assert store.write([parse_message(UPD)]) == WriteResult(0, 1)  # a repeat: stale
    assert store.write([parse_message(payload("update", E1, 5, box="box-b"))]) == WriteResult(0, 0, ((E1, "box-a", "box-b"),))
    assert store.write([parse_message(END)]) == WriteResult(1, 0)
    with pytest.raises(ValueError, match="several versions of one event"):
        store.write([parse_message(NEW), parse_message(UPD)])


@pytest.mark.parametrize("batch", [1, 100])
def test_an_event_id_stays_with_the_box_that_sent_it_first(engine: Engine, batch: int) -> None:
    other = payload("update", E1, 2, box="box-b", identity="eve")
    merge = HubMerge()
    for m in (NEW, other):
        merge.add(m)
    assert merge.conflicts == [(E1, "box-a", "box-b")] and [v.box_id for v in merge.take()] == ["box-a"]
    results = _apply(engine, [NEW, other], batch)
    assert _stored(engine) == {E1: ("box-a", 1, "room", None, False, 0.8, None)}
    if batch == 1:
        assert results[1] == WriteResult(0, 0, ((E1, "box-a", "box-b"),))


def test_two_boxes_with_one_camera_name_stay_apart_in_queries(engine: Engine) -> None:
    _apply(engine, CASES["two boxes, same camera name"][0], 100)
    assert {e.event_id for e in list_events(engine, camera="room")} == {E1, E2}
    assert [(e.event_id, e.box_id) for e in list_events(engine, box="box-b")] == [(E2, "box-b")]
    assert [e.event_id for e in list_events(engine, box="box-a", camera="room")] == [E1]
    assert list_events(engine, box="box-c") == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM cameras")).scalar() == 1


def _box_events(box_url: str) -> tuple[list, list[bytes]]:
    """A box's storage with the MQTT outbox: its events and its outbox payloads in publishing order."""
    upgrade(box_url)
    engine = open_engine(box_url)
    try:
        enroll(engine, "alice", np.eye(1, 8, dtype=np.float32), "m", ["a.jpg"], [None])
        w = EventWriter(engine, outbox_box_id="box-real")
        a, b, c = (uuid.uuid4().hex for _ in range(3))
        steps = [[update(a, last=10), update(b, camera="yard", first=5, last=6)],
                 [update(a, last=14, identity="alice", method="face", identity_score=0.71, snapshot_path="/s/a.jpg")],
                 [update(b, camera="yard", first=5, last=30, best_score=0.95, ended=True)],
                 [update(a, last=40, identity="alice", method="face", identity_score=0.71, ended=True),
                  update(c, camera="yard", t0=T0 + 10**9, last=3, identity_score=0.33, ended=True)]]
        for batch in steps:
            for u in batch:
                w.add_update(u)
            w.flush()
        with engine.connect() as conn:
            sent = list(conn.execute(text("SELECT payload FROM mqtt_outbox ORDER BY id")).scalars())
        return list_events(engine), [p.encode() for p in sent]
    finally:
        engine.dispose()


def test_the_hub_stores_a_box_s_outbox_as_the_box_s_own_rows(engine: Engine, tmp_path: Path) -> None:
    box_rows, sent = _box_events(f"sqlite:///{tmp_path / 'box.db'}")
    _apply(engine, sent[::-1] + sent, 3)  # late and repeated, in small batches
    hub_rows = {e.event_id: e for e in list_events(engine)}
    assert set(hub_rows) == {e.event_id for e in box_rows} and len(box_rows) == 3
    for row in box_rows:
        got = hub_rows[row.event_id]
        assert got.box_id == "box-real" and got.has_snapshot == row.has_snapshot
        assert got.snapshot_path == ("box:box-real" if row.has_snapshot else None)
        skip = {"snapshot_path", "box_id", "job_id"}
        assert {k: v for k, v in got.to_json().items() if k not in skip} == \
               {k: v for k, v in row.to_json().items() if k not in skip}
    assert get_event(engine, box_rows[0].event_id).box_id == "box-real"


# ------------------------------------------------------------- subscriber
class FakeClient:
    """paho's ``Client`` API as far as the subscriber uses it; records acknowledgements."""

    def __init__(self) -> None:
        self.acks: list[int] = []
        self.connected_with: dict = {}

    def connect_async(self, host, port, keepalive, clean_start, properties) -> None:
        self.connected_with = {"clean_start": clean_start, "expiry": properties.SessionExpiryInterval,
                               "receive_maximum": properties.ReceiveMaximum}

    def loop_start(self) -> None: ...
    def loop_stop(self) -> None: ...
    def disconnect(self) -> None: ...

    def subscribe(self, topic, qos) -> None:
        self.subscribed = (topic, qos)

    def ack(self, mid: int, qos: int) -> None:
        self.acks.append(mid)


class FlakySink:
    def __init__(self) -> None:
        self.down = False
        self.batches: list[list[int]] = []

    def write(self, batch):
        if self.down:
            raise StorageError("database down")
        self.batches.append([m.mid for m in batch])
        return {"applied": len(batch)}


class Msg:
    def __init__(self, mid: int) -> None:
        self.mid, self.qos, self.payload, self.properties = mid, 1, b"{}", None


class Flags:
    session_present = True


class Ok:
    is_failure = False


def _subscriber(clock) -> tuple[HubSubscriber, FakeClient, FlakySink]:
    broker = BrokerSettings("127.0.0.1", 1883, False, None, "hub-1", None, None, 30, 1, 1.0, 30.0)
    client, sink = FakeClient(), FlakySink()
    sub = HubSubscriber(client, sink, HubSettings(broker, "fp", "grp", 600, 50, retry_s=5.0), db_errors=(StorageError,),
                        clock=clock)
    sub.start()
    return sub, client, sink


def test_messages_are_acknowledged_only_after_their_batch_is_stored() -> None:
    now = [0.0]
    sub, client, sink = _subscriber(lambda: now[0])
    assert client.connected_with == {"clean_start": False, "expiry": 600, "receive_maximum": 50}
    sub._on_connect(client, None, Flags(), Ok(), None)
    assert client.subscribed == ("$share/grp/fp/events", 1)
    for mid in (1, 2, 3):
        sub._on_message(client, None, Msg(mid))
    sink.down = True
    sub.step(0.0)
    assert client.acks == [] and sub.gauges()["pending"] == 3 and "database down" in sub.last_error
    now[0] = 4.9
    sub.step(0.0)
    assert sink.batches == [] and client.acks == []  # waits retry_s
    sink.down = False
    now[0] = 5.0
    sub.step(0.0)
    assert sink.batches == [[1, 2, 3]] and client.acks == [1, 2, 3] and sub.last_error == ""
    assert sub.gauges()["applied"] == 3 and sub.gauges()["received"] == 3 and sub.gauges()["pending"] == 0


@pytest.mark.parametrize("resumed, stored", [(True, [[8]]), (False, [[7, 8]])])
def test_after_a_reconnect_only_the_new_connection_s_messages_are_acknowledged(resumed: bool, stored: list) -> None:
    sub, client, sink = _subscriber(lambda: 0.0)
    sub._on_connect(client, None, Flags(), Ok(), None)
    sub._on_message(client, None, Msg(7))  # delivered by connection 1, not stored yet
    flags = Flags()
    flags.session_present = resumed
    sub._on_connect(client, None, flags, Ok(), None)  # connection 2
    sub._on_message(client, None, Msg(8))  # (with a resumed session the broker sends 7 again, e.g. as 8)
    sub.step(0.0)
    # resumed: 7 is dropped (it comes again); a new session: 7 is stored but its packet id is not acknowledged
    assert sink.batches == stored and client.acks == [8]
    assert sub.gauges()["reconnects"] == 1 and sub.gauges().get("resent", 0) == int(resumed)


def test_pending_messages_are_written_in_batches_of_at_most_batch() -> None:
    sub, client, sink = _subscriber(lambda: 0.0)
    sub._on_connect(client, None, Flags(), Ok(), None)
    for mid in range(1, 121):
        sub._on_message(client, None, Msg(mid))
    sub.step(0.0)
    assert [len(b) for b in sink.batches] == [50, 50, 20] and client.acks == list(range(1, 121))


def test_stop_stores_and_acknowledges_what_is_pending() -> None:
    sub, client, sink = _subscriber(lambda: 0.0)
    sub._on_connect(client, None, Flags(), Ok(), None)
    sub._on_message(client, None, Msg(1))
    sub.stop()
    assert sink.batches == [[1]] and client.acks == [1]


# ---------------------------------------------------------------- options
def _args(**kw) -> argparse.Namespace:
    base = dict(mqtt=None, prefix=None, group="facepro-hub", client_id=None, session_expiry_s=86400, batch=500)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("options, error", [
    ({"mqtt": "http://x"}, "--mqtt: String should match pattern"),
    ({"prefix": "a/#"}, "--prefix: String should match pattern"),
    ({"group": "a/b"}, "--group: 'a/b' must be 1-64 characters"),
    ({"client_id": "x" * 65}, "--client-id"),
    ({"session_expiry_s": -1}, "--session-expiry-s: expected 0 to 4294967295"),
    ({"batch": 0}, "--batch: expected 1 to 65535"),
])
def test_hub_options_are_checked(models: Path, videos: Path, options: dict, error: str) -> None:
    from pipeline.config import parse_config
    from pipeline.hubrun import hub_settings
    from tests.unit.test_api import tree

    with pytest.raises(ValueError, match=error):
        hub_settings(parse_config(tree(models, videos)), _args(**options))


def test_hub_settings_take_the_config_s_credentials_and_the_hub_s_own_client_id(models: Path, videos: Path) -> None:
    from pipeline.config import parse_config
    from pipeline.hubrun import hub_settings
    from tests.unit.test_api import tree

    cfg = parse_config({**tree(models, videos), "box_id": "gate",
                        "mqtt": {"url": "mqtt://10.0.0.9", "username": "u", "password": "p", "client_id": "box"}})
    s = hub_settings(cfg, _args(mqtt="mqtts://broker.lan:8884", group="g1"))
    assert (s.broker.host, s.broker.port, s.broker.tls, s.broker.username, s.broker.password) == \
           ("broker.lan", 8884, True, "u", "p")
    assert s.broker.client_id == "facepro-hub-gate" and s.topic == "$share/g1/facepro/events"


# -------------------------------------------------------------------- api
def test_api_events_filter_by_box_and_hub_snapshots_answer_404(models: Path, videos: Path, data_dir: Path,
                                                                analyzer_free_api) -> None:
    url = f"sqlite:///{data_dir / 'facepro.db'}"
    eng = open_engine(url)
    try:
        _apply(eng, [END, payload("end", E2, 2, box="box-b", end=START + 1)], 100)
    finally:
        eng.dispose()
    c = analyzer_free_api
    got = c.get("/api/events", params={"box": "box-b"}).json()["events"]
    assert [(e["event_id"], e["box_id"]) for e in got] == [(E2, "box-b")]
    assert {e["box_id"] for e in c.get("/api/events").json()["events"]} == {"box-a", "box-b"}
    assert c.get("/api/events", params={"box": "a/b"}).status_code == 422
    assert "box_id" in c.get("/api/events", params={"format": "csv"}).text.splitlines()[0].split(",")
    snap = c.get(f"/api/events/{E1}/snapshot.jpg")
    assert snap.status_code == 404 and "box box-a" in snap.json()["error"]


@pytest.fixture()
def analyzer_free_api(models: Path, videos: Path, data_dir: Path):
    from fastapi.testclient import TestClient

    from pipeline.api import create_app
    from pipeline.config import parse_config
    from pipeline.services import api_context
    from tests.unit.test_api import tree

    upgrade(f"sqlite:///{data_dir / 'facepro.db'}")
    ctx = api_context(parse_config(tree(models, videos)), alone=True, config_path=None, threads=1)
    return TestClient(create_app(ctx), raise_server_exceptions=False)
