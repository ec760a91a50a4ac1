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


@pytest.mark.parametrize("finish", [True, False])
def test_a_finished_source_lets_detection_drain_without_waiting_for_its_revoke(runtime: Path, finish: bool) -> None:
    """Capture sends frames, then (``finish``) says no more follow and exits: detection has every frame and is
    drained as soon as it stops, instead of after the revoke timeout it needs when a capture exits silently."""
    t = Transport(runtime)
    try:
        disp = t.dispatcher("frames-c")
        inbox = t.credit_inbox(["frames-c"], window=4)
        assert inbox.recv(timeout_ms=500) is None  # sees the connection: grants the window
        sent = [disp.send(_update(i), timeout_ms=3000) for i in range(3)]
        assert sent == [True] * 3 and disp.peers
        if finish:
            assert disp.finish() == 1
        disp.sock.close()  # the capture process exits (finish made it linger to deliver the notice)
        got = [inbox.recv(timeout_ms=2000) for _ in range(3)]
        assert [m.track_id for m in got] == [0, 1, 2]  # type: ignore[union-attr]
        assert inbox.recv(timeout_ms=200) is None  # the notice is no frame
        inbox.stop_receiving()
        assert inbox.drained(idle_s=0.0, drain_idle_s=0.5) is finish
        assert inbox.drained(idle_s=1.0, drain_idle_s=0.5) is finish  # silently: only after revoke_timeout_s (3 s)
    finally:
        t.close()


def test_a_restarted_capture_takes_back_its_finished_notice(runtime: Path) -> None:
    """A capture that said it finished and then came back (a restart binds the endpoint anew) sends frames again:
    its connection counts as not drained until it finishes or answers a revoke."""
    t = Transport(runtime)
    try:
        first = t.dispatcher("frames-c")
        inbox = t.credit_inbox(["frames-c"], window=4)
        assert inbox.recv(timeout_ms=500) is None  # sees the connection: grants the window
        assert first.send(_update(0), timeout_ms=3000)
        first.finish()
        first.sock.close()
        assert inbox.recv(timeout_ms=2000).track_id == 0  # type: ignore[union-attr]
        assert inbox.recv(timeout_ms=200) is None and inbox.acked
        second = t.dispatcher("frames-c")  # the restarted capture
        assert inbox.recv(timeout_ms=500) is None  # sees the new connection: grants the window again
        assert second.send(_update(1), timeout_ms=3000)
        assert inbox.recv(timeout_ms=2000).track_id == 1  # type: ignore[union-attr]
        assert not inbox.acked
    finally:
        t.close()
