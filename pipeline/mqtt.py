"""MQTT out: the publisher of the ``mqtt`` process (committed events, person counts, identities, stats,
Home Assistant discovery) on paho-mqtt 2.x, MQTT 5.

At-least-once. The storage process writes an outbox row with every committed
event change (:mod:`storage.outbox`); :class:`MqttPublisher` reads the unsent
rows in ``id`` order, publishes each on ``<prefix>/events`` with the
configured QoS (1 or 2) and marks it sent only when paho reports the broker's
acknowledgement (``on_publish`` with the message's ``mid``: PUBACK for QoS 1,
PUBCOMP for 2). What was not acknowledged is published again: by paho after a
reconnect (it keeps its unacknowledged messages), by this class when a message
stays unacknowledged for :data:`RESEND_AFTER_S` while connected, and by the next
process from the outbox after a restart. So a subscriber may see a message
twice and drops repeats by ``(after.id, after.seq)``; it never misses one that
was committed, unless retention deleted the row first.

Threads. paho's network thread (``loop_start``) only puts what it learns
(connected, refused, disconnected, acknowledged ``mid``, retained config seen)
on a queue; :meth:`MqttPublisher.step`, called by the process's loop, does all
the rest (database, publishing, counters). Nothing here waits for the broker:
while it is down the outbox simply grows, paho retries the connection with
backoff (``mqtt.reconnect_min_s`` doubling to ``mqtt.reconnect_max_s``), and the
first failure of each kind is logged as one line naming the broker.

Every message carries ``box_id``: JSON payloads as a key, and every message
(the Last Will too) as the MQTT 5 user property ``box_id``.

Topics and discovery configs: :mod:`pipeline.discovery`.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence
from urllib.parse import urlsplit

from paho.mqtt.client import MQTT_ERR_NO_CONN, MQTT_ERR_SUCCESS

from pipeline.config import AppConfig
from pipeline.discovery import OFFLINE, ONLINE, Topics, all_configs, identity_config, identity_of_config_topic

log = logging.getLogger("facepro.mqtt")

#: Re-publish an event message still unacknowledged after this long while connected, seconds.
RESEND_AFTER_S = 30.0
#: Event messages published and not yet acknowledged, at most.
WINDOW = 100
#: How often the enrolled identities are read again (new ones get an entity, deleted ones lose theirs), seconds.
IDENTITY_REFRESH_S = 30.0
#: How often the outbox depth is counted, seconds.
PENDING_REFRESH_S = 1.0


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to connect (from the config's ``mqtt`` section).

    Attributes:
        host, port: the broker (port 1883, 8883 with TLS, unless the URL names one).
        tls: connect with TLS; ca_certs: PEM CA bundle or None (the system CAs).
        client_id, username, password: MQTT CONNECT fields (password None: none sent).
        keepalive_s, qos, reconnect_min_s, reconnect_max_s: as in :class:`pipeline.config.MqttConfig`.
    """

    host: str
    port: int
    tls: bool
    ca_certs: Path | None
    client_id: str
    username: str | None
    password: str | None
    keepalive_s: int
    qos: int
    reconnect_min_s: float
    reconnect_max_s: float

    @classmethod
    def from_config(cls, cfg: AppConfig) -> BrokerSettings:
        """Raises ValueError when ``cfg.mqtt`` is None or its URL has a port outside 1-65535."""
        m = cfg.mqtt
        if m is None:
            raise ValueError("mqtt is not configured")
        url = urlsplit(m.url)
        tls = m.tls or url.scheme == "mqtts"
        port = url.port or (8883 if tls else 1883)
        if not 0 < port < 65536:
            raise ValueError(f"mqtt.url: port {port} outside 1-65535")
        return cls(url.hostname or "127.0.0.1", port, tls, m.ca_certs, m.client_id or f"facepro-{cfg.box_id}",
                   m.username, m.password, m.keepalive_s, m.qos, m.reconnect_min_s, m.reconnect_max_s)

    def describe(self) -> str:
        """``mqtt[s]://host:port`` (never the credentials)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def topics_of(cfg: AppConfig) -> Topics:
    """The topic names of ``cfg`` (``cfg.mqtt`` must be set)."""
    assert cfg.mqtt is not None
    return Topics(cfg.mqtt.topic_prefix, cfg.mqtt.discovery_prefix, cfg.box_id)


def user_properties(packet: str, box_id: str) -> Any:
    """MQTT 5 properties with the user property ``box_id`` for a ``"PUBLISH"`` or ``"WILLMESSAGE"`` packet."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(getattr(PacketTypes, packet))
    props.UserProperty = ("box_id", box_id)
    return props


def make_client(settings: BrokerSettings, topics: Topics) -> Any:
    """A paho-mqtt 2.x MQTT 5 client with FacePro's Last Will (``offline``, retained), credentials, TLS and
    reconnect backoff set; not connected (:meth:`MqttPublisher.start` connects it)."""
    from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5

    client = Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id, protocol=MQTTv5)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        client.tls_set(ca_certs=str(settings.ca_certs) if settings.ca_certs else None)
    client.will_set(topics.available(), OFFLINE, qos=settings.qos, retain=True,
                    properties=user_properties("WILLMESSAGE", topics.box_id))
    client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
    return client


class Store(Protocol):
    """What the publisher needs from the database (:class:`storage.outbox.OutboxStore`); a failing method
    raises one of the publisher's ``db_errors`` (``storage.db.StorageError``, injected by the wiring)."""

    def unsent(self, after_id: int, limit: int) -> list[Any]:
        """Up to ``limit`` unsent rows (``id``, ``event_id``, ``seq``, ``kind``, ``payload``) after ``after_id``."""

    def mark_sent(self, ids: Sequence[int]) -> None:
        """Record that the broker acknowledged the rows ``ids``."""

    def pending(self) -> int:
        """Unsent rows."""

    def open_events(self) -> list[str]:
        """Payloads of the events subscribers were last told are in view."""

    def identities(self) -> list[str]:
        """Enrolled identity names."""


class InView:
    """Persons in view per camera and the last sighting per identity, from the event messages published.

    Args:
        cameras: the configured cameras (each gets a count, 0 until a person shows up).
    """

    def __init__(self, cameras: Sequence[str]) -> None:
        self.open: dict[str, set[str]] = {c: set() for c in cameras}

    def counts(self) -> dict[str, int]:
        """Camera → persons in view."""
        return {c: len(ids) for c, ids in self.open.items()}

    def apply(self, payload: str) -> tuple[str | None, dict[str, Any] | None]:
        """Take one event message (outbox payload JSON) into account.

        Returns:
            ``(camera whose person count changed or None, identity sighting or None)``; a sighting is
            ``{"name", "camera", "last_seen" (ISO 8601 UTC), "time" (epoch s), "event_id", "score", "method",
            "box_id"}`` for a message with an identity.
        """
        msg = json.loads(payload)
        after = msg["after"]
        changed = None
        if after["label"] == "person":
            ids = self.open.setdefault(after["camera"], set())
            before = len(ids)
            (ids.discard if msg["type"] == "end" else ids.add)(after["id"])
            changed = after["camera"] if len(ids) != before else None
        if after.get("identity") is None:
            return changed, None
        when = after["end_time"] if after["end_time"] is not None else after["start_time"]
        seen = {"name": after["identity"], "camera": after["camera"],
                "last_seen": datetime.fromtimestamp(when, timezone.utc).isoformat(), "time": when,
                "event_id": after["id"], "score": after["sub_label"][1], "method": after["method"],
                "box_id": after["box_id"]}
        return changed, seen


@dataclass
class _Flight:
    row_id: int
    payload: str
    since: float


class MqttPublisher:
    """Publishes the outbox and the box's state; one per ``mqtt`` process (module docstring).

    Args:
        client: from :func:`make_client` (tests may pass any object with paho's ``Client`` API).
        store: the outbox and gallery (:class:`Store`).
        settings: broker address and QoS; topics: topic names (:class:`pipeline.discovery.Topics`).
        cameras: configured camera names.
        discovery: publish Home Assistant discovery configs.
        stats: returns the status document to publish on ``<prefix>/stats`` (None: skip this time).
        stats_interval_s: seconds between stats messages.
        drain_timeout_s: :meth:`stop` waits at most this long for acknowledgements, seconds.
        version: FacePro's version for the discovery ``device``.
        db_errors: exceptions of ``store`` that mean "database unavailable now": logged once, retried at the
            next step (the wiring passes ``storage.db.StorageError``).
        clock: monotonic seconds.

    Attributes:
        connected: a CONNACK accepted the connection and no disconnect came since.
        published: event messages acknowledged by the broker (and marked sent).
        reconnects: connections after the first one.
        failed_connects: connection attempts refused or unanswered so far.
        pending: unsent outbox rows at the last count.
        last_error: one line on the current fault ("" when none).
    """

    def __init__(self, client: Any, store: Store, settings: BrokerSettings, topics: Topics, cameras: Sequence[str], *,
                 discovery: bool = True, stats: Callable[[], dict | None] | None = None, stats_interval_s: float = 60.0,
                 drain_timeout_s: float = 10.0, version: str = "",
                 db_errors: tuple[type[BaseException], ...] = (RuntimeError,),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client, self.store, self.settings, self.topics = client, store, settings, topics
        self.cameras = tuple(cameras)
        self.discovery, self.stats, self.stats_interval_s = discovery, stats, stats_interval_s
        self.drain_timeout_s, self.version, self.clock, self.db_errors = drain_timeout_s, version, clock, db_errors
        self.connected = False
        self.published = self.reconnects = self.pending = self.failed_connects = 0
        self.last_error = ""
        self._events: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._flights: dict[int, _Flight] = {}
        self._to_mark: list[int] = []
        self._cursor = 0
        self._connects = 0
        self._logged: set[str] = set()
        self._identities: set[str] = set()
        self._due = {"stats": 0.0, "identities": 0.0, "pending": 0.0}
        self._props = user_properties("PUBLISH", topics.box_id)
        self.view = InView(self.cameras)

    # ------------------------------------------------------------ paho thread
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._events.put(("connect", bool(getattr(reason, "is_failure", False)), str(reason)))

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._events.put(("unreachable",))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._events.put(("disconnect", str(reason)))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._events.put(("ack", mid, bool(getattr(reason, "is_failure", False)), str(reason)))

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._events.put(("message", message.topic, bytes(message.payload)))

    # ---------------------------------------------------------------- control
    def start(self) -> None:
        """Load what subscribers were last told (open events), connect in the background (returns at once)."""
        for payload in self._try(self.store.open_events, "reading open events", []):
            self.view.apply(payload)
        self._identities = set(self._try(self.store.identities, "listing identities", []))
        c = self.client
        c.on_connect, c.on_connect_fail, c.on_disconnect = self._on_connect, self._on_connect_fail, self._on_disconnect
        c.on_publish, c.on_message = self._on_publish, self._on_message
        c.connect_async(self.settings.host, self.settings.port, self.settings.keepalive_s)
        c.loop_start()

    def step(self) -> None:
        """Handle what paho reported, mark acknowledged rows sent, publish unsent rows and due state."""
        while True:
            try:
                self._handle(self._events.get_nowait())
            except queue.Empty:
                break
        self._mark()
        now = self.clock()
        if self.connected:
            self._resend_stale(now)
            self._publish_rows(now)
            self._periodic(now)
        if now >= self._due["pending"]:
            self._due["pending"] = now + PENDING_REFRESH_S
            self.pending = self._try(self.store.pending, "counting the outbox", self.pending)
            if self.pending > len(self._flights) + len(self._to_mark):
                self._cursor = 0  # unsent rows not in flight: read the outbox from its start again (none is stranded)

    def stop(self, abort: Callable[[], bool] = lambda: False) -> None:
        """Publish what is left (for up to ``drain_timeout_s``, also waiting for a reconnection), then
        ``offline`` (retained) and disconnect cleanly (so the broker does not send the Last Will); what the
        broker did not acknowledge stays in the outbox for the next run. ``abort()`` true ends the wait at once
        (a second stop signal)."""
        deadline = self.clock() + self.drain_timeout_s
        self._due["pending"] = 0.0
        self.step()
        while self.clock() < deadline and not abort() and (self._flights or self.pending or self._to_mark):
            time.sleep(0.05)  # connected or waiting for paho's reconnection: publish what is left
            self._due["pending"] = 0.0
            self.step()
        if self.connected:
            info = self.client.publish(self.topics.available(), OFFLINE, self.settings.qos, True, self._props)
            try:
                info.wait_for_publish(max(0.5, deadline - self.clock()))
            except (RuntimeError, ValueError):
                pass
        if self.pending:
            log.warning("mqtt: %d event message(s) not acknowledged by %s at stop stay in the outbox; the next "
                        "run publishes them", self.pending, self.settings.describe())
        self.client.disconnect()
        self.client.loop_stop()
        self.connected = False

    def gauges(self) -> dict[str, int]:
        """``mqtt_connected`` (0/1), ``outbox_pending``, ``published``, ``reconnects`` (for the counter block)."""
        return {"mqtt_connected": int(self.connected), "outbox_pending": self.pending, "published": self.published,
                "reconnects": self.reconnects}

    # --------------------------------------------------------------- handling
    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "ack":
            self._acked(event[1], event[2], event[3])
        elif kind == "connect":
            self._connected(failed=event[1], reason=event[2])
        elif kind == "unreachable":
            self.failed_connects += 1
            self._fault("unreachable", f"broker {self.settings.describe()} unreachable; retrying every "
                        f"{self.settings.reconnect_min_s:g}-{self.settings.reconnect_max_s:g} s, events wait in the outbox")
        elif kind == "disconnect" and self.connected:  # (a refused attempt's disconnect says nothing new)
            self.connected = False
            self._fault("lost", f"connection to {self.settings.describe()} lost ({event[1]}); reconnecting, "
                        "events wait in the outbox")
        elif kind == "message":
            self._retained_config(event[1], event[2])

    def _fault(self, key: str, line: str) -> None:
        """Set ``last_error``; log the line once per fault until a connection succeeds."""
        self.last_error = line
        if key not in self._logged:
            self._logged.add(key)
            log.warning("mqtt: %s", line)

    def _connected(self, failed: bool, reason: str) -> None:
        if failed:
            self.connected = False
            self.failed_connects += 1
            hint = " (check mqtt.username / mqtt.password)" if "password" in reason or "authori" in reason.lower() else ""
            self._fault(f"refused {reason}", f"broker {self.settings.describe()} refused the connection: {reason}{hint}")
            return
        self.connected = True
        self._connects += 1
        self.reconnects = self._connects - 1
        self.last_error = ""
        self._logged.clear()
        now = self.clock()
        for flight in self._flights.values():
            flight.since = now  # paho re-sends its unacknowledged messages itself after a reconnect
        log.info("mqtt: connected to %s", self.settings.describe())
        self._send(self.topics.available(), ONLINE)
        if self.discovery:
            from paho.mqtt.subscribeoptions import SubscribeOptions

            self.client.subscribe(self.topics.identity_configs(), options=SubscribeOptions(qos=1, noLocal=True))
            for topic, doc in all_configs(self.topics, self.cameras, sorted(self._identities), self.version):
                self._send(topic, json.dumps(doc))
        for camera, n in self.view.counts().items():
            self._send(self.topics.person(camera), str(n))
        self._due["stats"] = now

    def _acked(self, mid: int, failed: bool, reason: str) -> None:
        flight = self._flights.pop(mid, None)
        if flight is None:
            return  # a state message, or an event message already re-published under another mid
        if failed:  # the broker refused it (an MQTT 5 reason code, e.g. an ACL): again in RESEND_AFTER_S
            self._fault(f"refused message {reason}", f"broker {self.settings.describe()} refused event messages on "
                        f"{self.topics.events()}: {reason} (check its ACL); they stay in the outbox and are retried")
            self._flights[-flight.row_id] = _Flight(flight.row_id, flight.payload, self.clock())  # not a mid: a retry
            return
        self._to_mark.append(flight.row_id)
        self.published += 1

    def _mark(self) -> None:
        if not self._to_mark:
            return
        ids, self._to_mark = self._to_mark, []

        def mark() -> bool:
            self.store.mark_sent(ids)
            return True

        if not self._try(mark, "marking outbox rows sent", False):
            self._to_mark = ids + self._to_mark  # delivered, not yet marked: retried at the next step

    # ------------------------------------------------------------- publishing
    def _send(self, topic: str, payload: str, retain: bool = True, qos: int | None = None) -> Any:
        return self.client.publish(topic, payload, self.settings.qos if qos is None else qos, retain, self._props)

    def _publish(self, row_id: int, payload: str, now: float) -> bool:
        info = self._send(self.topics.events(), payload, retain=False)
        if info.rc not in (MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN):  # NO_CONN: paho keeps it, sends it on reconnect
            return False
        self._flights[info.mid] = _Flight(row_id, payload, now)
        return True

    def _publish_rows(self, now: float) -> None:
        room = WINDOW - len(self._flights)
        if room <= 0:
            return
        flying = {f.row_id for f in self._flights.values()} | set(self._to_mark)
        rows = self._try(lambda: self.store.unsent(self._cursor, room + len(flying)), "reading the outbox", [])
        for row in (r for r in rows if r.id not in flying):
            if not self._publish(row.id, row.payload, now):
                return
            self._cursor = row.id
            changed, seen = self.view.apply(row.payload)
            if changed is not None:
                self._send(self.topics.person(changed), str(self.view.counts()[changed]))
            if seen is not None:
                self._send(self.topics.identity(seen["name"]), json.dumps(seen))

    def _resend_stale(self, now: float) -> None:
        for mid, flight in list(self._flights.items()):
            if now - flight.since >= RESEND_AFTER_S:
                del self._flights[mid]
                if not self._publish(flight.row_id, flight.payload, now):  # paho refused it now: again later
                    self._flights[-flight.row_id] = _Flight(flight.row_id, flight.payload, now)

    def _periodic(self, now: float) -> None:
        if self.stats is not None and now >= self._due["stats"]:
            self._due["stats"] = now + self.stats_interval_s
            doc = self.stats()
            if doc is not None:
                self._send(self.topics.stats(), json.dumps(dict(doc, box_id=self.topics.box_id)), retain=False, qos=0)
        if self.discovery and now >= self._due["identities"]:
            self._due["identities"] = now + IDENTITY_REFRESH_S
            self._refresh_identities()

    def _refresh_identities(self) -> None:
        names = set(self._try(self.store.identities, "listing identities", sorted(self._identities)))
        for name in sorted(names - self._identities):
            topic, doc = identity_config(self.topics, name, self.version)
            self._send(topic, json.dumps(doc))
        for name in sorted(self._identities - names):
            self._send(identity_config(self.topics, name)[0], "")
            self._send(self.topics.identity(name), "")
        self._identities = names

    def _retained_config(self, topic: str, payload: bytes) -> None:
        """A retained identity config of this box for an identity that no longer exists: remove the entity."""
        object_id = identity_of_config_topic(self.topics, topic)
        current = {identity_config(self.topics, n)[0] for n in self._identities}
        if object_id is None or not payload or topic in current:
            return
        self._send(topic, "")
        try:
            state = json.loads(payload).get("state_topic")
        except (ValueError, AttributeError):
            state = None
        if isinstance(state, str) and state.startswith(self.topics.prefix + "/identities/"):
            self._send(state, "")
        log.info("mqtt: removed the Home Assistant entity of deleted identity (%s)", topic)

    def _try(self, fn: Callable[[], Any], what: str, default: Any) -> Any:
        """``fn()``, or ``default`` when the database fails (logged once per kind, retried by the next step)."""
        key = f"db {what}"
        try:
            result = fn()
        except self.db_errors as err:
            self._fault(key, f"{what} failed: {err}")
            return default
        if key in self._logged:  # the database is back: the fault is over
            self._logged.discard(key)
            if self.last_error.startswith(what):
                self.last_error = ""
        return result


def remove_identity_entity(cfg: AppConfig, name: str, timeout_s: float = 5.0) -> str | None:
    """Remove the Home Assistant entity of a deleted identity now: empty retained messages on its discovery
    config topic and its ``<prefix>/identities/<name>`` topic, over a short-lived connection of its own
    (client id ``<client_id>-cli-<pid>``, no Last Will, so a running pipeline's connection is not disturbed).

    Returns:
        None when the broker acknowledged both, else one line saying why not (the ``mqtt`` process removes
        the entity at its next connection, from the retained config it finds).
    """
    import os
    import threading

    from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5

    settings, topics = BrokerSettings.from_config(cfg), topics_of(cfg)
    client = Client(CallbackAPIVersion.VERSION2, client_id=f"{settings.client_id}-cli-{os.getpid()}", protocol=MQTTv5)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        client.tls_set(ca_certs=str(settings.ca_certs) if settings.ca_certs else None)
    answer: list[str] = []
    ready = threading.Event()
    client.on_connect = lambda c, u, f, reason, p: (answer.append(str(reason) if reason.is_failure else ""), ready.set())
    try:
        client.connect(settings.host, settings.port, settings.keepalive_s)
    except OSError as err:
        return f"broker {settings.describe()} unreachable ({err.strerror or err})"
    client.loop_start()
    try:
        if not ready.wait(timeout_s) or answer[0]:
            return f"broker {settings.describe()} refused the connection: {answer[0] if answer else 'no answer'}"
        props = user_properties("PUBLISH", topics.box_id)
        for topic in (identity_config(topics, name)[0], topics.identity(name)):
            info = client.publish(topic, "", settings.qos, True, props)
            info.wait_for_publish(timeout_s)
            if not info.is_published():
                return f"broker {settings.describe()} did not acknowledge within {timeout_s:g} s"
        return None
    except RuntimeError as err:
        return f"publishing to {settings.describe()} failed: {err}"
    finally:
        client.disconnect()
        client.loop_stop()
