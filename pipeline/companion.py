"""Frigate companion mode, the wiring of the ``frigate`` process: a paho-mqtt 2.x subscriber on Frigate's
``<frigate.mqtt_prefix>/events``, Frigate's HTTP API (:class:`FrigateApi`, urllib with a timeout), one worker
thread that fetches snapshots, names their faces (an injected ``recognize``: the gallery and the quality gate of
:func:`pipeline.services.identify_doc`), publishes the results and POSTs the sub_labels. The decisions are
:mod:`pipeline.frigate`'s.

Threads. paho's network thread only puts what it learns (connected, disconnected, a message) on a queue;
:meth:`FrigateCompanion.step`, called by the process's loop, parses and filters the messages and queues the
snapshot requests (:class:`pipeline.frigate.WorkQueue`: bounded, the oldest dropped and counted, a newer
snapshot of an event replacing the one still waiting). The worker thread makes the requests one at a time, each
bounded by ``frigate.timeout_s``; a failed one (Frigate unreachable, slow, answering 5xx/404/408/429) goes back
into the queue due after its backoff (``retry_min_s`` doubling up to ``retry_max_s``, ``retries`` at most), so a
failing Frigate holds neither the MQTT loop nor the requests of other events; other 4xx answers are given up at
once (one line says which request and what Frigate answered). Nothing is persisted: requests still queued at a
stop are counted (``frigate_abandoned``) and lost, like Frigate's own MQTT messages while nobody listens.

Counters (the process's counter block, ``facepro status``): see :data:`COUNTS` and :meth:`FrigateCompanion.gauges`.
"""

from __future__ import annotations

import enum
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, replace
from http.client import HTTPException
from typing import Any, Callable, Mapping
from urllib.parse import quote

import cv2
import numpy as np
from paho.mqtt.client import MQTT_ERR_NO_CONN, MQTT_ERR_SUCCESS

from pipeline.config import AppConfig
from pipeline.discovery import Topics
from pipeline.frigate import (Backoff, EventError, FrigateEvent, Outcome, Verdict, WorkQueue, attribute, parse_event,
                              person_box, result_message, EventTracker)

log = logging.getLogger("facepro.frigate")

#: Largest snapshot accepted, bytes.
MAX_SNAPSHOT_BYTES = 32 * 2**20
#: Query of the snapshot request (Frigate API ``/api/events/<id>/snapshot.jpg``): the frame without drawn box or
#: timestamp, uncropped, so the event's ``snapshot.box`` applies (honoured while the event is in progress).
SNAPSHOT_QUERY = "bbox=0&timestamp=0&crop=0"
#: HTTP statuses retried: Frigate busy or restarting, or the event not in its database yet.
RETRY_STATUSES = frozenset({404, 408, 429, 500, 502, 503, 504})
#: Work counts of the process (extra counters; gauges in :meth:`FrigateCompanion.gauges`).
COUNTS = ("frigate_events_seen", "frigate_events_invalid", "frigate_snapshots_queued", "frigate_snapshots_fetched",
          "frigate_snapshots_bad", "frigate_matches", "frigate_unknown", "frigate_ambiguous", "frigate_no_face",
          "frigate_published", "frigate_sub_labels", "frigate_http_errors", "frigate_retries", "frigate_given_up",
          "frigate_dropped", "frigate_superseded", "frigate_recognition_errors", "frigate_abandoned")


class HttpFailure(Exception):
    """A request to Frigate that failed: ``line`` says which and why, ``status`` is the HTTP status (None: no
    answer), ``retryable`` whether trying again may help; ``http`` False for a failure on FacePro's side (the
    gallery's database) that is retried the same way."""

    def __init__(self, line: str, status: int | None, retryable: bool, http: bool = True) -> None:
        super().__init__(line)
        self.line, self.status, self.retryable, self.http = line, status, retryable, http


class FrigateApi:
    """The two calls of Frigate's HTTP API the companion makes, over urllib (no HTTP proxy: Frigate is on the LAN).

    Args:
        url: Frigate's base URL (``frigate.url``, no trailing ``/``).
        timeout_s: bound of connecting and of each read, seconds.
        max_bytes: largest answer read.
    """

    def __init__(self, url: str, timeout_s: float, max_bytes: int = MAX_SNAPSHOT_BYTES) -> None:
        self.url, self.timeout_s, self.max_bytes = url.rstrip("/"), timeout_s, max_bytes
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def snapshot(self, event_id: str) -> bytes:
        """``GET /api/events/<id>/snapshot.jpg?bbox=0&timestamp=0&crop=0``: the JPEG bytes. Raises :class:`HttpFailure`."""
        return self._request("GET", f"/api/events/{quote(event_id, safe='')}/snapshot.jpg?{SNAPSHOT_QUERY}")

    def set_sub_label(self, event_id: str, name: str, score: float) -> None:
        """``POST /api/events/<id>/sub_label`` with ``{"subLabel": name, "subLabelScore": score}``. Raises
        :class:`HttpFailure`."""
        body = json.dumps({"subLabel": name, "subLabelScore": score}).encode()
        self._request("POST", f"/api/events/{quote(event_id, safe='')}/sub_label", body)

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        what = f"Frigate {self.url}: {method} {path.partition('?')[0]}"
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                data = resp.read(self.max_bytes + 1)
        except urllib.error.HTTPError as err:
            retry = err.code in RETRY_STATUSES
            raise HttpFailure(f"{what} answered {err.code} {err.reason}" + ("" if retry else "; not retried"),
                              err.code, retry) from None
        except TimeoutError:
            raise HttpFailure(f"{what}: no answer within {self.timeout_s:g} s (frigate.timeout_s)", None, True) from None
        except (OSError, HTTPException) as err:
            reason = getattr(err, "reason", None) or err
            raise HttpFailure(f"{what}: unreachable ({reason}); check frigate.url", None, True) from None
        if len(data) > self.max_bytes:
            raise HttpFailure(f"{what}: answer over {self.max_bytes} bytes; not retried", None, False)
        return data


class JobKind(enum.Enum):
    """What a queued request does."""

    SNAPSHOT = "snapshot"  # fetch the event's snapshot, name its faces, publish, maybe POST a sub_label
    SUB_LABEL = "sub_label"  # POST a sub_label again (the first try failed)


@dataclass(frozen=True)
class _Job:
    kind: JobKind
    event: FrigateEvent
    attempt: int = 0  # retries made so far
    name: str = ""
    score: float = 0.0


@dataclass(frozen=True)
class CompanionSettings:
    """The companion's settings (from the config's ``frigate`` and ``mqtt`` sections).

    Attributes:
        events_topic: ``<frigate.mqtt_prefix>/events``; topics: FacePro's topics (results, ``box_id``).
        qos: QoS of the subscription and the results; cameras: Frigate cameras served (empty: all).
        backoff: the retry policy; capacity: requests queued at most.
        host, port, keepalive_s: the broker (the ``mqtt`` section's); broker: it as ``mqtt[s]://host:port``.
    """

    events_topic: str
    topics: Topics
    qos: int
    cameras: tuple[str, ...]
    backoff: Backoff
    capacity: int
    host: str
    port: int
    keepalive_s: int
    broker: str

    @classmethod
    def from_config(cls, cfg: AppConfig) -> CompanionSettings:
        from pipeline.mqtt import BrokerSettings, topics_of

        f = cfg.frigate
        if f is None or cfg.mqtt is None:
            raise ValueError("the frigate companion needs the frigate and mqtt sections")
        b = BrokerSettings.from_config(cfg)
        return cls(f"{f.mqtt_prefix}/events", topics_of(cfg), b.qos, f.cameras,
                   Backoff(f.retry_min_s, f.retry_max_s, f.retries), f.queue, b.host, b.port, b.keepalive_s, b.describe())


def make_client(cfg: AppConfig) -> Any:
    """A paho-mqtt 2.x MQTT 5 client for the companion (client id ``<mqtt client id>-frigate``, the ``mqtt``
    section's credentials, TLS and reconnect backoff; no Last Will: the ``mqtt`` process owns availability)."""
    from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5

    from pipeline.mqtt import BrokerSettings

    s = BrokerSettings.from_config(cfg)
    client = Client(CallbackAPIVersion.VERSION2, client_id=f"{s.client_id}-frigate", protocol=MQTTv5)
    if s.username is not None:
        client.username_pw_set(s.username, s.password)
    if s.tls:
        client.tls_set(ca_certs=str(s.ca_certs) if s.ca_certs else None)
    client.reconnect_delay_set(s.reconnect_min_s, s.reconnect_max_s)
    client.max_queued_messages_set(1000)  # results waiting for a reconnection, at most
    return client


Recognize = Callable[[np.ndarray], Mapping[str, Any]]


class FrigateCompanion:
    """The ``frigate`` process's work (module docstring): subscribe, filter, fetch, name, publish, POST.

    Args:
        client: a paho client (:func:`make_client`), not connected.
        api: :class:`FrigateApi` (or anything with its ``snapshot`` / ``set_sub_label``).
        recognize: ``(H, W, 3) uint8`` BGR image → ``{"faces": [{"bbox", "identity", "similarity", "quality"}]}``
            (:func:`pipeline.services.identify_doc` with the gallery's threshold and the quality gate).
        settings: :class:`CompanionSettings`.
        retry_errors: exceptions of ``recognize`` worth a retry (a locked database: ``storage.db.StorageError``).
        observe: called with each analysed snapshot's time (fetch + naming), milliseconds.
        clock: monotonic seconds (the retry times); wall: epoch seconds (the ``time`` of the results).
    """

    def __init__(self, client: Any, api: Any, recognize: Recognize, settings: CompanionSettings,
                 retry_errors: tuple[type[BaseException], ...] = (), observe: Callable[[float], None] = lambda ms: None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.client, self.api, self.recognize, self.settings = client, api, recognize, settings
        self.retry_errors, self.observe, self.clock, self.wall = retry_errors, observe, clock, wall
        self.tracker = EventTracker(settings.cameras)
        self.queue: WorkQueue[_Job] = WorkQueue(settings.capacity)
        self.counts: Counter[str] = Counter({name: 0 for name in COUNTS})
        self.connected = False
        self.up = -1  # 1: Frigate's last answer was not an error of its own; 0: unreachable, slow or 5xx; -1: no request yet
        self.last_error = ""
        self._busy = 0
        self._stopping = False
        self._cond = threading.Condition()
        self._events: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._logged: set[str] = set()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ paho thread
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        failed = bool(getattr(reason, "is_failure", False))
        if not failed:  # (re)subscribe on every connection: a clean session forgets subscriptions
            client.subscribe(self.settings.events_topic, qos=self.settings.qos)
        self._events.put(("connect", failed, str(reason)))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._events.put(("disconnect", str(reason)))

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._events.put(("message", bytes(message.payload)))

    # ---------------------------------------------------------------- control
    def start(self) -> None:
        """Connect in the background and start the worker thread (returns at once)."""
        c, s = self.client, self.settings
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._on_message
        c.on_connect_fail = lambda client, userdata: self._events.put(("unreachable",))
        c.connect_async(s.host, s.port, s.keepalive_s)
        c.loop_start()
        self._thread = threading.Thread(target=self._work, name="frigate-requests", daemon=True)
        self._thread.start()

    def step(self) -> None:
        """Handle what paho reported: connection changes and Frigate's event messages (queued for the worker)."""
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if event[0] == "message":
                self._message(event[1])
            elif event[0] == "connect" and not event[1]:
                self.connected = True
                if "broker" in self._logged:
                    self._logged.discard("broker")
                    if self.last_error.startswith(("broker", "connection to")):
                        self.last_error = ""
                log.info("frigate: subscribed to %s on %s", self.settings.events_topic, self.settings.broker)
            elif event[0] == "connect" or event[0] == "unreachable":
                self._fault("broker", f"broker {self.settings.broker} "
                            + (f"refused the connection: {event[2]}" if event[0] == "connect" else "unreachable")
                            + f"; retrying, Frigate's events on {self.settings.events_topic} are missed meanwhile")
            elif event[0] == "disconnect" and self.connected:
                self.connected = False
                self._fault("broker", f"connection to {self.settings.broker} lost ({event[1]}); reconnecting")

    def stop(self, join_s: float = 10.0) -> None:
        """Stop the worker after its current request (at most ``join_s``), count what is still queued as
        abandoned, disconnect."""
        with self._cond:
            self._stopping = True
            abandoned = len(self.queue.clear())
            self.counts["frigate_abandoned"] += abandoned
            self._cond.notify_all()
        if abandoned:
            log.warning("frigate: %d queued request(s) to Frigate not made at stop (snapshots not analysed or "
                        "sub_labels not sent)", abandoned)
        if self._thread is not None:
            self._thread.join(join_s)
        self.client.disconnect()
        self.client.loop_stop()
        self.connected = False

    def gauges(self) -> dict[str, int]:
        """``frigate_mqtt_connected`` (0/1), ``frigate_up`` (1 Frigate answers, 0 it does not or answers 5xx,
        -1 no request yet), ``frigate_queued`` (requests waiting or in progress)."""
        with self._cond:
            return {"frigate_mqtt_connected": int(self.connected), "frigate_up": self.up,
                    "frigate_queued": len(self.queue) + self._busy}

    def snapshot_counts(self) -> dict[str, int]:
        """The work counts (:data:`COUNTS`), a consistent copy."""
        with self._cond:
            return dict(self.counts)

    # --------------------------------------------------------------- messages
    def _message(self, payload: bytes) -> None:
        try:
            ev = parse_event(payload)
        except EventError as err:
            with self._cond:
                self.counts["frigate_events_invalid"] += 1
            self._fault("invalid", f"a message on {self.settings.events_topic} is not a Frigate event ({err}); ignored")
            return
        with self._cond:
            self.counts["frigate_events_seen"] += 1
            if self.tracker.decide(ev) is not Verdict.ANALYSE:
                return
            self.counts["frigate_snapshots_queued"] += 1
            self._queue(_Job(JobKind.SNAPSHOT, ev), due=self.clock())

    def _queue(self, job: _Job, due: float) -> None:
        """Queue ``job`` (the lock held); count what it replaced or pushed out."""
        superseded, dropped = self.queue.put((job.kind, job.event.id), job, due)
        if superseded is not None:
            self.counts["frigate_superseded"] += 1
        if dropped is not None:
            self.counts["frigate_dropped"] += 1
            if dropped.kind is JobKind.SUB_LABEL:
                self.tracker.not_sent(dropped.event.id, dropped.name)
            self._fault("full", f"more than {self.settings.capacity} requests to Frigate waiting (frigate.queue): "
                        "the oldest are dropped (frigate_dropped)")
        self._cond.notify()

    # ----------------------------------------------------------- worker thread
    def _next(self) -> _Job | None:
        with self._cond:
            while not self._stopping:
                now = self.clock()
                got = self.queue.pop_due(now)
                if got is not None:
                    self._busy = 1
                    return got[1]
                due = self.queue.next_due()
                self._cond.wait(1.0 if due is None else min(1.0, max(0.001, due - now)))
            return None

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._run(job)
            except Exception as err:  # never let the thread die: the line says what failed
                self._fault("worker", f"analysing Frigate event {job.event.id} failed: {type(err).__name__}: {err}")
            finally:
                with self._cond:
                    self._busy = 0

    def _run(self, job: _Job) -> None:
        """One request: a snapshot (then perhaps its sub_label POST) or a sub_label POST; a failure is retried."""
        try:
            post = self._analyse(job) if job.kind is JobKind.SNAPSHOT else job
        except HttpFailure as err:
            self._failed(job, err)
            return
        if post is not None:
            try:
                self._post(post)
            except HttpFailure as err:
                self._failed(post, err)

    def _analyse(self, job: _Job) -> _Job | None:
        """Fetch, name, publish; the sub_label request to make, or None."""
        ev, t0 = job.event, time.perf_counter()
        data = self.api.snapshot(ev.id)
        self._answered()
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        with self._cond:
            self.counts["frigate_snapshots_fetched"] += 1
            self.counts["frigate_snapshots_bad"] += int(image is None)
        if image is None:
            self._fault("snapshot", f"the snapshot of Frigate event {ev.id} ({len(data)} bytes) is not an image; skipped")
            return None
        try:
            faces = list(self.recognize(image)["faces"])
        except self.retry_errors as err:
            with self._cond:
                self.counts["frigate_recognition_errors"] += 1
            raise HttpFailure(f"naming the faces of Frigate event {ev.id} failed: {err}", None, True, http=False) from None
        self._logged.discard("recognition")
        box = person_box(ev, image.shape[1], image.shape[0])
        outcome, name, similarity = attribute(faces, box)
        with self._cond:
            self.counts[f"frigate_{'matches' if outcome is Outcome.MATCH else outcome.value}"] += 1
            post = self.tracker.named(ev.id, outcome, name, similarity)
        self._publish(ev.camera, result_message(ev, faces, box, outcome, name, similarity,
                                                self.settings.topics.box_id, self.wall()))
        self.observe((time.perf_counter() - t0) * 1000.0)
        return _Job(JobKind.SUB_LABEL, ev, name=post[0], score=post[1]) if post is not None else None

    def _post(self, job: _Job) -> None:
        self.api.set_sub_label(job.event.id, job.name, job.score)
        self._answered()
        with self._cond:
            self.counts["frigate_sub_labels"] += 1
        log.info("frigate: event %s on %s is %s (%.3f)", job.event.id, job.event.camera, job.name, job.score)

    def _publish(self, camera: str, doc: Mapping[str, Any]) -> None:
        from pipeline.mqtt import user_properties

        info = self.client.publish(self.settings.topics.frigate(camera), json.dumps(doc), self.settings.qos, False,
                                   user_properties("PUBLISH", self.settings.topics.box_id))
        if info.rc in (MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN):  # NO_CONN: paho keeps it for the reconnection
            with self._cond:
                self.counts["frigate_published"] += 1
        else:
            self._fault("publish", f"publishing on {self.settings.topics.frigate(camera)} failed (paho rc {info.rc})")

    def _failed(self, job: _Job, err: HttpFailure) -> None:
        """Queue the retry of a failed request after its backoff, or give it up (not retryable, out of retries,
        or a newer request for the same event already waits)."""
        attempt, key = job.attempt + 1, (job.kind, job.event.id)
        with self._cond:
            if err.http:
                self.counts["frigate_http_errors"] += 1
                self.up = 0 if err.status is None or err.status >= 500 else 1
            newer = key in self.queue
            retry = err.retryable and not newer and not self.settings.backoff.gives_up(attempt)
            if retry:
                self.counts["frigate_retries"] += 1
                self._queue(replace(job, attempt=attempt), self.clock() + self.settings.backoff.delay(attempt))
            elif not newer:
                self.counts["frigate_given_up"] += 1
                if job.kind is JobKind.SUB_LABEL:
                    self.tracker.not_sent(job.event.id, job.name)
        what = f"{job.kind.value} of event {job.event.id}"
        tail = (f"retry {attempt} of {self.settings.backoff.retries} in {self.settings.backoff.delay(attempt):g} s"
                if retry else "a newer request replaces it" if newer else "given up")
        self._fault("http" if err.http else "recognition", f"{err.line} ({what}: {tail})")

    def _answered(self) -> None:
        """A request to Frigate succeeded: it is up; a logged HTTP fault is over."""
        with self._cond:
            self.up = 1
            if "http" in self._logged:
                self._logged.discard("http")
                log.info("frigate: Frigate answers again")
                if self.last_error.startswith("Frigate"):
                    self.last_error = ""

    def _fault(self, key: str, line: str) -> None:
        """Set ``last_error``; log the line once per fault kind until that kind of fault is over."""
        self.last_error = line
        if key not in self._logged:
            self._logged.add(key)
            log.warning("frigate: %s", line)
