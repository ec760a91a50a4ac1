"""The live view: ``GET /api/cameras/{name}/stream.mjpeg``, camera frames with their track boxes, ids and names.

Where the boxes come from. Recognition owns the tracks, so with ``api.enabled`` each recognition process
publishes, after every frame it handled, that frame's confirmed tracks (:class:`pipeline.messages.LiveTracks`:
track ids, boxes, labels, identity names, and where the frame lies in its ring) on a PUB socket connected to
the endpoint :func:`pipeline.topology.live_tracks`, which the api process binds (a SUB socket, read by the
daemon thread of :class:`TrackFeed`). The channel is lossy and never blocks recognition: the PUB socket
queues at most 8 messages and drops the rest, and the api subscribes only while a stream has a viewer (with
no subscriber, ZeroMQ drops each message in the publisher). The database is not used: its rows are written
every ``update_every_frames`` frames and in batches, so boxes read from it would lag and jump.

Which frame is shown (:class:`LiveView`). The frame a LiveTracks message describes is read from its ring
slot as a checked reader (:meth:`pipeline.ring.RingReader.read`: never torn, the reader owns and marks
nothing, so capture never waits for it) while the slot still holds it; the view is then exact but behind
the newest frame by the pipeline's latency. When that slot was overwritten (or no boxes arrived, e.g. under
``facepro serve`` or with the api not in the run) the newest frame of the ring is shown, with the newest
boxes only when they are at most :data:`STALE_BOXES_S` older than the frame, else without boxes.

Cost bounds (the api shares the cores with the stages). Nothing is rendered without a viewer. A camera's
frame is rendered (scaled to at most ``api.stream_max_width`` pixels wide straight from its ring slot, so a
full frame is never copied when it is scaled; boxes drawn; JPEG-encoded at ``api.stream_quality``) at most
``api.stream_fps`` times a second, whatever the number of viewers: they share the rendered JPEG. Each
client gets at most ``fps`` (≤ ``api.stream_fps``) parts a second, never the same frame twice, and never a
frame older than the one it got last; a client whose camera's rendering is still fresh is answered on the
event loop, without a thread. Nothing is queued per client: a slow client's next part is the newest frame
when its socket can take it, so the frames in between are dropped. A stream ends after :data:`IDLE_END_S`
seconds without a new frame (the pipeline stopped); the page reconnects. The api process itself runs at
niceness ``api.nice`` (:func:`pipeline.worker`), so on busy cores the stages come first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import cv2
import numpy as np
from fastapi import APIRouter, Depends, Path as PathParam, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from pipeline import topology
from pipeline.api import ApiContext, ApiError, PipelineLink, context
from pipeline.api_system import errors
from pipeline.config import CameraConfig
from pipeline.messages import LiveTracks
from pipeline.ring import RingError, RingReader

log = logging.getLogger("facepro.api.live")

#: Most frames a second a client may ask for (``?fps=``; ``api.stream_fps`` caps it further).
MAX_FPS = 30.0
#: Defaults of ``api.stream_fps``, ``api.stream_max_width`` and ``api.stream_quality``.
STREAM_FPS = 5.0
MAX_WIDTH = 960
JPEG_QUALITY = 75
#: Newest boxes are drawn on a newer frame only when at most this much older than it, seconds.
STALE_BOXES_S = 0.5
#: A stream ends after this long without a new frame, seconds.
IDLE_END_S = 30.0
#: The api keeps receiving track boxes for this long after the last stream asked for a frame, seconds.
VIEWER_LEASE_S = 5.0
BOUNDARY = "frame"


class TrackFeed:
    """The newest :class:`LiveTracks` per camera, received from recognition by a daemon thread.

    The thread binds a SUB socket at :func:`pipeline.topology.live_tracks` in the run's socket dir and is
    subscribed only while a viewer renewed its lease (:meth:`want`) in the last :data:`VIEWER_LEASE_S`
    seconds.

    Args:
        socket_dir: the run's ZeroMQ socket dir.
        keep: messages kept per camera (the newest ones).
    """

    def __init__(self, socket_dir: Path, keep: int = 32) -> None:
        self.socket_dir = socket_dir
        self.keep = keep
        self.received = 0
        self._tracks: dict[str, deque[LiveTracks]] = {}
        self._lock = threading.Lock()
        self._wanted_at = -1e9
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, name="live-tracks", daemon=True)

    def start(self, timeout_s: float = 5.0) -> TrackFeed:
        """Start the thread and wait until its socket is bound.

        Raises:
            RuntimeError: the socket could not be bound within ``timeout_s`` seconds (the message says why).
        """
        self._thread.start()
        if not self._bound.wait(timeout_s) or self._error:
            self.close()
            raise RuntimeError(f"live view: cannot receive track boxes: {self._error or 'bind timed out'}")
        return self

    def close(self) -> None:
        """Stop the thread and close its socket."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def want(self) -> None:
        """A viewer wants boxes: stay subscribed for :data:`VIEWER_LEASE_S` more seconds."""
        self._wanted_at = time.monotonic()

    def wanted(self) -> bool:
        """True while a viewer's lease runs."""
        return time.monotonic() - self._wanted_at < VIEWER_LEASE_S

    def add(self, msg: LiveTracks) -> None:
        """Keep ``msg`` as its camera's newest (the thread calls this; tests may too)."""
        with self._lock:
            self._tracks.setdefault(msg.camera, deque(maxlen=self.keep)).append(msg)
            self.received += 1

    def newest(self, camera: str) -> LiveTracks | None:
        """The newest boxes received for ``camera``, None when none."""
        with self._lock:
            q = self._tracks.get(camera)
            return q[-1] if q else None

    def _run(self) -> None:
        import zmq

        from pipeline.transport import Transport, TransportError

        t = Transport(self.socket_dir)
        try:
            rx = t.subscriber(topology.live_tracks(), bind=True, subscribe=False, hwm=64)
        except TransportError as err:
            self._error = str(err)
            self._bound.set()
            t.ctx.term()
            return
        self._bound.set()
        subscribed = False
        try:
            while not self._stop.is_set():
                wanted = self.wanted()
                if wanted != subscribed:
                    rx.sock.setsockopt(zmq.SUBSCRIBE if wanted else zmq.UNSUBSCRIBE, b"")
                    subscribed = wanted
                msg = rx.recv(100)
                if isinstance(msg, LiveTracks):
                    self.add(msg)
        finally:
            t.close()
            t.ctx.term()


@dataclass(frozen=True)
class Rendered:
    """One rendered frame of the live view.

    Attributes:
        frame_index: the frame's index in its source; seq: its ring sequence number.
        captured_at_ns: its capture time, Unix nanoseconds.
        tracks: boxes drawn on it.
        exact: True when the boxes are this very frame's (else the newest boxes, or none).
        jpeg: the JPEG bytes.
        made_at: when it was rendered, ``time.monotonic()`` seconds.
    """

    frame_index: int
    seq: int
    captured_at_ns: int
    tracks: int
    exact: bool
    jpeg: bytes
    made_at: float


def _colour(label: str, name: str | None) -> tuple[int, int, int]:
    if name:
        return (60, 200, 60)  # named: green (BGR)
    return (0, 165, 255) if label == "person" else (200, 200, 200)  # unknown person: orange; other: grey


def draw_tracks(frame: np.ndarray, tracks: LiveTracks | None, scale: float = 1.0) -> np.ndarray:
    """Draw each track's box and ``#id name`` (or ``#id label``) on ``frame`` (``(H, W, 3) uint8`` BGR, changed
    in place); returns ``frame``. ``scale``: the frame's size over the ring's (boxes are in ring pixels)."""
    if tracks is None:
        return frame
    h, w = frame.shape[:2]
    thick = max(1, round(w / 480))
    for tid, box, label, name in zip(tracks.track_ids, tracks.xyxy, tracks.labels, tracks.names):
        x1, y1, x2, y2 = (int(round(float(v) * scale)) for v in box)
        x1, x2 = max(0, min(w - 1, x1)), max(0, min(w - 1, x2))
        y1, y2 = max(0, min(h - 1, y1)), max(0, min(h - 1, y2))
        colour = _colour(label, name)
        cv2.rectangle(frame, (x1, y1), (x2, y2), colour, thick)
        text = f"#{int(tid)} {name or label}"
        scale = 0.4 * thick
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else min(h - 1, y1 + th + base + 2)
        cv2.rectangle(frame, (x1, ty - th - base), (min(w - 1, x1 + tw + 2), ty + 1), colour, -1)
        cv2.putText(frame, text, (x1 + 1, ty - base + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return frame


def scaled(frame: np.ndarray, max_width: int) -> np.ndarray:
    """``frame`` (``(H, W, 3) uint8``, e.g. a read-only ring view) scaled down (area interpolation) to at most
    ``max_width`` pixels wide, as a new array; a copy when it is not wider."""
    if frame.shape[1] <= max_width:
        return frame.copy()
    height = max(1, round(frame.shape[0] * max_width / frame.shape[1]))
    return cv2.resize(frame, (max_width, height), interpolation=cv2.INTER_AREA)


def read_frame(ring: str, slot: int, seq: int, max_width: int = MAX_WIDTH) -> tuple[np.ndarray, float] | None:
    """Frame ``seq`` of ``slot`` of ring segment ``ring``, scaled to at most ``max_width`` pixels wide (:func:`scaled`)
    straight from the slot (a zero-copy view, checked after: None once overwritten or gone, never torn), and
    its width over the ring's."""
    try:
        reader = RingReader.attach(ring)
    except RingError:
        return None
    try:
        view = reader.view(slot, seq) if 0 <= slot < reader.layout.slots else None
        frame = scaled(view, max_width) if view is not None else None
        del view
        if frame is None or not reader.published(slot, seq):
            return None
        return frame, frame.shape[1] / reader.layout.width
    finally:
        reader.close()


class LiveView:
    """Renders the live view of each camera, at most ``max_fps`` times a second, shared by its viewers.

    Args:
        link: the running pipeline (rings).
        feed: track boxes from recognition, None for frames without boxes.
        max_fps: renders per camera and second at most (``api.stream_fps``).
        max_width: frames are scaled to at most this width, pixels (``api.stream_max_width``).
        quality: JPEG quality, 1..100 (``api.stream_quality``).
    """

    def __init__(self, link: PipelineLink, feed: TrackFeed | None, max_fps: float = STREAM_FPS,
                 max_width: int = MAX_WIDTH, quality: int = JPEG_QUALITY) -> None:
        self.link = link
        self.feed = feed
        self.max_fps = max_fps
        self.min_interval = 1.0 / max_fps
        self.max_width = max_width
        self.quality = quality
        self.renders = 0
        self._cache: dict[str, Rendered] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, camera: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(camera, threading.Lock())

    def fresh(self, camera: str) -> Rendered | None:
        """The camera's rendering while it is younger than ``1 / max_fps`` s, else None; never blocks (what
        :meth:`render` would return without rendering)."""
        cached = self._cache.get(camera)
        return cached if cached is not None and time.monotonic() - cached.made_at < self.min_interval else None

    def render(self, camera: str) -> Rendered | None:
        """The newest rendering of ``camera`` (re-rendered when the cached one is older than ``1 / max_fps`` s
        and a newer frame exists); None when no frame is available (no pipeline, no ring, nothing published)."""
        with self._lock(camera):
            cached = self._cache.get(camera)
            now = time.monotonic()
            if cached is not None and now - cached.made_at < self.min_interval:
                return cached
            if self.feed is not None:
                self.feed.want()
            got = self._frame(camera)
            if got is None:
                return None
            frame, (index, seq, captured), tracks, exact, scale = got
            if cached is not None and index <= cached.frame_index:
                return cached  # nothing newer (or only an older exact frame): keep the last one
            rendered = self._encode(draw_tracks(frame, tracks, scale), index, seq, captured, tracks, exact, now)
            self._cache[camera] = rendered
            return rendered

    def _frame(self, camera: str) -> tuple[np.ndarray, tuple[int, int, int], LiveTracks | None, bool, float] | None:
        """``(scaled frame, (frame index, seq, captured ns), boxes to draw, exact, frame width / ring width)``."""
        tracks = self.feed.newest(camera) if self.feed is not None else None
        if tracks is not None:
            got = read_frame(tracks.ring, tracks.slot, tracks.seq, self.max_width)
            if got is not None:
                return got[0], (tracks.frame_index, tracks.seq, tracks.captured_at_ns), tracks, True, got[1]
        latest, size = self.link.latest(camera, transform=lambda view: scaled(view, self.max_width))
        if latest is None or latest.frame is None or size is None:
            return None
        fresh = tracks is not None and 0 <= latest.captured_at_ns - tracks.captured_at_ns <= STALE_BOXES_S * 1e9
        return (latest.frame, (latest.frame_index, latest.seq, latest.captured_at_ns), tracks if fresh else None, False,
                latest.frame.shape[1] / size[1])

    def _encode(self, frame: np.ndarray, index: int, seq: int, captured: int, tracks: LiveTracks | None,
                exact: bool, now: float) -> Rendered:
        ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise ApiError(500, "live view: JPEG encoding failed")
        self.renders += 1
        return Rendered(index, seq, captured, len(tracks) if tracks is not None else 0, exact, jpeg.tobytes(), now)


async def live_view(request: Request) -> LiveView:
    """FastAPI dependency: the app's :class:`LiveView`, made on first use over the context's link and feed with
    the ``api.stream_*`` settings."""
    state = request.app.state
    view = getattr(state, "live_view", None)
    if view is None:
        ctx: ApiContext = state.ctx
        api = ctx.cfg.api
        view = state.live_view = LiveView(ctx.link, ctx.tracks, api.stream_fps, api.stream_max_width, api.stream_quality)
    return view


def part(r: Rendered) -> bytes:
    """One ``multipart/x-mixed-replace`` part: the boundary line, headers (``X-Frame-Index``, ``X-Tracks``,
    ``X-Exact``) and the JPEG."""
    head = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(r.jpeg)}\r\n"
            f"X-Frame-Index: {r.frame_index}\r\nX-Tracks: {r.tracks}\r\nX-Exact: {int(r.exact)}\r\n\r\n")
    return head.encode() + r.jpeg + b"\r\n"


async def parts(view: LiveView, camera: str, fps: float, limit: int | None, first: Rendered) -> AsyncIterator[bytes]:
    """The parts of one client's stream: ``first``, then every ``1 / fps`` s the camera's newest rendering when
    its frame is newer than the last one sent; ends after ``limit`` parts or :data:`IDLE_END_S` s without one."""
    last, sent, current = -1, 0, first
    idle_since = time.monotonic()
    while True:
        if current is not None and current.frame_index > last:
            yield part(current)
            last, sent, idle_since = current.frame_index, sent + 1, time.monotonic()
            if limit is not None and sent >= limit:
                return
        elif time.monotonic() - idle_since > IDLE_END_S:
            return
        await asyncio.sleep(1.0 / fps)
        current = view.fresh(camera) or await run_in_threadpool(view.render, camera)


def _camera(ctx: ApiContext, name: str) -> CameraConfig:
    for cam in ctx.cfg.cameras:
        if cam.name == name:
            return cam
    raise ApiError(404, f"no camera named {name!r}; configured: {', '.join(c.name for c in ctx.cfg.cameras)}")


live = APIRouter(tags=["cameras"])


@live.get("/api/cameras/{name}/stream.mjpeg", response_class=StreamingResponse, responses={
    200: {"content": {f"multipart/x-mixed-replace; boundary={BOUNDARY}": {"schema": {"type": "string", "format": "binary"}}},
          "description": "MJPEG: one JPEG part per new frame (headers X-Frame-Index, X-Tracks, X-Exact)"},
    **errors(404, 503)})
async def stream(name: str = PathParam(min_length=1, max_length=32),
                 fps: float | None = Query(None, gt=0, le=MAX_FPS, description="parts per second at most (default and "
                                           "cap: api.stream_fps)"),
                 frames: int | None = Query(None, ge=1, le=1_000_000, description="end after this many parts (default: "
                                            "until the client goes, or no new frame for 30 s)"),
                 ctx: ApiContext = Depends(context), view: LiveView = Depends(live_view)) -> Any:
    """The live view of camera ``name`` as MJPEG (``multipart/x-mixed-replace``), for an ``<img>``: each part a
    JPEG of the camera's frame with its tracks' boxes, ids and names drawn (see the module docstring for the
    source of the boxes and the rate bounds). With ``api.token`` set, ``?token=`` may replace the header.
    503 when no frame is available."""
    cam = _camera(ctx, name)
    first = await run_in_threadpool(view.render, cam.name)
    if first is None:
        raise ApiError(503, f"camera {cam.name}: no frame available (no pipeline running, or the camera is not delivering)")
    rate = min(fps or view.max_fps, view.max_fps)
    return StreamingResponse(parts(view, cam.name, rate, frames, first),
                             media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


ROUTERS = (live,)
