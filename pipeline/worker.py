"""Child-process entry point: ``python -m pipeline.worker RUNTIME_DIR STAGE INDEX COUNTS [BLOCK]``.

``COUNTS`` are the live process counts when the supervisor spawned this
process (``capture=1,detection=2,...``, :func:`pipeline.topology.format_counts`);
the ONNX thread budget is computed from them. ``BLOCK`` names the
shared-memory counter block the supervisor created for this process
(:mod:`pipeline.counters`); without it the counters stay private.

Dispatch is by the stage table: :data:`ENTRIES` maps every row of
:data:`pipeline.topology.STAGES` to its entry function, and endpoint names
come only from :mod:`pipeline.topology`.

The process dies with the supervisor: it sets ``PR_SET_PDEATHSIG`` (SIGKILL)
and a daemon thread also watches the parent pid (:func:`die_with_parent`).

This module is wiring, like the supervisor and the CLI: it builds the stage
objects from ``stages``/``storage`` and connects them to the transport with
the generic :class:`~pipeline.runner.Runner` (or the
:class:`~pipeline.runner.CaptureLoop` for a camera). The config comes from
the run's ``config.json`` (written by the supervisor), never through pickling.

Flow: capture → detection is credit-based (``CREDIT_WINDOW`` frames per
camera and detection process), so detection processes can be added and
removed while running without losing or repeating a frame.

Routing: camera ``k`` (config order) is tracked by recognition process
``k % N_RECOGNITION``, so every camera's tracker lives in one process.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from pipeline import topology
from pipeline.config import AppConfig, data_dir, database_url, thread_budget
from pipeline.counters import CounterBlock
from pipeline.journal import FrameJournal, Outbox
from pipeline.messages import LiveTracks, event_id_for
from pipeline.metrics import Heartbeat, StageCounters
from pipeline.runner import Batcher, CaptureLoop, CaptureSettings, Reorderer, Runner, RunnerIO, StopFlag
from pipeline.transport import PRIVATE_UMASK, ReliableSender, Transport

log = logging.getLogger("facepro.worker")

#: Frames of one camera a detection process may hold at once (1 in work + 1 queued).
CREDIT_WINDOW = 2


recognition_index = topology.recognition_index


class SharedNamedTracks:
    """Re-ID and gait linking across recognition processes: feeds this process's linkers the named tracks the
    other processes stored.

    Each camera's tracks live in one recognition process, so a person named on a camera of another process
    is only known here through the database: every ``interval_s`` the track-level embeddings stored since the
    last poll (or since start: earlier runs are not used, clothes change) whose event has an identity are read
    (:func:`storage.queries.named_track_vectors`, a WAL reader that never blocks the writer) and handed to
    the linker's ``remember``. This process's own cameras are skipped (their tracks are already known). A
    failed read is logged and retried at the next poll; it only delays links.

    Args:
        engine: database engine (read only here).
        own_cameras: cameras of this process.
        linkers: ``(kind, model name, linker)`` with ``kind`` ``"reid"`` or ``"gait"``; the linker has
            ``remember(vector, named)``.
        interval_s: seconds between polls.
        clock: monotonic seconds (tests inject a fake one).

    Attributes:
        received: named tracks handed to the linkers so far.
    """

    def __init__(self, engine: Any, own_cameras: Sequence[str], linkers: Sequence[tuple[str, str, Any]],
                 interval_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        from storage.queries import last_vector_id

        self.engine = engine
        self.own_cameras = tuple(own_cameras)
        self.linkers = tuple(linkers)
        self.interval_s = interval_s
        self._clock = clock
        self._due = clock() + interval_s
        self._after = {kind: last_vector_id(engine, kind) for kind, _, _ in self.linkers}
        self.received = 0

    def __call__(self) -> None:
        from stages.identity import Named
        from storage.db import StorageError
        from storage.queries import named_track_vectors

        now = self._clock()
        if now < self._due:
            return
        self._due = now + self.interval_s
        for kind, model, linker in self.linkers:
            try:
                got = named_track_vectors(self.engine, kind, model, self._after[kind], self.own_cameras)
            except StorageError as err:
                log.warning("reading named %s tracks of other recognition processes failed (retried in %.0f s): %s",
                            kind, self.interval_s, err)
                continue
            for i, vector in enumerate(got.vectors):
                linker.remember(vector, Named(got.identities[i], got.methods[i], got.scores[i]))
            self._after[kind] = got.last_id
            self.received += len(got.identities)


def _sharing(cfg: AppConfig, engine: Any, index: int, n_rec: int, linkers: list[tuple[str, Any]],
             counters: StageCounters) -> tuple[Callable[[], None], ...]:
    """The runner service that feeds recognition process ``index`` the other processes' named tracks
    (:class:`SharedNamedTracks`); none with one process or without Re-ID and gait linkers."""
    active = [(kind, linker.embedder.model_name, linker) for kind, linker in linkers if linker is not None]
    if n_rec < 2 or not active:
        return ()
    own = [c.name for c in cfg.cameras if recognition_index(cfg, c.name, n_rec) == index]
    shared = SharedNamedTracks(engine, own, active)

    def share() -> None:
        shared()
        counters.extra["shared_named_tracks"] = shared.received

    return (share,)


def _session_options(cfg: AppConfig, stage: str, counts: topology.Counts | None = None):
    from stages.runtime import SessionOptions

    return SessionOptions(threads=thread_budget(cfg, stage=stage, counts=counts), providers=cfg.runtime.providers,
                          strict=cfg.runtime.strict_providers, cache_dir=data_dir() / "trt-cache",
                          static_shapes=_AUTO_ON_OFF[cfg.runtime.static_shapes], io_binding=_AUTO_ON_OFF[cfg.runtime.io_binding])


#: ``auto`` / ``on`` / ``off`` settings as :class:`stages.runtime.SessionOptions` takes them (None: decided per session).
_AUTO_ON_OFF: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


def _show_providers(counters: StageCounters) -> None:
    """Put what each model of this process runs on into its counters (``facepro status``, Prometheus)."""
    from stages.runtime import RUNNING_ON

    for model, provider in RUNNING_ON.items():
        counters.extra[f"{model[:40]} on {provider.removesuffix('ExecutionProvider')}"] = 1


def _capture(cfg: AppConfig, t: Transport, run_id: str, index: int, counters: StageCounters, hb: Heartbeat, stop: StopFlag) -> None:
    from stages.capture import open_source

    cam = cfg.cameras[index]
    source = open_source(cam)
    if source.last_error:  # a live camera that is down: offline, retried with backoff by the loop
        counters.last_error = source.last_error
        counters.extra["offline"] = 1
    sender = t.dispatcher(topology.frames(cam.name))
    settings = CaptureSettings(run_id=run_id, camera=cam.name, slots=cfg.ring.slots,
                               release_timeout_s=cfg.ring.release_timeout_s,
                               wait_for_release=cam.resolved_mode() == "file", max_fps=cam.max_fps,
                               reconnect_s=cam.reconnect_s, owner_pid=os.getppid(),
                               start_gate=True)
    CaptureLoop(source, settings, sender, counters, hb, stop).run()


def _file_mode(cfg: AppConfig) -> bool:
    return all(c.resolved_mode() == "file" for c in cfg.cameras)


def _detection(cfg: AppConfig, t: Transport, n_rec: int, counters: StageCounters, hb: Heartbeat, stop: StopFlag,
               counts: topology.Counts | None = None) -> None:
    from stages.detection import DetectionStage
    from stages.detector import ObjectDetector

    det = cfg.detection
    stage = DetectionStage(ObjectDetector(det.detector, _session_options(cfg, "detection", counts)), det.motion, batch=det.batch,
                           stable_skip=det.stable_skip, stable_iou=det.stable_iou, regions=det.regions)
    inbox = t.credit_inbox([topology.frames(cam.name) for cam in cfg.cameras], window=CREDIT_WINDOW)
    outs = [t.sender(topology.detections(i), hwm=cfg.ring.slots, linger_ms=2000) for i in range(n_rec)]
    route = lambda msg: outs[recognition_index(cfg, msg.frame.camera, n_rec)]  # noqa: E731
    io = RunnerIO(inbox=inbox, route=route, heartbeat=hb, release=False, blocking_send=_file_mode(cfg), zero_copy=True,
                  forwarder=True)
    _show_providers(counters)
    # detection.batch > 1: frames of all cameras go through the detector together (batch 1: frame by frame, as before)
    batcher = Batcher(det.batch, det.batch_timeout_ms / 1000.0) if det.batch > 1 else None
    Runner(stage, io, counters, stop, batcher=batcher).run()


def _snapshot_sink(root: Path):
    def save(event_id: str, camera: str, image) -> str | None:
        folder = root / camera
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{event_id}.jpg"
        tmp = folder / f".{event_id}.jpg.tmp"
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
        if not ok:
            return None
        tmp.write_bytes(buf.tobytes())
        os.replace(tmp, path)
        return str(path)

    return save


def _linkers(cfg: AppConfig, opts: Any) -> tuple[Any, Any]:
    """The Re-ID and gait linkers the config asks for (None where it does not)."""
    reid = gait = None
    if cfg.recognition.reid is not None:
        from stages.recognition import ReidLinker
        from stages.reid import ReidEmbedder

        from stages.runtime import for_model

        reid = ReidLinker(ReidEmbedder(cfg.recognition.reid.path, for_model(opts, cfg.recognition.reid.providers, cfg.recognition.reid.graph_optimization)),
                          cfg.recognition.reid)
    if cfg.recognition.gait is not None:
        from stages.gait import gait_embedder
        from stages.recognition import GaitLinker

        gait = GaitLinker(cfg.recognition.gait, gait_embedder(cfg.recognition.gait, opts))
    return reid, gait


@dataclass(frozen=True)
class RunPaths:
    """The run a worker belongs to: its id and runtime directory (journals, outboxes)."""

    run_id: str
    runtime_dir: Path


def _recognition(cfg: AppConfig, t: Transport, index: int, n_rec: int, counters: StageCounters, hb: Heartbeat,
                 stop: StopFlag, run: RunPaths, counts: topology.Counts | None = None) -> None:
    from pipeline.identities import GalleryRefresh, gallery_from_db
    from stages.detector import class_names_of
    from stages.face import FaceAnalyzer
    from stages.recognition import RecognitionStage
    from storage.db import open_engine

    opts = _session_options(cfg, "recognition", counts)
    class_names = class_names_of(cfg.detection.detector, opts)  # the tracker's labels (YOLOX: no model to open)
    analyzer = FaceAnalyzer(cfg.recognition.face, opts)
    engine = open_engine(database_url(cfg))
    threshold = cfg.recognition.face.match_threshold
    gallery = gallery_from_db(engine, analyzer.model_name, threshold)  # with its negative examples
    live = frozenset(c.name for c in cfg.cameras if c.resolved_mode() == "live")
    snap = _snapshot_sink(data_dir() / "snapshots") if cfg.storage.snapshots else None
    reid, gait = _linkers(cfg, opts)
    file_mode = _file_mode(cfg)
    stage = RecognitionStage(cfg.tracking, cfg.recognition.face, class_names, analyzer, gallery, snap, live,
                             cfg.recognition.max_lag_ms, reid, gait, event_ids=partial(event_id_for, run.run_id),
                             journaling=file_mode)
    reorderer = Reorderer(cfg.tracking.reorder_timeout_s, strict=file_mode)
    journals = _resume(cfg, run, index, n_rec, stage, reorderer, counters) if file_mode else {}
    inbox = t.receiver(topology.detections(index), bind=True, hwm=cfg.ring.slots)
    outbox = Outbox(run.runtime_dir / f"outbox-recognition-{index}") if file_mode else None
    out = ReliableSender(t.sender(topology.storage(), hwm=10_000, linger_ms=10_000), t.subscriber(topology.storage_acks()),
                         producer=f"recognition-{index}-{os.getpid()}", resend_after_s=cfg.storage.resend_after_s,
                         outbox=outbox)
    counters.extra["outbox_inherited"] = out.resend_inherited()

    def wait_for_storage() -> None:
        for journal in journals.values():
            journal.finish()  # every track was closed by the stage's finish()
        if not out.wait_all_acked(cfg.storage.exit_wait_s, stop_hard=stop.hard):
            counters.last_error = f"{len(out.unacked)} item(s) not acknowledged by storage at exit"

    def gauges() -> None:
        out.service()
        counters.extra.update(storage_unacked=len(out.unacked), storage_resent=out.resent, storage_dropped=out.dropped)

    def use_gallery(new: Any) -> None:  # names given, negatives, enrollments reach the running pipeline
        stage.gallery = new
        counters.extra["gallery_reloads"] = refresh.reloads + 1

    refresh = GalleryRefresh(engine, analyzer.model_name, threshold, use_gallery)

    def journal(det: object) -> None:
        journals[det.frame.camera].append(det, stage.checkpoint(det))  # type: ignore[attr-defined]

    io = RunnerIO(inbox=inbox, route=lambda msg: out, heartbeat=hb, release=True, blocking_send=True,
                  services=(gauges, refresh, *_sharing(cfg, engine, index, n_rec, [("reid", reid), ("gait", gait)], counters)),
                  on_exit=wait_for_storage, after_frame=_after_frame(journal if file_mode else None,
                                                                     _live_tracks(cfg, t, stage)))
    _show_providers(counters)
    rec = cfg.recognition  # batch > 1: face and Re-ID crops of several cameras' frames in one embedder run
    batcher = Batcher(rec.batch, rec.batch_timeout_ms / 1000.0) if rec.batch > 1 else None
    Runner(stage, io, counters, stop, reorderer=reorderer, batcher=batcher).run()


def _live_tracks(cfg: AppConfig, t: Transport, stage: Any) -> Callable[[object], None] | None:
    """With ``api.enabled``: publish each frame's confirmed tracks (:class:`~pipeline.messages.LiveTracks`) to
    the api's live view, on a PUB socket connected to :func:`pipeline.topology.live_tracks`. Lossy and never
    blocking: with no viewer subscribed, or 8 messages queued, a message is dropped. None without the api."""
    if not cfg.api.enabled:
        return None
    pub = t.publisher(topology.live_tracks(), linger_ms=0, bind=False, hwm=8)

    def publish(det: object) -> None:
        ref = det.frame  # type: ignore[attr-defined]
        active = stage.active(ref.camera)
        pub.send(LiveTracks(camera=ref.camera, frame_index=ref.frame_index, captured_at_ns=ref.captured_at_ns,
                            ring=ref.ring, slot=ref.slot, seq=ref.seq,
                            track_ids=np.array([a.track_id for a in active], np.int64),
                            xyxy=np.array([a.xyxy for a in active], np.float32).reshape(-1, 4),
                            labels=tuple(a.label for a in active), names=tuple(a.identity for a in active)))

    return publish


def _after_frame(*hooks: Callable[[object], None] | None) -> Callable[[object], None] | None:
    """One ``RunnerIO.after_frame`` calling each hook that is not None, in order (None when there is none)."""
    todo = [h for h in hooks if h is not None]
    if not todo:
        return None

    def after(det: object) -> None:
        for hook in todo:
            hook(det)

    return after


def _resume(cfg: AppConfig, run: RunPaths, index: int, n_rec: int, stage: Any, reorderer: Reorderer,
            counters: StageCounters) -> dict[str, FrameJournal]:
    """File mode: open the journals of this process's cameras and rebuild their tracks from them (a
    predecessor was killed, or the cameras were repartitioned); their sequences continue after the
    journaled frames."""
    journals = {}
    for cam in cfg.cameras:
        if recognition_index(cfg, cam.name, n_rec) != index:
            continue
        journal = journals[cam.name] = FrameJournal(run.runtime_dir / "journal", cam.name)
        resume = journal.replay(stage)
        if resume is not None:
            reorderer.resume(cam.name, *resume)
            counters.extra["resumed_cameras"] = counters.extra.get("resumed_cameras", 0) + 1  # one counter, any camera count
            log.info("camera %s: tracks rebuilt from the journal, resuming at frame %d", cam.name, resume[1])
    return journals


def _storage(cfg: AppConfig, t: Transport, counters: StageCounters, hb: Heartbeat, stop: StopFlag) -> None:
    from storage.db import open_engine
    from storage.stage import StorageStage
    from storage.writer import EventWriter

    engine = open_engine(database_url(cfg), cache_mb=cfg.storage.cache_mb)
    from pipeline.identities import unknown_assigner

    # an analyze job's pipeline (pipeline.job_analyze) stores its job id in every event it creates
    unknowns = unknown_assigner(cfg)  # clusters unnamed person tracks into unknown-<n> as they end
    writer = EventWriter(engine, cfg.storage.batch_rows, cfg.storage.batch_ms,
                         outbox_box_id=cfg.box_id if cfg.mqtt is not None else None,
                         job_id=os.environ.get("FACEPRO_JOB_ID") or None, unknowns=unknowns)
    st = cfg.storage
    tasks: list[Callable[[], object]] = []
    if st.retention_days or st.max_total_mb:
        from storage.retention import apply_retention

        max_bytes = int(st.max_total_mb * 2**20) if st.max_total_mb else None
        tasks.append(lambda: apply_retention(engine, st.retention_days, max_bytes, data_dir() / "snapshots"))
    if cfg.mqtt is not None:  # sent MQTT outbox rows nobody needs any more
        from storage.retention import prune_outbox

        tasks.append(lambda: prune_outbox(engine))
    retention = (lambda: [task() for task in tasks]) if tasks else None
    inbox = t.receiver(topology.storage(), bind=True, hwm=10_000)
    acks = t.publisher(topology.storage_acks())
    io = RunnerIO(inbox=inbox, route=lambda msg: acks, heartbeat=hb, release=False, blocking_send=False)
    consolidate = None
    if unknowns is not None:
        from storage.unknowns import consolidate_clusters

        consolidate = partial(consolidate_clusters, engine, unknowns.settings.merge_threshold)
    stage = StorageStage(writer, retention, st.retention_interval_s, st.debug_commit_delay_ms / 1000.0,
                         consolidate, cfg.recognition.face.unknowns.consolidate_interval_s)
    Runner(stage, io, counters, stop).run()


def _mqtt(cfg: AppConfig, t: Transport, runtime_dir: Path, counters: StageCounters, stop: StopFlag) -> None:
    """The mqtt process: :class:`pipeline.mqtt.MqttPublisher` over the outbox (:class:`storage.outbox.OutboxStore`)
    until stopped, then it drains (it is stopped after storage, so every committed change is in the outbox)."""
    from datetime import datetime, timezone

    from pipeline.mqtt import BrokerSettings, MqttPublisher, make_client, topics_of
    from storage.db import StorageError, open_engine
    from storage.outbox import OutboxStore

    m = cfg.mqtt
    assert m is not None  # the row is enabled only with an mqtt section
    started = json.loads((runtime_dir / "run.json").read_text()).get("started_at")
    since = datetime.fromtimestamp(started, timezone.utc) if started else None
    store = OutboxStore(open_engine(database_url(cfg), busy_timeout_ms=250), since)  # a locked db: retried, not waited for
    settings, topics = BrokerSettings.from_config(cfg), topics_of(cfg)
    pub = MqttPublisher(make_client(settings, topics), store, settings, topics, [c.name for c in cfg.cameras],
                        discovery=m.discovery, stats=partial(_status_doc, t.runtime_dir),
                        stats_interval_s=m.stats_interval_s, drain_timeout_s=m.drain_timeout_s, version=_version(),
                        db_errors=(StorageError,))

    def report() -> None:
        counters.extra.update(pub.gauges())
        counters.frames_out, counters.backlog, counters.last_error = pub.published, pub.pending, pub.last_error

    pub.start()
    counters.extra["ready"] = 1
    try:
        while not stop.is_set():
            pub.step()
            report()
            time.sleep(0.1)
    finally:
        pub.stop(abort=stop.hard)
        report()


def _frigate(cfg: AppConfig, counters: StageCounters, stop: StopFlag) -> None:
    """The Frigate companion process (:class:`pipeline.companion.FrigateCompanion`): Frigate's events from the
    broker, snapshots and sub_labels over Frigate's HTTP API, faces named by :func:`pipeline.services.identify_doc`
    (the gallery of the database, ``recognition.face.match_threshold``, the face quality gate). Its face models
    use every core on a box without cameras, one thread beside a pipeline (the stages keep the cores)."""
    from pipeline.companion import CompanionSettings, FrigateApi, FrigateCompanion, make_client
    from pipeline.services import face_analyzer, identify_doc
    from storage.db import StorageError, open_engine

    f, face = cfg.frigate, cfg.recognition.face
    assert f is not None  # the row is enabled only with a frigate section
    threads = cfg.runtime.inference_threads or (1 if cfg.cameras else os.cpu_count() or 1)
    analyzer = face_analyzer(cfg, threads)
    engine = open_engine(database_url(cfg), busy_timeout_ms=1000)  # a locked database: retried with backoff

    def recognize(image: np.ndarray) -> dict:
        return identify_doc(engine, analyzer, face.match_threshold, image, face.quality)

    comp = FrigateCompanion(make_client(cfg), FrigateApi(f.url, f.timeout_s), recognize, CompanionSettings.from_config(cfg),
                            retry_errors=(StorageError,), observe=counters.observe_ms)

    def report() -> None:
        counts = comp.snapshot_counts()
        counters.extra.update({**counts, **comp.gauges()})
        counters.frames_in, counters.frames_out = counts["frigate_snapshots_queued"], counts["frigate_snapshots_fetched"]
        counters.backlog, counters.last_error = comp.gauges()["frigate_queued"], comp.last_error

    comp.start()
    counters.extra["ready"] = 1
    log.info("frigate companion: Frigate at %s, events on %s", f.url, comp.settings.events_topic)
    try:
        while not stop.is_set():
            comp.step()
            report()
            time.sleep(0.1)
    finally:
        comp.stop(join_s=f.timeout_s + 5.0)
        report()


def _status_doc(socket_dir: Path) -> dict | None:
    """The ``facepro status --json`` document, asked from the supervisor's control endpoint (None: no answer)."""
    from pipeline.messages import StatusReply, StatusRequest
    from pipeline.status import status_json
    from pipeline.transport import TransportError, request

    try:
        reply = request(socket_dir, topology.control(), StatusRequest(), timeout_ms=1000)
    except TransportError:
        return None
    return status_json(reply) if isinstance(reply, StatusReply) else None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("facepro")
    except PackageNotFoundError:
        return ""


def _api(cfg: AppConfig, runtime_dir: Path, counters: StageCounters, stop: StopFlag) -> None:
    """The HTTP API process (:mod:`pipeline.api`): uvicorn until SIGTERM. Requests are its counted items; the
    bound port is its ``port`` count (``api.port: 0`` picks a free one). Its face models use one thread. The
    live view's track boxes arrive from recognition on :func:`pipeline.topology.live_tracks` (:mod:`pipeline.api_live`).
    It runs at niceness ``api.nice`` (absolute; never raised), so on busy cores the stages get them first."""
    from pipeline.api import bind, create_app, serve
    from pipeline.api_live import TrackFeed
    from pipeline.services import api_context

    if cfg.api.nice > os.nice(0):
        os.nice(cfg.api.nice - os.nice(0))

    info = json.loads((runtime_dir / "run.json").read_text())
    config_path = Path(info["config_path"]) if info.get("config_path") else None
    sock = bind(cfg.api.host, cfg.api.port)
    host, port = sock.getsockname()[:2]
    counters.extra["port"] = port
    ctx = api_context(cfg, alone=False, config_path=config_path, threads=1, counters=counters)
    ctx.tracks = TrackFeed(Path(info["socket_dir"])).start()
    app = create_app(ctx)

    def ready() -> None:
        counters.extra["ready"] = 1
        log.info("HTTP API on http://%s:%d%s", host, port, "" if cfg.api.token else " (no token: loopback only)")

    try:
        serve(app, sock, stop, on_ready=ready)
    finally:
        ctx.tracks.close()


@dataclass(frozen=True)
class StageContext:
    """What an entry function gets: the config, transport, run id, process index, live counts and counters."""

    cfg: AppConfig
    t: Transport
    run_id: str
    runtime_dir: Path
    index: int
    counts: topology.Counts
    counters: StageCounters
    hb: Heartbeat
    stop: StopFlag


#: Entry function per row of :data:`pipeline.topology.STAGES` (a new process kind adds one here).
ENTRIES: dict[str, Callable[[StageContext], None]] = {
    "capture": lambda c: _capture(c.cfg, c.t, c.run_id, c.index, c.counters, c.hb, c.stop),
    "detection": lambda c: _detection(c.cfg, c.t, c.counts["recognition"], c.counters, c.hb, c.stop, c.counts),
    "recognition": lambda c: _recognition(c.cfg, c.t, c.index, c.counts["recognition"], c.counters, c.hb, c.stop,
                                          RunPaths(c.run_id, c.runtime_dir), c.counts),
    "storage": lambda c: _storage(c.cfg, c.t, c.counters, c.hb, c.stop),
    "mqtt": lambda c: _mqtt(c.cfg, c.t, c.runtime_dir, c.counters, c.stop),
    "frigate": lambda c: _frigate(c.cfg, c.counters, c.stop),
    "api": lambda c: _api(c.cfg, c.runtime_dir, c.counters, c.stop),
}

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None, poll_s: float = 0.5) -> None:
    """Exit when ``parent_pid`` (the supervisor) dies, however it dies.

    Sets ``PR_SET_PDEATHSIG`` to SIGKILL (Linux), then checks ``os.getppid()``
    to close the race with a parent that died before the call, and starts a
    daemon thread that SIGKILLs this process once the parent pid changes (the
    fallback where prctl is unavailable). ``FACEPRO_KEEP_ORPHANS=1`` disables
    both (tests use it to make a leftover process on purpose).
    """
    if parent_pid is None or os.environ.get("FACEPRO_KEEP_ORPHANS") == "1":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the watch thread alone
        pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _context(argv: list[str], stop: StopFlag) -> StageContext:
    runtime_dir, stage, index = Path(argv[0]), argv[1], int(argv[2])
    counts = topology.parse_counts(argv[3])
    cfg = AppConfig.model_validate_json((runtime_dir / "config.json").read_text())
    run_info = json.loads((runtime_dir / "run.json").read_text())
    block = CounterBlock.attach(argv[4]) if len(argv) > 4 else None
    counters = StageCounters(stage, index, block=block)
    hb = Heartbeat(counters, None, cfg.runtime.stats_interval_s).start()
    return StageContext(cfg, Transport(Path(run_info["socket_dir"])), run_info["run_id"], runtime_dir, index, counts,
                        counters, hb, stop)


def main(argv: list[str]) -> int:
    """Run one stage process (module docstring); returns its exit code (2 on an error, reported in the block)."""
    os.umask(PRIVATE_UMASK)  # snapshots, journals, outboxes: owner-only
    supervisor = os.environ.get("FACEPRO_SUPERVISOR_PID")
    die_with_parent(int(supervisor) if supervisor else None)
    stage, index = argv[1], argv[2]
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage}-{index} %(levelname)s %(message)s")
    cv2.setNumThreads(1)
    stop = StopFlag().install()
    ctx = _context(argv, stop)
    try:
        entry = ENTRIES.get(stage)
        if entry is None:
            raise ValueError(f"unknown stage {stage!r}; known: {', '.join(ENTRIES)}")
        entry(ctx)
        return 0
    except Exception as err:  # report the error in the block, then exit non-zero
        ctx.counters.last_error = f"{type(err).__name__}: {err}"
        log.error("%s", ctx.counters.last_error)
        log.debug("%s", traceback.format_exc())
        ctx.hb.beat(force=True)
        return 2
    finally:
        ctx.hb.stop()
        ctx.t.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
