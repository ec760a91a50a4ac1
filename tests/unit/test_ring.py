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


def test_file_mode_waits_for_release_then_reclaims(name: str) -> None:
    w = r.RingWriter.create(name, r.RingLayout(slots=2, height=6, width=8), wait_for_release=True, release_timeout_s=0.05)
    rd = r.RingReader.attach(name)
    try:
        a = w.write(_frame(1), 0, 0)
        w.write(_frame(2), 1, 0)
        assert not w._slot_free(0)
        rd.release(*a)
        assert w.wait_slot(_Never()) and w.reclaimed == 0
        w.write(_frame(3), 2, 0)
        assert w.wait_slot(_Never())  # seq 2 never released: reclaimed after the timeout
        assert w.reclaimed == 1
    finally:
        rd.close()
        w.close()


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


def test_orphaned_slots_are_reclaimed_within_one_timeout(name: str) -> None:
    import time

    w = r.RingWriter.create(name, r.RingLayout(slots=3, height=6, width=8), wait_for_release=True, release_timeout_s=0.2)
    try:
        for s in range(1, 4):
            w.write(_frame(s), s - 1, time.time_ns())  # three frames whose owner dies: never released
        t0 = time.monotonic()
        for s in range(4, 7):
            assert w.wait_slot(_Never())
            w.write(_frame(s), s - 1, time.time_ns())
        assert w.reclaimed == 3
        assert time.monotonic() - t0 < 0.5  # one timeout for the burst, not three
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
