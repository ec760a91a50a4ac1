"""``facepro run`` with MQTT on real brokers: the system Mosquitto (127.0.0.1:1883, unique topic prefixes,
retained topics cleared afterwards) and a private one stopped mid-run for the outage.

(a) one ``new`` and one ``end`` per stored event, payloads equal to the rows, ``available`` online → offline,
    discovery configs, stats, and ``facepro identities delete`` / ``merge`` removing an entity;
(b) SIGKILL of the supervisor: ``offline`` arrives by the Last Will;
(c) the broker stopped for ~10 s mid-run: every stored event still reaches the subscriber, and
    ``facepro status`` shows the disconnection and the outbox depth while it lasts;
(d) with the api process too: both optional rows run, status and health show both, mqtt's queue is its
    outbox, the summary lists the rows in drain order (mqtt after storage, api last) and every event arrives.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import facepro, finish_run, pipeline_config, save_config, start_run, wait_status, write_clip
from tests.mqtt_broker import SYSTEM_BROKER, Broker, Recorder, wait_until
from tests.unit.test_outbox import assert_matches_row

FRAMES = 150


@pytest.fixture(scope="module")
def clip(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(videos / "one-by-one-person-detection.mp4", tmp_path_factory.mktemp("clip") / "one150.avi", FRAMES)


@pytest.fixture(scope="module")
def long_clip(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(videos / "one-by-one-person-detection.mp4", tmp_path_factory.mktemp("clip") / "one250.avi", 250)


def _system_broker() -> None:
    try:
        socket.create_connection(SYSTEM_BROKER, timeout=1).close()
    except OSError:
        pytest.skip(f"no Mosquitto at {SYSTEM_BROKER[0]}:{SYSTEM_BROKER[1]}")


def _config(models: Path, clip: Path, data_dir: Path, box: str, url: str, prefix: str, disco_prefix: str,
            max_fps: float | None = None, api: bool = False, **mqtt) -> Path:
    tree = pipeline_config(models, {"room": clip}, **({"api__enabled": True, "api__port": 0} if api else {}))
    if max_fps:
        tree["cameras"][0]["max_fps"] = max_fps
    tree["box_id"] = box
    tree["mqtt"] = {"url": url, "topic_prefix": prefix, "discovery_prefix": disco_prefix, "stats_interval_s": 1,
                    "reconnect_min_s": 0.5, "reconnect_max_s": 2, **mqtt}
    return save_config(tree, data_dir / "cfg.yaml")


def _stored(data_dir: Path) -> dict[str, dict]:
    con = sqlite3.connect(data_dir / "facepro.db")
    con.row_factory = sqlite3.Row
    try:
        rows = con.execute("SELECT e.id, c.name AS camera, e.label, e.best_score AS score, e.started_at, e.ended_at, "
                           "e.ended, e.x1, e.y1, e.x2, e.y2, i.name AS identity, e.identity_score, e.method, "
                           "e.snapshot_path, e.track_id, e.first_frame, e.last_frame "
                           "FROM events e JOIN cameras c ON c.id = e.camera_id "
                           "LEFT JOIN identities i ON i.id = e.identity_id").fetchall()
        unsent = con.execute("SELECT count(*) FROM mqtt_outbox WHERE sent_at IS NULL").fetchone()[0]
    finally:
        con.close()
    assert unsent == 0, "every outbox row was acknowledged by the broker"
    return {r["id"]: dict(r) for r in rows}


def _by_event(rec: Recorder, topic: str) -> dict[str, dict[str, set[int]]]:
    """Event id → type → the seqs received (repeats collapse: at-least-once)."""
    out: dict[str, dict[str, set[int]]] = {}
    for m in rec.on(topic):
        msg = m.json()
        out.setdefault(msg["after"]["id"], {}).setdefault(msg["type"], set()).add(msg["after"]["seq"])
    return out


def _clear_retained(rec: Recorder, prefixes: tuple[str, ...]) -> None:
    """Leave nothing of this test retained on the shared broker."""
    from tests.unit.test_mqtt import _retain

    for topic in sorted({m.topic for m in rec.all() if m.topic.startswith(prefixes)}):
        _retain(SYSTEM_BROKER[1], topic, "")


def test_run_publishes_each_stored_event_new_and_end_matching_the_rows(clip: Path, models: Path,
                                                                       short_data_dir: Path) -> None:
    _system_broker()
    tag = uuid.uuid4().hex[:8]
    prefix, disco, box = f"fpt-{tag}", f"ha-{tag}", f"box-{tag}"
    cfg = _config(models, clip, short_data_dir, box, "mqtt://127.0.0.1:1883", prefix, disco)
    rec = Recorder(SYSTEM_BROKER[1], (f"{prefix}/#", f"{disco}/#"))
    try:
        finish_run(start_run(str(cfg)), short_data_dir, timeout_s=120)
        wait_until(lambda: [m.text for m in rec.on(f"{prefix}/available")][-1:] == ["offline"], 20, "offline at stop")
        stored = _stored(short_data_dir)
        assert stored, "the clip shows a person: at least one event"
        got = _by_event(rec, f"{prefix}/events")
        assert set(got) == set(stored)  # nothing published that is not stored, nothing stored left out
        for eid, kinds in got.items():
            assert len(kinds.get("new", ())) == 1 and len(kinds.get("end", ())) == 1, (eid, kinds)
        ends = {m.json()["after"]["id"]: m.json()["after"] for m in rec.on(f"{prefix}/events") if m.json()["type"] == "end"}
        for eid, after in ends.items():
            assert_matches_row(after, stored[eid], box)
        assert [m.text for m in rec.on(f"{prefix}/available")] == ["online", "offline"]
        assert rec.on(f"{prefix}/room/person")[-1].text == "0"
        stats = [m.json() for m in rec.on(f"{prefix}/stats")]
        assert stats and all(s["box_id"] == box for s in stats)
        assert {"capture", "storage", "mqtt"} <= {st["stage"] for st in stats[-1]["stages"]}
        assert rec.on(f"{disco}/sensor/{box}/room_person_count/config")
        assert rec.on(f"{disco}/binary_sensor/{box}/room_person/config")
        _delete_identity_removes_its_entity(cfg, short_data_dir, rec, disco, box)
    finally:
        _clear_retained(rec, (prefix, disco))
        rec.close()


def _delete_identity_removes_its_entity(cfg: Path, data_dir: Path, rec: Recorder, disco: str, box: str) -> None:
    from storage.db import open_engine
    from storage.queries import enroll
    from tests.unit.test_mqtt import _retain

    engine = open_engine(f"sqlite:///{data_dir / 'facepro.db'}")
    for name in ("zed", "zed2", "zee"):
        enroll(engine, name, np.eye(1, 8, dtype=np.float32), "m", [f"{name}.jpg"], [None])
    engine.dispose()
    for argv, gone in ((["delete", "zed"], "zed"), (["merge", "zee", "zed2"], "zed2")):  # merge deletes zed2 too
        topic = f"{disco}/sensor/{box}/identity_{gone}_last_seen/config"
        _retain(SYSTEM_BROKER[1], topic, json.dumps({"state_topic": "x"}))  # as a run that knew it left it
        res = facepro("identities", *argv, "--config", str(cfg))
        assert res.returncode == 0 and f"removed the Home Assistant entity of {gone}" in res.stdout, res.stdout + res.stderr
        wait_until(lambda t=topic: rec.on(t) and rec.on(t)[-1].payload == b"", 10, "empty retained config")


def test_sigkilled_supervisor_goes_offline_by_last_will(clip: Path, models: Path, short_data_dir: Path) -> None:
    from pipeline.runs import cleanup_stale_runs

    _system_broker()
    tag = uuid.uuid4().hex[:8]
    prefix = f"fpk-{tag}"
    cfg = _config(models, clip, short_data_dir, f"box-{tag}", "mqtt://127.0.0.1:1883", prefix, f"ha-{tag}",
                  discovery=False, keepalive_s=5)
    rec = Recorder(SYSTEM_BROKER[1], (f"{prefix}/available",))
    proc = start_run(str(cfg))
    try:
        wait_until(lambda: [m.text for m in rec.on(f"{prefix}/available")] == ["online"], 60, "online")
        os.kill(proc.pid, signal.SIGKILL)  # the supervisor only; its children die with it (PR_SET_PDEATHSIG)
        proc.wait(timeout=30)
        wait_until(lambda: [m.text for m in rec.on(f"{prefix}/available")] == ["online", "offline"], 30,
                   "offline by the Last Will")
        late = Recorder(SYSTEM_BROKER[1], (f"{prefix}/available",))
        wait_until(lambda: late.on(f"{prefix}/available"), 10, "retained availability")
        assert late.on(f"{prefix}/available")[-1].text == "offline"  # retained: Home Assistant starting later sees it
        late.close()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        cleanup_stale_runs(short_data_dir)
        _clear_retained(rec, (prefix,))
        rec.close()


def _mqtt_row(doc: dict) -> dict:
    return next(s for s in doc["stages"] if s["stage"] == "mqtt")


def test_broker_outage_mid_run_loses_no_event(long_clip: Path, models: Path, short_data_dir: Path) -> None:
    broker = Broker(short_data_dir / "broker", persistence=True).start()  # keeps the recorder's session
    cfg = _config(models, long_clip, short_data_dir, "outage-box", broker.url, "fpo", "hao", drain_timeout_s=30,
                  max_fps=15)  # paced: the run outlasts the outage
    rec = Recorder(broker.port, ("fpo/events", "fpo/available"), persistent=True, client_id="outage-recorder")
    proc = start_run(str(cfg))
    seen: list[dict] = []
    try:
        wait_until(lambda: rec.on("fpo/events"), 60, "a first event published")
        broker.stop()
        stopped = time.monotonic()
        doc = wait_status(proc, timeout_s=60, until=lambda d: _mqtt_row(d)["counts"].get("mqtt_connected") == 0
                          and _mqtt_row(d)["counts"].get("outbox_pending", 0) > 0)
        seen.append(_mqtt_row(doc))
        time.sleep(max(0.0, 10.0 - (time.monotonic() - stopped)))  # the outage lasts ~10 s
        broker.start()  # same port
        summary = finish_run(proc, short_data_dir, timeout_s=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        stored = _stored(short_data_dir)
        wait_until(lambda: set(_by_event(rec, "fpo/events")) >= set(stored)
                   and all("end" in k for k in _by_event(rec, "fpo/events").values()), 30, "every event received")
        got = _by_event(rec, "fpo/events")
        assert set(got) == set(stored) and all({"new", "end"} <= set(k) for k in got.values())
        row = seen[0]
        assert row["counts"]["mqtt_connected"] == 0 and row["queue_depth"] == row["counts"]["outbox_pending"] > 0
        assert broker.url.split("//")[1] in row["last_error"] and "\n" not in row["last_error"]  # one line on the fault
        counts = summary["stages"]["mqtt"]["counts"]
        assert counts["reconnects"] >= 1 and counts["outbox_pending"] == 0
    finally:
        rec.close()
        broker.stop()


def test_run_with_the_api_too_drains_mqtt_after_storage_and_the_api_last(clip: Path, models: Path,
                                                                          short_data_dir: Path) -> None:
    from tests.integration.test_api_run import _get, _stage

    broker = Broker(short_data_dir / "broker").start()
    cfg = _config(models, clip, short_data_dir, "both-box", broker.url, "fpb", "hab", max_fps=10, api=True)
    rec = Recorder(broker.port, ("fpb/events", "fpb/available"))
    proc = start_run(str(cfg))
    try:
        doc = wait_status(proc, timeout_s=120, until=lambda d: all(s["processes"] >= 1 for s in d["stages"])
                          and (_stage(d, "api") or {}).get("counts", {}).get("ready")
                          and (_stage(d, "mqtt") or {}).get("counts", {}).get("mqtt_connected") == 1)
        names = ["capture", "detection", "recognition", "storage", "mqtt", "api"]
        assert [s["stage"] for s in doc["stages"]] == names
        status, body = _get(f"http://127.0.0.1:{_stage(doc, 'api')['counts']['port']}", "/api/health")
        assert status == 200 and list(json.loads(body)["stages"]) == names, body
        row = _mqtt_row(doc)
        assert row["queue_depth"] == row["counts"].get("outbox_pending", 0)  # its outbox, not storage's acks
        summary = finish_run(proc, short_data_dir, timeout_s=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        assert list(summary["stages"]) == names  # drain order: mqtt after storage, api last
        assert summary["stages"]["mqtt"]["counts"]["outbox_pending"] == 0 and summary["stages"]["api"]["frames_in"] >= 1
        stored = _stored(short_data_dir)  # every outbox row acknowledged before the mqtt process stopped
        wait_until(lambda: set(_by_event(rec, "fpb/events")) == set(stored), 10, "every stored event received")
        assert [m.text for m in rec.on("fpb/available")] == ["online", "offline"]
    finally:
        rec.close()
        broker.stop()
