"""The HTTP API in-process (FastAPI's TestClient): a real SQLite database migrated to head, the real face models
and asset images, a real ring and a control socket answered by a thread standing in for the supervisor (no
processes)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import threading
import uuid
import zlib
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

from pipeline import topology
from pipeline.api import create_app
from pipeline.cli import main
from pipeline.config import AppConfig, parse_config
from pipeline.messages import DROP_REASONS, Ack, ScaleRequest, StageStatus, StatusReply, StatusRequest
from pipeline.metrics import StageCounters
from pipeline.ring import RingLayout, RingWriter, ring_name
from pipeline.runs import current_run_file, write_json
from pipeline.services import api_context, face_analyzer
from pipeline.status import status_json
from pipeline.transport import Transport
from storage.db import upgrade
from storage.queries import enroll
from storage.writer import EventWriter
from tests.unit.test_storage import SEC, T0, update

TOKEN = "test-token-0123456789"
HEX = "0123456789abcdef" * 2


def tree(models: Path, videos: Path, **api: object) -> dict:
    return {
        "cameras": [{"name": "campus", "source": str(videos / "vtest.avi")},
                    {"name": "door", "source": "rtsp://admin:secret@10.0.0.5/stream"}],
        "detection": {"detector": {"path": str(models / "yolox_nano.onnx"), "layout": "yolox"}},
        "recognition": {"face": {"detector": {"path": str(models / "scrfd_500m.onnx")},
                                 "embedder": {"path": str(models / "mobilefacenet_128d.onnx")}}},
        "runtime": {"alerts": {"grace_s": 0}},
        "api": api,
    }


@pytest.fixture(scope="module")
def analyzer(models: Path, videos: Path):
    """The face models, loaded once for the module (each app would load them on first use)."""
    return face_analyzer(parse_config(tree(models, videos)), 2)


class Api:
    """Builds apps over the test's data dir; ``cfg_file`` is the same config for the CLI."""

    def __init__(self, data_dir: Path, models: Path, videos: Path, analyzer) -> None:
        self.data_dir, self.models, self.videos, self.analyzer = data_dir, models, videos, analyzer
        self.cfg_file = data_dir / "cfg.yaml"
        self.cfg_file.write_text(yaml.safe_dump(tree(models, videos)))
        self.url = f"sqlite:///{data_dir / 'facepro.db'}"
        upgrade(self.url)

    def config(self, **api: object) -> AppConfig:
        return parse_config(tree(self.models, self.videos, **api))

    def client(self, alone: bool = True, counters: StageCounters | None = None, **api: object) -> TestClient:
        ctx = api_context(self.config(**api), alone=alone, config_path=self.cfg_file, threads=1, counters=counters)
        ctx.backend._analyzer = self.analyzer  # type: ignore[attr-defined]
        return TestClient(create_app(ctx), raise_server_exceptions=False)


@pytest.fixture()
def api(data_dir: Path, models: Path, videos: Path, analyzer) -> Api:
    return Api(data_dir, models, videos, analyzer)


class FakeSupervisor:
    """A run file naming this process, a control socket answered by a thread, and a ring for camera ``campus``."""

    def __init__(self, data_dir: Path, frames: list[np.ndarray], states: dict[str, str] | None = None) -> None:
        self.run_id = uuid.uuid4().hex[:8]
        self.states = states or {s: "running" for s in topology.DATA_PATH}
        self.scales: list[ScaleRequest] = []
        self.socket_dir = Path(tempfile.mkdtemp(prefix="fpa-", dir="/tmp"))
        (data_dir / "run").mkdir(exist_ok=True)
        write_json(current_run_file(data_dir), {"run_id": self.run_id, "pid": os.getpid(), "socket_dir": str(self.socket_dir)})
        h, w = frames[0].shape[:2]
        self.ring = RingWriter.create(ring_name(self.run_id, "campus", os.getpid(), 0), RingLayout(4, h, w), wait_for_release=False)
        for i, frame in enumerate(frames):
            self.ring.write(frame, frame_index=i, captured_at_ns=T0 + i * SEC)
        self._stop = threading.Event()
        t = Transport(self.socket_dir)
        self._server = t.server(topology.control())  # bound before the first request
        self._thread = threading.Thread(target=self._serve, args=(t,), daemon=True)
        self._thread.start()

    def reply(self) -> StatusReply:
        drops = np.zeros(len(DROP_REASONS), np.int64)
        stages = tuple(StageStatus(stage=s, processes=1, pids=np.array([100 + i], np.int64), rate_fps=12.5, queue_depth=i,
                                   oldest_wait_ms=1.0, drop_counts=drops, latency_p50_ms=3.0, latency_p99_ms=9.0,
                                   cpu_percent=50.0, rss_mb=100.0, restarts=0, state=state,
                                   last_error="boom" if state == "failed" else "", count_names=("ready",),
                                   counts=np.array([1], np.int64))
                       for i, (s, state) in enumerate(self.states.items()))
        return StatusReply(run_id=self.run_id, uptime_s=42.0, stages=stages)

    def _serve(self, t: Transport) -> None:
        while not self._stop.is_set():
            req = self._server.poll_request(timeout_ms=20)
            if isinstance(req, StatusRequest):
                self._server.reply(self.reply())
            elif isinstance(req, ScaleRequest):
                self.scales.append(req)
                ok = req.stage == "detection"
                self._server.reply(Ack(ok=ok, message=f"{req.stage}: 1 -> {req.processes} processes" if ok
                                       else f"scaling {req.stage} at run time is not supported"))
        t.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.ring.close(unlink=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def vtest_frames(videos: Path, n: int = 2) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(videos / "vtest.avi"))
    frames = [cap.read()[1] for _ in range(n)]
    cap.release()
    return frames


@pytest.fixture()
def supervisor(data_dir: Path, videos: Path) -> Iterator[FakeSupervisor]:
    sup = FakeSupervisor(data_dir, vtest_frames(videos))
    yield sup
    sup.close()


def store_events(api: Api) -> list[str]:
    """Six events on two cameras; ``bob`` names two of them; the newest has a snapshot in the data dir."""
    from storage.db import open_engine

    engine = open_engine(api.url)
    enroll(engine, "bob", np.eye(1, 4, dtype=np.float32), "other-model")
    snap = api.data_dir / "snapshots" / "shot.jpg"
    snap.parent.mkdir()
    cv2.imwrite(str(snap), np.full((40, 30, 3), 90, np.uint8))
    w = EventWriter(engine, 100, 100)
    ids = [uuid.uuid4().hex for _ in range(6)]
    for i, eid in enumerate(ids):
        named = {"identity": "bob", "method": "face", "identity_score": 0.8} if i in (1, 4) else {}
        extra = {"snapshot_path": str(snap)} if i == 5 else {"snapshot_path": "/etc/hostname"} if i == 3 else {}
        w.add_update(update(eid, camera=("campus", "door")[i % 2], t0=T0 + i * SEC, label="car" if i == 2 else "person",
                            ended=True, **named, **extra))
    w.flush()
    engine.dispose()
    return ids


# ------------------------------------------------------------ happy paths
def _multipart(*paths: Path, field: str = "files") -> list:
    return [(field, (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def test_every_endpoint_answers(api: Api, supervisor: FakeSupervisor, faces: Path) -> None:
    ids = store_events(api)
    c = api.client(alone=False)
    table = [  # method, path, request kwargs, status, content type
        ("GET", "/api/health", {}, 200, "application/json"),
        ("GET", "/api/status", {}, 200, "application/json"),
        ("GET", "/metrics", {}, 200, "text/plain"),
        ("GET", "/api/events", {}, 200, "application/json"),
        ("GET", "/api/events?format=ndjson", {}, 200, "application/x-ndjson"),
        ("GET", "/api/events?format=csv", {}, 200, "text/csv"),
        ("GET", f"/api/events/{ids[0]}", {}, 200, "application/json"),
        ("GET", f"/api/events/{ids[5]}/snapshot.jpg", {}, 200, "image/jpeg"),
        ("GET", "/api/identities", {}, 200, "application/json"),
        ("POST", "/api/identities/Joe Biden/faces", {"files": _multipart(faces / "biden/biden.jpg")}, 201, "application/json"),
        ("POST", "/api/recognize", {"files": _multipart(faces / "biden/biden2.jpg", field="file")}, 200, "application/json"),
        ("GET", "/api/identities/Joe Biden/face.jpg", {}, 200, "image/jpeg"),
        ("DELETE", "/api/identities/Joe Biden", {}, 200, "application/json"),
        ("GET", "/api/identities/Joe Biden/face.jpg", {}, 404, "application/json"),
        ("GET", "/api/cameras", {}, 200, "application/json"),
        ("GET", "/api/cameras/campus/latest.jpg", {}, 200, "image/jpeg"),
        ("POST", "/api/scale", {"json": {"stage": "detection", "processes": 2}}, 200, "application/json"),
        ("GET", "/api/backups", {}, 200, "application/json"),
        ("POST", "/api/backups", {}, 201, "application/json"),
        ("GET", "/openapi.json", {}, 200, "application/json"),
    ]
    for method, path, kwargs, status, ctype in table:
        r = c.request(method, path, **kwargs)
        assert (r.status_code, r.headers["content-type"].split(";")[0]) == (status, ctype), (path, r.text[:300])
    name = c.get("/api/backups").json()["backups"][0]["name"]
    r = c.get(f"/api/backups/{name}")
    assert r.status_code == 200 and r.content[:2] == b"\x1f\x8b"  # gzip
    assert c.post(f"/api/backups/{name}/restore").status_code == 409  # the pipeline runs
    assert [(s.stage, s.processes) for s in supervisor.scales] == [("detection", 2)]


def test_status_is_the_cli_document_and_metrics_the_collector(api: Api, supervisor: FakeSupervisor) -> None:
    c = api.client(alone=False)
    assert c.get("/api/status").json() == json.loads(json.dumps(status_json(supervisor.reply())))
    health = c.get("/api/health").json()
    assert health == {"status": "ok", "mode": "pipeline", "stages": {s: "running" for s in topology.DATA_PATH}}
    text = c.get("/metrics").text
    for stage in topology.DATA_PATH:
        assert f'facepro_stage_rate_fps{{stage="{stage}"}} 12.5' in text
    assert 'facepro_alert{alert="low_rate",stage="detection"} 0.0' in text
    assert 'facepro_stage_count{name="ready",stage="storage"} 1.0' in text


@pytest.mark.parametrize("states, stage", [
    ({"capture": "done", "detection": "running", "recognition": "running", "storage": "running"}, None),
    ({"capture": "running", "detection": "running", "recognition": "failed", "storage": "running"}, "recognition"),
    ({"capture": "running", "detection": "stopped", "recognition": "failed", "storage": "running"}, "detection"),
])
def test_health_names_the_first_stage_that_does_not_run(api: Api, supervisor: FakeSupervisor, states: dict,
                                                        stage: str | None) -> None:
    supervisor.states = states
    r = api.client(alone=False).get("/api/health")
    if stage is None:
        assert r.status_code == 200 and r.json()["stages"]["capture"] == "done"
    else:
        assert r.status_code == 503 and r.json()["stage"] == stage
        assert r.json()["error"].startswith(f"stage {stage} is {states[stage]}")


def test_cameras_and_the_latest_frame(api: Api, supervisor: FakeSupervisor, videos: Path) -> None:
    c = api.client(alone=False)
    cams = {d["name"]: d for d in c.get("/api/cameras").json()["cameras"]}
    assert cams["campus"]["live"] and (cams["campus"]["width"], cams["campus"]["height"]) == (480, 360)
    assert cams["campus"]["frame_index"] == 1 and cams["campus"]["captured_at"].endswith("+00:00")
    assert cams["door"] == {"name": "door", "source_kind": "rtsp", "mode": "live", "live": False, "width": None,
                            "height": None, "frame_index": None, "captured_at": None, "age_s": None}
    assert "secret" not in c.get("/api/cameras").text  # source credentials never leave the box
    r = c.get("/api/cameras/campus/latest.jpg")
    img = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (360, 480, 3) and r.headers["x-frame-index"] == "1"
    newest = vtest_frames(videos)[1].astype(np.int16)
    assert np.abs(img.astype(np.int16) - newest).mean() < 4  # the newest frame (JPEG-close), not the first
    assert supervisor.ring._headers[:, 1].tolist() == [0, 0, 0, 0]  # the api released nothing


def test_without_a_pipeline(api: Api) -> None:
    alone, inside = api.client(alone=True), api.client(alone=False)
    assert alone.get("/api/health").json() == {"status": "ok", "mode": "alone", "stages": {}}
    for c in (alone, inside):
        for method, path, kwargs in [("GET", "/api/status", {}), ("GET", "/metrics", {}),
                                     ("POST", "/api/scale", {"json": {"stage": "detection", "processes": 2}}),
                                     ("GET", "/api/cameras/campus/latest.jpg", {})]:
            r = c.request(method, path, **kwargs)
            assert r.status_code == 503 and r.json()["error"], path
    assert "no pipeline is running" in inside.get("/api/health").json()["error"]
    assert [d["live"] for d in alone.get("/api/cameras").json()["cameras"]] == [False, False]


def test_health_alone_is_the_database(api: Api) -> None:
    (api.data_dir / "facepro.db").write_bytes(b"not a database" * 100)
    r = api.client(alone=True).get("/api/health")
    assert r.status_code == 503 and r.json()["error"]


# ----------------------------------------------------------------- errors
def _png(width: int, height: int) -> bytes:
    """A PNG header declaring ``width x height`` (no pixels: a decompression-bomb probe)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def _blank_jpeg() -> bytes:
    return cv2.imencode(".jpg", np.full((480, 640, 3), 200, np.uint8))[1].tobytes()


def _upload(data: bytes, name: str = "x.jpg", field: str = "files") -> dict:
    return {"files": [(field, (name, data, "application/octet-stream"))]}


ERRORS = [  # method, path, request kwargs (FACES: an asset path), status, error text
    ("GET", f"/api/events/{HEX}", {}, 404, "no event"),
    ("GET", "/api/events/not-an-id", {}, 422, "path.event_id"),
    ("GET", "/api/events?cursor=garbage", {}, 400, "cursor: not a cursor"),
    ("GET", "/api/events?limit=0", {}, 422, "query.limit"),
    ("GET", "/api/events?limit=10001", {}, 422, "query.limit"),
    ("GET", "/api/events?method=magic", {}, 422, "query.method"),
    ("GET", "/api/events?format=xml", {}, 422, "query.format"),
    ("GET", "/api/events?since=yesterday", {}, 422, "query.since"),
    ("GET", f"/api/events/{HEX}/snapshot.jpg", {}, 404, "no event"),
    ("DELETE", "/api/identities/nobody", {}, 404, "no identity named 'nobody'"),
    ("POST", "/api/identities/x/faces", {}, 422, "files: Field required"),
    ("POST", "/api/identities/x/faces", _upload(b"hello, not an image", "notes.txt"), 415, "notes.txt: not a JPEG, PNG"),
    ("POST", "/api/identities/x/faces", _upload(b""), 400, "x.jpg: empty file"),
    ("POST", "/api/identities/x/faces", _upload(b"\xff\xd8\xff\xe0" + b"\x00" * 40), 415, "damaged jpeg header"),
    ("POST", "/api/identities/x/faces", _upload(_png(20000, 20000)), 413, "20000x20000 pixels"),
    ("POST", "/api/identities/x/faces", _upload(_png(64, 64)), 415, "cannot be decoded"),
    ("POST", "/api/identities/x/faces", _upload(_blank_jpeg(), "wall.jpg"), 400, "wall.jpg: no face found"),
    ("POST", "/api/identities/x/faces", {"files": "FACES:_multi/t1.jpg"}, 400, "6 faces found"),
    ("POST", "/api/identities/ x/faces", {"files": "FACES:obama/obama.jpg"}, 400, "without leading/trailing spaces"),
    ("POST", "/api/recognize", {}, 422, "file: Field required"),
    ("POST", "/api/recognize", _upload(b"GIF89a....", "a.gif", field="file"), 415, "a.gif: not a JPEG"),
    ("GET", "/api/cameras/nope/latest.jpg", {}, 404, "no camera named 'nope'"),
    ("GET", "/api/backups/facepro-backup-20240101T000000Z.tar.gz", {}, 404, "no backup named"),
    ("GET", "/api/backups/passwd", {}, 422, "path.name"),
    ("POST", "/api/backups/facepro-backup-20240101T000000Z.tar.gz/restore", {}, 404, "no backup named"),
    ("POST", "/api/scale", {"json": {"stage": "detection", "processes": 0}}, 422, "processes"),
    ("POST", "/api/scale", {"json": {"stage": "detection"}}, 422, "processes: Field required"),
    ("POST", "/api/scale", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "JSON decode error"),
    ("POST", "/api/scale", {"json": {"stage": "capture", "processes": 2}}, 409, "not supported"),
    ("GET", "/api/nothing-here", {}, 404, "Not Found"),
    ("PUT", "/api/events", {}, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("method, path, kwargs, status, error", ERRORS, ids=[f"{m} {p} {s}" for m, p, _, s, _ in ERRORS])
def test_errors_are_json_with_their_status(api: Api, supervisor: FakeSupervisor, faces: Path, method: str, path: str,
                                           kwargs: dict, status: int, error: str) -> None:
    if isinstance(kwargs.get("files"), str):
        kwargs = {"files": _multipart(faces / kwargs["files"].removeprefix("FACES:"))}
    r = api.client(alone=False).request(method, path, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and set(r.json()) >= {"error"}
    assert error in r.json()["error"]


def test_a_snapshot_outside_the_data_dir_is_never_served(api: Api) -> None:
    ids = store_events(api)
    c = api.client()
    event = c.get(f"/api/events/{ids[3]}").json()
    assert event["has_snapshot"] and event["snapshot_path"] == "/etc/hostname"
    assert c.get(f"/api/events/{ids[3]}/snapshot.jpg").status_code == 404
    assert c.get(f"/api/events/{ids[0]}/snapshot.jpg").status_code == 404  # none taken
    shot = c.get(f"/api/events/{ids[5]}/snapshot.jpg")
    assert shot.content == (api.data_dir / "snapshots" / "shot.jpg").read_bytes()


@pytest.mark.parametrize("limit_mb, body_mb, chunked", [(1, 2, False), (1, 2, True)])
def test_oversize_bodies_are_refused(api: Api, limit_mb: int, body_mb: int, chunked: bool) -> None:
    c = api.client(max_upload_mb=limit_mb)
    data = b"\xff\xd8\xff" + b"\x00" * (body_mb * 2**20)
    if chunked:  # no Content-Length: counted while read
        r = c.post("/api/recognize", content=iter([data[i:i + 65536] for i in range(0, len(data), 65536)]),
                   headers={"content-type": "multipart/form-data; boundary=b"})
    else:
        r = c.post("/api/recognize", files={"file": ("big.jpg", data, "image/jpeg")})
    assert r.status_code == 413 and "api.max_upload_mb (1 MiB)" in r.json()["error"]


def test_restore_when_no_pipeline_runs(api: Api, faces: Path) -> None:
    c = api.client()
    assert c.post("/api/identities/Joe Biden/faces", files=_multipart(faces / "biden/biden.jpg")).status_code == 201
    sample = c.get("/api/identities/Joe Biden/face.jpg").content
    name = c.post("/api/backups").json()["name"]
    assert c.delete("/api/identities/Joe Biden").status_code == 200
    assert c.get("/api/identities/Joe Biden/face.jpg").status_code == 404  # went with the identity
    r = c.post(f"/api/backups/{name}/restore")
    assert r.status_code == 200 and r.json()["restored"] == name and r.json()["faces"] == 1
    assert c.get("/api/identities").json() == {"identities": [_identity("Joe Biden", 1)]}
    assert c.get("/api/identities/Joe Biden/face.jpg").content == sample  # the backup carried the sample
    damaged = api.data_dir / "backups" / "facepro-backup-20000101T000000Z.tar.gz"
    damaged.write_bytes(b"\x1f\x8b not really")
    r = c.post(f"/api/backups/{damaged.name}/restore")
    assert r.status_code == 422 and r.json()["error"]
    assert any(b["error"] for b in c.get("/api/backups").json()["backups"])


# ------------------------------------------------------------------ faces
def test_enroll_two_identities_then_recognize_the_group_photo(api: Api, faces: Path) -> None:
    c = api.client()
    for name, folder in (("Barack Obama", "obama"), ("Joe Biden", "biden")):
        images = sorted((faces / folder).glob("*.jpg"))
        r = c.post(f"/api/identities/{name}/faces", files=_multipart(*images))
        assert r.status_code == 201 and r.json() == {"name": name, "added": len(images), "model": "mobilefacenet_128d"}
    assert c.get("/api/identities").json() == {"identities": [_identity("Barack Obama", 5), _identity("Joe Biden", 2)]}
    found = c.post("/api/recognize", files=_multipart(faces / "_multi/obama_and_biden.jpg", field="file")).json()["faces"]
    assert sorted(f["identity"] or "" for f in found) == ["", "Barack Obama", "Joe Biden"]  # the third face unknown
    for f in found:
        x1, y1, x2, y2 = f["bbox"]
        assert x1 < x2 and y1 < y2 and (f["similarity"] >= api.config().recognition.face.match_threshold) == (f["identity"] is not None)
    stored = sorted(p.name for p in (api.data_dir / "faces").iterdir())  # kept for backups, named by content
    assert len(stored) == 7 and all(n.endswith("-upload.jpg") for n in stored)


def _identity(name: str, embeddings: int, face: bool = True) -> dict:
    from urllib.parse import quote

    return {"name": name, "embeddings": embeddings, "has_face": face,
            "face_url": f"/api/identities/{quote(name)}/face.jpg" if face else None}


def test_sample_faces_of_identities(api: Api, faces: Path, analyzer) -> None:
    from storage.db import open_engine
    from storage.queries import enroll

    c = api.client()
    r = c.post("/api/identities/Barack Obama/faces", files=_multipart(faces / "obama/obama.jpg", faces / "obama/obama2.jpg"))
    assert r.status_code == 201
    engine = open_engine(api.url)
    enroll(engine, "Old Timer", np.ones((1, 128), np.float32), "mobilefacenet_128d")  # as before samples were kept
    engine.dispose()
    assert c.get("/api/identities").json() == {"identities": [_identity("Barack Obama", 2), _identity("Old Timer", 1, False)]}
    shot = c.get("/api/identities/Barack%20Obama/face.jpg")
    assert shot.status_code == 200 and shot.headers["content-type"] == "image/jpeg"
    image = cv2.imdecode(np.frombuffer(shot.content, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (112, 112, 3)
    found = c.post("/api/recognize", files=[("file", ("sample.jpg", shot.content, "image/jpeg"))]).json()["faces"]
    assert [f["identity"] for f in found] == ["Barack Obama"]  # the sample shows him
    for name in ("Old Timer", "Nobody"):
        r = c.get(f"/api/identities/{name}/face.jpg")
        assert r.status_code == 404 and "has no sample face" in r.json()["error"]
    assert c.delete("/api/identities/Barack Obama").status_code == 200
    assert c.get("/api/identities/Barack Obama/face.jpg").status_code == 404


def test_cli_and_api_enrollment_store_the_same_sample(api: Api, faces: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from storage.db import open_engine
    from storage.queries import identity_sample

    images = [faces / "obama/obama.jpg", faces / "obama/obama2.jpg"]
    assert main(["enroll", "--config", str(api.cfg_file), "cli", *map(str, images)]) == 0
    c = api.client()
    assert c.post("/api/identities/api/faces", files=_multipart(*images)).status_code == 201
    engine = open_engine(api.url)
    try:
        cli = identity_sample(engine, "cli")
    finally:
        engine.dispose()
    assert cli is not None and cli == c.get("/api/identities/api/face.jpg").content  # one enrollment path


def test_recognize_equals_facepro_identify(api: Api, faces: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = api.client()
    c.post("/api/identities/Barack Obama/faces", files=_multipart(faces / "obama/obama.jpg"))
    image = faces / "_multi/obama_and_biden.jpg"
    doc = c.post("/api/recognize", files=_multipart(image, field="file")).json()
    capsys.readouterr()
    assert main(["identify", "--config", str(api.cfg_file), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == doc


def test_a_failed_enrollment_stores_nothing(api: Api, faces: Path) -> None:
    c = api.client()
    r = c.post("/api/identities/Barack Obama/faces", files=_multipart(faces / "obama/obama.jpg", faces / "_multi/t1.jpg"))
    assert r.status_code == 400 and "t1.jpg: 6 faces found" in r.json()["error"]
    assert c.get("/api/identities").json() == {"identities": []}


# ----------------------------------------------------------------- events
@pytest.mark.parametrize("query, flags", [
    ({}, []), ({"camera": "door"}, ["--camera", "door"]), ({"identity": "bob"}, ["--identity", "bob"]),
    ({"label": "car"}, ["--label", "car"]), ({"method": "face"}, ["--method", "face"]),
    ({"since": "2023-11-14T22:13:22+00:00", "until": "2023-11-14T22:13:24"},
     ["--since", "2023-11-14T22:13:22+00:00", "--until", "2023-11-14T22:13:24"]),
    ({"camera": "campus", "label": "person", "limit": 2}, ["--camera", "campus", "--label", "person", "--limit", "2"]),
])
def test_events_equal_facepro_events_json(api: Api, capsys: pytest.CaptureFixture[str], query: dict, flags: list) -> None:
    store_events(api)
    page = api.client().get("/api/events", params=query).json()
    capsys.readouterr()
    assert main(["events", "--config", str(api.cfg_file), "--json", *flags]) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert page["events"] == cli and cli
    assert page["next"] is None or query.get("limit") == 2


def test_event_pages_csv_and_ndjson(api: Api) -> None:
    ids = store_events(api)
    c = api.client()
    everything = c.get("/api/events").json()["events"]
    assert [e["event_id"] for e in everything] == ids[::-1]
    got, cursor = [], None
    while True:
        page = c.get("/api/events", params={"limit": 4, **({"cursor": cursor} if cursor else {})}).json()
        got += page["events"]
        cursor = page["next"]
        if cursor is None:
            break
    assert got == everything
    r = c.get("/api/events", params={"format": "ndjson", "limit": 4})
    assert [json.loads(line) for line in r.text.splitlines()] == everything[:4]
    assert c.get("/api/events", params={"cursor": r.headers["x-next-cursor"]}).json()["events"] == everything[4:]
    rows = c.get("/api/events", params={"format": "csv"}).text.splitlines()
    assert rows[0].split(",")[:3] == ["event_id", "camera", "track_id"] and len(rows) == 7
    assert rows[1].startswith(f"{ids[5]},door,7,person,,,") and rows[1].endswith(",1.5,2.5,30.25,60.75")


# --------------------------------------------------------------- security
PROTECTED = [("GET", "/api/health"), ("GET", "/api/status"), ("GET", "/metrics"), ("GET", "/api/events"),
             ("GET", f"/api/events/{HEX}"), ("GET", f"/api/events/{HEX}/snapshot.jpg"), ("GET", "/api/identities"),
             ("POST", "/api/identities/x/faces"), ("DELETE", "/api/identities/x"), ("POST", "/api/recognize"),
             ("GET", "/api/cameras"), ("GET", "/api/cameras/campus/latest.jpg"), ("POST", "/api/scale"),
             ("GET", "/api/backups"), ("POST", "/api/backups"), ("GET", "/api/backups/facepro-backup-1.tar.gz"),
             ("POST", "/api/backups/facepro-backup-1.tar.gz/restore"), ("GET", "/nothing"), ("GET", "/api/alerts"),
             ("GET", "/api/gpu"), ("GET", "/api/cameras/campus/stream.mjpeg")]


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}", f"Bearer {TOKEN}x"])
def test_a_token_is_required_on_every_endpoint(api: Api, auth: str | None) -> None:
    c = api.client(token=TOKEN)
    for method, path in PROTECTED:
        r = c.request(method, path, headers={"Authorization": auth} if auth else {})
        assert r.status_code == 401, (method, path)
        assert "bearer token" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
    assert c.get("/openapi.json").status_code == 200  # the schema holds no data
    assert c.get("/openapi.json").json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_the_right_token_is_let_through(api: Api) -> None:
    c = api.client(token=TOKEN)
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert c.get("/api/health", headers=ok).status_code == 200
    assert c.get("/api/events", headers=ok).json() == {"events": [], "next": None}
    assert api.client().get("/api/health").status_code == 200  # no token configured: none needed (loopback only)


def test_the_unauthenticated_upload_is_refused_before_its_body_is_read(api: Api) -> None:
    c = api.client(token=TOKEN, max_upload_mb=1)
    r = c.post("/api/recognize", files={"file": ("big.jpg", b"\xff\xd8\xff" + b"\x00" * 2**21, "image/jpeg")})
    assert r.status_code == 401  # not 413: the token comes first


def test_no_cors_headers(api: Api) -> None:
    c = api.client()
    r = c.get("/api/health", headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)
    pre = c.options("/api/health", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
    assert not any(h.startswith("access-control-") for h in pre.headers)


def test_requests_are_counted_in_the_api_process_counters(api: Api) -> None:
    counters = StageCounters("api", 0)
    c = api.client(counters=counters)
    c.get("/api/events")
    c.get("/api/nothing")
    assert (counters.frames_in, counters.frames_out, counters.extra["http_4xx"]) == (2, 2, 1)
    assert counters.percentiles()[1] > 0


@pytest.mark.parametrize("args, error", [
    (["--host", "0.0.0.0"], "api.host 0.0.0.0 is not a loopback address: binding it requires api.token"),
    (["--port", "70000"], "less than or equal to 65535"),
])
def test_facepro_serve_refuses_bad_bindings(api: Api, args: list, error: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", str(api.cfg_file), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert error in err and len(err.splitlines()) == 1


def test_facepro_run_refuses_an_api_port_in_use(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    api.cfg_file.write_text(yaml.safe_dump(tree(api.models, api.videos, enabled=True, port=port)))
    try:
        assert main(["run", str(api.cfg_file)]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err.strip()
    assert f"cannot serve the api on 127.0.0.1:{port}" in err and "api.port" in err and len(err.splitlines()) == 1
    assert not (api.data_dir / "run" / "current.json").exists()  # nothing started
