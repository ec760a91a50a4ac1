"""``facepro hub``: the fleet hub (one view of the events of many boxes).

Wiring module (like cli.py): it joins the MQTT subscriber (:mod:`pipeline.hub`), the hub's database writes
(:mod:`storage.hub`) and the HTTP API over the hub's database (:mod:`pipeline.api`, as ``facepro serve``).
One process: the subscriber's loop runs in a thread, the API server (uvicorn) in another; SIGTERM/SIGINT
stops both (what is stored is acknowledged first; the rest the broker sends again at the next start).

Several instances (same ``--group``, each its own ``--client-id``) share the boxes' messages over the MQTT 5
shared subscription and may write to one PostgreSQL database (README, "Fleet hub").
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import threading
from dataclasses import replace
from typing import Any, Callable, Sequence

from pipeline.config import AppConfig, MqttConfig, data_dir, database_url, load_config
from pipeline.hub import HubSettings, HubSubscriber, Received, make_client

log = logging.getLogger("facepro.hub")

_GROUP = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Refused messages logged one by one; after that, one line every this many.
REFUSALS_LOGGED = 10


class StoreSink:
    """:class:`pipeline.hub.Sink` over :class:`storage.hub.HubStore`: each batch is reduced by a
    :class:`storage.hub.HubMerge` (newest version per event) and written in one transaction.

    Counts per batch: ``applied``, ``stale`` (the stored row is as new or newer), ``superseded`` (a newer
    message of the event was in the same batch), ``rejected`` (not a valid event message; logged),
    ``conflicts`` (the event id belongs to another box; logged). Every received message is in exactly one.
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self.refused = 0

    def write(self, batch: Sequence[Received]) -> dict[str, int]:
        from storage.hub import HubMerge, MessageError, payload_box

        merge = HubMerge()
        for m in batch:
            try:
                merge.add(m.payload, m.properties)
            except MessageError as err:
                self.refused += 1
                if self.refused <= REFUSALS_LOGGED or self.refused % 1000 == 0:
                    log.warning("hub: a message of box %s refused (%d so far): %s; fix that box's FacePro version "
                                "or whatever else publishes on the events topic", payload_box(m.payload),
                                self.refused, err)
        result = self.store.write(merge.take())
        conflicts = [*merge.conflicts, *result.conflicts]
        for event_id, stored, got in conflicts:
            log.warning("hub: event %s of box %s not stored: that event id belongs to %s", event_id, got,
                        f"box {stored}" if stored else "this database's own pipeline")
        return {"applied": result.applied, "stale": result.stale, "superseded": merge.superseded,
                "rejected": merge.rejected, "conflicts": len(conflicts)}


def hub_settings(cfg: AppConfig, args: argparse.Namespace) -> HubSettings:
    """The subscriber's settings: the config's ``mqtt`` section (credentials, TLS, backoff; defaults when
    absent) with ``--mqtt`` / ``--prefix`` / ``--group`` / ``--client-id`` / ``--session-expiry-s`` /
    ``--batch`` applied.

    Raises:
        ValueError: an option out of range or of the wrong form (one line naming it).
    """
    from pydantic import ValidationError

    from pipeline.mqtt import BrokerSettings

    tree = cfg.mqtt.model_dump() if cfg.mqtt is not None else {}
    tree.update({k: v for k, v in (("url", args.mqtt), ("topic_prefix", args.prefix)) if v is not None})
    try:
        mqtt = MqttConfig.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        flag = {"url": "--mqtt", "topic_prefix": "--prefix"}.get(str(first["loc"][0]), f"mqtt.{first['loc'][0]}")
        raise ValueError(f"{flag}: {first['msg']}") from None
    client_id = args.client_id or f"facepro-hub-{cfg.box_id}"[:64]
    for flag, value, pattern, chars in (("--group", args.group, _GROUP, "A-Z a-z 0-9 _ -"),
                                        ("--client-id", client_id, _CLIENT_ID, "A-Z a-z 0-9 _ . -")):
        if not pattern.match(value):
            raise ValueError(f"{flag}: {value!r} must be 1-64 characters of {chars}")
    if not 0 <= args.session_expiry_s <= 2**32 - 1:
        raise ValueError(f"--session-expiry-s: expected 0 to {2**32 - 1}, got {args.session_expiry_s}")
    if not 1 <= args.batch <= 65535:
        raise ValueError(f"--batch: expected 1 to 65535, got {args.batch}")
    broker = replace(BrokerSettings.from_config(cfg.model_copy(update={"mqtt": mqtt})), client_id=client_id)
    return HubSettings(broker, mqtt.topic_prefix, args.group, args.session_expiry_s, args.batch)


def _ingest(sub: HubSubscriber, stop: Any, failure: list[BaseException]) -> None:
    """The subscriber's loop until ``stop``; a crash is recorded in ``failure`` and stops the hub."""
    try:
        while not stop.is_set():
            sub.step(0.2)
    except Exception as err:  # noqa: BLE001 - reported as the hub's failure, then the process exits 1
        log.exception("hub: the subscriber failed")
        failure.append(err)
        stop.set()
    finally:
        sub.stop()


def _api(cfg: AppConfig, db: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """``(app, bound socket)`` of the HTTP API over the hub's database (``facepro serve``'s app; no jobs).

    Raises:
        ValueError: the address cannot be bound, or ``--host`` needs a token.
    """
    from pydantic import ValidationError

    from pipeline.api import ApiContext, PipelineLink, bind, create_app
    from pipeline.config import ApiConfig, StorageConfig
    from pipeline.services import StorageBackend

    api_tree = cfg.api.model_dump()
    api_tree.update({k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    try:
        cfg = cfg.model_copy(update={"api": ApiConfig.model_validate(api_tree),
                                     "storage": StorageConfig.model_validate({**cfg.storage.model_dump(), "url": db})})
    except ValidationError as err:
        raise ValueError("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in err.errors())) from None
    try:
        sock = bind(cfg.api.host, cfg.api.port)
    except OSError as err:
        raise ValueError(str(err)) from None
    backend = StorageBackend(cfg, data_dir(), None, threads=1)
    return create_app(ApiContext(cfg, backend, PipelineLink(data_dir()), alone=True)), sock


def cmd_hub(args: argparse.Namespace) -> int:
    """``facepro hub``: subscribe, store, serve; exit 0 after a stop signal, 1 when the subscriber failed."""
    from pipeline.api import serve
    from pipeline.runner import StopFlag
    from storage.db import StorageError, describe, open_engine, upgrade
    from storage.hub import HubStore

    cfg = load_config(args.config)
    settings = hub_settings(cfg, args)
    db = args.db or database_url(cfg)
    upgrade(db)
    app, sock = _api(cfg, db, args) if not args.no_api else (None, None)
    engine = open_engine(db)
    sub = HubSubscriber(make_client(settings), StoreSink(HubStore(engine)), settings, db_errors=(StorageError,))
    stop = StopFlag().install()
    failure: list[BaseException] = []
    sub.start()
    print(f"hub {settings.broker.client_id}: {settings.topic} on {settings.broker.describe()} into {describe(db)}",
          flush=True)
    try:
        if sock is None:
            _ingest(sub, stop, failure)
        else:
            ingest = threading.Thread(target=_ingest, args=(sub, stop, failure), name="hub-ingest", daemon=True)
            ingest.start()
            host, port = sock.getsockname()[:2]
            # one write: under PYTHONUNBUFFERED, print's separate "\n" lets a log line from the ingest thread in
            sys.stdout.write(f"serving the FacePro API on http://{f'[{host}]' if ':' in host else host}:{port} over "
                             "the hub's database (Ctrl-C stops)\n")
            sys.stdout.flush()
            try:
                serve(app, sock, stop)
            except RuntimeError as err:
                failure.append(err)
            finally:
                stop.set()
                ingest.join()
    finally:
        engine.dispose()
        print(json.dumps({"hub": sub.gauges()}), flush=True)
    return 1 if failure else 0


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``hub`` to the ``facepro`` parser (``add`` is cli.build_parser's helper)."""
    hub = add("hub", cmd_hub, "fleet hub: store the event messages of many boxes (MQTT) in one database and serve "
              "/api/events across them (README 'Fleet hub')")
    hub.add_argument("--mqtt", metavar="URL", help="broker, mqtt[s]://HOST[:PORT] (default: mqtt.url of the config, "
                     "else mqtt://127.0.0.1:1883); credentials and TLS come from the config's mqtt section")
    hub.add_argument("--db", metavar="URL", help="the hub's database, e.g. postgresql://user@host/db (default: "
                     "storage.url of the config); migrated to the current schema at start")
    hub.add_argument("--prefix", help="the boxes' mqtt.topic_prefix (default: the config's, else facepro)")
    hub.add_argument("--group", default="facepro-hub", help="shared-subscription group: instances of one group share "
                     "the messages (default: %(default)s)")
    hub.add_argument("--client-id", help="MQTT client id, one per instance and the same at every restart (the "
                     "broker keeps the instance's session by it; default: facepro-hub-<box_id>)")
    hub.add_argument("--session-expiry-s", type=int, default=86400, help="how long the broker keeps queuing for a "
                     "stopped instance, seconds (default: %(default)s)")
    hub.add_argument("--batch", type=int, default=500, help="most messages per database transaction and unacknowledged "
                     "at once (default: %(default)s)")
    hub.add_argument("--host", help="API address (default: api.host; anything but loopback requires api.token)")
    hub.add_argument("--port", type=int, help="API port (default: api.port; 0: any free port)")
    hub.add_argument("--no-api", action="store_true", help="store only; serve nothing (e.g. a second instance)")
