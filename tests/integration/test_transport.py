"""ZeroMQ module over real ipc:// sockets: delivery, malformed messages, timeouts, private dirs."""

from __future__ import annotations

import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
import zmq

from pipeline.codec import VERSION
from pipeline.messages import Ack, StatusRequest, TrackUpdate
from pipeline.transport import Transport, TransportError, make_runtime_dir, request


@pytest.fixture()
def runtime() -> Path:
    return make_runtime_dir(Path(tempfile.mkdtemp(prefix="fpt-", dir="/tmp")) / "run")


def _update(i: int) -> TrackUpdate:
    return TrackUpdate(event_id=f"{i:032x}", camera="c", track_id=i, label="person", first_seen_ns=0, last_seen_ns=1,
                       first_frame=0, last_frame=i, best_score=0.5, xyxy=np.arange(4, dtype=np.float32))


def test_runtime_dir_is_private(runtime: Path) -> None:
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700


def test_too_long_runtime_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="too long"):
        make_runtime_dir(tmp_path / ("x" * 120))


def test_malformed_message_is_counted_and_the_receiver_keeps_going(runtime: Path) -> None:
    t = Transport(runtime)
    try:
        rx = t.receiver("inbox", bind=True)
        tx = t.sender("inbox")
        raw = t.ctx.socket(zmq.PUSH)
        raw.connect(t.endpoint("inbox"))
        raw.send_multipart([bytes((VERSION, 3)) + b"{garbage"])
        assert tx.send(_update(1), timeout_ms=1000)
        got = [rx.recv(timeout_ms=2000), rx.recv(timeout_ms=2000)]
        raw.close(linger=0)
        msgs = [m for m in got if m is not None]
        assert len(msgs) == 1 and msgs[0].track_id == 1
        assert rx.malformed == 1 and "TrackUpdate" in rx.last_malformed
        assert rx.recv(timeout_ms=50) is None  # timeout, not a hang
    finally:
        t.close()


def test_full_queue_fails_fast_and_is_counted(runtime: Path) -> None:
    t = Transport(runtime)
    try:
        tx = t.sender("nobody", hwm=2)  # nobody receives: the queue fills up to its high-water mark
        results = [tx.send(_update(i), timeout_ms=20) for i in range(10)]
        assert results[0] and not results[-1]
        assert tx.full == results.count(False) > 0
    finally:
        t.close()


def test_request_without_server_times_out(runtime: Path) -> None:
    with pytest.raises(TransportError, match="no answer"):
        request(runtime, "control", StatusRequest(), timeout_ms=200)


def test_server_answers_a_malformed_request_with_a_failed_ack(runtime: Path) -> None:
    t = Transport(runtime)
    try:
        server = t.server("control")
        client = t.ctx.socket(zmq.REQ)
        client.connect(t.endpoint("control"))
        client.send_multipart([b"\x07\x06{"])
        assert server.poll_request(timeout_ms=2000) is None
        from pipeline.codec import decode

        assert client.poll(2000)
        reply = decode(client.recv_multipart())
        client.close(linger=0)
        assert isinstance(reply, Ack) and not reply.ok and "malformed" in reply.message
    finally:
        t.close()
