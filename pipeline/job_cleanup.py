"""Deleting finished jobs (``DELETE /api/jobs/{id}``) and the retention of old ones (``api.job_retention_days``).

What a job leaves: its row in the ``jobs`` table; for an analyze job its folder ``<data dir>/jobs/<job id>/``
(the child pipeline's config, ``job.log``, run summary and runtime files, and ``snapshots/`` of its events)
and, until the job ran, its uploaded clip ``<data dir>/uploads/<upload id>.*``; and the events its pipeline
stored (``events.job_id``), which are results like a live camera's.

:meth:`JobCleanup.delete` removes one finished job (``done``, ``failed``, ``cancelled``; a queued or
running job is refused: cancel it first): its row, its upload, and its folder except ``snapshots/`` while
its events stay (they show those snapshots); with ``events=True`` also its events (their vectors and
snapshot rows by ``ON DELETE CASCADE``) and then the whole folder. The row goes first (compare-and-delete: a
job claimed meanwhile is refused, nothing removed), files after it.

:meth:`JobCleanup.prune` is the retention pass, run by the job runner's thread at its start and every
:data:`PRUNE_EVERY_S` seconds (:class:`pipeline.jobs.JobRunner`): finished jobs that ended more than
``api.job_retention_days`` days ago are deleted as above, keeping their events (events have their own
retention, ``storage.retention_days``); then every job folder that neither a job row nor an event refers to
any more (its events were deleted by retention or with the job) is removed, and uploads no job used for a
day (:func:`pipeline.job_analyze.prune_uploads`).

Files are removed with :func:`shutil.rmtree`, which unlinks symbolic links instead of following them (the
folder's ``trt-cache`` link to the live data dir's engines stays intact). Only names that are job ids
(canonical UUIDs) under ``<data dir>/jobs`` and ``<data dir>/uploads`` are ever touched.

Layering: framework; the ``jobs`` table comes injected (:class:`JobFiles`, :class:`storage.jobs.JobTable`).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Collection, Protocol

from pipeline.job_analyze import UPLOAD_ID, job_paths, prune_uploads
from pipeline.jobs import TERMINAL, JobConflict, JobRecord

log = logging.getLogger("facepro.jobs")

#: How often the job runner runs :meth:`JobCleanup.prune`, seconds.
PRUNE_EVERY_S = 3600.0
#: Most jobs deleted by one prune (the next one goes on).
PRUNE_BATCH = 1000
#: The folder of a job's event snapshots, kept while its events are.
SNAPSHOTS = "snapshots"


class JobFiles(Protocol):
    """What the cleanup needs of the ``jobs`` table (:class:`storage.jobs.JobTable`)."""

    def get(self, job_id: str) -> JobRecord | None:
        """One job, None when unknown."""

    def delete(self, job_id: str) -> bool:
        """Delete a finished job's row; False when none or not finished."""

    def delete_events(self, job_id: str) -> int:
        """Delete the job's events; how many."""

    def count_events(self, job_id: str) -> int:
        """The job's events."""

    def finished_before(self, cutoff: datetime, limit: int = 1000) -> list[JobRecord]:
        """Finished jobs that ended before ``cutoff``, oldest first."""

    def referenced(self, job_ids: Collection[str]) -> set[str]:
        """The ids that still have a job row or an event."""


@dataclass(frozen=True)
class Deleted:
    """What :meth:`JobCleanup.delete` removed: ``events_deleted`` and ``events_kept`` (the job's events),
    ``files`` (files and folders removed: the upload, the job folder's entries)."""

    job: str
    events_deleted: int
    events_kept: int
    files: int

    def to_json(self) -> dict[str, Any]:
        """``{"deleted": job id, "events_deleted", "events_kept", "files"}``."""
        return {"deleted": self.job, "events_deleted": self.events_deleted, "events_kept": self.events_kept,
                "files": self.files}


@dataclass(frozen=True)
class Pruned:
    """What :meth:`JobCleanup.prune` removed: ``jobs`` (rows), ``folders`` (job folders no row or event
    refers to), ``uploads`` (stale upload files)."""

    jobs: int
    folders: int
    uploads: int


def utcnow() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(timezone.utc)


class JobCleanup:
    """Deletes finished jobs and prunes old ones (module docstring).

    Args:
        store: the ``jobs`` table.
        data_dir: the data dir (``jobs/``, ``uploads/``).
        retention_days: finished jobs older than this are pruned (``api.job_retention_days``, > 0).
        clock: aware UTC "now".
    """

    def __init__(self, store: JobFiles, data_dir: Path, retention_days: float,
                 clock: Callable[[], datetime] = utcnow) -> None:
        if not retention_days > 0:
            raise ValueError(f"retention_days: expected > 0, got {retention_days}")
        self.store = store
        self.data_dir = data_dir
        self.retention = timedelta(days=retention_days)
        self.clock = clock

    def delete(self, job_id: str, events: bool = False) -> Deleted:
        """Delete finished job ``job_id`` (module docstring); ``events``: its events too.

        Raises:
            KeyError: no such job.
            JobConflict: the job is queued or running (cancel it first), or was claimed meanwhile.
        """
        job = self.store.get(job_id)
        if job is not None and job.state in TERMINAL and self.store.delete(job_id):
            return self._remove(job, events)
        job = self.store.get(job_id)  # not deleted: unknown, unfinished, or deleted meanwhile
        if job is None:
            raise KeyError(job_id)
        raise JobConflict(f"a {job.state} job cannot be deleted; cancel it first (POST /api/jobs/{job_id}/cancel), "
                          "then delete it")

    def _remove(self, job: JobRecord, events: bool) -> Deleted:
        """After the row is gone: the events (when asked), the upload and the job's files."""
        deleted = self.store.delete_events(job.id) if events else 0
        kept = 0 if events else self.store.count_events(job.id)
        files = self._drop_upload(job) + self._drop_folder(job.id, keep_snapshots=kept > 0)
        log.info("job %s deleted: %d event(s) deleted, %d kept, %d file(s) removed", job.id, deleted, kept, files)
        return Deleted(job.id, deleted, kept, files)

    def _drop_upload(self, job: JobRecord) -> int:
        upload = str(job.params.get("upload") or "")
        if not UPLOAD_ID.match(upload):
            return 0
        removed = 0
        for path in (self.data_dir / "uploads").glob(f"{upload}*"):
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _drop_folder(self, job_id: str, keep_snapshots: bool) -> int:
        """Remove the job's folder (all but ``snapshots/`` when ``keep_snapshots``); entries removed."""
        folder = job_paths(self.data_dir, job_id).folder
        if not UPLOAD_ID.match(job_id) or not folder.is_dir() or folder.is_symlink():
            return 0
        if not keep_snapshots:
            shutil.rmtree(folder, ignore_errors=True)
            return 1
        removed = 0
        for entry in folder.iterdir():
            if entry.name == SNAPSHOTS and entry.is_dir() and not entry.is_symlink():
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def prune(self) -> Pruned:
        """The retention pass (module docstring); errors of one job are logged and the pass goes on."""
        cutoff = self.clock() - self.retention
        jobs = 0
        for job in self.store.finished_before(cutoff, PRUNE_BATCH):
            try:
                if self.store.delete(job.id):
                    self._remove(job, events=False)
                    jobs += 1
            except OSError:
                log.warning("job %s: its files could not all be removed", job.id, exc_info=True)
        folders = self._sweep()
        uploads = prune_uploads(self.data_dir / "uploads")
        if jobs or folders or uploads:
            log.info("job retention: %d job(s) older than %s removed, %d unused job folder(s), %d stale upload(s)",
                     jobs, self.retention, folders, uploads)
        return Pruned(jobs, folders, uploads)

    def _sweep(self) -> int:
        """Remove the job folders that no job row and no event refers to."""
        root = self.data_dir / "jobs"
        names = [p.name for p in root.iterdir() if UPLOAD_ID.match(p.name) and p.is_dir() and not p.is_symlink()] \
            if root.is_dir() else []
        if not names:
            return 0
        used = self.store.referenced(names)
        gone = [n for n in names if n not in used]
        for name in gone:
            shutil.rmtree(root / name, ignore_errors=True)
        return len(gone)
