"""All ZeroMQ code: one context per process, typed senders and receivers.

Endpoints are ``ipc://`` sockets inside the run's runtime directory (mode
0700). Every socket has an explicit high-water mark; receivers poll with a
timeout; closing uses ``linger=0`` except where a sender must deliver what it
queued before exiting (``linger_ms``). Messages are encoded by
:mod:`pipeline.codec`; a message that fails to decode is counted in
``Receiver.malformed`` and skipped, so a receiving stage keeps running.

Endpoint names used by the pipeline:

- ``frames-<camera>``: capture binds a :class:`Dispatcher` (ROUTER); each detection
  process connects a :class:`CreditInbox` (one DEALER per camera). Frames are
  sent only against credits the detection process granted, so adding or
  removing a detection process never loses or duplicates a frame.
- ``detections-<i>``: recognition process ``i`` binds PULL; detection connects PUSH.
- ``storage``: storage binds PULL; recognition connects PUSH through a
  :class:`ReliableSender`: every item is numbered and kept until storage
  acknowledges its commit on ``storage-acks`` (PUB → SUB), and re-sent when no
  acknowledgement comes (e.g. storage was restarted). Storage writes are
  idempotent (events upserted by UUID, embeddings by natural key), so a
  re-sent item is never duplicated: delivery is effectively exactly-once.
- ``stats``: supervisor binds PULL; every process connects PUSH (heartbeats).
- ``control``: supervisor binds REP; ``facepro status`` / ``scale`` connect REQ.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from pathlib import Path

import zmq

from pipeline.codec import MalformedMessage, decode, encode
from pipeline.messages import Ack, Credit, CreditAck, StorageAck, StorageItem

#: Unix socket paths are limited to ~107 bytes.
MAX_IPC_PATH = 100


class TransportError(RuntimeError):
    """A socket that cannot be bound/connected, or a peer that does not answer."""


#: umask of every FacePro process: files 0600, folders 0700 (face embeddings, snapshots and backups are private).
PRIVATE_UMASK = 0o077


def make_runtime_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 (sockets are private to the user).

    A parent folder outside the data dir (the ``/tmp/facepro-<uid>`` fallback)
    that already exists must belong to this user and be writable by nobody
    else, or another local user could have planted it to read the sockets.

    Raises:
        TransportError: the socket paths inside it would be too long for
            ``ipc://``, or a pre-existing parent is someone else's or open to others.
    """
    if not fits_ipc(path):
        raise TransportError(f"runtime directory {path} is too long for ipc:// sockets (limit ~{MAX_IPC_PATH} bytes); use a shorter FACEPRO_DATA_DIR")
    if path.parent.name.startswith("facepro-") and path.parent.exists():
        check_private_dir(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.mkdir(exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def check_private_dir(path: Path) -> None:
    """Refuse a folder owned by another user, or writable by group or others.

    Raises:
        TransportError: naming the folder, its owner/mode and what to do.
    """
    st = path.lstat()
    if path.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise TransportError(f"runtime directory {path} is not private (owner uid {st.st_uid}, mode {st.st_mode & 0o777:o}); "
                             f"remove it or set FACEPRO_DATA_DIR to a shorter private path")


def fits_ipc(path: Path) -> bool:
    """True if sockets inside ``path`` stay within the ``ipc://`` path limit."""
    return len(str(path)) + 24 <= MAX_IPC_PATH


def socket_dir_for(run_dir: Path, run_id: str) -> Path:
    """Where a run's sockets live: ``run_dir`` itself, or ``/tmp/facepro-<uid>/<run_id>`` when ``run_dir`` is too deep."""
    if fits_ipc(run_dir):
        return run_dir
    return Path(tempfile.gettempdir()) / f"facepro-{os.getuid()}" / run_id


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

    def dispatcher(self, name: str) -> Dispatcher:
        """A ROUTER socket bound at ``name`` that sends frames against credits (capture side)."""
        sock = self._socket(zmq.ROUTER, 1000, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._attach(sock, name, True)
        return Dispatcher(sock)

    def credit_inbox(self, names: list[str], window: int) -> CreditInbox:
        """DEALER sockets connected to each dispatcher ``names`` (detection side), granting ``window`` credits
        each time a dispatcher connects. The sockets' routing id is this process's pid, so capture knows which
        process holds each frame."""
        socks, monitors = [], []
        for name in names:
            sock = self._socket(zmq.DEALER, 1000, 0)
            sock.setsockopt(zmq.IDENTITY, str(os.getpid()).encode())
            monitors.append(sock.get_monitor_socket(zmq.EVENT_CONNECTED))
            monitors[-1].setsockopt(zmq.LINGER, 0)
            self._sockets.append(monitors[-1])  # closed by close() (an open one would block the context's term)
            self._attach(sock, name, False)
            socks.append(sock)
        return CreditInbox(socks, window, monitors=monitors)

    def publisher(self, name: str, linger_ms: int = 1000, *, bind: bool = True, hwm: int = 10_000) -> Sender:
        """A PUB socket at ``name``: bound (storage's acknowledgements) or, ``bind=False``, connected to a bound
        SUB (recognition's live tracks); a PUB never blocks: beyond ``hwm`` queued messages, or with no
        subscriber, a message is dropped."""
        sock = self._socket(zmq.PUB, hwm, linger_ms)
        self._attach(sock, name, bind)
        return Sender(sock)

    def subscriber(self, name: str, *, bind: bool = False, subscribe: bool = True, hwm: int = 10_000) -> Receiver:
        """A SUB socket connected to ``name`` (or bound, ``bind=True``), subscribed to everything unless
        ``subscribe`` is False (then set ``zmq.SUBSCRIBE`` on ``.sock`` when wanted)."""
        sock = self._socket(zmq.SUB, hwm, 0)
        if subscribe:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._attach(sock, name, bind)
        return Receiver(sock)

    def server(self, name: str) -> Server:
        """A REP socket bound at ``name`` (the supervisor's control endpoint)."""
        sock = self._socket(zmq.REP, 16, 0)
        self._attach(sock, name, True)
        return Server(sock)

    def close(self) -> None:
        for sock in self._sockets:
            if sock.type == zmq.DEALER:
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
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

    def stop_receiving(self) -> None:
        """Nothing to withdraw for a PULL socket: it drains until idle."""

    def drained(self, idle_s: float, drain_idle_s: float) -> bool:
        return idle_s >= drain_idle_s

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


class Dispatcher:
    """Capture side of credit-based flow control: send each message to a worker that asked for one.

    Workers (``CreditInbox``) grant credits; :meth:`send` spends one, so a
    worker never holds more than its window of frames and frames go to idle
    workers first. A revoke is answered with :class:`CreditAck` after removing
    the worker's unused credits. Call :meth:`service` while idle so revokes are
    answered. :meth:`finish` sends the same answer unasked when the source has
    ended, so workers drain at once instead of waiting for a revoke to time out.
    """

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.credits: deque[bytes] = deque()
        self.peers: set[bytes] = set()  # routing ids of the workers that ever granted credits
        self.full = 0
        self.malformed = 0
        self.last_peer = b""  # routing id (the worker's pid) the last message went to

    def service(self, timeout_ms: int = 0) -> None:
        """Handle credit messages that have arrived (waiting up to ``timeout_ms`` for the first)."""
        while self.sock.poll(timeout_ms, zmq.POLLIN):
            timeout_ms = 0
            identity, *frames = self.sock.recv_multipart()
            try:
                msg = decode(frames)
            except MalformedMessage:
                self.malformed += 1
                continue
            if isinstance(msg, Credit) and msg.frames > 0:
                self.credits.extend([identity] * msg.frames)
                self.peers.add(identity)
            elif isinstance(msg, Credit):
                self._revoke(identity, -msg.frames)

    def _revoke(self, identity: bytes, n: int) -> None:
        kept = [c for c in self.credits if c != identity]
        revoked = min(n, len(self.credits) - len(kept))
        self.credits = deque(kept)
        self._send_to(identity, CreditAck(revoked=revoked))

    def finish(self, linger_ms: int = 500) -> int:
        """No more frames will be sent (the file ended, or capture stops): tell every worker that granted credits
        with a :class:`CreditAck` (``revoked`` 0), which follows every frame sent to it on the same connection, and
        let the socket linger up to ``linger_ms`` at close to deliver it. Returns the number of workers told."""
        self.service(0)
        told = sum(self._send_to(peer, CreditAck(revoked=0)) for peer in sorted(self.peers))
        self.credits.clear()
        self.sock.setsockopt(zmq.LINGER, linger_ms)
        return told

    def _send_to(self, identity: bytes, msg: object) -> bool:
        try:
            self.sock.send_multipart([identity, *encode(msg)], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError:  # EHOSTUNREACH (worker gone) or EAGAIN: forget its credits
            self.credits = deque(c for c in self.credits if c != identity)
            return False

    def send(self, msg: object, timeout_ms: int = 0) -> bool:
        """Send ``msg`` to a worker with a credit, waiting up to ``timeout_ms`` for one.

        Returns:
            False (and counts ``full``) when no worker asked for a frame in time.
        """
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            self.service(0)
            while self.credits:
                peer = self.credits.popleft()
                if self._send_to(peer, msg):
                    self.last_peer = peer
                    return True
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                self.full += 1
                return False
            self.service(min(remaining_ms, 100))

    def send_until(self, msg: object, stop: object, slice_ms: int = 100, idle: object = None) -> bool:
        """Send, waiting for a credit, until sent or ``stop.is_set()``; ``idle()`` runs between waits
        (the capture's heartbeat: waiting for a busy detection process is not being dead)."""
        while not stop.is_set():  # type: ignore[attr-defined]
            if self.send(msg, timeout_ms=slice_ms):
                return True
            if idle is not None:
                idle()  # type: ignore[operator]
        return False


class CreditInbox:
    """Detection side: DEALER sockets to each camera's :class:`Dispatcher`, granting credits.

    ``window`` credits are granted whenever a dispatcher connects (at start, and
    again when a restarted capture process binds its endpoint anew: the credits
    of the dead one died with it); every received frame is replaced by a new
    credit at once, so each camera keeps about ``window`` frames in flight to
    this process. :meth:`stop_receiving` revokes the unused credits; :meth:`drained`
    is True once every camera has answered, or said before that its source ended
    (:meth:`Dispatcher.finish`): all frames it sent here have then arrived; or
    after ``revoke_timeout_s`` (a capture that exited without saying so).

    Args:
        socks: connected DEALER sockets, one per camera.
        window: credits per camera.
        revoke_timeout_s: see :meth:`drained`.
        monitors: ``EVENT_CONNECTED`` monitor sockets of ``socks`` (same order);
            without them the window is granted once, at construction.
    """

    def __init__(self, socks: list[zmq.Socket], window: int, revoke_timeout_s: float = 3.0,
                 monitors: list[zmq.Socket] | None = None) -> None:
        self.socks = socks
        self.poller = zmq.Poller()
        for sock in socks:
            self.poller.register(sock, zmq.POLLIN)
            if monitors is None:
                sock.send_multipart(encode(Credit(frames=window)))
        self._monitors = {m: sock for m, sock in zip(monitors or [], socks)}
        for mon in self._monitors:
            self.poller.register(mon, zmq.POLLIN)
        self.window = window
        self.revoke_timeout_s = revoke_timeout_s
        self.malformed = 0
        self.last_malformed = ""
        self.stopping_since: float | None = None
        self.acked: set[int] = set()
        self.connects = 0
        self._ready: deque[tuple[zmq.Socket, list]] = deque()

    def _connected(self, monitor: zmq.Socket) -> None:
        """A dispatcher (re)connected: grant it the window, unless stopping."""
        monitor.recv_multipart()  # the event itself: (event id, value), endpoint
        self.connects += 1
        self.acked.discard(id(self._monitors[monitor]))  # a restarted capture: its frames follow again
        if self.stopping_since is None:
            self._monitors[monitor].send_multipart(encode(Credit(frames=self.window)))

    def recv(self, timeout_ms: int) -> object | None:
        """Next frame message from any camera, or None after ``timeout_ms``."""
        if not self._ready:
            for sock, _ in self.poller.poll(timeout_ms):
                if sock in self._monitors:
                    self._connected(sock)
                else:
                    self._ready.append((sock, sock.recv_multipart(copy=False)))
        while self._ready:
            sock, frames = self._ready.popleft()
            try:
                msg = decode(frames)
            except MalformedMessage as err:
                self.malformed += 1
                self.last_malformed = str(err)
                msg = None
            if isinstance(msg, CreditAck):
                self.acked.add(id(sock))
                continue
            if self.stopping_since is None:
                sock.send_multipart(encode(Credit(frames=1)))
            if msg is not None:
                return msg
        return None

    def stop_receiving(self) -> None:
        """Revoke unused credits on every connection (once)."""
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
            for sock in self.socks:
                sock.send_multipart(encode(Credit(frames=-self.window)))

    def drained(self, idle_s: float, drain_idle_s: float) -> bool:
        if self.stopping_since is None:
            return False
        if len(self.acked) == len(self.socks):
            return True
        return time.monotonic() - self.stopping_since > self.revoke_timeout_s and idle_s >= drain_idle_s


class ReliableSender:
    """At-least-once delivery to storage: number, keep, re-send until acknowledged.

    :meth:`send` wraps a message in a :class:`StorageItem` and keeps it until a
    :class:`StorageAck` for this producer covers its ``seq``. :meth:`service`
    (call it often) reads acknowledgements and, when the oldest kept item has
    waited ``resend_after_s`` without any acknowledgement progress, re-sends
    every kept item in order (storage may have been restarted and lost its
    uncommitted batch). At most ``max_unacked`` items are kept; beyond that the
    oldest are dropped and counted in ``dropped`` (reported, never silent).
    With an ``outbox`` (:class:`pipeline.journal.Outbox`), every kept item and
    every acknowledgement is also written to disk, so a successor of a killed
    process re-sends what was never acknowledged (:meth:`resend_inherited`).
    """

    def __init__(self, sender: Sender, acks: Receiver, producer: str, resend_after_s: float = 5.0,
                 max_unacked: int = 200_000, outbox: object = None) -> None:
        self.outbox = outbox  # pipeline.journal.Outbox: kept items survive this process (file mode)
        self.sender = sender
        self.acks = acks
        self.producer = producer
        self.resend_after_s = resend_after_s
        self.max_unacked = max_unacked
        self.unacked: dict[int, StorageItem] = {}
        self.next_seq = 1
        self.resent = 0
        self.dropped = 0
        self._progress_at = time.monotonic()

    def send(self, msg: object, timeout_ms: int | None = 0) -> bool:
        """Number and keep ``msg`` (a TrackUpdate or EmbeddingRecord), then try to send it. Always True: it is kept."""
        is_update = type(msg).__name__ == "TrackUpdate"
        item = StorageItem(producer=self.producer, seq=self.next_seq,
                           update=msg if is_update else None, embedding=None if is_update else msg)  # type: ignore[arg-type]
        self.next_seq += 1
        if not self.unacked:
            self._progress_at = time.monotonic()
        self.unacked[item.seq] = item
        if self.outbox is not None:
            self.outbox.sent(item)  # type: ignore[attr-defined]
        if len(self.unacked) > self.max_unacked:
            self.unacked.pop(next(iter(self.unacked)))
            self.dropped += 1
        self.sender.send(item, timeout_ms=timeout_ms or 0)
        return True

    def service(self) -> None:
        """Apply acknowledgements that arrived; re-send everything kept if storage went quiet."""
        while (ack := self.acks.recv(timeout_ms=0)) is not None:
            if isinstance(ack, StorageAck) and ack.producer == self.producer:
                before = len(self.unacked)
                for seq in ack.seqs.tolist():
                    self.unacked.pop(seq, None)
                if len(self.unacked) < before:
                    self._progress_at = time.monotonic()
                    if self.outbox is not None:
                        self.outbox.acked(self.producer, ack.seqs, len(self.unacked))  # type: ignore[attr-defined]
                        self.outbox.compact(list(self.unacked.values()))  # type: ignore[attr-defined]
        if self.unacked and time.monotonic() - self._progress_at > self.resend_after_s:
            for item in list(self.unacked.values()):
                self.sender.send(item, timeout_ms=100)
            self.resent += len(self.unacked)
            self._progress_at = time.monotonic()

    def resend_inherited(self) -> int:
        """Send again, as this producer's items, what a dead predecessor's outbox holds unacknowledged;
        returns how many."""
        if self.outbox is None:
            return 0
        inherited = list(self.outbox.inherited)  # type: ignore[attr-defined]
        for item in inherited:
            self.send(item.payload)
        self.outbox.rewrite(list(self.unacked.values()))  # type: ignore[attr-defined]
        self.resent += len(inherited)
        return len(inherited)

    def wait_all_acked(self, timeout_s: float, stop_hard: object = None) -> bool:
        """Block (servicing) until nothing is kept, ``timeout_s`` passes, or ``stop_hard()`` is True."""
        deadline = time.monotonic() + timeout_s
        while self.unacked and time.monotonic() < deadline:
            if stop_hard is not None and stop_hard():  # type: ignore[operator]
                break
            self.service()
            time.sleep(0.01)
        return not self.unacked
