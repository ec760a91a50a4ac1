"""Test helpers for MQTT: a private Mosquitto broker on a free port, and a recording subscriber.

The broker is the real ``mosquitto`` binary with a tiny config (``listener PORT 127.0.0.1``, anonymous or
password logins, persistence off unless asked for); it can be stopped and started again on the same port
(broker outages). :class:`Recorder` is a paho-mqtt MQTT 5 subscriber that keeps every message it receives.
"""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

SYSTEM_BROKER = ("127.0.0.1", 1883)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.05,
               between: Callable[[], None] | None = None) -> object:
    """Poll ``condition`` until it returns something truthy (returned); AssertionError naming ``what`` when it
    does not within ``timeout_s`` (a bound against hanging, not a timing requirement)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if between is not None:
            between()
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        time.sleep(poll_s)


class Broker:
    """A private ``mosquitto`` on 127.0.0.1.

    Args:
        folder: where its config (and password file, persistence) live.
        users: ``{name: password}``; None: anonymous logins allowed.
        persistence: keep sessions and retained messages across :meth:`stop` / :meth:`start`
            (a subscriber with a persistent session then misses nothing while the broker is down).
        acl: the text of a Mosquitto ``acl_file`` (with ``users``).
    """

    def __init__(self, folder: Path, users: dict[str, str] | None = None, persistence: bool = False,
                 acl: str | None = None) -> None:
        if shutil.which("mosquitto") is None:
            pytest.skip("the mosquitto binary is not installed")
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"listener {self.port} 127.0.0.1", f"allow_anonymous {'false' if users else 'true'}",
                 f"user {getpass.getuser()}",  # started as root it would switch to "mosquitto" and lose its files
                 f"persistence {'true' if persistence else 'false'}"]
        if persistence:
            lines += [f"persistence_location {folder}/", "autosave_interval 1"]
        if users:
            pw = folder / "passwd"
            pw.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
            subprocess.run(["mosquitto_passwd", "-U", str(pw)], check=True)
            lines.append(f"password_file {pw}")
        if acl is not None:
            (folder / "acl").write_text(acl)
            lines.append(f"acl_file {folder / 'acl'}")
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Broker:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(self._accepting, 10, f"mosquitto listening on port {self.port}")
        return self

    def _accepting(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "mosquitto exited at start"
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    user_properties: tuple[tuple[str, str], ...] = ()

    def json(self) -> dict:
        return json.loads(self.payload)

    @property
    def text(self) -> str:
        return self.payload.decode()


class Recorder:
    """An MQTT 5 subscriber on ``filters`` that records every message (thread-safe).

    Args:
        port: broker port on 127.0.0.1; host: the broker host.
        persistent: a persistent session (clean start off, 1 h expiry): with a broker that keeps sessions,
            messages published while this client is away are delivered when it is back.
    """

    def __init__(self, port: int, filters: tuple[str, ...], host: str = "127.0.0.1", persistent: bool = False,
                 client_id: str | None = None) -> None:
        from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"rec-{time.monotonic_ns()}",
                             protocol=MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(f_, 1) for f_ in filters])
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = self._on_message
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect(host, port, 30, clean_start=not persistent, properties=props)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the recorder's subscription was not acknowledged"

    def _on_message(self, client, userdata, msg) -> None:
        props = getattr(msg, "properties", None)
        user = tuple(getattr(props, "UserProperty", ()) or ())
        with self._lock:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain), user))

    def on(self, topic: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def all(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
