"""All ZeroMQ code: one context per process, typed senders and receivers.

Endpoints are ``ipc://`` sockets inside the run's runtime directory (mode
0700). Every socket has an explicit high-water mark; receivers poll with a
timeout; closing uses ``linger=0`` except where a sender must deliver what it
queued before exiting (``linger_ms``). Messages are encoded by
:mod:`pipeline.codec`; a message that fails to decode is counted in
``Receiver.malformed`` and skipped, so a receiving stage keeps running.

Endpoint names used by the pipeline:

- ``frames-<camera>``: capture binds PUSH; detection processes connect PULL.
- ``detections-<i>``: recognition process ``i`` binds PULL; detection connects PUSH.
- ``storage``: storage binds PULL; recognition connects PUSH.
- ``stats``: supervisor binds PULL; every process connects PUSH (heartbeats).
- ``control``: supervisor binds REP; ``facepro status`` / ``scale`` connect REQ.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq

from pipeline.codec import MalformedMessage, decode, encode
from pipeline.messages import Ack

#: Unix socket paths are limited to ~107 bytes.
MAX_IPC_PATH = 100


class TransportError(RuntimeError):
    """A socket that cannot be bound/connected, or a peer that does not answer."""


def make_runtime_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 (sockets are private to the user).

    Raises:
        TransportError: the socket paths inside it would be too long for ``ipc://``.
    """
    if len(str(path)) + 24 > MAX_IPC_PATH:
        raise TransportError(f"runtime directory {path} is too long for ipc:// sockets (limit ~{MAX_IPC_PATH} bytes); use a shorter FACEPRO_DATA_DIR")
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


class Transport:
    """The process's ZeroMQ context and sockets, rooted at a runtime directory."""

    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = Path(runtime_dir)
        self.ctx = zmq.Context()
        self._sockets: list[zmq.Socket] = []

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.runtime_dir / name}.sock"

    def _socket(self, kind: int, hwm: int, linger_ms: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, linger_ms)
        self._sockets.append(sock)
        return sock

    def _attach(self, sock: zmq.Socket, name: str, bind: bool) -> None:
        ep = self.endpoint(name)
        try:
            sock.bind(ep) if bind else sock.connect(ep)
        except zmq.ZMQError as err:
            raise TransportError(f"cannot {'bind' if bind else 'connect'} {ep}: {err}") from None

    def sender(self, name: str, *, bind: bool = False, hwm: int = 64, linger_ms: int = 0) -> Sender:
        """A PUSH socket for the endpoint ``name``."""
        sock = self._socket(zmq.PUSH, hwm, linger_ms)
        self._attach(sock, name, bind)
        return Sender(sock)

    def receiver(self, name: str, *, bind: bool = True, hwm: int = 64) -> Receiver:
        """A PULL socket for the endpoint ``name``."""
        sock = self._socket(zmq.PULL, hwm, 0)
        self._attach(sock, name, bind)
        return Receiver(sock)

    def server(self, name: str) -> Server:
        """A REP socket bound at ``name`` (the supervisor's control endpoint)."""
        sock = self._socket(zmq.REP, 16, 0)
        self._attach(sock, name, True)
        return Server(sock)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self.ctx.term()


class Sender:
    """Sends encoded messages; never blocks forever."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.full = 0  # sends abandoned because the queue stayed full

    def send(self, msg: object, timeout_ms: int | None = 0) -> bool:
        """Send ``msg``. ``timeout_ms=0``: fail at once if full; ``None``: wait until sent.

        Returns:
            False (and counts ``full``) when the queue stayed full for ``timeout_ms``.
        """
        frames = encode(msg)
        if timeout_ms is None:
            self.sock.send_multipart(frames, copy=False)
            return True
        if timeout_ms > 0 and not self.sock.poll(timeout_ms, zmq.POLLOUT):
            self.full += 1
            return False
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            self.full += 1
            return False

    def send_until(self, msg: object, stop: object, slice_ms: int = 100) -> bool:
        """Send, waiting while the queue is full, until sent or ``stop.is_set()``."""
        while not stop.is_set():  # type: ignore[attr-defined]
            if self.send(msg, timeout_ms=slice_ms):
                return True
        return False


class Receiver:
    """Receives and decodes messages with a timeout; counts malformed ones."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.malformed = 0
        self.last_malformed = ""

    def recv(self, timeout_ms: int) -> object | None:
        """Next decoded message, or None after ``timeout_ms`` (or for a malformed one)."""
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return None
        frames = self.sock.recv_multipart(copy=False)
        try:
            return decode(frames)
        except MalformedMessage as err:
            self.malformed += 1
            self.last_malformed = str(err)
            return None

    def connect(self, endpoint_name: str, transport: Transport) -> None:
        """Also pull from another endpoint (a PULL socket may connect to several PUSHers)."""
        transport._attach(self.sock, endpoint_name, False)


class Server(Receiver):
    """REP socket: :meth:`poll_request` then :meth:`reply` (a malformed request is answered with a failed Ack)."""

    def poll_request(self, timeout_ms: int) -> object | None:
        before = self.malformed
        msg = self.recv(timeout_ms)
        if self.malformed != before:
            self.reply(Ack(ok=False, message=f"malformed request: {self.last_malformed}"))
        return msg

    def reply(self, msg: object) -> None:
        self.sock.send_multipart(encode(msg), copy=False)


def request(runtime_dir: Path, name: str, msg: object, timeout_ms: int = 3000) -> object:
    """One REQ/REP round trip to ``name`` in ``runtime_dir`` with a timeout (for the CLI).

    Raises:
        TransportError: no answer within ``timeout_ms`` (the supervisor is not running or stuck).
    """
    t = Transport(runtime_dir)
    try:
        sock = t._socket(zmq.REQ, 1, 0)
        t._attach(sock, name, False)
        sock.send_multipart(encode(msg))
        if not sock.poll(timeout_ms, zmq.POLLIN):
            raise TransportError(f"no answer from {t.endpoint(name)} within {timeout_ms} ms")
        return decode(sock.recv_multipart())
    finally:
        t.close()
