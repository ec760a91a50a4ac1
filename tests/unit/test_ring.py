"""Ring buffer semantics in one process: seqlock checks, release, file/live modes, lifecycle."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from pipeline import ring as r


@pytest.fixture()
def name() -> str:
    return r.ring_name(uuid.uuid4().hex[:8], "cam0", 1, 0)


def _frame(seq: int, shape=(6, 8, 3)) -> np.ndarray:
    return np.full(shape, seq % 251, np.uint8)


def test_write_read_release_round_trip(name: str) -> None:
    w = r.RingWriter.create(name, r.RingLayout(slots=4, height=6, width=8), wait_for_release=True)
    rd = r.RingReader.attach(name)
    try:
        slot, seq = w.write(_frame(1), frame_index=0, captured_at_ns=123)
        assert (slot, seq) == (0, 1)
        assert rd.occupancy() == 1
        out = rd.read(slot, seq)
        assert out is not None and np.array_equal(out, _frame(1))
        rd.release(slot, seq)
        assert rd.occupancy() == 0 and w.all_released()
    finally:
        rd.close()
        w.close()
    assert name not in r.list_segments()


def test_overwritten_slot_is_never_returned(name: str) -> None:
    w = r.RingWriter.create(name, r.RingLayout(slots=2, height=6, width=8), wait_for_release=False)
    rd = r.RingReader.attach(name)
    try:
        refs = [w.write(_frame(s), s, 0) for s in range(1, 4)]  # seq 3 reuses slot 0 (live mode)
        assert rd.read(*refs[0]) is None  # seq 1 was overwritten by seq 3
        assert np.array_equal(rd.read(*refs[2]), _frame(3))
        rd.release(*refs[0])  # releasing a stale seq does nothing
        assert rd.occupancy() == 2
    finally:
        rd.close()
        w.close()


def test_busy_slot_reads_as_overwritten(name: str) -> None:
    w = r.RingWriter.create(name, r.RingLayout(slots=2, height=6, width=8), wait_for_release=False)
    rd = r.RingReader.attach(name)
    try:
        slot, seq = w.write(_frame(1), 0, 0)
        w._headers[slot, 0] = -2  # writer mid-copy of seq 2 in this slot
        assert rd.read(slot, seq) is None
        assert rd.read(slot, 2) is None
    finally:
        rd.close()
        w.close()


class _Never:
    def is_set(self) -> bool:
        return False


class _StopAfter:
    """``is_set()`` turns True after ``n`` calls (a wait that would otherwise last for ever)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def is_set(self) -> bool:
        self.n -= 1
        return self.n < 0


def test_file_mode_waits_for_release_and_never_takes_a_slot_back(name: str) -> None:
    w = r.RingWriter.create(name, r.RingLayout(slots=2, height=6, width=8), wait_for_release=True, release_timeout_s=0.01)
    rd = r.RingReader.attach(name)
    idle_calls = []
    try:
        a = w.write(_frame(1), 0, 0)
        w.write(_frame(2), 1, 0)
        assert not w._slot_free(0)
        rd.release(*a)
        assert w.wait_slot(_Never())
        w.write(_frame(3), 2, 0)
        # seq 2 is never released: the writer keeps waiting (running idle) until stopped
        assert not w.wait_slot(_StopAfter(200), idle=lambda: idle_calls.append(1))
        assert idle_calls and rd.read(1, 2) is not None
    finally:
        rd.close()
        w.close()


def test_adopt_resumes_after_the_last_published_frame_and_keeps_frames_in_flight(name: str) -> None:
    w = r.RingWriter.create(name, r.RingLayout(slots=4, height=6, width=8), wait_for_release=True)
    rd = r.RingReader.attach(name)
    try:
        for i in range(3):
            w.write(_frame(i + 1), 10 + i, 0)
        w.begin_write()  # the writer dies while decoding frame seq 4
        new = r.RingWriter.adopt(name, wait_for_release=True)
        assert new.next_seq == 4 and new.last_frame_index == 12
        assert [f.frame_index for f in new.pending()] == [10, 11, 12]
        assert rd.read(0, 1) is not None  # a frame downstream holds is still readable
        assert new.wait_slot(_Never())  # the half-written slot is free again
        assert new.write(_frame(9), 13, 0) == (3, 4)
    finally:
        rd.close()
        w.close()


@pytest.mark.parametrize("dispatched_alive, accepted, dead_recognizers, replayed", [
    (True, 0, frozenset(), False),          # in a live detection process
    (False, 0, frozenset(), True),          # its detection process died before anyone accepted it
    (False, 77, frozenset(), False),        # recognition 77 (alive) already owns it
    (True, 77, frozenset({77}), True),      # accepted by a recognition process that died
    (True, 0, frozenset({77}), True),       # on its way to the dead recognition process
    (True, 78, frozenset({77}), False),     # accepted by the successor
])
def test_replays_pick_frames_whose_owner_is_gone(name: str, dispatched_alive: bool, accepted: int,
                                                 dead_recognizers: frozenset, replayed: bool) -> None:
    w = r.RingWriter.create(name, r.RingLayout(slots=2, height=6, width=8), wait_for_release=True)
    rd = r.RingReader.attach(name)
    try:
        slot, seq = w.write(_frame(1), 0, 0)
        assert w.unconfirmed() and w.replays(dead_recognizers) == []
        w.mark_dispatched(slot, seq, 4242)
        if accepted:
            rd.mark_accepted(slot, seq, accepted)
        got = w.replays(dead_recognizers, alive=lambda pid: dispatched_alive)
        assert [f.seq for f in got] == ([seq] if replayed else [])
        rd.release(slot, seq)
        assert w.replays(dead_recognizers, alive=lambda pid: False) == []  # released: nothing to replay
    finally:
        rd.close()
        w.close()


def test_forwarded_is_true_once_per_frame_and_recognizer_pid_is_shared(name: str) -> None:
    w = r.RingWriter.create(name, r.RingLayout(slots=2, height=6, width=8), wait_for_release=True)
    rd = r.RingReader.attach(name)
    try:
        slot, seq = w.write(_frame(1), 0, 0)
        assert rd.mark_forwarded(slot, seq) and not rd.mark_forwarded(slot, seq)
        assert w.recognizer_pid() == 0
        rd.claim_recognizer(31337)
        assert w.recognizer_pid() == 31337
        slot2, seq2 = w.write(_frame(2), 1, 0)
        assert rd.mark_forwarded(slot2, seq2)
    finally:
        rd.close()
        w.close()


def test_pid_alive() -> None:
    import os
    import subprocess
    import sys

    assert r.pid_alive(os.getpid()) and not r.pid_alive(0)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while child.poll() is None:  # poll() reaps it
        pass
    assert not r.pid_alive(child.pid)


def test_wrong_frame_shape_is_rejected(name: str) -> None:
    w = r.RingWriter.create(name, r.RingLayout(slots=2, height=6, width=8), wait_for_release=False)
    try:
        with pytest.raises(ValueError, match="does not fit ring"):
            w.write(np.zeros((7, 8, 3), np.uint8), 0, 0)
    finally:
        w.close()


def test_attach_errors() -> None:
    with pytest.raises(r.RingError, match="does not exist"):
        r.RingReader.attach("facepro_nosuchrun_cam_1_0")


def test_free_space_check_names_both_sizes(tmp_path) -> None:
    with pytest.raises(r.ShmSpaceError, match=r"MiB free but .* needs .* ring.slots"):
        r.check_free_space(1 << 60, "ring X", shm_dir=tmp_path)


@pytest.mark.parametrize(
    "segment, run_id",
    [("facepro_ab12cd34_cam0_77_0", "ab12cd34"), ("facepro_x", None), ("psm_1234", None), ("facepro_r_c_1_2", "r")],
)
def test_run_id_of(segment: str, run_id: str | None) -> None:
    assert r.run_id_of(segment) == run_id


def test_layout_aligns_slots() -> None:
    lay = r.RingLayout(slots=3, height=1080, width=1920)
    assert lay.slot_stride % 4096 == 0 and lay.slot_stride >= 1080 * 1920 * 3
    assert lay.data_offset % 4096 == 0
    assert lay.total_bytes == lay.data_offset + 3 * lay.slot_stride


def test_view_is_zero_copy_read_only_and_rechecked(name: str) -> None:
    w = r.RingWriter.create(name, r.RingLayout(slots=2, height=6, width=8), wait_for_release=False)
    rd = r.RingReader.attach(name)
    try:
        slot, seq = w.write(_frame(1), 0, 0)
        v = rd.view(slot, seq)
        assert v is not None and np.array_equal(v, _frame(1)) and not v.flags.writeable
        assert np.shares_memory(v, rd._frames[slot])
        assert rd.published(slot, seq)
        w.write(_frame(2), 1, 0)
        w.write(_frame(3), 2, 0)  # rewrites the viewed slot
        assert not rd.published(slot, seq)  # the user of the view must discard its result
        assert rd.view(slot, seq) is None
    finally:
        rd.close()
        w.close()


def test_missing_fallocate_does_not_lose_the_segment(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(r.os, "posix_fallocate")
    w = r.RingWriter.create(name, r.RingLayout(slots=2, height=6, width=8), wait_for_release=False)
    try:
        assert name in r.list_segments()
        rd = r.RingReader.attach(name)
        rd.close()
    finally:
        w.close()


def test_begin_write_fills_the_slot_in_place_and_publish_announces_it(name: str) -> None:
    w = r.RingWriter.create(name, r.RingLayout(slots=2, height=6, width=8), wait_for_release=False)
    rd = r.RingReader.attach(name)
    try:
        view = w.begin_write()
        assert view.shape == (6, 8, 3) and view.flags.writeable
        view[:] = 7  # a decoder writing its output straight into the slot
        assert rd.read(0, 1) is None  # busy until published
        assert w.publish(frame_index=0, captured_at_ns=5) == (0, 1)
        assert np.array_equal(rd.read(0, 1), np.full((6, 8, 3), 7, np.uint8))
    finally:
        rd.close()
        w.close()


def test_abort_empties_the_slot_and_keeps_the_sequence(name: str) -> None:
    w = r.RingWriter.create(name, r.RingLayout(slots=2, height=6, width=8), wait_for_release=True)
    rd = r.RingReader.attach(name)
    try:
        w.begin_write()[:] = 1
        w.abort()  # no frame came (end of file)
        assert rd.read(0, 1) is None and rd.occupancy() == 0 and w.all_released()
        assert w.wait_slot() and w.write(_frame(1), 0, 0) == (0, 1)  # the same seq is used next
        assert np.array_equal(rd.read(0, 1), _frame(1))
    finally:
        rd.close()
        w.close()


@pytest.mark.parametrize(
    "calls, error",
    [
        (("begin_write", "begin_write"), "busy"),
        (("publish",), "without begin_write"),
    ],
)
def test_write_protocol_misuse_is_refused(name: str, calls: tuple[str, ...], error: str) -> None:
    w = r.RingWriter.create(name, r.RingLayout(slots=2, height=6, width=8), wait_for_release=False)
    try:
        with pytest.raises(r.RingError, match=error):
            for call in calls:
                getattr(w, call)(*((0, 0) if call == "publish" else ()))
    finally:
        w.close()


def test_latest_is_the_newest_published_frame_and_never_a_torn_one(name: str) -> None:
    w = r.RingWriter.create(name, r.RingLayout(slots=3, height=6, width=8), wait_for_release=False)
    rd = r.RingReader.attach(name)
    try:
        assert rd.latest() is None  # nothing published yet
        for s in range(1, 5):  # seq 4 reuses slot 0
            w.write(_frame(s), frame_index=s - 1, captured_at_ns=1000 + s)
        got = rd.latest()
        assert got is not None and (got.seq, got.frame_index, got.captured_at_ns) == (4, 3, 1004)
        assert np.array_equal(got.frame, _frame(4))
        head = rd.latest(copy=False)
        assert head is not None and head.frame is None and head.seq == 4
        w.begin_write()  # seq 5 busy in slot 1: the newest complete frame is still seq 4
        assert rd.latest().seq == 4
        w.publish(4, 1005)

        real_read = rd.read
        calls = []

        def overwritten_once(slot: int, seq: int, out=None):
            if not calls:  # the writer overwrites the slot while the api copies it
                w.write(_frame(6), frame_index=5, captured_at_ns=1006)
                w.write(_frame(7), frame_index=6, captured_at_ns=1007)
                w.write(_frame(8), frame_index=7, captured_at_ns=1008)  # slot of seq 5 now holds seq 8
            calls.append((slot, seq))
            return real_read(slot, seq, out)

        rd.read = overwritten_once  # type: ignore[method-assign]
        got = rd.latest()
        assert [seq for _, seq in calls] == [5, 8] and got.seq == 8 and np.array_equal(got.frame, _frame(8))
        calls.clear()
        assert rd.latest(attempts=1) is None  # overwritten on its only attempt: skipped, never served torn
        rd.read = real_read  # type: ignore[method-assign]
        for rd_slot in range(3):
            assert w._headers[rd_slot, 1] == 0  # nothing released by the reader
    finally:
        rd.close()
        w.close()
