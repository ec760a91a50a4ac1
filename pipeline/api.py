"""The HTTP API: a FastAPI app over the running pipeline and the database.

It runs as the ``api`` process of ``facepro run`` (``api.enabled``; a row of
:data:`pipeline.topology.STAGES`, started and watched by the supervisor) or
alone with ``facepro serve`` (no pipeline needed: events, identities,
backups; status, scale and live frames answer 503 until a pipeline runs with
the same data dir).

Layering. This module and its routers (:mod:`pipeline.api_system`: health,
status, metrics, scale, cameras; :mod:`pipeline.api_data`: events,
identities, recognition, backups) are framework: they never import
``stages`` or ``storage``. What needs those (queries, enrollment, the face
models, backup archives) comes in as a :class:`Backend` built by the wiring
(:mod:`pipeline.services`) and handed to :func:`create_app` in an
:class:`ApiContext`. A new area is one more router included by
:func:`create_app` (jobs: :mod:`pipeline.api_jobs`).

What it touches. Status and scale go to the supervisor's control socket
with the CLI's request (:func:`pipeline.transport.request`, endpoint
:func:`pipeline.topology.control`); a camera's latest frame is copied out of
its ring as a checked reader (:meth:`pipeline.ring.RingReader.latest`: a
frame overwritten while it is read is skipped, never served torn; the reader
owns and releases nothing, so capture never waits for it); events come from
the database. Nothing here is on a frame's path.

Errors. Every error is JSON ``{"error": "<one line>"}`` (plus the fields a
route documents, e.g. ``stage``) with its status code: 400 bad parameters,
401 missing or wrong token, 404 unknown thing, 409 refused in the current
state (restore while a pipeline runs, a refused scale), 413 body larger than
``api.max_upload_mb``, 415 an upload that is not a decodable image, 422
invalid request fields, 503 no pipeline / database unavailable / no frame,
500 a bug (logged with its traceback).

Security. With ``api.token`` set, every request except ``GET /openapi.json``
(the schema holds no data) needs ``Authorization: Bearer <token>``, checked
before the body is read; the config refuses a non-loopback ``api.host``
without a token. Bodies are limited to ``api.max_upload_mb`` (413, checked on
``Content-Length`` and while reading). No CORS headers are sent, and no
interactive docs page is served (it would load scripts from a CDN).
"""

from __future__ import annotations

import logging
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pipeline import topology
from pipeline.capture import camera_rings
from pipeline.config import AppConfig
from pipeline.messages import Ack, ScaleRequest, StatusReply, StatusRequest
from pipeline.metrics import AlertTracker, StageCounters
from pipeline.ring import LatestFrame, RingError, RingReader
from pipeline.runs import read_current_run
from pipeline.runner import StopFlag
from pipeline.transport import TransportError, request

log = logging.getLogger("facepro.api")

#: Paths answered without the bearer token: the schema and the web page (:mod:`pipeline.api_page`; no data).
PUBLIC_PATHS: frozenset[str] = frozenset({"/openapi.json", "/"})
PUBLIC_PREFIXES: tuple[str, ...] = ("/ui/",)
#: Paths where ``?token=<api.token>`` may stand in for the header (an ``<img>`` cannot send one): the live
#: stream, event snapshots and identities' sample faces. Anywhere else a query token is ignored.
QUERY_TOKEN_PATHS = re.compile(r"^/api/(cameras/[^/]+/stream\.mjpeg|events/[0-9a-f]{32}/snapshot\.jpg"
                               r"|identities/[^/]+/face\.jpg)$")


class ApiError(HTTPException):
    """An error answer: ``status`` (HTTP code) and a one-line ``message``; ``extra`` fields join the JSON body.

    Raised by routes and by the :class:`Backend` (wiring), turned into ``{"error": message, **extra}``.
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.message = message
        self.extra = extra


@dataclass(frozen=True)
class Upload:
    """One uploaded image: its client file name (for messages only), raw bytes and the decoded ``(H, W, 3) uint8`` BGR."""

    name: str
    data: bytes
    image: np.ndarray


@dataclass(frozen=True)
class EventQuery:
    """Filters of ``GET /api/events`` (all optional): times are aware UTC datetimes on ``started_at``
    (``since`` <= started_at < ``until``); ``before`` is the cursor: ``(started_at, event_id)`` of the last
    event of the previous page (newest first)."""

    camera: str | None = None
    identity: str | None = None
    label: str | None = None
    method: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    before: tuple[datetime, str] | None = None
    job: str | None = None  # only the events of this analysis job (its id)
    unknown: str | None = None  # only the events of this anonymous identity (unknown-<n>)
    box: str | None = None  # only the events a fleet hub received from this box (its box_id)


class Backend(Protocol):
    """What the app needs from the database and the face models; built by :mod:`pipeline.services`.

    Methods raise :class:`ApiError` for answers with a specific status, or an exception listed in
    :attr:`errors`; anything else is a 500.
    """

    #: ``(exception class, HTTP status)`` pairs, most specific first (e.g. an enrollment error → 422).
    errors: Sequence[tuple[type[BaseException], int]]

    def check_database(self) -> None:
        """Open the database and run a trivial query (raises when it cannot)."""

    def list_events(self, query: EventQuery, limit: int) -> list[dict[str, Any]]:
        """At most ``limit`` events matching ``query``, newest first, as ``facepro events --json`` dicts."""

    def get_event(self, event_id: str) -> dict[str, Any] | None:
        """One event as a ``facepro events --json`` dict, None when unknown."""

    def snapshot_file(self, event_id: str) -> Path | None:
        """The event's snapshot JPEG file (inside the data dir), None when it has none or it is gone."""

    def list_identities(self) -> list[tuple[str, int, bool]]:
        """``(name, gallery embeddings, has a sample face)`` per identity, by name."""

    def identity_face(self, name: str) -> bytes | None:
        """The identity's sample face (JPEG bytes), None when it has none or is unknown."""

    def enroll(self, name: str, uploads: Sequence[Upload]) -> tuple[int, str]:
        """Enroll every upload for ``name`` (all checked first); returns ``(images enrolled, embedder model)``."""

    def delete_identity(self, name: str) -> bool:
        """Delete an identity and its embeddings; False when unknown."""

    def recognize(self, image: np.ndarray) -> dict[str, Any]:
        """Every face of a ``(H, W, 3) uint8`` BGR image: ``{"faces": [{"bbox", "identity", "similarity"}]}``."""

    def list_unknowns(self) -> list[dict[str, Any]]:
        """The anonymous identities, most recently seen first (``facepro identities list --unknown --json``)."""

    def name_unknown(self, unknown: str, name: str) -> dict[str, Any]:
        """Name cluster ``unknown`` (``unknown-<n>``): ``{"unknown", "name", "created", "embeddings", "events"}``;
        ValueError when it does not exist or the name is bad."""

    def relabel_event(self, event_id: str, not_name: str | None, as_name: str | None) -> dict[str, Any]:
        """``facepro events relabel``: ``{"event_id", "identity", "unknown", "negative_of", "added_to"}``."""

    def list_backups(self) -> list[dict[str, Any]]:
        """The backup archives, newest first (``name``, ``size`` bytes, ``created_at``, ``schema_revision``, ``files``, ``error``)."""

    def create_backup(self) -> dict[str, Any]:
        """Write a new archive; returns its :meth:`list_backups` entry."""

    def backup_file(self, name: str) -> Path | None:
        """The archive file ``name`` (a bare file name), None when there is none."""

    def restore_backup(self, name: str, running: bool) -> dict[str, Any]:
        """Restore archive ``name`` (refused with 409 when ``running``), then upgrade the schema."""


class PipelineLink:
    """The running pipeline as the api sees it: its run file, control socket and rings.

    The run is looked up at every call (``<data dir>/run/current.json``), so ``facepro serve`` finds a
    pipeline started after it, and an api process finds the run it belongs to.

    Status replies are shared: one is reused for up to ``status_max_age_s`` (the stages report only every
    ``runtime.stats_interval_s``, 0.5 s by default, so a newer reply would say the same), and requests arriving
    while one is asked share its answer; any number of clients polling status costs the supervisor at most
    ``1 / status_max_age_s`` status computations a second.

    Args:
        data_dir: the pipeline's data dir.
        timeout_ms: how long to wait for the supervisor's answer, milliseconds.
        status_max_age_s: longest reuse of a status reply, seconds (0: every call asks).
    """

    def __init__(self, data_dir: Path, timeout_ms: int = 3000, status_max_age_s: float = 0.5) -> None:
        self.data_dir = data_dir
        self.timeout_ms = timeout_ms
        self.status_max_age_s = status_max_age_s
        self._status: tuple[float, StatusReply] | None = None
        self._status_lock = threading.Lock()
        self._body: tuple[StatusReply, bytes] | None = None

    def fresh_status(self) -> StatusReply | None:
        """The kept status reply while it is younger than ``status_max_age_s``, else None; never blocks (an async
        route answers from it without a thread)."""
        kept = self._status
        return kept[1] if kept is not None and time.monotonic() - kept[0] < self.status_max_age_s else None

    def status_body(self, reply: StatusReply, render: Callable[[StatusReply], bytes]) -> bytes:
        """``render(reply)`` (the JSON body of ``GET /api/status``), computed once per reply: every client polling
        within ``status_max_age_s`` gets the same bytes."""
        kept = self._body
        if kept is not None and kept[0] is reply:
            return kept[1]
        body = render(reply)
        self._body = (reply, body)
        return body

    def current(self) -> dict | None:
        """The running pipeline's run file (``run_id``, ``socket_dir``...), None when none runs."""
        return read_current_run(self.data_dir)

    def running(self) -> bool:
        """True while a pipeline runs on the data dir."""
        return self.current() is not None

    def _run(self) -> dict:
        info = self.current()
        if info is None:
            raise ApiError(503, f"no pipeline is running (data dir {self.data_dir}); start one with: facepro run CONFIG")
        return info

    def _ask(self, msg: object) -> object:
        try:
            return request(Path(self._run()["socket_dir"]), topology.control(), msg, timeout_ms=self.timeout_ms)
        except TransportError as err:
            raise ApiError(503, f"the supervisor did not answer: {err}") from None

    def status(self) -> StatusReply:
        """The supervisor's :class:`StatusReply` (what ``facepro status`` prints).

        Raises:
            ApiError: 503 when no pipeline runs or the supervisor does not answer in time.
        """
        with self._status_lock:  # a request arriving meanwhile waits and gets this answer
            kept = self._status
            if kept is not None and time.monotonic() - kept[0] < self.status_max_age_s:
                return kept[1]
            reply = self._ask(StatusRequest())
            if not isinstance(reply, StatusReply):
                raise ApiError(503, f"unexpected answer from the supervisor: {type(reply).__name__}")
            self._status = (time.monotonic(), reply)
            return reply

    def scale(self, stage: str, processes: int) -> Ack:
        """Send the CLI's :class:`ScaleRequest`; returns the supervisor's :class:`Ack` (503 as :meth:`status`)."""
        reply = self._ask(ScaleRequest(stage=stage, processes=processes))
        if not isinstance(reply, Ack):
            raise ApiError(503, f"unexpected answer from the supervisor: {type(reply).__name__}")
        return reply

    def latest(self, camera: str, copy: bool = True, transform: Callable[[np.ndarray], np.ndarray] | None = None
               ) -> tuple[LatestFrame | None, tuple[int, int] | None]:
        """The newest published frame of ``camera`` and the ring's ``(height, width)``.

        Reads the newest ring generation of the camera (a resolution change makes a new one) as a checked
        reader (:meth:`RingReader.latest`). ``(None, None)`` without a pipeline or a ring; ``(None, size)``
        when nothing is published yet or the frame was overwritten on every attempt.

        Args:
            copy: False: the header only (``frame`` None).
            transform: instead of a copy, ``frame`` is ``transform(zero-copy read-only view of the slot)`` (a new
                array, e.g. a scaled frame), kept only when the slot still holds the frame afterwards.
        """
        info = self.current()
        names = camera_rings(str(info["run_id"]), camera) if info else []
        if not names:
            return None, None
        try:
            ring = RingReader.attach(names[-1])
        except RingError:  # the capture stopped between the listing and the attach
            return None, None
        size = (ring.layout.height, ring.layout.width)
        try:
            if transform is None:
                return ring.latest(copy=copy), size
            head = ring.latest(copy=False)
            view = ring.view(head.slot, head.seq) if head is not None else None
            if head is None or view is None:
                return None, size
            frame = transform(view)
            del view
            return (replace(head, frame=frame) if ring.published(head.slot, head.seq) else None), size
        finally:
            ring.close()


@dataclass
class ApiContext:
    """Everything the routes use (``request.app.state.ctx``).

    Attributes:
        cfg: the config (cameras, ``api`` settings).
        backend: database and models (:class:`Backend`).
        link: the running pipeline (:class:`PipelineLink`).
        alone: True under ``facepro serve``: health is the database's, not the stages'.
        counters: the api process's counters (requests as items, latency per request), None alone.
        alerts: alert states of ``GET /metrics`` and ``GET /api/alerts`` (fed with each request's status).
        lock: serialises the scrapes' alert updates (routes run in a thread pool).
        jobs: the job runner (:class:`pipeline.jobs.JobRunner`; its routes: :mod:`pipeline.api_jobs`), None: the
            jobs routes answer 503. :func:`serve` starts and stops it with the server.
        tracks: the live view's track boxes from recognition (:class:`pipeline.api_live.TrackFeed`), None
            without (``facepro serve``: frames without boxes).
    """

    cfg: AppConfig
    backend: Backend
    link: PipelineLink
    alone: bool = False
    counters: StageCounters | None = None
    alerts: AlertTracker | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    jobs: Any = None
    tracks: Any = None

    def __post_init__(self) -> None:
        if self.alerts is None:
            a = self.cfg.runtime.alerts
            self.alerts = AlertTracker(a.min_rate_fps, a.backlog_frames, a.max_rss_mb, a.grace_s, rate_stages=topology.DATA_PATH)


async def context(request: Request) -> ApiContext:
    """FastAPI dependency: the app's :class:`ApiContext` (async: a sync dependency would cost every request a
    hop to the thread pool)."""
    return request.app.state.ctx


# ------------------------------------------------------------------ errors
def error_body(message: str, status: int, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The JSON error answer ``{"error": message, **extra}``."""
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    extra = exc.extra if isinstance(exc, ApiError) else {}
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # Allow: every method of the path, not only those of the first route matched
        headers["Allow"] = ", ".join(allowed_methods(request))
    return error_body(str(exc.detail), exc.status_code, headers or None, **extra)


def allowed_methods(request: Request) -> list[str]:
    """The HTTP methods the app's routes answer on the request's path, sorted."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for e in exc.errors()[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return error_body("; ".join(parts) or "invalid request", 422)


def _mapped(status: int) -> Callable[[Request, Exception], JSONResponse]:
    def handler(request: Request, exc: Exception) -> JSONResponse:
        if status >= 500:
            log.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error_body(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, status)
    return handler


def _crash(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return error_body(f"internal error ({type(exc).__name__}); see the api log", 500)


# --------------------------------------------------------------- middleware
def query_token(query_string: bytes) -> str:
    """The ``token`` parameter of a raw query string ("" when absent)."""
    from urllib.parse import parse_qs

    return (parse_qs(query_string.decode("latin-1")).get("token") or [""])[0]


class RequestGate:
    """ASGI middleware in front of every route: bearer token, body size limit, request counters.

    Args:
        app: the wrapped ASGI app.
        token: required bearer token, None for none.
        max_body: largest request body, bytes (413 beyond; ``Content-Length`` checked first, then the bytes read).
        counters: the api process's counters: ``frames_in``/``frames_out`` count requests, latency per
            request in milliseconds, extra ``http_4xx`` / ``http_5xx``; None for none.
    """

    def __init__(self, app: Any, token: str | None, max_body: int, counters: StageCounters | None = None) -> None:
        self.app = app
        self.token = token
        self.max_body = max_body
        self.counters = counters

    def _refusal(self, scope: dict) -> tuple[int, str, dict[str, str] | None] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if self.token is not None and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" and QUERY_TOKEN_PATHS.match(path):
                scheme, given = "bearer", query_token(scope.get("query_string", b""))
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.token.encode()):
                return 401, "missing or wrong bearer token (send Authorization: Bearer <api.token>)", {"WWW-Authenticate": "Bearer"}
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return 413, self._too_large(), None
        return None

    def _too_large(self) -> str:
        return f"request body larger than api.max_upload_mb ({self.max_body / 2**20:g} MiB)"

    def _limited(self, receive: Callable) -> Callable:
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise ApiError(413, self._too_large())
            return message

        return limited

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        refusal = self._refusal(scope)
        try:
            if refusal is not None:
                await error_body(refusal[1], refusal[0], refusal[2])(scope, receive, sending)
            else:
                await self.app(scope, self._limited(receive), sending)
        finally:
            self._count(status[0], started)

    def _count(self, status: int, started: float) -> None:
        c = self.counters
        if c is None:
            return
        c.frames_in += 1
        c.frames_out += 1
        c.observe_ms((time.monotonic() - started) * 1000.0)
        if status >= 400:
            key = "http_5xx" if status >= 500 else "http_4xx"
            c.extra[key] = c.extra.get(key, 0) + 1


# ---------------------------------------------------------------------- app
def create_app(ctx: ApiContext, routers: Iterable[Any] | None = None) -> FastAPI:
    """The FastAPI app over ``ctx``: every router, the JSON error handlers and the :class:`RequestGate`.

    Args:
        ctx: what the routes use.
        routers: ``APIRouter`` objects to include (default: system, cameras, events, identities, backups, the
            live view and the web page).

    Returns:
        The ASGI app; ``app.openapi()`` is the schema served at ``/openapi.json``.
    """
    from fastapi import Depends
    from fastapi.security import HTTPBearer

    from pipeline import api_data, api_jobs, api_live, api_page, api_system

    api = ctx.cfg.api
    deps = [Depends(HTTPBearer(auto_error=False, description="api.token"))] if api.token else []
    app = FastAPI(title="FacePro", version=_version(), docs_url=None, redoc_url=None, dependencies=deps,
                  description="FacePro's HTTP API: pipeline status, events, identities, live frames, backups. "
                              "Errors are JSON {\"error\": \"...\"}.")
    app.state.ctx = ctx
    for router in routers if routers is not None else (*api_system.ROUTERS, *api_data.ROUTERS, *api_jobs.ROUTERS,
                                                        *api_live.ROUTERS, *api_page.ROUTERS):
        app.include_router(router)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for cls, status in ctx.backend.errors:
        app.add_exception_handler(cls, _mapped(status))
    app.add_exception_handler(Exception, _crash)
    app.add_middleware(RequestGate, token=api.token, max_body=int(api.max_upload_mb * 2**20), counters=ctx.counters)
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("facepro")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        return "0"


# -------------------------------------------------------------------- serve
def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6; port 0: any free port).

    Raises:
        OSError: the address cannot be bound; the message names ``api.host``/``api.port``.
    """
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, proto, _, addr = infos[0]
        # proto IPPROTO_TCP (not 0): asyncio then sets TCP_NODELAY on every accepted connection; without it a
        # response written in two parts waits for the client's delayed ACK (about 40 ms per request)
        sock = socket.socket(family, socket.SOCK_STREAM, proto or socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
    except OSError as err:
        raise OSError(f"cannot serve the api on {host}:{port} ({err.strerror or err}); change api.host / api.port "
                      "in the config") from None
    sock.set_inheritable(False)
    return sock


def serve(app: Any, sock: socket.socket, stop: StopFlag, on_ready: Callable[[], None] | None = None) -> None:
    """Run ``app`` on uvicorn over the bound ``sock`` until ``stop`` is set (SIGTERM/SIGINT), then shut down.

    uvicorn runs in a thread (so it installs no signal handlers of its own); ``on_ready`` is called once it
    accepts connections. The app's job runner (``ctx.jobs``) runs while the server does: started first,
    stopped (a running job interrupted) after the server.

    Raises:
        RuntimeError: the server stopped on its own (startup failed).
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    jobs = getattr(getattr(getattr(app, "state", None), "ctx", None), "jobs", None)
    if jobs is not None:
        jobs.start()
    thread.start()
    ready = False
    try:
        while thread.is_alive():
            if stop.wait(0.1):
                server.should_exit = True
                server.force_exit = stop.hard()
            if not ready and server.started:
                ready = True
                if on_ready is not None:
                    on_ready()
        thread.join()
    finally:
        if jobs is not None:
            jobs.stop()
    sock.close()
    if not stop.is_set():
        raise RuntimeError("the api server stopped on its own (see the log above)")

