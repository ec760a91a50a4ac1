"""Payloads without a broker: Home Assistant discovery configs checked against the keys HA's MQTT integration
requires, topic names, the in-view bookkeeping and the outbox change rules (parametrised tables).

What HA requires (home-assistant/core, homeassistant/components/mqtt; see pipeline/discovery.py's docstring):
``discovery.py`` TOPIC_MATCHER for the config topic; ``config.py`` MQTT_RO_SCHEMA: ``state_topic`` required
(a valid subscribe topic) for ``sensor`` and ``binary_sensor``; ``schemas.py``: a ``device`` needs
``identifiers`` or ``connections``; availability payloads; a ``timestamp`` sensor's state is ISO 8601 with a
time zone; a binary sensor's state is ``payload_on`` / ``payload_off``.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import pytest

from pipeline.discovery import Topics, all_configs, identity_of_config_topic, slug, topic_level
from pipeline.mqtt import InView
from storage.outbox import EventState, changes

TOPICS = Topics("facepro", "homeassistant", "edge.box-7")
CONFIGS = all_configs(TOPICS, ["front", "yard"], ["Ann Lee", "bob"], version="0.1.0")

#: homeassistant/components/mqtt/discovery.py TOPIC_MATCHER (after the discovery prefix).
HA_TOPIC = re.compile(r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config")
#: Keys HA requires per component (MQTT_RO_SCHEMA), plus what this project requires of every entity.
REQUIRED = {
    "sensor": {"state_topic"},
    "binary_sensor": {"state_topic"},
}
PROJECT = {"availability_topic", "payload_available", "payload_not_available", "unique_id", "device", "name"}
#: Device classes HA accepts for these components (subset used here).
DEVICE_CLASSES = {"sensor": {None, "timestamp"}, "binary_sensor": {"occupancy"}}


def _valid_subscribe_topic(topic: str) -> bool:
    """homeassistant/components/mqtt/util.py valid_subscribe_topic: non-empty, no NUL, wildcards only as whole levels."""
    if not topic or "\0" in topic or len(topic.encode()) > 65535:
        return False
    levels = topic.split("/")
    return all(("+" not in lv or lv == "+") and ("#" not in lv or lv == "#") for lv in levels) and \
        ("#" not in topic or levels.index("#") == len(levels) - 1)


@pytest.mark.parametrize("topic, doc", CONFIGS, ids=[t for t, _ in CONFIGS])
def test_every_config_has_the_keys_home_assistant_requires(topic: str, doc: dict) -> None:
    prefix, _, rest = topic.partition("/")
    assert prefix == "homeassistant"
    m = HA_TOPIC.fullmatch(rest)
    assert m is not None and m["node_id"] == "edge_box-7", topic
    component = m["component"]
    assert component in REQUIRED
    missing = (REQUIRED[component] | PROJECT) - doc.keys()
    assert not missing, missing
    assert _valid_subscribe_topic(doc["state_topic"]) and not set("+#") & set(doc["state_topic"])
    assert doc["availability_topic"] == "facepro/available"
    assert (doc["payload_available"], doc["payload_not_available"]) == ("online", "offline")
    assert doc["device"]["identifiers"] and doc["device"]["manufacturer"] == "FacePro"
    assert "edge.box-7" in doc["device"]["name"]
    assert doc.get("device_class") in DEVICE_CLASSES[component]
    assert doc["unique_id"].endswith(m["object_id"])
    json.dumps(doc)  # a JSON object


def test_unique_ids_and_topics_are_unique_and_the_device_is_shared() -> None:
    assert len({t for t, _ in CONFIGS}) == len({d["unique_id"] for _, d in CONFIGS}) == len(CONFIGS) == 6
    assert len({json.dumps(d["device"], sort_keys=True) for _, d in CONFIGS}) == 1


@pytest.mark.parametrize(
    "state, expected",
    [("0", "OFF"), ("1", "ON"), ("3", "ON"), ("", "OFF"), ("garbage", "OFF")],
)
def test_the_binary_sensor_template_maps_the_count_to_on_off(state: str, expected: str) -> None:
    jinja2 = pytest.importorskip("jinja2")
    doc = next(d for t, d in CONFIGS if t.startswith("homeassistant/binary_sensor/") and "front" in t)
    assert jinja2.Template(doc["value_template"]).render(value=state) == expected
    assert expected in (doc["payload_on"], doc["payload_off"])


def test_the_identity_sensor_state_is_an_iso_timestamp_with_zone() -> None:
    jinja2 = pytest.importorskip("jinja2")
    view = InView(["front"])
    _, seen = view.apply(_message("end", "e1", "front", identity="Ann Lee", end=1_700_000_100.5))
    topic, doc = next((t, d) for t, d in CONFIGS if "identity_Ann_Lee" in t)
    assert doc["state_topic"] == doc["json_attributes_topic"] == "facepro/identities/Ann_Lee"
    state = jinja2.Template(doc["value_template"]).render(value_json=seen)
    parsed = datetime.fromisoformat(state)
    assert parsed.utcoffset() == timedelta(0) and parsed.timestamp() == 1_700_000_100.5


@pytest.mark.parametrize(
    "name, level, object_id",
    [("bob", "bob", "bob"), ("Ann Lee", "Ann_Lee", "Ann_Lee"), ("a/b+c#", "a_b_c_", "a_b_c_"),
     ("jo.e", "jo.e", "jo_e"), ("Zoë", "Zo_", "Zo_")],
)
def test_names_become_single_topic_levels_and_ids(name: str, level: str, object_id: str) -> None:
    assert topic_level(name) == level and slug(name) == object_id
    assert TOPICS.identity(name) == f"facepro/identities/{level}"


@pytest.mark.parametrize(
    "topic, expected",
    [("homeassistant/sensor/edge_box-7/identity_bob_last_seen/config", "identity_bob_last_seen"),
     ("homeassistant/sensor/edge_box-7/front_person_count/config", None),
     ("homeassistant/sensor/other/identity_bob_last_seen/config", None),
     ("homeassistant/binary_sensor/edge_box-7/identity_bob_last_seen/config", None)],
)
def test_identity_config_topics_of_this_box_are_recognised(topic: str, expected: str | None) -> None:
    assert identity_of_config_topic(TOPICS, topic) == expected


def _message(kind: str, eid: str, camera: str, label: str = "person", identity: str | None = None,
             end: float | None = None) -> str:
    after = {"id": eid, "camera": camera, "label": label, "start_time": 1_700_000_000.0, "end_time": end,
             "identity": identity, "sub_label": [identity, 0.7] if identity else None, "method": "face" if identity else None,
             "box_id": "b", "seq": 1}
    return json.dumps({"type": kind, "before": after, "after": after})


@pytest.mark.parametrize(
    "messages, counts, changed",
    [
        ([("new", "a", "front")], {"front": 1, "yard": 0}, ["front"]),
        ([("new", "a", "front"), ("update", "a", "front")], {"front": 1, "yard": 0}, ["front", None]),
        ([("new", "a", "front"), ("new", "b", "front"), ("end", "a", "front")], {"front": 1, "yard": 0},
         ["front", "front", "front"]),
        ([("end", "a", "yard")], {"front": 0, "yard": 0}, [None]),  # an end whose new was in an earlier run
        ([("new", "c", "front", "car")], {"front": 0, "yard": 0}, [None]),  # only persons are counted
    ],
)
def test_persons_in_view_follow_the_event_messages(messages: list, counts: dict, changed: list) -> None:
    view = InView(["front", "yard"])
    got = [view.apply(_message(*m))[0] for m in messages]
    assert got == changed and view.counts() == counts


def _state(**kw) -> EventState:
    base = dict(id="e" * 32, camera="front", label="person", score=0.8,
                started_at=datetime(2024, 1, 2, tzinfo=timezone.utc), ended_at=datetime(2024, 1, 2, 0, 0, 5, tzinfo=timezone.utc),
                ended=False, box=(1.0, 2.0, 3.0, 4.0), identity=None, identity_score=0.0, method=None, has_snapshot=False)
    base.update(kw)
    return EventState(**base)


@pytest.mark.parametrize(
    "before, after, last_seq, kinds",
    [
        (None, _state(), 0, [("new", 1)]),
        (None, _state(ended=True), 0, [("new", 1), ("end", 2)]),
        (_state(), _state(score=0.9, box=(5.0, 5.0, 9.0, 9.0)), 1, []),  # position and score alone: no message
        (_state(), _state(identity="bob", method="face", identity_score=0.6), 1, [("update", 2)]),
        (_state(), _state(has_snapshot=True), 1, [("update", 2)]),
        (_state(), _state(ended=True), 4, [("end", 5)]),
        (_state(ended=True), _state(ended=True), 2, []),  # a re-sent final update
        (_state(), _state(identity="bob", ended=True), 0, [("end", 1)]),  # mqtt configured mid-event
    ],
)
def test_change_rules(before: EventState | None, after: EventState, last_seq: int, kinds: list) -> None:
    got = changes({} if before is None else {after.id: before}, {after.id: after}, {after.id: last_seq} if last_seq else {}, "b")
    assert [(c.kind, c.seq) for c in got] == kinds
    for c in got:
        msg = json.loads(c.payload)
        assert msg["type"] == c.kind and msg["after"]["seq"] == c.seq and msg["after"]["box_id"] == "b"
        assert (msg["after"]["end_time"] is None) == (c.kind != "end")
