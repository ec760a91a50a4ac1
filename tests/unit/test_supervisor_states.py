"""Shutdown and rescale state machines of the supervisor, driven with a fake spawner (no real processes)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from pipeline import topology
from pipeline.processes import ProcessTable
from pipeline.supervisor import Rescaler, RescaleState, ShutdownState, Supervisor
from tests.unit.test_processes import FakeClock, FakeSpawner
from tests.unit.test_topology import _cfg


def _exit(table: ProcessTable, stage: str) -> None:
    for p in table.of(stage):
        p.handle.code = 0
    table.reap()


@pytest.mark.parametrize("api", [False, True])
@pytest.mark.parametrize("mqtt", [False, True])
def test_shutdown_drains_stage_by_stage_in_table_order(tmp_path: Path, api: bool, mqtt: bool) -> None:
    sup = Supervisor(_cfg(2, 2, 1, api=api, mqtt=mqtt), tmp_path, clock=FakeClock())
    spawner = FakeSpawner()
    sup.table.spawner = spawner
    for row in topology.start_order():
        for i in range(sup.counts[row.name]):
            sup.table.spawn(row.name, i)
    sup._begin_shutdown()
    assert sup.table.hold
    assert sup.stages == topology.active_names(sup.cfg) and ("api" in sup.stages) is api and ("mqtt" in sup.stages) is mqtt
    assert sup.stages[4:] == (("mqtt",) if mqtt else ()) + (("api",) if api else ())  # mqtt after storage, api last
    for stage in sup.stages:  # a switched-off row has no process: its draining state passes at once
        assert not sup._advance_shutdown()  # the previous stage has exited: this one is asked to stop
        assert sup.shutdown is ShutdownState.draining(stage)
        signalled = {s for s, _, h in spawner.started if h.signals}
        assert stage in signalled and not signalled & set(topology.STAGE_NAMES[topology.STAGE_NAMES.index(stage) + 1:])
        _exit(sup.table, stage)
    assert sup._advance_shutdown() and sup.shutdown is ShutdownState.DONE
    assert all(sup.table.restarts(s) == 0 for s in topology.STAGE_NAMES) and sup.failure is None


def test_without_mqtt_no_publisher_runs_and_the_shutdown_ends_after_storage(tmp_path: Path) -> None:
    sup = Supervisor(_cfg(1, 1, 1), tmp_path, clock=FakeClock())
    sup.table.spawner = FakeSpawner()
    assert sup.counts["mqtt"] == 0 and "mqtt" not in sup.stages and sup.gate.stages == ("detection", "recognition", "storage")
    for row in topology.start_order():
        for i in range(sup.counts[row.name]):
            sup.table.spawn(row.name, i)
    assert "mqtt" not in {p.stage for p in sup.table.procs}
    sup._begin_shutdown()
    for stage in topology.STAGE_NAMES[:4]:
        assert not sup._advance_shutdown() and sup.shutdown is ShutdownState.draining(stage)
        _exit(sup.table, stage)
    assert sup._advance_shutdown() and sup.shutdown is ShutdownState.DONE
    assert [s.stage for s in sup.status().stages] == list(topology.STAGE_NAMES[:4])


class CountingSpawner(FakeSpawner):
    """Records the live counts each process was started with (what the launcher passes in argv)."""

    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.counts = counts
        self.seen: list[tuple[str, int, dict]] = []

    def __call__(self, stage: str, index: int):
        self.seen.append((stage, index, dict(self.counts)))
        return super().__call__(stage, index)


def test_direct_scale_sizes_new_processes_for_the_new_count() -> None:
    counts = {"capture": 1, "detection": 1, "recognition": 1, "storage": 1}
    spawner = CountingSpawner(counts)
    table = ProcessTable(spawner, FakeClock())
    table.spawn("detection", 0)
    ack = Rescaler(table, counts).scale("detection", 3)
    assert ack.ok and ack.message == "detection: 1 -> 3 processes"
    assert [(s, i, c["detection"]) for s, i, c in spawner.seen[1:]] == [("detection", 1, 3), ("detection", 2, 3)]
    ack = Rescaler(table, counts).scale("detection", 1)
    assert ack.ok and [p.index for p in table.of("detection") if p.stopping] == [1, 2]


def test_repartition_drains_upstream_then_the_stage_then_restarts_both() -> None:
    counts = {"capture": 1, "detection": 1, "recognition": 1, "storage": 1}
    spawner = CountingSpawner(counts)
    table = ProcessTable(spawner, FakeClock())
    for stage in ("storage", "recognition", "detection", "capture"):
        table.spawn(stage, 0)
    r = Rescaler(table, counts)
    assert r.scale("recognition", 2).ok and r.state is RescaleState.DRAINING_UPSTREAM
    assert not r.scale("detection", 2).ok  # busy
    r.advance()
    assert [p.stage for p in table.procs if p.stopping] == ["detection"] and r.state is RescaleState.DRAINING_UPSTREAM
    _exit(table, "detection")
    r.advance()
    assert r.state is RescaleState.DRAINING_STAGE and table.of("recognition")[0].stopping
    _exit(table, "recognition")
    r.advance()
    assert r.state is RescaleState.IDLE and counts["recognition"] == 2
    assert [(s, i, c["recognition"]) for s, i, c in spawner.seen[4:]] == [("recognition", 0, 2), ("recognition", 1, 2),
                                                                         ("detection", 0, 2)]
    assert table.restarts("detection") == table.restarts("recognition") == 0
    assert table.of("capture")[0].handle.signals == [] and table.of("storage")[0].handle.signals == []  # kept running


def test_a_companion_only_box_runs_its_rows_until_signalled_and_scales_nothing_absent(tmp_path: Path) -> None:
    sup = Supervisor(_cfg(0, 1, 1, frigate=True), tmp_path, clock=FakeClock())
    spawner = FakeSpawner()
    sup.table.spawner = spawner
    for row in topology.start_order():
        for i in range(sup.counts[row.name]):
            sup.table.spawn(row.name, i)
    assert sorted(s for s, _, _ in spawner.started) == ["frigate", "mqtt"]
    assert not sup._file_mode() and not sup._files_done()  # no file source to end the run: it runs until signalled
    ack = sup.scale("detection", 2)
    assert not ack.ok and "detection does not run with this config (running: mqtt, frigate)" in ack.message
    assert [s.stage for s in sup.status().stages] == ["mqtt", "frigate"]
    sup._begin_shutdown()
    for stage in ("mqtt", "frigate"):  # the data path's states pass at once, then the two rows drain in order
        assert not sup._advance_shutdown() and sup.shutdown is ShutdownState.draining(stage)
        _exit(sup.table, stage)
    assert sup._advance_shutdown() and sup.shutdown is ShutdownState.DONE


def test_fixed_and_unknown_stages_are_not_scaled() -> None:
    counts = {"capture": 1, "detection": 1, "recognition": 1, "storage": 1}
    r = Rescaler(ProcessTable(FakeSpawner(), FakeClock()), counts)
    assert not r.scale("capture", 2).ok and "not supported" in r.scale("capture", 2).message
    assert not r.scale("jobs", 2).ok and "unknown stage" in r.scale("jobs", 2).message
    assert not r.scale("api", 2).ok and "not supported" in r.scale("api", 2).message


@pytest.mark.parametrize("api", [False, True])
@pytest.mark.parametrize("mqtt", [False, True])
def test_the_optional_rows_are_spawned_only_when_enabled_and_never_hold_the_live_cameras(
        tmp_path: Path, api: bool, mqtt: bool) -> None:
    sup = Supervisor(_cfg(1, 1, 1, api=api, mqtt=mqtt), tmp_path, clock=FakeClock())
    spawner = FakeSpawner()
    sup.table.spawner = spawner
    for row in topology.start_order():
        for i in range(sup.counts[row.name]):
            sup.table.spawn(row.name, i)
    assert [s for s, _, _ in spawner.started].count("api") == int(api)
    assert [s for s, _, _ in spawner.started].count("mqtt") == int(mqtt)
    assert sup.gate.capture_stage == "capture" and sup.gate.stages == ("detection", "recognition", "storage")
    assert list(sup._views(with_usage=False)) == list(topology.active_names(sup.cfg))
