"""Fleet hub, MQTT side: the subscriber of ``facepro hub`` on paho-mqtt 2.x, MQTT 5.

Subscription. ``$share/<group>/<prefix>/events`` (an MQTT 5 shared subscription, spec section 4.8.2): every
hub instance of one group gets a share of the boxes' event messages, each message goes to one of them,
so instances share the load; instances of different groups each get every message. QoS 1.

At-least-once, end to end. The client connects with clean start off and a session expiry
(``--session-expiry-s``), so the broker keeps the subscription and queues the messages while a hub is
away (restarted, killed), and re-sends what it delivered but did not get acknowledged. Acknowledgement is
manual (paho's ``manual_ack``): a message's PUBACK is sent only after the batch holding it was committed to
the database (:class:`Sink`), so a hub killed between receipt and commit gets the message again. The
database write is idempotent (:mod:`storage.hub`: newest ``seq`` per event wins), so re-sent and repeated
messages change nothing. The connection's Receive Maximum (``--batch``) bounds the unacknowledged messages
the broker sends at once (Mosquitto also applies its own ``max_inflight_messages``).

Acknowledgements go only to the connection that delivered the message: after a reconnect the packet ids
of the old connection may name other messages. When the broker resumed the session, it sends every
message it has no acknowledgement of again (MQTT 5 section 4.4), so the old connection's pending
messages are dropped (counted as ``resent``); when it did not (the session expired), they are written but
cannot be acknowledged.

Threads. paho's network thread (``loop_start``) only puts what it learns (connected, subscribed,
disconnected, a message) on a queue; :meth:`HubSubscriber.step`, called by the hub's loop, does the rest:
batches, database writes (through the injected :class:`Sink`), acknowledgements, counters. While the
database is unavailable nothing is acknowledged (the broker keeps the messages) and the batch is written
again every ``retry_s``; the fault is logged once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from pipeline.mqtt import BrokerSettings

log = logging.getLogger("facepro.hub")


@dataclass(frozen=True)
class Received:
    """One message from the broker: its packet id ``mid`` and ``qos`` (for the acknowledgement), the payload,
    the MQTT 5 user properties ``(name, value)``, and the connection (count from 1) that delivered it."""

    mid: int
    qos: int
    payload: bytes
    properties: tuple[tuple[str, str], ...]
    connection: int


class Sink(Protocol):
    """Where batches go (the wiring's adapter over :class:`storage.hub.HubStore`)."""

    def write(self, batch: Sequence[Received]) -> dict[str, int]:
        """Store ``batch`` in one transaction (a message that cannot be stored is counted and logged, not
        raised). Returns counts to add to the hub's (``applied``, ``stale``, ``rejected``, ``conflicts``...).
        Raises one of the subscriber's ``db_errors`` when nothing was stored (written again later)."""


@dataclass(frozen=True)
class HubSettings:
    """Where and how the hub subscribes.

    Attributes:
        broker: address, TLS, credentials, client id (stable per hub instance: the broker keeps its session by
            it), keep-alive and reconnect backoff (:class:`pipeline.mqtt.BrokerSettings`).
        prefix: the boxes' ``mqtt.topic_prefix``; group: the shared-subscription group.
        session_expiry_s: how long the broker keeps this hub's session (and queues its messages) while it is
            away, seconds.
        batch: most messages written in one transaction, and the connection's Receive Maximum.
        retry_s: wait before writing a failed batch again, seconds.
    """

    broker: BrokerSettings
    prefix: str = "facepro"
    group: str = "facepro-hub"
    session_expiry_s: int = 86400
    batch: int = 500
    retry_s: float = 1.0

    @property
    def topic(self) -> str:
        """``$share/<group>/<prefix>/events``."""
        return f"$share/{self.group}/{self.prefix}/events"


def make_client(settings: HubSettings) -> Any:
    """A paho-mqtt 2.x MQTT 5 client with manual acknowledgement, credentials, TLS and reconnect backoff set;
    not connected (:meth:`HubSubscriber.start` connects it)."""
    from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5

    b = settings.broker
    client = Client(CallbackAPIVersion.VERSION2, client_id=b.client_id, protocol=MQTTv5, manual_ack=True)
    if b.username is not None:
        client.username_pw_set(b.username, b.password)
    if b.tls:
        client.tls_set(ca_certs=str(b.ca_certs) if b.ca_certs else None)
    client.reconnect_delay_set(b.reconnect_min_s, b.reconnect_max_s)
    return client


def connect_properties(settings: HubSettings) -> Any:
    """CONNECT properties: Session Expiry Interval and Receive Maximum."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = settings.session_expiry_s
    props.ReceiveMaximum = min(65535, settings.batch)
    return props


class HubSubscriber:
    """Receives the boxes' event messages and hands them to a :class:`Sink` in batches (module docstring).

    Args:
        client: from :func:`make_client` (tests may pass any object with paho's ``Client`` API).
        sink: writes batches.
        settings: :class:`HubSettings`.
        db_errors: exceptions of ``sink`` that mean "database unavailable now": logged once, retried.
        clock: monotonic seconds.

    Attributes:
        connected, subscribed: the current connection is up / its subscription was granted.
        counts: ``received`` (messages), ``acked``, ``batches``, ``reconnects``, ``failed_connects``,
            ``resent`` (pending messages dropped at a resumed session: the broker sends them again) and the
            sink's counts.
        last_error: one line on the current fault ("" when none).
    """

    def __init__(self, client: Any, sink: Sink, settings: HubSettings, *,
                 db_errors: tuple[type[BaseException], ...] = (RuntimeError,),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client, self.sink, self.settings, self.db_errors, self.clock = client, sink, settings, db_errors, clock
        self.connected = self.subscribed = False
        self.counts: dict[str, int] = {"received": 0, "acked": 0, "batches": 0, "reconnects": 0, "failed_connects": 0}
        self.last_error = ""
        self._events: queue.Queue[tuple] = queue.Queue()
        self._pending: list[Received] = []
        self._retry_at = 0.0
        self._connects = 0
        self._connection = 0  # paho thread writes, under _lock; a message carries the connection that delivered it
        self._lock = threading.Lock()
        self._logged: set[str] = set()

    # ------------------------------------------------------------ paho thread
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        failed = bool(getattr(reason, "is_failure", False))
        if not failed:
            with self._lock:
                self._connection += 1
            client.subscribe(self.settings.topic, qos=1)
        self._events.put(("connect", failed, str(reason), bool(getattr(flags, "session_present", False))))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        bad = [str(r) for r in reasons if getattr(r, "is_failure", False)]
        self._events.put(("subscribed", bad))

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._events.put(("unreachable",))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._events.put(("disconnect", str(reason)))

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        props = getattr(message, "properties", None)
        user = tuple((str(k), str(v)) for k, v in (getattr(props, "UserProperty", None) or ()))
        with self._lock:
            connection = self._connection
        self._events.put(("message", Received(message.mid, message.qos, bytes(message.payload), user, connection)))

    # ---------------------------------------------------------------- control
    def start(self) -> None:
        """Connect in the background (clean start off, the session expiry set) and subscribe on every
        connection; returns at once."""
        c, b = self.client, self.settings.broker
        c.on_connect, c.on_connect_fail, c.on_disconnect = self._on_connect, self._on_connect_fail, self._on_disconnect
        c.on_subscribe, c.on_message = self._on_subscribe, self._on_message
        c.connect_async(b.host, b.port, b.keepalive_s, clean_start=False, properties=connect_properties(self.settings))
        c.loop_start()

    def step(self, wait_s: float = 0.2) -> None:
        """Wait up to ``wait_s`` for what paho reports, take everything queued, then write the pending messages
        in batches of at most ``batch`` and acknowledge each batch once stored (unless a failed write waits
        for ``retry_s``)."""
        try:
            self._handle(self._events.get(timeout=wait_s))
        except queue.Empty:
            pass
        while True:
            try:
                self._handle(self._events.get_nowait())
            except queue.Empty:
                break
        while self._pending and self.clock() >= self._retry_at:
            self._flush()

    def stop(self) -> None:
        """Write and acknowledge what is pending (one try), then disconnect. The session stays on the broker
        for ``session_expiry_s``: what arrives meanwhile waits for the next start with the same client id."""
        self.step(0.0)
        if self._pending and self._retry_at > self.clock():
            self._retry_at = 0.0
            self._flush()
        if self._pending:
            log.warning("hub: %d message(s) not stored at stop: not acknowledged, the broker sends them again at "
                        "the next start", len(self._pending))
        self.client.disconnect()
        self.client.loop_stop()
        self.connected = self.subscribed = False

    def gauges(self) -> dict[str, int]:
        """The counts plus ``connected``, ``subscribed`` (0/1) and ``pending`` (received, not yet stored)."""
        return {**self.counts, "connected": int(self.connected), "subscribed": int(self.subscribed),
                "pending": len(self._pending)}

    # --------------------------------------------------------------- handling
    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "message":
            self._pending.append(event[1])
            self.counts["received"] += 1
        elif kind == "connect":
            self._connected(failed=event[1], reason=event[2], session_present=event[3])
        elif kind == "subscribed":
            if event[1]:
                self._fault("subscribe", f"broker {self.settings.broker.describe()} refused the subscription "
                            f"{self.settings.topic}: {', '.join(event[1])} (does it support MQTT 5 shared "
                            "subscriptions? check its ACL)")
            else:
                self.subscribed = True
                log.info("hub: subscribed to %s on %s", self.settings.topic, self.settings.broker.describe())
        elif kind == "unreachable":
            self.counts["failed_connects"] += 1
            self._fault("unreachable", f"broker {self.settings.broker.describe()} unreachable; retrying every "
                        f"{self.settings.broker.reconnect_min_s:g}-{self.settings.broker.reconnect_max_s:g} s")
        elif kind == "disconnect" and self.connected:
            self.connected = self.subscribed = False
            self._fault("lost", f"connection to {self.settings.broker.describe()} lost ({event[1]}); reconnecting "
                        "(the broker keeps this hub's messages meanwhile)")

    def _connected(self, failed: bool, reason: str, session_present: bool) -> None:
        if failed:
            self.counts["failed_connects"] += 1
            hint = " (check mqtt.username / mqtt.password)" if "password" in reason or "authori" in reason.lower() else ""
            self._fault(f"refused {reason}", f"broker {self.settings.broker.describe()} refused the connection: "
                        f"{reason}{hint}")
            return
        self._connects += 1
        self.counts["reconnects"] = self._connects - 1
        if session_present:  # the broker sends every message it has no acknowledgement of again
            self.counts["resent"] = self.counts.get("resent", 0) + len(self._pending)
            self._pending = []
        self.connected = True
        self.last_error = ""
        self._logged = {k for k in self._logged if k == "db"}  # the connection faults are over
        log.info("hub: connected to %s as %s (%s session)", self.settings.broker.describe(),
                 self.settings.broker.client_id, "resumed" if session_present else "new")

    def _flush(self) -> None:
        """Write the first ``batch`` pending messages; acknowledge them once stored."""
        batch, self._pending = self._pending[:self.settings.batch], self._pending[self.settings.batch:]
        try:
            counts = self.sink.write(batch)
        except self.db_errors as err:
            self._pending = batch + self._pending
            self._retry_at = self.clock() + self.settings.retry_s
            self._fault("db", f"storing {len(batch)} message(s) failed: {err}; not acknowledged, written again in "
                        f"{self.settings.retry_s:g} s")
            return
        if "db" in self._logged:
            self._logged.discard("db")
            log.info("hub: the database is back: %d message(s) stored", len(batch))
            self.last_error = ""
        self.counts["batches"] += 1
        for key, n in counts.items():
            self.counts[key] = self.counts.get(key, 0) + int(n)
        self._ack(batch)

    def _ack(self, batch: Sequence[Received]) -> None:
        """PUBACK every message of ``batch`` delivered by the current connection (module docstring)."""
        with self._lock:  # the connection cannot change between the check and the acknowledgement
            current = self._connection
            for m in batch:
                if m.qos > 0 and m.connection == current:
                    self.client.ack(m.mid, m.qos)
                    self.counts["acked"] += 1

    def _fault(self, key: str, line: str) -> None:
        """Set ``last_error``; log the line once per fault until it is over."""
        self.last_error = line
        if key not in self._logged:
            self._logged.add(key)
            log.warning("hub: %s", line)
