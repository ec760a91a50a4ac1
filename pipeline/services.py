"""What the CLI and the HTTP API do with the database and the face models: one code path for both.

``facepro enroll``, ``POST /api/identities/{name}/faces`` and enroll jobs find each image's face
(:func:`stages.gallery.enrollment_face`; every image must show exactly one face, or a dominant one, else
nothing is stored) and store the faces with :func:`store_enrollment` (their embeddings, and the identity's
sample face when it has none); ``facepro identify`` and ``POST /api/recognize`` call
:func:`identify_doc`; ``facepro events --json`` and ``GET /api/events`` print :func:`event_docs`.

This module is wiring (like :mod:`pipeline.cli` and :mod:`pipeline.worker`): it joins ``stages`` and
``storage`` and hands the framework app (:mod:`pipeline.api`) a :class:`StorageBackend` in an
:class:`~pipeline.api.ApiContext` (:func:`api_context`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.api import ApiContext, ApiError, EventQuery, PipelineLink, Upload
from pipeline.config import AppConfig, data_dir, database_url
from pipeline.metrics import StageCounters

log = logging.getLogger("facepro.services")


def face_analyzer(cfg: AppConfig, threads: int) -> Any:
    """The configured face pipeline (:class:`stages.face.FaceAnalyzer`) with ``threads`` ONNX Runtime threads.

    Raises:
        ModelError: a face model is missing or not what the config says.
    """
    from stages.face import FaceAnalyzer
    from stages.runtime import SessionOptions

    return FaceAnalyzer(cfg.recognition.face, SessionOptions(threads=max(1, threads), providers=cfg.runtime.providers,
                                                             strict=cfg.runtime.strict_providers))


def enrollment_faces(analyzer: Any, images: Sequence[tuple[str, np.ndarray]]) -> list[Any]:
    """The enrolled face (:class:`stages.face.Face`: box, embedding) of each ``(source name, (H, W, 3) uint8 BGR
    image)``, all checked first.

    Raises:
        EnrollmentError: an image without a face, or with several and none dominant (the message names it).
    """
    from stages.gallery import enrollment_embedding

    return [enrollment_embedding(analyzer, image, source)[1] for source, image in images]


def enrollment_vectors(analyzer: Any, images: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """The enrollment embedding of each ``(source name, (H, W, 3) uint8 BGR image)``, all checked first
    (:func:`enrollment_faces`).

    Returns:
        ``(k, d) float32`` unit-norm embeddings, one per image, in order.
    """
    return np.stack([f.embedding for f in enrollment_faces(analyzer, images)]).astype(np.float32)


def store_enrollment(engine: Any, name: str, model: str, faces: Sequence[tuple[np.ndarray, Any]],
                     image_paths: Sequence[str | None], image_sha256: Sequence[str | None]) -> int:
    """Store an enrollment: the embedding of each ``(image, its enrolled Face)`` (:func:`storage.queries.enroll`,
    one transaction) with its image path and SHA-256, and the identity's sample face (:mod:`stages.sample`)
    cut from the widest of these faces, kept only when the identity has none yet.

    Returns:
        The identity's id.

    Raises:
        ValueError: as :func:`storage.queries.enroll`.
    """
    from stages.sample import sample_jpeg
    from storage.queries import enroll

    vectors = np.stack([face.embedding for _, face in faces]).astype(np.float32)
    image, face = max(faces, key=lambda f: f[1].width)  # the first of the widest
    return enroll(engine, name, vectors, model, image_paths, image_sha256, sample=sample_jpeg(image, face.xyxy))


def identify_doc(engine: Any, analyzer: Any, match_threshold: float, image: np.ndarray,
                 quality: Any = None) -> dict[str, Any]:
    """Every face of ``image`` (``(H, W, 3) uint8`` BGR) matched against the stored gallery of the analyzer's model:
    ``{"faces": [{"bbox": [x1, y1, x2, y2] (pixels, 0.1 px), "identity": name | None, "similarity": cosine}]}``,
    best detection score first (``facepro identify --json``). The gallery carries its negative examples
    (:func:`pipeline.identities.gallery_from_db`). With ``quality`` (a :class:`pipeline.config.FaceQualityConfig`,
    the Frigate companion's gate) each face also has ``"quality"``: None when it passed, else the reason it failed
    (it then has no identity)."""
    from pipeline.identities import gallery_from_db
    from stages.gallery import identify

    gallery = gallery_from_db(engine, analyzer.model_name, match_threshold)  # with its negative examples
    faces = identify(analyzer, gallery, image, quality)
    return {"faces": [{"bbox": [round(float(v), 1) for v in f.xyxy], "identity": f.identity,
                       "similarity": round(float(f.similarity), 4), **({"quality": f.quality} if quality is not None else {})}
                      for f in faces]}


def event_docs(engine: Any, limit: int, **filters: Any) -> list[dict[str, Any]]:
    """Events newest first as ``facepro events --json`` prints them (:meth:`storage.queries.EventRow.to_json`);
    ``filters`` are :func:`storage.queries.list_events`'s."""
    from storage.queries import list_events

    return [r.to_json() for r in list_events(engine, limit=limit, **filters)]


def _image_suffix(data: bytes) -> str:
    from pipeline.api_data import image_kind

    return {"jpeg": ".jpg", "png": ".png", "bmp": ".bmp", "webp": ".webp"}.get(image_kind(data) or "", ".img")


class StorageBackend:
    """:class:`pipeline.api.Backend` over the config's database, the face models and ``<data dir>/backups``.

    The engine and the face models are opened on first use (a model load takes seconds; a locked database at
    start does not stop the api). Uploaded enrollment images are kept in ``<data dir>/faces/`` (named by their
    SHA-256) and recorded like the CLI's files, so backups carry them.

    Args:
        cfg: the config.
        folder: the data dir.
        config_path: the config file (put into backups), None for none.
        threads: ONNX Runtime threads of the face models.
    """

    def __init__(self, cfg: AppConfig, folder: Path, config_path: Path | None, threads: int) -> None:
        from stages.gallery import EnrollmentError
        from storage.backup import BackupError
        from storage.corrections import NotFoundError
        from storage.db import SchemaError, StorageError

        self.cfg = cfg
        self.url = database_url(cfg)
        self.folder = folder
        self.config_path = config_path
        self.threads = threads
        self.errors = ((NotFoundError, 404), (EnrollmentError, 400), (BackupError, 422), (SchemaError, 409), (StorageError, 503), (ValueError, 400))
        self._engine: Any = None
        self._analyzer: Any = None
        self._lock = threading.Lock()

    @property
    def engine(self) -> Any:
        with self._lock:
            if self._engine is None:
                from storage.db import open_engine

                self._engine = open_engine(self.url)
            return self._engine

    @property
    def analyzer(self) -> Any:
        with self._lock:
            if self._analyzer is None:
                self._analyzer = face_analyzer(self.cfg, self.threads)
            return self._analyzer

    # -------------------------------------------------------------- events
    def check_database(self) -> None:
        from sqlalchemy import text

        from storage.db import storage_errors

        with storage_errors(self.url, "opening the database"), self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def list_events(self, query: EventQuery, limit: int) -> list[dict[str, Any]]:
        return event_docs(self.engine, limit, camera=query.camera, identity=query.identity, label=query.label,
                          method=query.method, since=query.since, until=query.until, before=query.before,
                          job=query.job, unknown=query.unknown, box=query.box)

    def get_event(self, event_id: str) -> dict[str, Any] | None:
        from storage.queries import get_event

        row = get_event(self.engine, event_id)
        return row.to_json() if row is not None else None

    def snapshot_file(self, event_id: str) -> Path | None:
        """The event's snapshot file, only inside ``<data dir>/snapshots`` or, for an analysis job's event,
        ``<data dir>/jobs/<its job id>/snapshots`` (a path elsewhere, e.g. from a tampered restored database,
        is never served)."""
        from storage.queries import get_event

        row = get_event(self.engine, event_id)
        if row is None or row.snapshot_path is None:
            return None
        if row.box_id is not None:
            raise ApiError(404, f"event {event_id} was reported by box {row.box_id}: its snapshot stays on that box "
                           "(a fleet hub receives no snapshots); ask that box's API")
        roots = [self.folder / "snapshots"] + ([self.folder / "jobs" / row.job_id / "snapshots"] if row.job_id else [])
        path = Path(row.snapshot_path).resolve()
        if not any(path.is_relative_to(root.resolve()) for root in roots):
            log.warning("event %s: snapshot %s is outside %s; not served", event_id, path, roots[-1])
            return None
        return path if path.is_file() else None

    # ---------------------------------------------------------- identities
    def list_identities(self) -> list[tuple[str, int, bool]]:
        from storage.queries import identity_overview

        return identity_overview(self.engine)

    def identity_face(self, name: str) -> bytes | None:
        from storage.queries import identity_sample

        return identity_sample(self.engine, name)

    def enroll(self, name: str, uploads: Sequence[Upload]) -> tuple[int, str]:
        from storage.queries import check_name

        check_name(name)
        analyzer = self.analyzer
        faces = enrollment_faces(analyzer, [(u.name, u.image) for u in uploads])
        shas = [hashlib.sha256(u.data).hexdigest() for u in uploads]
        folder = self.folder / "faces"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for u, sha in zip(uploads, shas):
            path = folder / f"{sha[:16]}-upload{_image_suffix(u.data)}"
            if not path.exists():
                path.write_bytes(u.data)
            paths.append(str(path))
        store_enrollment(self.engine, name, analyzer.model_name, [(u.image, f) for u, f in zip(uploads, faces)], paths, shas)
        return len(uploads), str(analyzer.model_name)

    def delete_identity(self, name: str) -> bool:
        from storage.queries import delete_identity

        return delete_identity(self.engine, name)

    def recognize(self, image: np.ndarray) -> dict[str, Any]:
        return identify_doc(self.engine, self.analyzer, self.cfg.recognition.face.match_threshold, image)

    def list_unknowns(self) -> list[dict[str, Any]]:
        from pipeline.identities import unknown_docs

        return unknown_docs(self.engine)

    def name_unknown(self, unknown: str, name: str) -> dict[str, Any]:
        from pipeline.identities import name_doc

        return name_doc(self.engine, unknown, name)

    def relabel_event(self, event_id: str, not_name: str | None, as_name: str | None) -> dict[str, Any]:
        from pipeline.identities import relabel_doc

        return relabel_doc(self.engine, self.cfg, event_id, not_name, as_name)

    # ------------------------------------------------------------- backups
    @property
    def backup_dir(self) -> Path:
        return self.folder / "backups"

    def list_backups(self) -> list[dict[str, Any]]:
        from storage.backup import list_backups

        return [_backup_doc(i) for i in list_backups(self.backup_dir)]

    def _sqlite_only(self) -> None:
        from storage.db import sqlite_path

        if sqlite_path(self.url) is None:
            raise ApiError(409, "backups handle SQLite databases only; back up PostgreSQL with pg_dump")

    def create_backup(self) -> dict[str, Any]:
        from storage.backup import create_backup, list_backups

        self._sqlite_only()
        path = create_backup(self.url, self.folder, self.config_path, self.backup_dir)
        return next(_backup_doc(i) for i in list_backups(self.backup_dir) if i.path.name == path.name)

    def backup_file(self, name: str) -> Path | None:
        path = self.backup_dir / name
        return path if "/" not in name and path.is_file() else None

    def restore_backup(self, name: str, running: bool) -> dict[str, Any]:
        from storage.backup import restore_backup
        from storage.db import upgrade

        if running:
            raise ApiError(409, f"restore refused: a pipeline is running with data dir {self.folder}; stop it first")
        self._sqlite_only()
        res = restore_backup(self.backup_dir / name, self.url, self.folder, running=False)
        with self._lock:
            if self._engine is not None:  # its connections point at the replaced file
                self._engine.dispose()
                self._engine = None
        revision = upgrade(self.url)
        return {"restored": name, "schema_revision": res.schema_revision, "revision": revision, "faces": len(res.faces),
                "config": str(res.config) if res.config else None, "previous": str(res.previous) if res.previous else None}


def _backup_doc(info: Any) -> dict[str, Any]:
    return {"name": info.path.name, "size": info.size, "created_at": info.created_at.isoformat() if info.created_at else None,
            "schema_revision": info.schema_revision, "files": info.files, "error": info.error}


def api_context(cfg: AppConfig, *, alone: bool, config_path: Path | None, threads: int,
                counters: StageCounters | None = None) -> ApiContext:
    """The app's context over ``cfg``'s database and the data dir's pipeline (:class:`~pipeline.api.PipelineLink`).

    Args:
        alone: ``facepro serve`` (health is the database's).
        config_path: the config file put into backups.
        threads: ONNX Runtime threads of the face models (1 inside a pipeline: the stages keep the cores).
        counters: the api process's counters.
    """
    folder = data_dir()
    backend = StorageBackend(cfg, folder, config_path, threads)
    return ApiContext(cfg, backend, PipelineLink(folder), alone=alone, counters=counters,
                      jobs=job_runner(cfg, backend, counters))


def job_runner(cfg: AppConfig, backend: StorageBackend, counters: StageCounters | None = None) -> Any:
    """The api's :class:`pipeline.jobs.JobRunner` over the ``jobs`` table of ``backend``'s database: analyze jobs
    run the clip through their own child pipeline (:class:`pipeline.job_analyze.AnalyzeJobs`), backup and enroll
    jobs call ``backend`` (the routes' code); finished jobs are deleted and pruned by
    :class:`pipeline.job_cleanup.JobCleanup` (``api.job_retention_days``). Not started: :func:`pipeline.api.serve`
    starts it."""
    from pipeline.api_data import check_image
    from pipeline.job_analyze import AnalyzeJobs
    from pipeline.job_cleanup import PRUNE_EVERY_S, JobCleanup
    from pipeline.jobs import JobRunner, backup_handler, enroll_handler
    from storage.jobs import JobTable

    handlers = {"analyze": AnalyzeJobs(cfg, backend.folder, backend.url), "backup": backup_handler(backend),
                "enroll": enroll_handler(backend, check_image)}
    errors = tuple(cls for cls, _ in backend.errors) + (ApiError,)
    table = JobTable(lambda: backend.engine)
    cleanup = JobCleanup(table, backend.folder, cfg.api.job_retention_days)
    return JobRunner(table, handlers, user_errors=errors, counters=counters, cleanup=cleanup, prune_every_s=PRUNE_EVERY_S)
