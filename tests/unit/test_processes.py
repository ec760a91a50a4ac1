"""The process table with a fake clock and a fake spawner (no real processes)."""

from __future__ import annotations

import signal

import pytest

from pipeline.processes import ProcessTable, RestartPolicy


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeHandle:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.code: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.code

    def kill(self) -> None:
        self.signals.append(signal.SIGKILL)
        self.code = -signal.SIGKILL

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)


class FakeSpawner:
    def __init__(self) -> None:
        self.started: list[tuple[str, int, FakeHandle]] = []

    def __call__(self, stage: str, index: int) -> FakeHandle:
        h = FakeHandle(1000 + len(self.started))
        self.started.append((stage, index, h))
        return h


@pytest.fixture()
def table() -> tuple[ProcessTable, FakeSpawner, FakeClock]:
    spawner, clock = FakeSpawner(), FakeClock()
    return ProcessTable(spawner, clock, heartbeat_timeout_s=30.0, policy=RestartPolicy()), spawner, clock


def test_backoff_doubles_and_is_capped() -> None:
    p = RestartPolicy(first_delay_s=0.5, max_delay_s=10.0)
    assert [p.delay(k) for k in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_crashed_process_restarts_after_backoff(table) -> None:
    t, spawner, clock = table
    proc = t.spawn("detection", 0)
    proc.handle.code = 2
    exits = t.reap(lambda p: "ModelError: bad model")
    assert [e.restart_in for e in exits] == [0.5] and exits[0].reason == "exited with code 2"
    assert t.start_due() == []  # not yet
    clock.now += 0.5
    [again] = t.start_due()
    assert (again.stage, again.index) == ("detection", 0) and len(spawner.started) == 2
    again.handle.code = 2
    assert t.reap()[0].restart_in == 1.0  # second restart within the window: twice as long
    assert t.restarts("detection") == 2 and t.record("detection").last_error == "ModelError: bad model"


def test_more_than_five_restarts_in_a_minute_is_a_failure_naming_the_stage_and_error(table) -> None:
    t, spawner, clock = table
    t.spawn("recognition", 0)
    for i in range(6):
        [p] = t.of("recognition")
        p.handle.code = 2
        exits = t.reap(lambda p: "ModelError: broken.onnx is not an ONNX model")
        clock.now += 9.0  # past each backoff (0.5 ... 8 s), all six within 60 s
        t.start_due()
    assert exits[0].restart_in is None
    assert t.failure == "stage recognition failed 6 times in 60 s; last error: ModelError: broken.onnx is not an ONNX model"
    assert t.failed_stage == "recognition" and t.restarts("recognition") == 6
    assert t.of("recognition") == [] and t.start_due() == []


def test_restarts_outside_the_window_do_not_count(table) -> None:
    t, _, clock = table
    t.spawn("storage", 0)
    for _ in range(10):
        [p] = t.of("storage")
        p.handle.code = 1
        t.reap()
        clock.now += 61.0  # each restart alone in its window
        t.start_due()
    assert t.failure is None and t.restarts("storage") == 10


def test_only_a_silent_process_is_killed_for_missing_heartbeats(table) -> None:
    t, _, clock = table
    beating, silent, stopping = t.spawn("detection", 0), t.spawn("detection", 1), t.spawn("recognition", 0)
    t.stop(stopping)
    clock.now += 20.0
    t.beat(beating, clock.now)
    clock.now += 15.0  # silent: 35 s since start; beating: 15 s since its beat
    assert t.check_heartbeats() == [silent]
    assert signal.SIGKILL in silent.handle.signals and signal.SIGKILL not in beating.handle.signals
    assert signal.SIGKILL not in stopping.handle.signals
    exits = {e.proc.index: e for e in t.reap() if e.proc.stage == "detection"}
    assert exits[1].reason == "sent no heartbeat for 35 s" and exits[1].restart_in == 0.5


def test_no_heartbeat_kill_while_on_hold(table) -> None:
    t, _, clock = table
    t.spawn("detection", 0)
    t.hold = True
    clock.now += 100.0
    assert t.check_heartbeats() == []


def test_a_requested_stop_and_an_ended_source_are_not_failures(table) -> None:
    t, spawner, _ = table
    det, cap = t.spawn("detection", 0), t.spawn("capture", 0)
    t.stop(det)
    assert det.handle.signals == [signal.SIGTERM]
    det.handle.code, cap.handle.code = 0, 0
    exits = t.reap()
    assert [(e.proc.stage, e.restart_in, e.reason) for e in exits] == [("detection", None, "stopped"), ("capture", None, "source ended")]
    assert t.restarts("detection") == 0 and t.restarts("capture") == 0 and t.failure is None and t.pending == []


def test_a_stopping_process_that_crashes_is_not_restarted(table) -> None:
    t, _, _ = table
    p = t.spawn("recognition", 0)
    t.stop(p)
    p.handle.code = -9
    assert t.reap()[0].restart_in is None and t.pending == []


def test_nothing_restarts_while_on_hold(table) -> None:
    t, spawner, clock = table
    p = t.spawn("detection", 0)
    p.handle.code = 3
    t.reap()
    t.hold = True
    clock.now += 10
    assert t.start_due() == [] and len(spawner.started) == 1


def test_kill_all(table) -> None:
    t, _, _ = table
    procs = [t.spawn("capture", 0), t.spawn("storage", 0)]
    t.kill_all()
    assert all(p.handle.signals == [signal.SIGKILL] for p in procs)
    assert len(t.reap()) == 2 and t.procs == []
