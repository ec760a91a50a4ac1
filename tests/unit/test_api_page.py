"""The web page's routes, the live view (MJPEG stream, boxes from recognition) and the token in the query, in
process: TestClient over the real app, a real ring written by the test, a control socket answered by
:class:`tests.unit.test_api.FakeSupervisor`, and real ZeroMQ sockets for the track feed."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipeline import topology
from pipeline.api import create_app
from pipeline.api_live import LiveView, TrackFeed, draw_tracks
from pipeline.api_page import WEB_FILES
from pipeline.config import parse_config
from pipeline.messages import Detections, FrameRef, LiveTracks
from pipeline.services import api_context
from pipeline.transport import Transport
from stages.tracking import ActiveTrack
from tests.unit.test_api import TOKEN, FakeSupervisor, tree, vtest_frames
from tests.unit.test_storage import SEC, T0

PART = re.compile(rb"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: (\d+)\r\nX-Frame-Index: (\d+)\r\n"
                  rb"X-Tracks: (\d+)\r\nX-Exact: ([01])\r\n\r\n")


def _ctx(models: Path, videos: Path, runtime: dict | None = None, **api: object):
    t = tree(models, videos, **api)
    t["runtime"] = {**t["runtime"], **(runtime or {})}
    return api_context(parse_config(t), alone=False, config_path=None, threads=1)


def _client(ctx) -> TestClient:
    return TestClient(create_app(ctx), raise_server_exceptions=False)


@pytest.fixture()
def supervisor(data_dir: Path, videos: Path) -> Iterator[FakeSupervisor]:
    sup = FakeSupervisor(data_dir, vtest_frames(videos))
    yield sup
    sup.close()


def _tracks(sup: FakeSupervisor, slot: int, seq: int, index: int, names=("Ada",)) -> LiveTracks:
    n = len(names)
    return LiveTracks(camera="campus", frame_index=index, captured_at_ns=T0 + index * SEC, ring=sup.ring.name,
                      slot=slot, seq=seq, track_ids=np.arange(1, n + 1, dtype=np.int64),
                      xyxy=np.tile(np.array([40, 60, 140, 300], np.float32), (n, 1)), labels=("person",) * n,
                      names=tuple(names))


# ------------------------------------------------------------------- page
def test_the_page_and_its_files_are_served_without_the_token(data_dir: Path, models: Path, videos: Path) -> None:
    c = _client(_ctx(models, videos, token=TOKEN))
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/ui/app.js">' in r.text and "http" not in r.text.replace("http://www.w3.org", "")
    for name, ctype in WEB_FILES.items():
        r = c.get(f"/ui/{name}")
        assert (r.status_code, r.headers["content-type"]) == (200, ctype) and r.content, name
    assert c.get("/ui/secrets.txt").status_code == 404 and c.get("/ui/..%2Fapi.py").status_code == 404
    assert c.get("/api/cameras").status_code == 401  # the data still needs the token
    assert "/" not in c.get("/openapi.json").json()["paths"]  # the page is not part of the API


def test_no_page_file_loads_anything_from_elsewhere() -> None:
    from importlib import resources

    for name in WEB_FILES:
        text = resources.files("pipeline").joinpath("resources/web", name).read_text()
        urls = set(re.findall(r"""(?:src|href)=["']([^"']+)""", text)) | set(re.findall(r"""import\(?\s*["']([^"']+)""", text))
        assert all(u.startswith(("/", "./", "#")) for u in urls), (name, urls)
        assert "https://" not in text and "cdn" not in text.lower()


def test_gpu_answers_with_its_devices_or_why_not(data_dir: Path, models: Path, videos: Path) -> None:
    doc = _client(_ctx(models, videos)).get("/api/gpu").json()
    assert doc["available"] == bool(doc["gpus"])
    assert doc["available"] or doc["reason"]  # e.g. "NVML: Driver Not Loaded" on this CPU machine


def test_alerts_are_the_trackers_active_ones(data_dir: Path, models: Path, videos: Path, supervisor: FakeSupervisor) -> None:
    c = _client(_ctx(models, videos, runtime={"alerts": {"grace_s": 0, "max_rss_mb": 50, "min_rate_fps": 1}}))
    doc = c.get("/api/alerts").json()
    assert doc["max_rss_mb"] == 50  # every fake stage uses 100 MiB, passes 12.5 frames/s
    assert doc["alerts"] == [{"stage": s, "alert": "high_memory"} for s in sorted(topology.DATA_PATH)]
    c = _client(_ctx(models, videos))
    assert c.get("/api/alerts").json()["alerts"] == []


def test_alerts_without_a_pipeline(data_dir: Path, models: Path, videos: Path) -> None:
    r = _client(_ctx(models, videos)).get("/api/alerts")
    assert r.status_code == 503 and "no pipeline is running" in r.json()["error"]


# -------------------------------------------------------------- live view
def _writer(sup: FakeSupervisor, frames: list[np.ndarray], stop: threading.Event) -> threading.Thread:
    """Writes frames 2, 3, 4... into the ring until ``stop`` (a capture that keeps delivering)."""
    def run() -> None:
        for i in itertools.count(2):
            if stop.wait(0.02):
                return
            sup.ring.write(frames[i % len(frames)], frame_index=i, captured_at_ns=T0 + i * SEC)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _parts(body: bytes) -> list[tuple[int, int, bool, np.ndarray]]:
    out, pos = [], 0
    while (m := PART.search(body, pos)) is not None:
        length, start = int(m.group(1)), m.end()
        image = cv2.imdecode(np.frombuffer(body[start:start + length], np.uint8), cv2.IMREAD_COLOR)
        out.append((int(m.group(2)), int(m.group(3)), m.group(4) == b"1", image))
        pos = start + length
    return out


def test_the_stream_yields_jpeg_parts_of_increasing_frames(data_dir: Path, models: Path, videos: Path,
                                                           supervisor: FakeSupervisor) -> None:
    frames = vtest_frames(videos, 4)
    stop = threading.Event()
    writer = _writer(supervisor, frames, stop)
    try:
        with _client(_ctx(models, videos)).stream("GET", "/api/cameras/campus/stream.mjpeg?frames=4") as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "multipart/x-mixed-replace; boundary=frame"
            body = r.read()
    finally:
        stop.set()
        writer.join()
    parts = _parts(body)
    indices = [p[0] for p in parts]
    assert len(parts) == 4 and indices == sorted(set(indices)), indices  # strictly increasing, each once
    assert all(img is not None and img.shape == frames[0].shape for *_, img in parts)
    assert all(n == 0 and not exact for _, n, exact, _ in parts)  # no track feed: frames without boxes


def test_stream_errors(data_dir: Path, models: Path, videos: Path, supervisor: FakeSupervisor) -> None:
    c = _client(_ctx(models, videos))
    assert c.get("/api/cameras/nope/stream.mjpeg").status_code == 404
    r = c.get("/api/cameras/door/stream.mjpeg")  # configured, but no ring
    assert r.status_code == 503 and "no frame available" in r.json()["error"]
    assert c.get("/api/cameras/campus/stream.mjpeg?fps=31").status_code == 422  # at most 30 frames/s asked


def test_a_token_in_the_query_only_for_the_stream_and_snapshots(data_dir: Path, models: Path, videos: Path,
                                                                supervisor: FakeSupervisor) -> None:
    c = _client(_ctx(models, videos, token=TOKEN))
    with c.stream("GET", f"/api/cameras/campus/stream.mjpeg?frames=1&token={TOKEN}") as r:
        assert r.status_code == 200 and len(_parts(r.read())) == 1
    assert c.get("/api/cameras/campus/stream.mjpeg?frames=1&token=wrong-token-0123456789").status_code == 401
    snap = c.get(f"/api/events/{'ab' * 16}/snapshot.jpg?token={TOKEN}")
    assert snap.status_code in (404, 503) and snap.status_code != 401  # let through; no such event
    face = c.get(f"/api/identities/Ada/face.jpg?token={TOKEN}")
    assert face.status_code in (404, 503) and face.status_code != 401  # let through; no such identity
    for path in ("/api/cameras", "/api/events", "/api/cameras/campus/latest.jpg", "/api/status"):
        assert c.get(f"{path}?token={TOKEN}").status_code == 401, path  # elsewhere the header is required


def test_boxes_are_drawn_on_the_very_frame_they_belong_to(data_dir: Path, models: Path, videos: Path,
                                                         supervisor: FakeSupervisor) -> None:
    frames = vtest_frames(videos, 3)
    slot, seq = supervisor.ring.write(frames[2], frame_index=2, captured_at_ns=T0 + 2 * SEC)
    feed = TrackFeed(supervisor.socket_dir)  # not started: the test hands it the messages
    feed.add(_tracks(supervisor, slot, seq, 2))
    view = LiveView(_ctx(models, videos).link, feed)
    r = view.render("campus")
    assert (r.frame_index, r.tracks, r.exact) == (2, 1, True)
    image = cv2.imdecode(np.frombuffer(r.jpeg, np.uint8), cv2.IMREAD_COLOR)
    b, g, rr = image[180, 40].astype(int)  # left edge of the box: green (a named track)
    assert g > 150 and g > b + 60 and g > rr + 60, (b, g, rr)
    expected = draw_tracks(frames[2].copy(), _tracks(supervisor, slot, seq, 2))
    assert np.abs(image.astype(int) - expected.astype(int)).mean() < 4  # that frame with those boxes (JPEG noise)


@pytest.mark.parametrize("exact", [True, False])
def test_frames_are_scaled_to_the_stream_width_with_their_boxes(data_dir: Path, models: Path, videos: Path,
                                                                supervisor: FakeSupervisor, exact: bool) -> None:
    frames = vtest_frames(videos, 3)
    slot, seq = supervisor.ring.write(frames[2], frame_index=2, captured_at_ns=T0 + 2 * SEC)
    feed = TrackFeed(supervisor.socket_dir)
    tracks = _tracks(supervisor, slot, seq if exact else 999, 2)  # 999: slot overwritten, the newest frame is drawn
    feed.add(tracks)
    h, w = frames[2].shape[:2]
    view = LiveView(_ctx(models, videos).link, feed, max_width=w // 2, quality=90)
    r = view.render("campus")
    assert (r.frame_index, r.tracks, r.exact) == (2, 1, exact)
    image = cv2.imdecode(np.frombuffer(r.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (h // 2, w // 2, 3)
    small = cv2.resize(frames[2], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    near = (slice(0, 160), slice(0, 80))  # around both boxes: at half (20..70 x 30..150) and at full coordinates

    def error(scale: float) -> float:
        expected = draw_tracks(small.copy(), tracks, scale=scale)
        return float(np.abs(image[near].astype(int) - expected[near].astype(int)).mean())

    assert error(0.5) < 7 and error(1.0) > 2 * error(0.5), (error(0.5), error(1.0))  # drawn at half its ring coordinates


def test_a_stream_is_capped_at_the_configured_rate(data_dir: Path, models: Path, videos: Path,
                                                   supervisor: FakeSupervisor) -> None:
    from pipeline.api_live import live_view

    ctx = _ctx(models, videos, stream_fps=2.0, stream_max_width=320, stream_quality=50)
    view = asyncio.run(live_view(SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(ctx=ctx)))))
    assert (view.max_fps, view.min_interval, view.max_width, view.quality) == (2.0, 0.5, 320, 50)
    frames = vtest_frames(videos, 6)
    stop = threading.Event()
    writer = _writer(supervisor, frames, stop)
    try:
        t = time.monotonic()
        with _client(ctx).stream("GET", "/api/cameras/campus/stream.mjpeg?frames=3&fps=30") as r:
            parts = _parts(r.read())
        took = time.monotonic() - t
    finally:
        stop.set()
        writer.join()
    assert len(parts) == 3 and took >= 0.9, took  # 3 parts at 2/s at most: >= 1 s, whatever ?fps asked
    assert all(img.shape[1] == 320 for *_, img in parts)


def test_overwritten_frames_fall_back_to_the_newest_one(data_dir: Path, models: Path, videos: Path,
                                                        supervisor: FakeSupervisor) -> None:
    frames = vtest_frames(videos, 2)
    feed = TrackFeed(supervisor.socket_dir)
    feed.add(_tracks(supervisor, slot=0, seq=999, index=7))  # that slot holds another frame now
    view = LiveView(_ctx(models, videos).link, feed)
    r = view.render("campus")
    assert (r.frame_index, r.exact, r.tracks) == (1, False, 0)  # the ring's newest; boxes 6 s older: not drawn
    slot, seq = supervisor.ring.write(frames[0], frame_index=8, captured_at_ns=T0 + 7 * SEC + SEC // 5)
    view.min_interval = 0.0
    r = view.render("campus")
    assert (r.frame_index, r.exact, r.tracks) == (8, False, 1)  # 0.2 s newer than the boxes: drawn


def test_viewers_share_one_rendering_per_interval(data_dir: Path, models: Path, videos: Path,
                                                  supervisor: FakeSupervisor) -> None:
    frames = vtest_frames(videos, 2)
    view = LiveView(_ctx(models, videos).link, None, max_fps=0.001)  # one render per 1000 s at most
    first = view.render("campus")
    supervisor.ring.write(frames[0], frame_index=5, captured_at_ns=T0 + 5 * SEC)
    assert view.render("campus") is first and view.renders == 1  # a newer frame waits for the next interval
    view.min_interval = 0.0
    assert view.render("campus").frame_index == 5 and view.renders == 2


def test_no_frame_no_rendering(data_dir: Path, models: Path, videos: Path) -> None:
    assert LiveView(_ctx(models, videos).link, None).render("campus") is None  # no pipeline running


# ------------------------------------------------------ boxes from recognition
def _socket_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="fpl-", dir="/tmp"))  # short: ipc:// paths are limited


def test_recognition_publishes_each_frames_tracks_to_the_feed(models: Path, videos: Path) -> None:
    from pipeline.worker import _live_tracks

    cfg = parse_config({**tree(models, videos), "api": {"enabled": True}})
    socket_dir = _socket_dir()
    feed = TrackFeed(socket_dir).start()
    t = Transport(socket_dir)

    class Stage:
        def active(self, camera: str) -> list[ActiveTrack]:
            return [ActiveTrack(3, "a" * 32, np.array([1, 2, 30, 40], np.float32), "person", "Ada"),
                    ActiveTrack(4, "b" * 32, np.array([5, 6, 70, 80], np.float32), "car")]

    try:
        publish = _live_tracks(cfg, t, Stage())
        assert _live_tracks(parse_config(tree(models, videos)), t, Stage()) is None  # no api: nothing published
        for i in range(200):  # until the subscription has reached the publisher
            feed.want()
            ref = FrameRef(camera="campus", ring="r", slot=i % 4, seq=i + 1, frame_index=i, captured_at_ns=i, height=2, width=2)
            publish(Detections(frame=ref, xyxy=np.zeros((0, 4), np.float32), confidence=np.zeros(0, np.float32),
                               class_id=np.zeros(0, np.int32)))
            if feed.newest("campus") is not None:
                break
            threading.Event().wait(0.02)
        got = feed.newest("campus")
        assert got is not None, "no LiveTracks arrived"
        assert (got.ring, got.slot, got.seq) == ("r", got.frame_index % 4, got.frame_index + 1)
        assert got.track_ids.tolist() == [3, 4] and got.labels == ("person", "car") and got.names == ("Ada", None)
        assert got.xyxy.tolist() == [[1, 2, 30, 40], [5, 6, 70, 80]]
    finally:
        t.close()
        feed.close()


def test_a_feed_that_cannot_bind_says_why(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="live view: cannot receive track boxes"):
        TrackFeed(tmp_path / "missing" / "dir").start()


def test_status_replies_are_shared_for_their_max_age(data_dir: Path, supervisor: FakeSupervisor,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.api as api_module
    from pipeline.api import PipelineLink

    asked = []
    real = api_module.request
    monkeypatch.setattr(api_module, "request", lambda *a, **k: asked.append(1) or real(*a, **k))
    link = PipelineLink(data_dir, status_max_age_s=1000.0)
    first = link.status()
    assert link.status() is first and len(asked) == 1  # 50 pollers cost the supervisor one status per max age
    link.status_max_age_s = 0.0
    assert link.status() is not first and len(asked) == 2


def test_status_within_its_max_age_is_one_request_and_one_rendering(data_dir: Path, models: Path, videos: Path,
                                                                    supervisor: FakeSupervisor,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.api as api_module
    import pipeline.api_system as api_system
    from pipeline.status import status_json

    asked, rendered = [], []
    real_request, real_body = api_module.request, api_system.status_body
    monkeypatch.setattr(api_module, "request", lambda *a, **k: asked.append(1) or real_request(*a, **k))
    monkeypatch.setattr(api_system, "status_body", lambda reply: rendered.append(1) or real_body(reply))
    ctx = _ctx(models, videos)
    ctx.link.status_max_age_s = 1000.0
    assert ctx.link.fresh_status() is None  # nothing asked yet
    c = _client(ctx)
    bodies = [c.get("/api/status") for _ in range(5)]
    assert all(r.status_code == 200 and r.headers["content-type"] == "application/json" for r in bodies)
    assert len({r.content for r in bodies}) == 1 and (len(asked), len(rendered)) == (1, 1)
    assert bodies[0].json() == json.loads(json.dumps(status_json(supervisor.reply())))
    ctx.link.status_max_age_s = 0.0  # too old: asked and rendered again
    assert c.get("/api/status").status_code == 200 and (len(asked), len(rendered)) == (2, 2)


def test_the_api_socket_is_tcp_so_responses_are_not_delayed() -> None:
    """asyncio sets TCP_NODELAY on accepted connections only when the listening socket's proto is TCP; with
    proto 0 every response written in two parts waited for the client's delayed ACK (~40 ms a request)."""
    import socket

    from pipeline.api import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
