"""``facepro hub`` on real servers: a private Mosquitto and the PostgreSQL server (a fresh schema per test).

(a) Two boxes (two ``facepro run`` of the two asset videos, ``box_id`` box-a and box-b, the same camera name)
    publish to the broker; one hub stores into PostgreSQL and is SIGKILLed mid-run while a batch it received
    waits on a table lock (received, not committed, so not acknowledged), then started again with the same
    client id: the hub's events are exactly the union of both boxes' stored events (by event id, none
    twice, every field equal to the precision the messages carry), ``/api/events`` pages and ``?box=`` and
    ``facepro events --db --box`` give them, and its counts add up (every message received is applied, stale,
    superseded or dropped for the broker's resend; none refused).
(b) Two hub instances of one shared-subscription group: each message of a synthetic box goes to one of
    them (the received counts add up to the messages sent, both got a share), and the union is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.conftest import facepro, pipeline_config, save_config
from tests.mqtt_broker import Broker, wait_until
from tests.unit.test_hub import payload
from tests.unit.test_storage import pg_url  # noqa: F401  (fixture: a fresh PostgreSQL schema)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

#: Each box's clip: (video, frames, every n-th frame of the video): long enough for a kill mid-run, short
#: enough for a sane test time; box-b takes every 4th frame, so several of the video's people walk through.
CLIPS = {"box-a": ("vtest.avi", 200, 1), "box-b": ("one-by-one-person-detection.mp4", 250, 4)}
#: The hub is killed once it stored this many events (both boxes still running).
KILL_AFTER = 4
PREFIX = "fleet"
SKIP_FIELDS = {"snapshot_path", "box_id", "job_id"}  # hub: snapshot_path is box:<id>, job_id is not carried
#: Precision of the floats the event messages carry (storage.outbox.event_json rounds them).
PRECISION = {"best_score": 1e-6, "identity_score": 1e-6, "xyxy": 0.005 + 1e-9}


def same_event(hub_row: dict, box_row: dict) -> bool:
    """A hub row describes the box's row: every field equal, the floats to the precision the messages carry."""
    keys = (hub_row.keys() | box_row.keys()) - SKIP_FIELDS
    exact = {k for k in keys if k not in PRECISION}
    return ({k: hub_row[k] for k in exact} == {k: box_row[k] for k in exact}
            and all(hub_row[k] == pytest.approx(box_row[k], abs=tol) for k, tol in PRECISION.items()))


class Process:
    """A ``python -m pipeline.cli ...`` child whose output (stdout and stderr) is collected by a thread."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, needle: str, timeout_s: float) -> str:
        def found() -> str | None:
            assert self.proc.poll() is None or any(needle in ln for ln in self.lines), \
                f"exited with {self.proc.returncode}:\n{self.text[-3000:]}"
            return next((ln for ln in self.lines if needle in ln), None)
        return str(wait_until(found, timeout_s, f"{needle!r} in the output"))

    def wait(self, timeout_s: float) -> int:
        """Wait for the child to exit by itself (killed after ``timeout_s``)."""
        try:
            return self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self._reader.join(5)

    def finish(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(5)
        return code

    def summary(self) -> dict:
        return json.loads(next(ln for ln in reversed(self.lines) if ln.startswith('{"hub"')))["hub"]


def _env(data_dir: Path) -> dict[str, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "FACEPRO_DATA_DIR": str(data_dir)}


def _hub(cfg: Path, broker: Broker, db: str, data_dir: Path, client_id: str, *extra: str) -> Process:
    hub = Process(["hub", "--config", str(cfg), "--mqtt", broker.url, "--db", db, "--prefix", PREFIX,
                   "--client-id", client_id, *extra], _env(data_dir))
    hub.wait_for(f"subscribed to $share/facepro-hub/{PREFIX}/events", 60)
    return hub


def _hub_rows(db: str) -> dict[str, dict]:
    from storage.db import open_engine
    from storage.queries import list_events

    engine = open_engine(db)
    try:
        return {e.event_id: e.to_json() for e in list_events(engine, limit=100_000)}
    finally:
        engine.dispose()


def _box_rows(data_dir: Path) -> dict[str, dict]:
    import sqlite3

    from storage.db import open_engine
    from storage.queries import list_events

    con = sqlite3.connect(data_dir / "facepro.db")
    try:
        assert con.execute("SELECT count(*) FROM mqtt_outbox WHERE sent_at IS NULL").fetchone()[0] == 0
    finally:
        con.close()
    engine = open_engine(f"sqlite:///{data_dir / 'facepro.db'}")
    try:
        return {e.event_id: e.to_json() for e in list_events(engine, limit=100_000)}
    finally:
        engine.dispose()


def _api_pages(port: int, **query: str) -> list[str]:
    """Event ids of every page of ``GET /api/events`` (25 a page), in order."""
    ids, cursor = [], None
    while True:
        params = {"limit": "25", **query, **({"cursor": cursor} if cursor else {})}
        url = f"http://127.0.0.1:{port}/api/events?" + "&".join(f"{k}={v}" for k, v in params.items())
        with urllib.request.urlopen(url, timeout=10) as res:
            page = json.loads(res.read())
        ids += [e["event_id"] for e in page["events"]]
        cursor = page["next"]
        if cursor is None:
            return ids


@contextlib.contextmanager
def _events_locked(db: str) -> Iterator[None]:
    """Hold a lock on the hub's ``events`` table that blocks writers (not readers) until a hub's insert waits
    for it, then yield; released (rolled back) afterwards."""
    from sqlalchemy import text

    from storage.db import open_engine

    engine = open_engine(db)
    try:
        with engine.connect() as conn, conn.begin() as tx:
            conn.execute(text("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE"))
            waiting = text("SELECT count(*) FROM pg_locks WHERE relation = 'events'::regclass AND NOT granted")
            with engine.connect() as probe:
                wait_until(lambda: probe.execute(waiting).scalar(), 120, "a hub insert waiting for the lock", poll_s=0.2)
            yield
            tx.rollback()
    finally:
        engine.dispose()


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def clips(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hubclips")
    return {box: _clip(videos / name, folder / f"{box}.avi", n, step) for box, (name, n, step) in CLIPS.items()}


def _clip(src: Path, dst: Path, frames: int, step: int) -> Path:
    """Every ``step``-th frame of ``src``, ``frames`` of them, as an MJPG AVI."""
    import cv2

    cap = cv2.VideoCapture(str(src))
    out, i = None, 0
    while frames:
        ok, frame = cap.read()
        if not ok:
            break
        if i % step == 0:
            if out is None:
                out = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, frame.shape[1::-1])
            out.write(frame)
            frames -= 1
        i += 1
    cap.release()
    assert out is not None, f"cannot read {src}"
    out.release()
    return dst


def test_two_boxes_one_hub_killed_mid_run_stores_the_union_once(pg_url: str, broker: Broker, clips: dict[str, Path],
                                                                  models: Path, tmp_path: Path) -> None:  # noqa: F811
    started = time.monotonic()
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"fph-{os.getpid()}-{int(started)}"  # short ipc:// paths
    hub_cfg = save_config(pipeline_config(models, {"entrance": clips["box-a"]}), tmp_path / "hub.yaml")
    hub = _hub(hub_cfg, broker, pg_url, root / "hub", "hub-1", "--port", "0")
    boxes: dict[str, Process] = {}
    try:
        for box, clip in clips.items():
            tree = pipeline_config(models, {"entrance": clip})  # the same camera name on both boxes
            tree.update(box_id=box, mqtt={"url": broker.url, "topic_prefix": PREFIX, "discovery": False,
                                           "reconnect_min_s": 0.5, "reconnect_max_s": 2})
            cfg = save_config(tree, tmp_path / f"{box}.yaml")
            boxes[box] = Process(["run", str(cfg)], _env(root / box))
        wait_until(lambda: len(_hub_rows(pg_url)) >= KILL_AFTER, 240, f"{KILL_AFTER} events stored", poll_s=0.2)
        with _events_locked(pg_url):  # the hub's next batch is received but cannot commit: killed unacknowledged
            assert all(p.proc.poll() is None for p in boxes.values()), "the kill must come mid-run"
            hub.finish(signal.SIGKILL)
        killed_at = len(_hub_rows(pg_url))
        time.sleep(2)  # messages published now wait in the hub's session on the broker
        hub = _hub(hub_cfg, broker, pg_url, root / "hub", "hub-1", "--port", "0")
        assert "(resumed session)" in hub.text
        running_at_restart = sum(p.proc.poll() is None for p in boxes.values())
        port = int(re.search(r"on http://[^ ]+:(\d+) ", hub.wait_for("serving the FacePro API on", 30)).group(1))
        for box, p in boxes.items():
            assert p.wait(600) == 0, p.text[-3000:]
        stored = {box: _box_rows(root / box) for box in boxes}
        union = {eid: (box, row) for box, rows in stored.items() for eid, row in rows.items()}
        assert len(union) == sum(len(r) for r in stored.values()), "event ids are unique across boxes"
        assert all(stored.values()), {b: len(r) for b, r in stored.items()}
        wait_until(lambda: _hub_rows(pg_url).keys() == union.keys()
                   and all(r["ended"] for r in _hub_rows(pg_url).values()), 60, "the hub has every event, ended",
                   poll_s=0.5)

        rows = _hub_rows(pg_url)
        for eid, (box, row) in union.items():
            assert rows[eid]["box_id"] == box
            assert rows[eid]["has_snapshot"] == row["has_snapshot"]
            assert same_event(rows[eid], row), (rows[eid], row)
        try:
            paged = _api_pages(port)
        except OSError as err:  # seen once under a loaded full-suite run (a reset): keep what the hub said
            raise AssertionError(f"hub API on port {port}: {err!r}; hub output:\n{hub.text[-3000:]}") from err
        assert len(paged) == len(set(paged)) == len(union) and set(paged) == set(union)  # none twice
        for box in boxes:
            assert set(_api_pages(port, box=box)) == set(stored[box])
        res = facepro("events", "--db", pg_url, "--box", "box-b", "--json", "--limit", "100000")
        assert res.returncode == 0, res.stderr
        assert {json.loads(ln)["event_id"] for ln in res.stdout.splitlines()} == set(stored["box-b"])

        assert hub.finish() == 0, hub.text[-3000:]
        counts = hub.summary()
        assert counts["rejected"] == 0 and counts["conflicts"] == 0 and counts["pending"] == 0
        assert counts["received"] == sum(counts.get(k, 0) for k in ("applied", "stale", "superseded", "resent"))
        assert killed_at < len(union)
        print(f"\nhub test: {len(stored['box-a'])} + {len(stored['box-b'])} events, {killed_at} stored at the kill, "
              f"{running_at_restart} box(es) still running at the restart, the restarted hub received "
              f"{counts['received']} messages ({counts}), {time.monotonic() - started:.0f} s")
    finally:
        for p in (hub, *boxes.values()):
            if p.proc.poll() is None:
                p.finish(signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_two_hub_instances_share_the_messages_and_store_them_all(pg_url: str, broker: Broker, models: Path,
                                                                   videos: Path, tmp_path: Path) -> None:  # noqa: F811
    from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5

    from pipeline.mqtt import user_properties

    cfg = save_config(pipeline_config(models, {"entrance": videos / "vtest.avi"}), tmp_path / "hub.yaml")
    hubs = [_hub(cfg, broker, pg_url, tmp_path / f"h{i}", f"hub-{i}", "--no-api") for i in (1, 2)]
    events = [f"{i:032x}" for i in range(1, 101)]
    messages = [payload(kind, e, seq, box="synthetic", identity="ann" if seq > 1 else None, end=1_700_000_009.5)
                for e in events for seq, kind in ((1, "new"), (2, "update"), (3, "end"))]
    pub = Client(CallbackAPIVersion.VERSION2, client_id="synthetic-box", protocol=MQTTv5)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        props = user_properties("PUBLISH", "synthetic")
        infos = [pub.publish(f"{PREFIX}/events", m, 1, False, props) for m in messages]
        for info in infos:
            info.wait_for_publish(30)
        wait_until(lambda: (rows := _hub_rows(pg_url)).keys() == set(events)
                   and all(r["ended"] and r["identity"] == "ann" for r in rows.values()), 60, "every event ended",
                   poll_s=0.5)
        for hub in hubs:
            assert hub.finish() == 0, hub.text[-3000:]
        counts = [hub.summary() for hub in hubs]
        assert sum(c["received"] for c in counts) == len(messages)  # each message went to one instance
        assert all(c["received"] > 0 for c in counts), counts  # and both had a share
        assert sum(c["applied"] for c in counts) >= len(events)
        print(f"\nshared subscription: {[c['received'] for c in counts]} of {len(messages)} messages")
    finally:
        pub.disconnect()
        pub.loop_stop()
        for hub in hubs:
            if hub.proc.poll() is None:
                hub.finish(signal.SIGKILL)
