"""The stage table: endpoints, counts, order, worker dispatch, shutdown states."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline import topology
from pipeline.config import AppConfig, thread_budget
from pipeline.supervisor import ShutdownState

ROOT = Path(__file__).resolve().parents[2]
TRANSPORT_CALLS = {"sender", "receiver", "publisher", "subscriber", "dispatcher", "server", "credit_inbox", "request",
                   "endpoint"}


def _cfg(cameras: int = 3, det: int = 2, rec: int = 2, api: bool = False, mqtt: bool = False,
         frigate: bool = False) -> AppConfig:
    return AppConfig.model_validate({
        **({"mqtt": {}} if mqtt or frigate else {}),
        **({"frigate": {"url": "http://frigate:5000"}} if frigate else {}),
        "cameras": [{"name": f"cam{i}", "source": f"/v/{i}.mp4", "mode": "file"} for i in range(cameras)],
        "detection": {"processes": det, "detector": {"type": "onnx", "path": "d.onnx", "layout": "yolox"}},
        "recognition": {"processes": rec, "face": {"detector": {"type": "onnx", "path": "f.onnx"},
                                                   "embedder": {"type": "onnx", "path": "e.onnx"}}},
        "api": {"enabled": api}})


def test_rows_in_pipeline_order_with_their_counts() -> None:
    assert topology.STAGE_NAMES == ("capture", "detection", "recognition", "storage", "mqtt", "frigate", "api")
    assert topology.DATA_PATH == ("capture", "detection", "recognition", "storage")
    assert topology.initial_counts(_cfg(3, 2, 4)) == {"capture": 3, "detection": 2, "recognition": 4, "storage": 1,
                                                      "mqtt": 0, "frigate": 0, "api": 0}  # optional rows off
    assert topology.initial_counts(_cfg(1, 1, 1, api=True))["api"] == 1
    assert topology.initial_counts(_cfg(3, 2, 4, mqtt=True))["mqtt"] == 1
    assert topology.initial_counts(_cfg(3, 2, 4, frigate=True))["frigate"] == 1
    assert [s.name for s in topology.start_order()] == ["api", "frigate", "mqtt", "storage", "recognition", "detection",
                                                        "capture"]
    assert topology.spec("frigate").resume is topology.Resume.FRESH and topology.upstream("frigate") is None
    assert topology.upstream("recognition") == "detection" and topology.upstream("capture") is None
    assert topology.upstream("api") is None and topology.upstream("mqtt") is None  # off the data path: no queue behind
    assert topology.spec("mqtt").resume is topology.Resume.OUTBOX_REPLAYED
    assert topology.spec("mqtt").count is topology.Count.ONE and topology.spec("mqtt").rescale is topology.Rescale.FIXED
    assert topology.spec("capture").resume is topology.Resume.AFTER_LAST_PUBLISHED
    assert topology.spec("storage").resume is topology.Resume.UNACKED_RESENT
    assert topology.spec("api").resume is topology.Resume.FRESH and topology.spec("api").rescale is topology.Rescale.FIXED
    assert not topology.spec("api").inference and not topology.spec("api").ends_with_source
    with pytest.raises(KeyError, match="unknown stage 'jobs'"):
        topology.spec("jobs")


@pytest.mark.parametrize("api", [False, True])
@pytest.mark.parametrize("mqtt", [False, True])
def test_the_optional_rows_run_only_when_enabled(api: bool, mqtt: bool) -> None:
    cfg = _cfg(api=api, mqtt=mqtt)
    names = topology.active_names(cfg)
    assert names == ("capture", "detection", "recognition", "storage") + (("mqtt",) if mqtt else ()) + (("api",) if api else ())
    for row in ("api", "mqtt"):  # both optional rows use the same two fields
        assert topology.spec(row).enabled is not None and not topology.spec(row).data_path
        assert topology.spec(row).outboxes(cfg, 0, {}) == ()
    assert topology.spec("mqtt").inboxes(cfg, 0, {}) == ()
    assert topology.spec("api").inboxes(cfg, 0, {}) == ("live-tracks",)  # only read when the row runs
    rec_out = topology.spec("recognition").outboxes(cfg, 0, {})
    assert rec_out == ("storage",) + (("live-tracks",) if api else ())  # no live view, nothing published


@pytest.mark.parametrize("cameras, api, expected", [
    (0, False, ("mqtt", "frigate")),  # a companion-only box: no data path, the broker rows alone
    (0, True, ("mqtt", "frigate", "api")),
    (2, False, ("capture", "detection", "recognition", "storage", "mqtt", "frigate")),  # companion beside cameras
])
def test_a_config_without_cameras_runs_only_the_rows_off_the_data_path(cameras: int, api: bool,
                                                                       expected: tuple[str, ...]) -> None:
    cfg = _cfg(cameras, api=api, frigate=True)
    assert topology.active_names(cfg) == expected
    counts = topology.initial_counts(cfg)
    assert {name for name, n in counts.items() if n} == set(expected)
    assert counts["capture"] == len(cfg.cameras) and topology.spec("frigate").inboxes(cfg, 0, counts) == ()


def test_every_inbox_is_some_outbox_and_names_come_from_the_table() -> None:
    cfg = _cfg(api=True, mqtt=True, frigate=True)
    counts = {"capture": 3, "detection": 2, "recognition": 2, "storage": 1, "mqtt": 1, "frigate": 1, "api": 1}
    ins, outs = set(), set()
    for row in topology.STAGES:
        for i in range(counts[row.name]):
            ins.update(row.inboxes(cfg, i, counts))
            outs.update(row.outboxes(cfg, i, counts))
    assert ins == outs == {"frames-cam0", "frames-cam1", "frames-cam2", "detections-0", "detections-1", "storage",
                           "storage-acks", "live-tracks"}
    assert topology.spec("detection").outboxes(cfg, 0, dict(counts, recognition=3))[-1] == "detections-2"


def test_counts_argument_round_trip() -> None:
    counts = {"capture": 1, "detection": 4, "recognition": 2, "storage": 1, "mqtt": 0, "frigate": 1, "api": 1}
    assert topology.parse_counts(topology.format_counts(counts)) == counts
    for bad in ("capture=1", "capture=x,detection=1,recognition=1,storage=1,api=0", "capture=1,detection=1,recognition=1,storage=1",
                "capture=1,detection=1,recognition=1,storage=1,mqtt=0,api=0",  # frigate missing
                "capture=1,detection=1,recognition=1,storage=1,mqtt=0,frigate=0,api=0,jobs=1"):
        with pytest.raises(ValueError):
            topology.parse_counts(bad)


def test_worker_dispatch_covers_every_row() -> None:
    from pipeline.worker import ENTRIES

    assert set(ENTRIES) == set(topology.STAGE_NAMES)


def test_every_stage_has_a_draining_state_in_order() -> None:
    state, seen = ShutdownState.draining(topology.STAGE_NAMES[0]), []
    while state is not ShutdownState.DONE:
        seen.append(state.stage)
        state = state.next()
    assert tuple(seen) == topology.STAGE_NAMES


@pytest.mark.parametrize("module", sorted(p.name for p in (ROOT / "pipeline").glob("*.py") if p.name != "topology.py"))
def test_no_endpoint_name_literal_outside_the_table(module: str) -> None:
    """Transport calls never get a literal endpoint name: it comes from a pipeline.topology function."""
    bad = []
    for node in ast.walk(ast.parse((ROOT / "pipeline" / module).read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in TRANSPORT_CALLS:
            for arg in node.args[:2]:
                arg = arg.elt if isinstance(arg, ast.ListComp) else arg
                if isinstance(arg, ast.JoinedStr) or (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                    bad.append(node.lineno)
    assert bad == [], f"{module}: endpoint name literal at lines {bad}"


def test_thread_budget_follows_the_live_counts() -> None:
    cfg = _cfg(1, 1, 1)
    assert thread_budget(cfg, cpu_count=8, stage="detection") == 4  # configured 1 + 1
    live = {"capture": 1, "detection": 4, "recognition": 1, "storage": 1}  # after facepro scale detection=4
    assert thread_budget(cfg, cpu_count=8, stage="detection", counts=live) == 1
    assert thread_budget(cfg, cpu_count=8, stage="recognition", counts=dict(live, detection=1, recognition=3)) == 2
    assert thread_budget(cfg, cpu_count=2, stage="detection", counts=dict(live, detection=8)) == 1  # never 0
