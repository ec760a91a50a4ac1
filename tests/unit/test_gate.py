"""The start gate opens live captures only once every other stage process is ready."""

from __future__ import annotations

from pipeline.counters import W_GO
from pipeline.gate import StartGate
from pipeline.metrics import StageCounters


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _procs(**pids: tuple[str, StageCounters]) -> tuple[list[tuple[str, int]], dict]:
    procs, blocks = [], {}
    for pid, (stage, counters) in pids.items():
        procs.append((stage, int(pid[1:])))
        blocks[int(pid[1:])] = counters.block
    return procs, blocks


def test_gate_opens_when_every_other_stage_has_all_processes_ready_and_stays_open() -> None:
    clock = _Clock()
    gate = StartGate("capture", ("detection", "recognition", "storage"), interval_s=0.2, clock=clock)
    cap, det1, det2, rec, sto = (StageCounters(s, 0) for s in ("capture", "detection", "detection", "recognition", "storage"))
    procs, blocks = _procs(p1=("capture", cap), p2=("detection", det1), p3=("detection", det2), p4=("recognition", rec),
                           p5=("storage", sto))
    for c in (det1, rec, sto):
        c.extra["ready"] = 1
    assert not gate.update(procs, blocks) and not cap.block.ints[W_GO]  # det2 is still loading its model
    det2.extra["ready"] = 1
    assert not gate.update(procs, blocks)  # looks again only after interval_s
    clock.now += 0.2
    assert gate.update(procs, blocks) and cap.block.ints[W_GO] == 1 and gate.opened_at == 0.2
    late = StageCounters("capture", 1)  # a capture restarted later gets GO at once
    procs.append(("capture", 9))
    blocks[9] = late.block
    det1.extra["ready"] = 0  # a restarted detection process loading again: the gate stays open
    assert gate.update(procs, blocks) and late.block.ints[W_GO] == 1


def test_gate_needs_a_process_of_every_stage() -> None:
    gate = StartGate("capture", ("detection", "recognition"), interval_s=0.0, clock=_Clock())
    cap, det = StageCounters("capture", 0), StageCounters("detection", 0)
    det.extra["ready"] = 1
    procs, blocks = _procs(p1=("capture", cap), p2=("detection", det))
    assert not gate.update(procs, blocks) and not cap.block.ints[W_GO]  # no recognition process yet
