"""The MQTT publisher class with a real paho client against a private Mosquitto broker and a real outbox
(SQLite): order, marking on PUBACK only, outages, restarts, refused logins, retained state, discovery cleanup.

No processes of the pipeline: the test drives :meth:`MqttPublisher.step` itself.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from sqlalchemy import Engine, text

from pipeline.config import parse_config
from pipeline.discovery import Topics, identity_config
from pipeline.mqtt import BrokerSettings, MqttPublisher, make_client, remove_identity_entity
from storage.db import StorageError
from storage.outbox import OutboxStore
from storage.queries import delete_identity, enroll
from storage.writer import EventWriter
from tests.mqtt_broker import Broker, Recorder, wait_until
from tests.unit.test_config import BASE
from tests.unit.test_storage import _eid, update

BOX = "box-1"
TOPICS = Topics("t", "ha", BOX)


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def _settings(port: int, password: str | None = None, user: str | None = None) -> BrokerSettings:
    return BrokerSettings("127.0.0.1", port, False, None, f"pub-{os.getpid()}", user, password, keepalive_s=10, qos=1,
                          reconnect_min_s=0.2, reconnect_max_s=1.0)


def _publisher(engine: Engine, port: int, **kw) -> MqttPublisher:
    settings = _settings(port, kw.pop("password", None), kw.pop("user", None))
    return MqttPublisher(make_client(settings, TOPICS), OutboxStore(engine), settings, TOPICS, ["room"],
                         drain_timeout_s=kw.pop("drain_timeout_s", 5.0), db_errors=(StorageError,), **kw)


def _steps(pub: MqttPublisher):
    def step() -> None:
        pub._due["pending"] = 0.0  # count the outbox at every step
        pub.step()
    return step


def _events(engine: Engine, writer: EventWriter, n: int, **kw) -> list[str]:
    ids = [_eid() for _ in range(n)]
    for eid in ids:
        writer.add_update(update(eid, camera="room", **kw))
    writer.flush()
    return ids


def _outbox(engine: Engine) -> list[tuple[str, bool]]:
    with engine.connect() as conn:
        return [(p, s is not None) for p, s in conn.execute(text("SELECT payload, sent_at FROM mqtt_outbox ORDER BY id"))]


def test_rows_go_out_in_order_with_box_id_and_are_marked_sent_on_puback(engine: Engine, broker: Broker) -> None:
    enroll(engine, "alice", np.eye(1, 8, dtype=np.float32), "m", ["a.jpg"], [None])
    writer = EventWriter(engine, outbox_box_id=BOX)
    first, second = _events(engine, writer, 2)
    writer.add_update(update(first, camera="room", last=30, identity="alice", method="face", identity_score=0.8, ended=True))
    writer.flush()
    rec = Recorder(broker.port, ("t/#", "ha/#"))
    stats = [{"run_id": "r1"}]
    pub = _publisher(engine, broker.port, stats=lambda: stats[0], stats_interval_s=3600)
    pub.start()
    try:
        wait_until(lambda: pub.connected and pub.pending == 0 and pub.published == 3, 20, "all rows acknowledged",
                   between=_steps(pub))
        rows = _outbox(engine)
        assert all(sent for _, sent in rows)
        assert [m.text for m in rec.on("t/events")] == [p for p, _ in rows]  # verbatim, in outbox order
        assert all(("box_id", BOX) in m.user_properties for m in rec.all())
        assert pub.gauges() == {"mqtt_connected": 1, "outbox_pending": 0, "published": 3, "reconnects": 0}
        stat = wait_until(lambda: rec.on("t/stats"), 10, "stats message", between=_steps(pub))[0]
        assert stat.json() == {"run_id": "r1", "box_id": BOX}
        late = Recorder(broker.port, ("t/#", "ha/#"))  # what a subscriber starting now gets: the retained state
        wait_until(lambda: late.on("t/room/person") and late.on("t/identities/alice"), 10, "retained state")
        assert late.on("t/available")[-1].text == "online" and late.on("t/available")[-1].retain
        assert late.on("t/room/person")[-1].text == "1"  # second is still in view
        seen = late.on("t/identities/alice")[-1].json()
        assert (seen["camera"], seen["event_id"], seen["box_id"], seen["method"]) == ("room", first, BOX, "face")
        assert seen["last_seen"].endswith("+00:00")
        configs = {m.topic for m in late.all() if m.topic.startswith("ha/")}
        assert configs == {"ha/sensor/box-1/room_person_count/config", "ha/binary_sensor/box-1/room_person/config",
                           "ha/sensor/box-1/identity_alice_last_seen/config"}
        late.close()
    finally:
        pub.stop()
    wait_until(lambda: [m.text for m in rec.on("t/available")] == ["online", "offline"], 10, "online then offline")
    rec.close()


def test_a_broker_outage_loses_nothing_and_the_gauges_show_it(engine: Engine, broker: Broker) -> None:
    writer = EventWriter(engine, outbox_box_id=BOX)
    before = _events(engine, writer, 1)
    pub = _publisher(engine, broker.port)
    pub.start()
    try:
        wait_until(lambda: pub.published == 1, 20, "first row acknowledged", between=_steps(pub))
        broker.stop()
        wait_until(lambda: not pub.connected, 20, "disconnection noticed", between=_steps(pub))
        during = _events(engine, writer, 3)  # committed while the broker is down
        wait_until(lambda: pub.pending == 3, 10, "outbox depth counted", between=_steps(pub))
        assert pub.gauges()["mqtt_connected"] == 0 and pub.gauges()["outbox_pending"] == 3
        assert "lost" in pub.last_error and "\n" not in pub.last_error
        assert [sent for _, sent in _outbox(engine)] == [True, False, False, False]
        broker.start()  # same port
        rec = Recorder(broker.port, ("t/events",))
        wait_until(lambda: pub.connected and pub.pending == 0, 30, "outbox drained after the outage",
                   between=_steps(pub))
        got = [m.json()["after"]["id"] for m in rec.on("t/events")]
        assert sorted(got) == sorted(during) and before[0] not in got
        assert pub.reconnects == 1 and pub.last_error == ""
        rec.close()
    finally:
        pub.stop()


def test_a_restarted_publisher_sends_what_the_broker_never_acknowledged(engine: Engine, broker: Broker,
                                                                        tmp_path: Path) -> None:
    writer = EventWriter(engine, outbox_box_id=BOX)
    first = _publisher(engine, broker.port)
    first.start()
    wait_until(lambda: first.connected, 20, "connected", between=_steps(first))
    os.kill(broker.proc.pid, signal.SIGSTOP)  # the broker takes the messages but never acknowledges them
    try:
        ids = _events(engine, writer, 3)
        wait_until(lambda: len(first._flights) == 3, 10, "three messages in flight", between=_steps(first))
        for _ in range(5):
            _steps(first)()  # whatever it would mark, it marks now
        assert first.published == 0 and all(not sent for _, sent in _outbox(engine))  # no PUBACK: nothing marked
    finally:
        os.kill(broker.proc.pid, signal.SIGKILL)  # the broker dies with them; the first publisher is abandoned
        broker.proc.wait()
        first.client.loop_stop()
    broker.start()
    rec = Recorder(broker.port, ("t/events",))
    second = _publisher(engine, broker.port)
    second.start()
    try:
        wait_until(lambda: second.pending == 0 and second.published == 3, 20, "re-sent and acknowledged",
                   between=_steps(second))
        assert sorted(m.json()["after"]["id"] for m in rec.on("t/events")) == sorted(ids)
    finally:
        second.stop()
        rec.close()


def test_a_refused_login_is_one_clear_line_and_nothing_is_marked(engine: Engine, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    broker = Broker(tmp_path / "secure", users={"cam": "right"}).start()
    writer = EventWriter(engine, outbox_box_id=BOX)
    _events(engine, writer, 2)
    pub = _publisher(engine, broker.port, user="cam", password="wrong")
    caplog.set_level(logging.WARNING, "facepro.mqtt")
    pub.start()
    try:
        wait_until(lambda: pub.failed_connects >= 3, 30, "three refused attempts", between=_steps(pub))
        assert not pub.connected and pub.gauges()["outbox_pending"] == 2 and pub.published == 0
        assert "refused the connection" in pub.last_error and "mqtt.username / mqtt.password" in pub.last_error
        lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(lines) == 1, lines  # logged once, however often paho retries
        assert all(not sent for _, sent in _outbox(engine))
    finally:
        pub.stop()
        broker.stop()


def test_messages_the_broker_refuses_stay_in_the_outbox(engine: Engine, tmp_path: Path) -> None:
    acl = "user cam\ntopic readwrite t/available\ntopic readwrite t/room/#\ntopic readwrite ha/#\n"  # not t/events
    broker = Broker(tmp_path / "acl", users={"cam": "pw"}, acl=acl).start()
    writer = EventWriter(engine, outbox_box_id=BOX)
    _events(engine, writer, 2)
    pub = _publisher(engine, broker.port, user="cam", password="pw")
    pub.start()
    try:
        wait_until(lambda: "refused event messages" in pub.last_error, 20, "refusal reported", between=_steps(pub))
        for _ in range(10):
            _steps(pub)()
        assert pub.connected and pub.published == 0 and pub.pending == 2
        assert all(not sent for _, sent in _outbox(engine))
        assert sorted(k < 0 for k in pub._flights) == [True, True]  # waiting RESEND_AFTER_S, not re-sent in a loop
    finally:
        pub.stop()
        broker.stop()


def _retain(port: int, topic: str, payload: str) -> None:
    from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5

    c = Client(CallbackAPIVersion.VERSION2, client_id="seed", protocol=MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.publish(topic, payload, 1, True).wait_for_publish(10)
    c.disconnect()
    c.loop_stop()


def test_entities_of_deleted_identities_are_removed(engine: Engine, broker: Broker) -> None:
    gone_topic, gone = identity_config(TOPICS, "old friend")
    _retain(broker.port, gone_topic, json.dumps(gone))  # left by an earlier run; "old friend" was deleted since
    _retain(broker.port, gone["state_topic"], json.dumps({"name": "old friend"}))
    enroll(engine, "bob", np.eye(1, 8, dtype=np.float32), "m", ["b.jpg"], [None])
    rec = Recorder(broker.port, ("ha/#", "t/identities/#"))
    pub = _publisher(engine, broker.port)
    pub.start()
    try:
        wait_until(lambda: any(m.payload == b"" for m in rec.on(gone_topic)), 20, "empty retained config",
                   between=_steps(pub))
        assert any(m.payload == b"" for m in rec.on(gone["state_topic"]))
        bob_topic = identity_config(TOPICS, "bob")[0]
        assert rec.on(bob_topic) and rec.on(bob_topic)[-1].json()["unique_id"] == "facepro_box-1_identity_bob_last_seen"
        delete_identity(engine, "bob")
        enroll(engine, "carl", np.eye(1, 8, dtype=np.float32), "m", ["c.jpg"], [None])
        pub._due["identities"] = 0.0  # the next look at the gallery (every 30 s) is now
        carl_topic = identity_config(TOPICS, "carl")[0]
        wait_until(lambda: rec.on(carl_topic) and rec.on(bob_topic)[-1].payload == b"", 10, "gallery change published",
                   between=_steps(pub))
    finally:
        pub.stop()
        rec.close()
    late = Recorder(broker.port, ("ha/#",))
    wait_until(lambda: late.on(carl_topic), 10, "retained configs")
    assert not late.on(gone_topic) and not late.on(bob_topic)  # no retained config left for them
    late.close()


def test_cli_removal_of_an_identity_entity(broker: Broker) -> None:
    cfg = parse_config(dict(BASE, box_id=BOX, mqtt={"url": broker.url, "topic_prefix": "t", "discovery_prefix": "ha"}))
    topic, doc = identity_config(TOPICS, "ann")
    _retain(broker.port, topic, json.dumps(doc))
    assert remove_identity_entity(cfg, "ann") is None
    late = Recorder(broker.port, ("ha/#",))
    _retain(broker.port, "ha/sensor/box-1/marker/config", "{}")
    wait_until(lambda: late.on("ha/sensor/box-1/marker/config"), 10, "marker")
    assert not late.on(topic)
    late.close()
    broker.stop()
    why = remove_identity_entity(cfg, "ann", timeout_s=2)
    assert why is not None and "unreachable" in why and broker.url.split("//")[1] in why


@pytest.mark.parametrize(
    "mqtt, expected",
    [
        ({}, ("127.0.0.1", 1883, False, "facepro-b1")),
        ({"url": "mqtts://broker.lan"}, ("broker.lan", 8883, True, "facepro-b1")),
        ({"url": "mqtt://broker.lan:2000", "tls": True, "client_id": "cam-x"}, ("broker.lan", 2000, True, "cam-x")),
    ],
)
def test_broker_settings_from_config(mqtt: dict, expected: tuple) -> None:
    s = BrokerSettings.from_config(parse_config(dict(BASE, box_id="b1", mqtt=mqtt)))
    assert (s.host, s.port, s.tls, s.client_id) == expected
    assert s.describe().endswith(f"{expected[0]}:{expected[1]}")


class LockedOnce(OutboxStore):
    """An outbox whose first ``fails`` marks find the database locked."""

    def __init__(self, engine: Engine, fails: int) -> None:
        super().__init__(engine)
        self.fails = fails

    def mark_sent(self, ids) -> None:
        if self.fails:
            self.fails -= 1
            raise StorageError("marking MQTT outbox rows sent: database is locked by another process")
        super().mark_sent(ids)


def test_a_locked_database_delays_marking_and_loses_nothing(engine: Engine, broker: Broker) -> None:
    writer = EventWriter(engine, outbox_box_id=BOX)
    _events(engine, writer, 2)
    pub = _publisher(engine, broker.port)
    pub.store = LockedOnce(engine, fails=3)
    pub.start()
    try:
        wait_until(lambda: pub.published == 2 and pub.store.fails == 0 and pub.pending == 0, 20, "marked after the lock",
                   between=_steps(pub))
        assert all(sent for _, sent in _outbox(engine)) and pub.last_error == ""
    finally:
        pub.stop()


class HidesFirstOnce(OutboxStore):
    """An outbox whose first read leaves out its first unsent row (as a row committed after a later one was read
    would be): the publisher's cursor passes it."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.hidden = False

    def unsent(self, after_id: int, limit: int):
        rows = super().unsent(after_id, limit)
        if not self.hidden and rows:
            self.hidden = True
            return rows[1:]
        return rows


def test_a_row_the_cursor_passed_is_still_published(engine: Engine, broker: Broker) -> None:
    writer = EventWriter(engine, outbox_box_id=BOX)
    _events(engine, writer, 3)
    pub = _publisher(engine, broker.port)
    pub.store = HidesFirstOnce(engine)
    pub.start()
    try:
        wait_until(lambda: pub.published == 3 and pub.pending == 0, 20, "every row acknowledged, the passed one too",
                   between=_steps(pub))
        assert pub.store.hidden and all(sent for _, sent in _outbox(engine))
    finally:
        pub.stop()
