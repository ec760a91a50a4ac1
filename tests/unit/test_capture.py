"""Capture: decoding straight into ring slots, new rings on a size change, the real video source."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import ring as r
from pipeline.config import CameraConfig
from pipeline.messages import FrameRef
from pipeline.metrics import Heartbeat, StageCounters
from pipeline.runner import CaptureLoop, CaptureSettings, StopFlag
from stages.capture import VideoSource


class _ListSource:
    """Frames from a list; behaves like ``cv2.VideoCapture.read(image=out)``: fills ``out`` when the shape fits."""

    is_file = True

    def __init__(self, frames: list[np.ndarray]) -> None:
        self.frames = list(frames)
        self.in_place = 0

    def read(self, out: np.ndarray | None = None) -> np.ndarray | None:
        if not self.frames:
            return None
        frame = self.frames.pop(0)
        if out is not None and out.shape == frame.shape:
            out[:] = frame
            self.in_place += 1
            return out
        return frame.copy()

    def skip(self, frames: int) -> int:
        done = min(frames, len(self.frames))
        del self.frames[:done]
        return done

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass


class _ConsumingSender:
    """Stands in for the Dispatcher: each FrameRef is read back from its ring (byte copy) and released."""

    def __init__(self) -> None:
        self.refs: list[FrameRef] = []
        self.frames: list[np.ndarray] = []
        self.readers: dict[str, r.RingReader] = {}

    def send_until(self, ref: FrameRef, stop: object, idle: object = None) -> bool:
        reader = self.readers.get(ref.ring) or self.readers.setdefault(ref.ring, r.RingReader.attach(ref.ring))
        frame = reader.read(ref.slot, ref.seq)
        assert frame is not None, f"frame {ref.frame_index} not readable from {ref.ring}"
        reader.release(ref.slot, ref.seq)
        self.refs.append(ref)
        self.frames.append(frame)
        return True

    def send(self, msg: object, timeout_ms: int | None = None) -> bool:
        return True  # heartbeats

    def service(self, timeout_ms: int = 0) -> None:
        pass

    def finish(self) -> int:
        self.finished = True  # the end-of-stream notice to detection
        return 1

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def _run(frames: list[np.ndarray]) -> tuple[_ListSource, _ConsumingSender, StageCounters, str]:
    run_id = uuid.uuid4().hex[:8]
    source, sender = _ListSource(frames), _ConsumingSender()
    counters = StageCounters("capture", 0)
    settings = CaptureSettings(run_id=run_id, camera="cam0", slots=4, release_timeout_s=5.0, wait_for_release=True)
    loop = CaptureLoop(source, settings, sender, counters, Heartbeat(counters, sender, 60.0), StopFlag())  # type: ignore[arg-type]
    try:
        loop.run()
    finally:
        sender.close()
    return source, sender, counters, run_id


def _pattern(i: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_frames_after_the_first_are_decoded_into_the_slot_and_arrive_byte_exact() -> None:
    frames = [_pattern(i, 12, 16) for i in range(10)]
    source, sender, counters, run_id = _run(frames)
    assert [ref.frame_index for ref in sender.refs] == list(range(10))
    assert all(np.array_equal(got, want) for got, want in zip(sender.frames, frames))
    assert source.in_place == 9  # the first frame creates the ring (its size is unknown before)
    assert counters.frames_out == 10 and counters.sent == 10
    assert r.list_segments(run_id) == [sender.refs[-1].ring]  # file mode: kept for a successor until the run ends
    r.unlink_segments(r.list_segments(run_id))


def test_a_size_change_gets_a_new_ring_and_no_frame_is_lost() -> None:
    frames = [_pattern(i, 12, 16) for i in range(3)] + [_pattern(i, 20, 24) for i in range(3, 6)] + [_pattern(6, 12, 16)]
    source, sender, _, run_id = _run(frames)
    assert all(np.array_equal(got, want) for got, want in zip(sender.frames, frames)) and len(sender.frames) == 7
    rings = [ref.ring for ref in sender.refs]
    assert len(set(rings)) == 3 and rings[0] != rings[6]  # back to the old size: a new ring, never the stale one
    assert [(ref.height, ref.width) for ref in sender.refs] == [(12, 16)] * 3 + [(20, 24)] * 3 + [(12, 16)]
    assert source.in_place == 4  # 2 + 2 + 0: each size's first frame is copied into its new ring
    assert r.list_segments(run_id) == [rings[6]]  # replaced rings are unlinked at once
    r.unlink_segments(r.list_segments(run_id))


class _HoldingSender(_ConsumingSender):
    """Like a detection process that is alive but never finishes: frames are sent, never released; stops the
    loop after ``limit`` frames."""

    def __init__(self, stop: StopFlag, limit: int) -> None:
        super().__init__()
        self.stop, self.limit = stop, limit
        self.last_peer = str(os.getpid()).encode()

    def send_until(self, ref: FrameRef, stop: object, idle: object = None) -> bool:
        self.refs.append(ref)
        if len(self.refs) >= self.limit:
            self.stop.set()
        return True


def test_a_restarted_capture_adopts_the_ring_resends_what_was_never_sent_and_resumes() -> None:
    frames = [_pattern(i, 12, 16) for i in range(10)]
    run_id = uuid.uuid4().hex[:8]
    settings = CaptureSettings(run_id=run_id, camera="cam0", slots=4, release_timeout_s=5.0, wait_for_release=True)
    stop = StopFlag()
    first = _HoldingSender(stop, limit=4)
    counters1 = StageCounters("capture", 0)
    CaptureLoop(_ListSource(frames), settings, first, counters1, Heartbeat(counters1, first, 60.0), stop).run()  # type: ignore[arg-type]
    (ring,) = r.list_segments(run_id)
    reader = r.RingReader.attach(ring)
    try:
        for ref in first.refs[:2]:
            reader.release(ref.slot, ref.seq)  # downstream finished frames 0-1
        # frame 2 went to a live detection process that has not passed it on: perhaps it never arrived
        reader._headers[first.refs[3].slot, 4] = 0  # the predecessor died after publishing frame 3, before sending it
        second, counters2 = _ConsumingSender(), StageCounters("capture", 0)
        source = _ListSource(frames)
        loop = CaptureLoop(source, settings, second, counters2, Heartbeat(counters2, second, 60.0), StopFlag())  # type: ignore[arg-type]
        loop.run()
        second.close()
    finally:
        reader.close()
        r.unlink_segments(r.list_segments(run_id))
    assert loop.resumed_from == 4 and r.list_segments(run_id) == []
    # frame 2 may be lost: sent again as a replay; frame 3 was never sent: sent now, for the first time
    assert [(ref.frame_index, ref.replay) for ref in second.refs] == [(2, True), (3, False)] + [(i, False) for i in range(4, 10)]
    assert all(np.array_equal(got, frames[ref.frame_index]) for got, ref in zip(second.frames, second.refs))
    assert {ref.ring for ref in second.refs} == {ring}  # the same segment: never two rings for one camera
    # (the fake predecessor did count frame 3, which a real one dying before the send would not have)
    assert (counters1.frames_out - 1) + counters2.frames_out == 10 and counters2.extra["replayed"] == 1


def test_video_source_decodes_into_the_given_slot(videos: Path) -> None:
    cam = CameraConfig(name="cam0", source=str(videos / "vtest.avi"))
    plain, direct = VideoSource(cam), VideoSource(cam)
    try:
        first = plain.read()
        assert first is not None and first.shape == (360, 480, 3)
        slot = np.zeros_like(first)
        got = direct.read(out=slot)
        assert got is slot and np.array_equal(slot, first)  # same pixels, no new array
        wrong = np.zeros((10, 10, 3), np.uint8)
        other = direct.read(out=wrong)
        assert other is not None and other is not wrong and other.shape == (360, 480, 3)
        assert np.array_equal(other, plain.read())
    finally:
        plain.close()
        direct.close()


def test_video_source_ends_with_none_for_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "one.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    writer.write(np.zeros((24, 32, 3), np.uint8))
    writer.release()
    src = VideoSource(CameraConfig(name="cam0", source=str(path)))
    try:
        assert src.read() is not None
        assert src.read(out=np.zeros((24, 32, 3), np.uint8)) is None
    finally:
        src.close()


class _FlakyLiveSource(_ListSource):
    """A live camera that drops: reads fail (None) until it has been reopened ``fail_opens`` times."""

    is_file = False

    def __init__(self, frames: list[np.ndarray], fail_opens: int) -> None:
        super().__init__(frames)
        self.fail_opens, self.opens = fail_opens, 0

    def read(self, out: np.ndarray | None = None) -> np.ndarray | None:
        return None if self.opens < self.fail_opens else super().read(out)

    def open(self) -> None:
        self.opens += 1


def test_a_live_source_that_drops_is_reopened_with_growing_waits(monkeypatch) -> None:
    import pipeline.capture as capture_mod

    waits: list[float] = []
    clock = [0.0]
    monkeypatch.setattr(capture_mod.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(capture_mod.time, "sleep", lambda s: (waits.append(s), clock.__setitem__(0, clock[0] + s)))
    source = _FlakyLiveSource([_pattern(0, 12, 16)], fail_opens=4)
    stop = StopFlag()
    sender = _ConsumingSender()
    sender.send = lambda msg, timeout_ms=None: (stop.set(), True)[1]  # type: ignore[method-assign]
    counters = StageCounters("capture", 0)
    settings = CaptureSettings(run_id=uuid.uuid4().hex[:8], camera="cam0", slots=4, release_timeout_s=5.0,
                               wait_for_release=False, reconnect_s=1.0)
    CaptureLoop(source, settings, sender, counters, Heartbeat(counters, _ConsumingSender(), 60.0), stop).run()  # type: ignore[arg-type]
    assert source.opens == 4 and counters.extra["reconnects"] == 4
    assert round(sum(waits)) == 1 + 2 + 4 + 8  # backoff doubles after every failed attempt
    assert counters.frames_out == 1


def test_a_truncated_file_is_reported_with_the_frame_where_decoding_stopped(videos: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.avi"
    cut.write_bytes((videos / "vtest.avi").read_bytes()[:100_000])  # the first 100 KB of a 795-frame file
    source = VideoSource(CameraConfig(name="cam0", source=str(cut)))
    assert source.frame_count == 795
    sender, counters = _ConsumingSender(), StageCounters("capture", 0)
    settings = CaptureSettings(run_id=uuid.uuid4().hex[:8], camera="cam0", slots=4, release_timeout_s=5.0, wait_for_release=True)
    CaptureLoop(source, settings, sender, counters, Heartbeat(counters, sender, 60.0), StopFlag()).run()  # type: ignore[arg-type]
    sender.close()
    r.unlink_segments(r.list_segments(settings.run_id))
    decoded = counters.frames_out
    assert 0 < decoded < 795 and counters.extra["ended_early"] == 1 and counters.extra["container_frames"] == 795
    assert f"stopped at frame {decoded} of the 795" in counters.last_error


def test_a_complete_file_is_not_reported(videos: Path) -> None:
    source = VideoSource(CameraConfig(name="cam0", source=str(videos / "vtest.avi")))
    sender, counters = _ConsumingSender(), StageCounters("capture", 0)
    settings = CaptureSettings(run_id=uuid.uuid4().hex[:8], camera="cam0", slots=4, release_timeout_s=5.0, wait_for_release=True)
    CaptureLoop(source, settings, sender, counters, Heartbeat(counters, sender, 60.0), StopFlag()).run()  # type: ignore[arg-type]
    sender.close()
    r.unlink_segments(r.list_segments(settings.run_id))
    assert counters.frames_out == 795 and "ended_early" not in counters.extra and counters.last_error == ""


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the pid no longer exists
    return proc.pid


@pytest.mark.parametrize("accepted_by_dead", [False, True])
def test_frames_of_an_owner_the_capture_never_saw_are_replayed_once_its_successor_claims(accepted_by_dead: bool) -> None:
    """A recognition process claims the camera, dies, and its successor claims the camera before the capture
    looked at the ring header in between (the capture was blocked sending): the frames on their way to the
    dead process (not accepted yet) or accepted by it are still replayed, each once."""
    run_id = uuid.uuid4().hex[:8]
    settings = CaptureSettings(run_id=run_id, camera="cam0", slots=4, release_timeout_s=5.0, wait_for_release=True)
    stop = StopFlag()
    sender = _HoldingSender(stop, limit=100)
    counters = StageCounters("capture", 0)
    loop = CaptureLoop(_ListSource([]), settings, sender, counters, Heartbeat(counters, sender, 60.0), stop)  # type: ignore[arg-type]
    name = r.ring_name(run_id, "cam0", os.getpid(), 0)
    loop.writer = r.RingWriter.create(name, r.RingLayout(slots=4, height=6, width=8), wait_for_release=True)
    reader = r.RingReader.attach(name)
    try:
        loop._watch()  # the capture's last look: nobody owns the camera yet
        dead = _dead_pid()
        for i in range(3):
            slot, seq = loop.writer.write(_pattern(i, 6, 8), i, 0)
            loop.writer.mark_dispatched(slot, seq, os.getpid())  # a live detection process
        reader.claim_recognizer(dead)
        if accepted_by_dead:
            reader.mark_accepted(0, 1, dead)
        reader.claim_recognizer(os.getpid())  # the successor, alive
        assert loop.writer.recognizers() == (os.getpid(), dead)
        loop._watch_due = 0.0
        loop._watch()
        assert [(ref.frame_index, ref.replay) for ref in sender.refs] == [(0, True), (1, True), (2, True)]
        loop._watch_due = 0.0
        loop._watch()
        assert len(sender.refs) == 3  # replayed once
    finally:
        reader.close()
        loop.writer.close()


def _pf(slot: int, forwarded: bool = True, accepted: int = 0) -> r.PendingFrame:
    return r.PendingFrame(slot=slot, seq=slot + 1, frame_index=slot, captured_at_ns=0, dispatched=4242,
                          accepted=accepted, forwarded=forwarded)


@pytest.mark.parametrize("overtaken, first_due", [(True, 2.0), (False, 10.0)])
def test_transit_watch_sends_a_frame_lost_on_the_way_to_recognition_again_with_a_doubling_wait(
        overtaken: bool, first_due: float) -> None:
    """A forwarded frame nobody accepted is due after 2 s when a later frame was accepted (it was lost: messages
    arrive in order), after 10 s when nothing later was; then after a doubling wait, capped."""
    from pipeline.capture import TransitWatch

    now = [0.0]
    watch = TransitWatch(first_s=2.0, idle_s=10.0, max_s=15.0, clock=lambda: now[0])
    lost, in_detection = _pf(0), _pf(1, forwarded=False)
    later = _pf(2, accepted=777 if overtaken else 0, forwarded=overtaken)
    frames = [lost, in_detection, later]
    sent = []
    for t in [0.0, 1.9, 2.0, 3.0, 5.9, 6.0, 9.9, 10.0, 29.9, 30.0, 45.0]:
        now[0] = t
        sent += [(t, f.slot) for f in watch.due(frames) if f.slot == 0]
    if overtaken:  # 2, then after 4 s (6), 8 s (14, polled at 29.9), then 15 s (the cap: 44.9 -> polled 45)
        assert sent == [(2.0, 0), (6.0, 0), (29.9, 0), (45.0, 0)]
    else:  # 10, then after 15 s (the cap): 25 -> polled at 29.9, then 44.9 -> 45
        assert sent == [(10.0, 0), (29.9, 0), (45.0, 0)]
    assert in_detection.slot not in [slot for _, slot in sent]
    now[0] = 50.0
    assert [f.slot for f in watch.due([in_detection])] == []  # the lost frame was accepted or released: forgotten
    now[0] = 51.0
    assert watch.due(frames) == []  # waiting again: a fresh first wait
