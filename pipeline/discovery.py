"""MQTT topic names and Home Assistant discovery configs (pure functions, no broker).

Topics (``<prefix>`` is ``mqtt.topic_prefix``, Frigate's shapes where they
overlap, https://docs.frigate.video/integrations/mqtt):

- ``<prefix>/available``: ``online`` / ``offline`` (retained; ``offline`` is also the Last Will);
- ``<prefix>/events``: the outbox payloads (:mod:`storage.outbox`), not retained;
- ``<prefix>/<camera>/person``: persons in view of the camera, a decimal integer (retained);
- ``<prefix>/identities/<name>``: where and when an identity was last seen, JSON (retained);
- ``<prefix>/stats``: the ``facepro status --json`` document plus ``box_id``, not retained.

``<name>`` is the identity name as one topic level (:func:`topic_level`).

Home Assistant discovery (retained configs on
``<discovery_prefix>/<component>/<node_id>/<object_id>/config``, ``node_id``
the box id as a slug): per camera a ``sensor`` (person count) and a
``binary_sensor`` (person present, ``occupancy``), per identity a ``sensor``
with ``device_class: timestamp`` (last seen). An empty retained payload on a
config topic removes the entity.

Sources followed (Home Assistant core, ``homeassistant/components/mqtt``):
``discovery.py`` ``TOPIC_MATCHER`` (``<component>/[<node_id>/]<object_id>/config``,
ids ``[a-zA-Z0-9_-]+``); ``config.py`` ``MQTT_RO_SCHEMA`` (``state_topic``
required for ``sensor`` and ``binary_sensor``, optional ``value_template``);
``schemas.py`` ``MQTT_ENTITY_DEVICE_INFO_SCHEMA`` (a ``device`` needs
``identifiers`` or ``connections``) and ``MQTT_AVAILABILITY_SINGLE_SCHEMA``
(``availability_topic``, ``payload_available`` / ``payload_not_available``,
defaults ``online`` / ``offline``); the MQTT Sensor page
(https://www.home-assistant.io/integrations/sensor.mqtt/: a ``timestamp``
sensor's state is an ISO 8601 time with its time zone) and the MQTT Binary
Sensor page (``payload_on`` / ``payload_off``, default ``ON`` / ``OFF``).
``unique_id`` is set on every entity so Home Assistant keeps it in its
entity registry (and the entity can be renamed and removed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

MANUFACTURER = "FacePro"
#: Topic payloads of the availability topic (Home Assistant's defaults).
ONLINE, OFFLINE = "online", "offline"
_NOT_ID = re.compile(r"[^A-Za-z0-9_-]")
_NOT_LEVEL = re.compile(r"[^A-Za-z0-9_.-]")


def slug(text: str) -> str:
    """``text`` as a Home Assistant node/object id: characters outside ``[A-Za-z0-9_-]`` become ``_``."""
    return _NOT_ID.sub("_", text) or "_"


def topic_level(name: str) -> str:
    """``name`` as one MQTT topic level: characters outside ``[A-Za-z0-9_.-]`` (``/``, ``+``, ``#``, spaces...)
    become ``_`` (so ``"Ann Lee"`` is ``Ann_Lee``; the payloads carry the real name)."""
    return _NOT_LEVEL.sub("_", name) or "_"


@dataclass(frozen=True)
class Topics:
    """Every topic name of one box.

    Attributes:
        prefix: ``mqtt.topic_prefix``; discovery_prefix: ``mqtt.discovery_prefix``; box_id: the config's ``box_id``.
    """

    prefix: str
    discovery_prefix: str
    box_id: str

    @property
    def node_id(self) -> str:
        """The discovery node id: the box id as a slug."""
        return slug(self.box_id)

    def available(self) -> str:
        """``<prefix>/available``."""
        return f"{self.prefix}/available"

    def events(self) -> str:
        """``<prefix>/events``."""
        return f"{self.prefix}/events"

    def stats(self) -> str:
        """``<prefix>/stats``."""
        return f"{self.prefix}/stats"

    def person(self, camera: str) -> str:
        """``<prefix>/<camera>/person`` (camera names are already topic-safe: ``[A-Za-z0-9_-]``)."""
        return f"{self.prefix}/{camera}/person"

    def frigate(self, camera: str) -> str:
        """``<prefix>/frigate/<Frigate camera>``: the Frigate companion's results (Frigate camera names are
        topic-safe: ``[A-Za-z0-9_-]``, checked by :func:`pipeline.frigate.parse_event`)."""
        return f"{self.prefix}/frigate/{camera}"

    def identity(self, name: str) -> str:
        """``<prefix>/identities/<name as one level>`` (:func:`topic_level`)."""
        return f"{self.prefix}/identities/{topic_level(name)}"

    def config(self, component: str, object_id: str) -> str:
        """``<discovery_prefix>/<component>/<node_id>/<object_id>/config``."""
        return f"{self.discovery_prefix}/{component}/{self.node_id}/{object_id}/config"

    def identity_configs(self) -> str:
        """Subscription filter matching this box's sensor configs (to find entities of deleted identities)."""
        return f"{self.discovery_prefix}/sensor/{self.node_id}/+/config"


def identity_object_id(name: str) -> str:
    """The discovery object id of an identity's "last seen" sensor: ``identity_<slug>_last_seen``."""
    return f"identity_{slug(name)}_last_seen"


def identity_of_config_topic(topics: Topics, topic: str) -> str | None:
    """The object id of an identity sensor config ``topic`` of this box, None for any other topic."""
    head, tail = topics.config("sensor", ""), "/config"
    head = head[: -len(tail)]  # ".../sensor/<node>/"
    if not (topic.startswith(head) and topic.endswith(tail)):
        return None
    object_id = topic[len(head): -len(tail)]
    return object_id if object_id.startswith("identity_") and object_id.endswith("_last_seen") else None


def device(box_id: str, version: str = "") -> dict[str, Any]:
    """The Home Assistant ``device`` block shared by every entity of the box."""
    doc = {"identifiers": [f"facepro_{slug(box_id)}"], "name": f"FacePro {box_id}", "manufacturer": MANUFACTURER,
           "model": "FacePro edge pipeline"}
    if version:
        doc["sw_version"] = version
    return doc


def _base(topics: Topics, object_id: str, name: str, state_topic: str, version: str) -> dict[str, Any]:
    return {
        "name": name, "unique_id": f"facepro_{topics.node_id}_{object_id}", "object_id": f"facepro_{object_id}",
        "state_topic": state_topic, "availability_topic": topics.available(),
        "payload_available": ONLINE, "payload_not_available": OFFLINE,
        "device": device(topics.box_id, version), "origin": {"name": MANUFACTURER},
    }


def camera_configs(topics: Topics, camera: str, version: str = "") -> list[tuple[str, dict[str, Any]]]:
    """``(config topic, config)`` of a camera's person-count ``sensor`` and person-present ``binary_sensor``."""
    count_id, present_id = f"{slug(camera)}_person_count", f"{slug(camera)}_person"
    count = _base(topics, count_id, f"{camera} person count", topics.person(camera), version)
    count.update(state_class="measurement", icon="mdi:account-multiple")
    present = _base(topics, present_id, f"{camera} person", topics.person(camera), version)
    present.update(device_class="occupancy", payload_on="ON", payload_off="OFF",
                   value_template="{{ 'ON' if (value | int(0)) > 0 else 'OFF' }}")
    return [(topics.config("sensor", count_id), count), (topics.config("binary_sensor", present_id), present)]


def identity_config(topics: Topics, name: str, version: str = "") -> tuple[str, dict[str, Any]]:
    """``(config topic, config)`` of an identity's "last seen" ``sensor`` (state: ``last_seen`` of
    ``<prefix>/identities/<name>``, the other keys as attributes)."""
    object_id = identity_object_id(name)
    doc = _base(topics, object_id, f"{name} last seen", topics.identity(name), version)
    doc.update(device_class="timestamp", value_template="{{ value_json.last_seen }}",
               json_attributes_topic=topics.identity(name), icon="mdi:account-clock")
    return topics.config("sensor", object_id), doc


def all_configs(topics: Topics, cameras: Iterable[str], identities: Iterable[str],
                version: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every discovery config of the box: the cameras' two entities each, then one per identity."""
    out = [c for cam in cameras for c in camera_configs(topics, cam, version)]
    out.extend(identity_config(topics, name, version) for name in identities)
    return out
