"""The generic runner's frame handling: copies, checked zero-copy views, release, reorder buffer."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from pipeline import ring as r
from pipeline.messages import FrameRef
from pipeline.metrics import StageCounters
from pipeline.runner import Batcher, Reorderer, Runner, RunnerIO, StopFlag


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


# ----------------------------------------------------------------- cross-camera batching

TICK_S = 1 / 32  # test time unit, exact in binary: the fake clock never rounds


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _ScriptedInbox:
    """Delivers ``(arrival_s, message)`` in order on a fake clock: a receive returns the next message once it has
    arrived, else waits up to its timeout (advancing the clock) and returns None. After the last message it asks
    the runner to stop."""

    malformed = 0

    def __init__(self, script: list[tuple[float, object]], clock: _Clock, stop: StopFlag) -> None:
        self.script = list(script)
        self.clock = clock
        self.stop = stop
        self.waits = 0  # receives that returned nothing after waiting

    def recv(self, timeout_ms: int):
        if self.script and self.script[0][0] <= self.clock.t + timeout_ms / 1000:
            arrival, msg = self.script.pop(0)
            self.clock.t = max(self.clock.t, arrival)
            return msg
        self.clock.t += timeout_ms / 1000
        self.waits += timeout_ms > 0
        if not self.script and not self.stop.is_set():
            self.stop.set()
        return None

    def stop_receiving(self) -> None:
        pass

    def drained(self, idle_s: float, drain_idle_s: float) -> bool:
        return True


class _Beats:
    def __init__(self) -> None:
        self.beats = 0

    def beat(self, force: bool = False) -> None:
        self.beats += 1


def _answer(frame, meta) -> tuple:
    return (meta.camera, meta.frame_index, None if frame is None else int(frame[0, 0, 0]))


class _BatchStage(_Stage):
    """Answers each frame with (camera, index, first pixel); records batch sizes; ``during`` runs inside a batch."""

    def __init__(self, during=None) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.during = during

    def process(self, frame, meta):
        self.seen.append(("single", meta.frame_index, frame is None))
        return [_answer(frame, meta)]

    def process_batch(self, frames, metas):
        self.batches.append(len(metas))
        out = [[_answer(f, m)] for f, m in zip(frames, metas)]
        if self.during is not None:
            self.during()
        return out


@pytest.fixture()
def rings():
    made: list[r.RingWriter] = []

    def make(cameras: int, slots: int = 32) -> list[r.RingWriter]:
        run = uuid.uuid4().hex[:8]
        for c in range(cameras):
            made.append(r.RingWriter.create(r.ring_name(run, f"cam{c}", 1, 0), r.RingLayout(slots=slots, height=4, width=4),
                                            wait_for_release=False))
        return made[-cameras:]

    yield make
    for w in made:
        w.close()


def _value(cam: int, index: int) -> int:
    return cam * 30 + index  # first pixel of each frame (< 256 for the sizes used here)


def _interleaved(writers: list[r.RingWriter], per_camera: int) -> list[FrameRef]:
    """Frames of all cameras written round-robin (cam0 f0, cam1 f0, ..., cam0 f1, ...), as captures running side by side."""
    refs = []
    for index in range(per_camera):
        for cam, w in enumerate(writers):
            slot, seq = w.write(np.full((4, 4, 3), _value(cam, index), np.uint8), index, 0)
            refs.append(FrameRef(camera=f"cam{cam}", ring=w.name, slot=slot, seq=seq, frame_index=index,
                                 captured_at_ns=0, height=4, width=4))
    return refs


def _batch_runner(stage, inbox_script, batch: int, timeout_ticks: float, *, zero_copy: bool = True, file_mode: bool = False):
    sink, counters, stop, clock, beats = _Sink(), StageCounters("test", 0), StopFlag(), _Clock(), _Beats()
    inbox = _ScriptedInbox(inbox_script, clock, stop)
    io = RunnerIO(inbox=inbox, route=lambda m: sink, heartbeat=beats, release=False, blocking_send=file_mode,
                  zero_copy=zero_copy, forwarder=True)
    batcher = Batcher(batch, timeout_ticks * TICK_S, clock=clock)
    return Runner(stage, io, counters, stop, batcher=batcher), sink, counters, inbox, beats


@pytest.mark.parametrize(
    "cameras, per_camera, arrivals, batch, timeout_ticks, expected",
    [
        # arrivals: "burst" = everything at once, ("every", k) = one message each k ticks, ("bursts", sizes): bursts 8 ticks apart
        (1, 6, "burst", 1, 2.5, [1] * 6),
        (2, 4, "burst", 4, 2.5, [4, 4]),
        (3, 5, "burst", 4, 2.5, [4, 4, 4, 3]),  # the rest goes when its timeout passes
        (3, 4, ("every", 1), 8, 2.5, [3, 3, 3, 3]),  # timeout first: what arrived within 2.5 ticks of the first
        (2, 5, ("every", 1), 4, 10.5, [4, 4, 2]),  # full first
        (2, 3, "burst", 4, 0, [4, 2]),  # no waiting, but frames already received are batched
        (2, 3, ("every", 1), 4, 0, [1] * 6),
        (4, 2, ("bursts", (3, 3, 2)), 4, 2.5, [3, 3, 2]),
        (4, 4, ("bursts", (5, 6, 5)), 4, 2.5, [4, 1, 4, 2, 4, 1]),
        (8, 8, "burst", 64, 0.5, [64]),
    ],
)
@pytest.mark.parametrize("zero_copy", [True, False])
def test_cross_camera_batches_have_the_expected_sizes_and_answer_every_frame_once_in_order(
        rings, cameras, per_camera, arrivals, batch, timeout_ticks, expected, zero_copy):
    refs = _interleaved(rings(cameras), per_camera)
    if arrivals == "burst":
        times = [0.0] * len(refs)
    elif arrivals[0] == "every":
        times = [i * arrivals[1] * TICK_S for i in range(len(refs))]
    else:
        times = [8 * TICK_S * b for b, size in enumerate(arrivals[1]) for _ in range(size)]
    assert len(times) == len(refs)
    stage = _BatchStage()
    runner, sink, counters, inbox, beats = _batch_runner(stage, list(zip(times, refs)), batch, timeout_ticks,
                                                         zero_copy=zero_copy)
    runner.run()
    assert stage.batches == expected
    assert sink.sent == [(ref.camera, ref.frame_index, _value(int(ref.camera[3:]), ref.frame_index)) for ref in refs]
    assert counters.frames_in == counters.frames_out == len(refs) and counters.sent == len(refs)
    assert counters.drops.sum() == 0 and runner.duplicates == 0
    assert (counters.extra["batches"], counters.extra["batch_frames"]) == (len(expected), len(refs))
    assert counters.extra["batch_timeouts"] == sum(n < batch for n in expected)
    assert beats.beats >= inbox.waits  # waiting for a batch to fill is not being dead


@pytest.mark.parametrize("file_mode", [False, True])
@pytest.mark.parametrize("zero_copy", [True, False])
def test_a_frame_overwritten_before_the_batch_is_handled_as_without_batching(rings, file_mode, zero_copy):
    (w,) = rings(1, slots=4)
    refs = _interleaved([w], 6)  # frames 0 and 1 are gone: 4 slots
    stage = _BatchStage()
    runner, sink, counters, _, _ = _batch_runner(stage, [], 6, 1, zero_copy=zero_copy, file_mode=file_mode)
    runner.handle_batch(refs)
    if file_mode:  # a rewritten slot in file mode: a replayed frame that already took effect
        assert stage.batches == [4] and runner.duplicates == 2 and counters.drops[0] == 0
        assert [m[1] for m in sink.sent] == [2, 3, 4, 5]
    else:  # live: counted overwritten, answered with frame=None
        assert stage.batches == [6] and runner.duplicates == 0 and counters.drops[0] == 2
        assert [m[1:] for m in sink.sent] == [(0, None), (1, None), (2, 2), (3, 3), (4, 4), (5, 5)]
    runner.rings.close()


@pytest.mark.parametrize("file_mode", [False, True])
def test_a_view_overwritten_during_the_batch_discards_only_that_result(rings, file_mode):
    (w,) = rings(1, slots=4)
    refs = _interleaved([w], 4)
    stage = _BatchStage(during=lambda: w.write(np.full((4, 4, 3), 250, np.uint8), 4, 0))  # rewrites frame 0's slot
    runner, sink, counters, _, _ = _batch_runner(stage, [], 4, 1, zero_copy=True, file_mode=file_mode)
    runner.handle_batch(refs)
    assert stage.batches == [4]
    if file_mode:
        assert [m[1] for m in sink.sent] == [1, 2, 3] and runner.duplicates == 1 and counters.frames_out == 3
    else:
        assert sink.sent == [("cam0", 0, None), ("cam0", 1, 1), ("cam0", 2, 2), ("cam0", 3, 3)]
        assert stage.seen == [("single", 0, True)] and counters.drops[0] == 1
        # as without batching: mark_forwarded finds frame 0's slot rewritten, so it is not counted as forwarded
        assert counters.frames_out == 3 and counters.extra["replayed_frames"] == 1
    runner.rings.close()


def test_a_batcher_needs_a_stage_with_process_batch() -> None:
    with pytest.raises(TypeError, match="_Stage has no process_batch"):
        Runner(_Stage(), RunnerIO(inbox=_Inbox(), route=lambda m: None, heartbeat=None, release=False, blocking_send=False),
               StageCounters("test", 0), StopFlag(), batcher=Batcher(2, 0.005))


@pytest.mark.parametrize("size, timeout_s", [(0, 0.005), (2, -0.001)])
def test_batcher_rejects_bad_settings(size, timeout_s) -> None:
    with pytest.raises(ValueError, match="size must be >= 1"):
        Batcher(size, timeout_s)


def test_a_stage_that_answers_too_few_messages_of_a_batch_is_an_error(rings) -> None:
    refs = _interleaved(rings(2), 2)
    stage = _BatchStage()
    stage.process_batch = lambda frames, metas: [["only one"]]
    runner, sink, _, _, _ = _batch_runner(stage, [], 4, 1, zero_copy=False)
    with pytest.raises(ValueError, match="process_batch answered 1 of 4 messages"):
        runner.handle_batch(refs)
    assert sink.sent == []
    runner.rings.close()
