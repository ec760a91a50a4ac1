"""The generic runner's frame handling: copies, checked zero-copy views, release, reorder buffer."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from pipeline import ring as r
from pipeline.messages import FrameRef
from pipeline.metrics import StageCounters
from pipeline.runner import Reorderer, Runner, RunnerIO, StopFlag


class _Stage:
    """Records what it saw; optionally rewrites the ring slot while 'processing' (a late reader in live mode)."""

    def __init__(self, writer: r.RingWriter | None = None) -> None:
        self.seen: list[object] = []
        self.writer = writer

    def wants_frame(self, meta: object) -> bool:
        return True

    def process(self, frame, meta):
        self.seen.append(None if frame is None else int(frame[0, 0, 0]))
        if frame is not None and self.writer is not None:
            for k in range(self.writer.layout.slots):
                self.writer.write(np.full((4, 4, 3), 200 + k, np.uint8), 100 + k, 0)
        return ["result"]

    def tick(self, now_ns):
        return []

    def finish(self):
        return []


class _Sink:
    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, msg, timeout_ms=0) -> bool:
        self.sent.append(msg)
        return True


class _Inbox:
    malformed = 0


def _runner(stage, zero_copy: bool, release: bool = True) -> tuple[Runner, _Sink, StageCounters]:
    sink, counters = _Sink(), StageCounters("test", 0)
    io = RunnerIO(inbox=_Inbox(), route=lambda m: sink, heartbeat=None, release=release, blocking_send=False,
                  zero_copy=zero_copy)
    return Runner(stage, io, counters, StopFlag()), sink, counters


@pytest.fixture()
def ring():
    name = r.ring_name(uuid.uuid4().hex[:8], "cam", 1, 0)
    w = r.RingWriter.create(name, r.RingLayout(slots=2, height=4, width=4), wait_for_release=False)
    yield w
    w.close()


def _ref(w: r.RingWriter, value: int, index: int) -> FrameRef:
    slot, seq = w.write(np.full((4, 4, 3), value, np.uint8), index, 0)
    return FrameRef(camera="cam", ring=w.name, slot=slot, seq=seq, frame_index=index, captured_at_ns=0, height=4, width=4)


@pytest.mark.parametrize("zero_copy", [False, True])
def test_stage_sees_the_frame_and_the_slot_is_released(ring: r.RingWriter, zero_copy: bool) -> None:
    stage = _Stage()
    runner, sink, counters = _runner(stage, zero_copy)
    ref = _ref(ring, 7, 0)
    runner.handle(ref)
    assert stage.seen == [7] and sink.sent == ["result"]
    assert ring.all_released()
    assert counters.drops.sum() == 0
    runner.rings.close()


def test_zero_copy_result_of_an_overwritten_frame_is_discarded(ring: r.RingWriter) -> None:
    stage = _Stage(writer=ring)  # the slot is rewritten while the stage uses the view
    runner, sink, counters = _runner(stage, zero_copy=True)
    runner.handle(_ref(ring, 7, 0))
    assert stage.seen == [7, None]  # second call: frame=None, the first result was dropped
    assert counters.drops[0] == 1  # overwritten
    runner.rings.close()


def test_frame_gone_before_the_copy_is_counted(ring: r.RingWriter) -> None:
    stage = _Stage()
    runner, _, counters = _runner(stage, zero_copy=False)
    ref = _ref(ring, 7, 0)
    _ref(ring, 8, 1)
    _ref(ring, 9, 2)  # overwrites ref's slot
    runner.handle(ref)
    assert stage.seen == [None] and counters.drops[0] == 1
    runner.rings.close()


def _fr(index: int, ring: str = "r1") -> FrameRef:
    return FrameRef(camera="c", ring=ring, slot=0, seq=index + 1, frame_index=index, captured_at_ns=0, height=1, width=1)


def test_reorderer_releases_in_order_and_skips_gaps_after_timeout() -> None:
    ro = Reorderer(timeout_s=0.05)
    assert [x.frame_index for x in ro.push(_fr(0))] == [0]
    assert ro.push(_fr(2)) == [] and ro.push(_fr(3)) == []
    assert [x.frame_index for x in ro.push(_fr(1))] == [1, 2, 3]
    assert ro.push(_fr(5)) == []
    assert ro.backlog == 1
    time.sleep(0.06)
    assert [x.frame_index for x in ro.expire()] == [5]
    assert ro.lost == 1  # frame 4 never came
    assert ro.push(_fr(4)) == [] and len(ro.late) == 1  # too late: handed back for release only


def test_reorderer_restarts_on_a_new_ring() -> None:
    ro = Reorderer(timeout_s=1.0)
    ro.push(_fr(0))
    assert [x.frame_index for x in ro.push(_fr(0, ring="r2"))] == [0]  # a new capture process starts at 0


def test_reorderer_flush_counts_gaps() -> None:
    ro = Reorderer(timeout_s=10.0)
    ro.push(_fr(0))
    ro.push(_fr(3))
    assert [x.frame_index for x in ro.flush()] == [3] and ro.lost == 2


def test_strict_reorderer_waits_for_any_gap_and_drops_duplicates() -> None:
    ro = Reorderer(timeout_s=0.01, strict=True)
    assert ro.waiting_for() == -1
    assert ro.push(_fr(2)) == []  # frames 0 and 1 are still with a (dead) detection process
    assert ro.waiting_for() == 0  # status says which frame the camera waits for
    time.sleep(0.02)
    assert ro.expire() == [] and ro.lost == 0  # file mode never gives a frame up
    assert ro.push(_fr(2)) == [] and ro.duplicates == 1  # a replayed copy of a held frame
    assert [x.frame_index for x in ro.push(_fr(0))] == [0]
    assert ro.waiting_for() == 1
    assert [x.frame_index for x in ro.push(_fr(1))] == [1, 2]
    assert ro.push(_fr(1)) == [] and ro.duplicates == 2 and len(ro.late) == 1  # handed back for release
    assert ro.waiting_for() == -1


def test_strict_reorderer_resumes_where_a_predecessor_stopped() -> None:
    ro = Reorderer(timeout_s=1.0, strict=True)
    ro.resume("c", "r1", 5)
    assert ro.push(_fr(4)) == [] and ro.duplicates == 1
    assert [x.frame_index for x in ro.push(_fr(5))] == [5]
