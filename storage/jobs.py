"""The ``jobs`` table: background jobs of the HTTP API, their state, progress and result.

:class:`JobTable` is the store the job runner (:mod:`pipeline.jobs`) is given by the wiring
(:mod:`pipeline.services`). State changes are compare-and-set: :meth:`JobTable.set_state` changes a row
only while it is in one of the states the caller expects (the state machine itself,
:data:`pipeline.jobs.TRANSITIONS`, says which), in one statement, so two writers can never both move a
job (a cancel racing the runner's start, two api processes).

``params`` and ``result`` are JSON objects stored as text; times are aware UTC datetimes.

Raises (every method):
    StorageError: locked or unreachable database, failed statement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Collection

from sqlalchemy import Engine, delete, func, insert, select, update

from storage.db import storage_errors
from storage.models import JOB_STATES, JOB_TYPES, PATH_LEN, Event, Job, utcnow

#: Largest ``limit`` of :meth:`JobTable.list`.
MAX_JOBS = 10_000
#: Events deleted per transaction by :meth:`JobTable.delete_events` (the live writer waits at most one).
EVENT_CHUNK = 500
#: Finished states: the only ones :meth:`JobTable.delete` removes.
FINISHED = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class JobRow:
    """One job as stored.

    Attributes:
        id: canonical UUID text.
        type: ``analyze``, ``backup`` or ``enroll``.
        state: ``queued``, ``running``, ``done``, ``failed`` or ``cancelled``.
        params: the job's parameters (JSON object).
        source: what it reads, for display (a path under ``api.job_dirs``, ``upload:<file name>``), or None.
        progress: 0..1.
        frames_done: frames analysed so far (analyze jobs; 0 otherwise).
        frames_total: frames of the clip, None when unknown.
        result: the result (JSON object) once done (or what a cancelled job left), else None.
        error: why it failed or was cancelled, one line; None otherwise.
        pid: the job's pipeline process while it runs (analyze), else None.
        created_at, started_at, ended_at, updated_at: aware UTC datetimes (None: not yet).
    """

    id: str
    type: str
    state: str
    params: dict[str, Any]
    source: str | None
    progress: float
    frames_done: int
    frames_total: int | None
    result: dict[str, Any] | None
    error: str | None
    pid: int | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    updated_at: datetime


def _row(m: Any) -> JobRow:
    """A :class:`JobRow` from a row mapping of ``select(Job)``."""
    return JobRow(id=m["id"], type=m["type"], state=m["state"], params=json.loads(m["params"]), source=m["source"],
                  progress=float(m["progress"]), frames_done=int(m["frames_done"]), frames_total=m["frames_total"],
                  result=json.loads(m["result"]) if m["result"] is not None else None, error=m["error"], pid=m["pid"],
                  created_at=m["created_at"], started_at=m["started_at"], ended_at=m["ended_at"],
                  updated_at=m["updated_at"])


#: Columns :meth:`JobTable.set_state` may change with the state.
_STATE_FIELDS = frozenset({"progress", "frames_done", "frames_total", "result", "error", "pid", "started_at", "ended_at"})


class JobTable:
    """The ``jobs`` table over an engine (schema at head, revision 0006 or later).

    Args:
        engine: an engine, or a callable returning one (opened on first use).
    """

    def __init__(self, engine: Engine | Callable[[], Engine]) -> None:
        self._engine = engine

    @property
    def engine(self) -> Engine:
        """The engine (opened by the callable on first use)."""
        return self._engine if isinstance(self._engine, Engine) else self._engine()

    def create(self, job_id: str, job_type: str, params: dict[str, Any], source: str | None = None,
               frames_total: int | None = None) -> JobRow:
        """Insert a ``queued`` job.

        Raises:
            ValueError: unknown type, an id that is not 36 characters, a source longer than its column.
        """
        if job_type not in JOB_TYPES:
            raise ValueError(f"job type: expected one of {', '.join(JOB_TYPES)}, got {job_type!r}")
        if len(job_id) != 36:
            raise ValueError(f"job id: expected a canonical UUID (36 characters), got {job_id!r}")
        if source is not None and len(source) > PATH_LEN:
            raise ValueError(f"job source: at most {PATH_LEN} characters")
        now = utcnow()
        values = {"id": job_id, "type": job_type, "state": "queued", "params": json.dumps(params), "source": source,
                  "progress": 0.0, "frames_done": 0, "frames_total": frames_total, "created_at": now, "updated_at": now}
        with storage_errors(self.engine.url, "creating a job"), self.engine.begin() as conn:
            conn.execute(insert(Job), [values])
        got = self.get(job_id)
        assert got is not None
        return got

    def get(self, job_id: str) -> JobRow | None:
        """The job ``job_id``, None when there is none."""
        with storage_errors(self.engine.url, "reading a job"), self.engine.connect() as conn:
            row = conn.execute(select(Job).where(Job.id == job_id)).first()
        return _row(row._mapping) if row is not None else None

    def list(self, state: str | None = None, limit: int = 100, oldest_first: bool = False) -> list[JobRow]:
        """Jobs newest first (``oldest_first``: the queue order), optionally of one state.

        Raises:
            ValueError: ``limit`` out of 1..:data:`MAX_JOBS`, or an unknown state.
        """
        if not 1 <= limit <= MAX_JOBS:
            raise ValueError(f"limit: expected 1 to {MAX_JOBS}, got {limit}")
        if state is not None and state not in JOB_STATES:
            raise ValueError(f"state: expected one of {', '.join(JOB_STATES)}, got {state!r}")
        order = (Job.created_at.asc(), Job.id.asc()) if oldest_first else (Job.created_at.desc(), Job.id.desc())
        stmt = select(Job).order_by(*order).limit(limit)
        if state is not None:
            stmt = stmt.where(Job.state == state)
        with storage_errors(self.engine.url, "listing jobs"), self.engine.connect() as conn:
            return [_row(r._mapping) for r in conn.execute(stmt)]

    def set_state(self, job_id: str, state: str, expect: Collection[str], **fields: Any) -> JobRow | None:
        """Move the job to ``state`` (with ``fields``: progress, frames_done, frames_total, result, error, pid,
        started_at, ended_at) only while its state is one of ``expect``; one statement.

        Returns:
            The updated job, or None when it does not exist or is in another state (nothing changed).

        Raises:
            ValueError: an unknown state or field.
        """
        if state not in JOB_STATES or not set(expect) <= set(JOB_STATES):
            raise ValueError(f"state: expected one of {', '.join(JOB_STATES)}, got {state!r} (from {sorted(expect)})")
        unknown = set(fields) - _STATE_FIELDS
        if unknown:
            raise ValueError(f"set_state: unknown field(s) {', '.join(sorted(unknown))}")
        values = dict(fields, state=state, updated_at=utcnow())
        if "result" in values and values["result"] is not None:
            values["result"] = json.dumps(values["result"])
        stmt = update(Job).where(Job.id == job_id, Job.state.in_(list(expect))).values(**values)
        with storage_errors(self.engine.url, "changing a job's state"), self.engine.begin() as conn:
            changed = conn.execute(stmt).rowcount
        return self.get(job_id) if changed else None

    def set_progress(self, job_id: str, frames_done: int, frames_total: int | None, progress: float,
                     pid: int | None = None) -> bool:
        """Record a running job's progress (``progress`` clamped to 0..1; ``pid`` kept unless given).

        Returns:
            False when the job is not ``running`` (nothing changed).
        """
        values: dict[str, Any] = {"frames_done": int(frames_done), "frames_total": frames_total,
                                  "progress": min(1.0, max(0.0, float(progress))), "updated_at": utcnow()}
        if pid is not None:
            values["pid"] = int(pid)
        stmt = update(Job).where(Job.id == job_id, Job.state == "running").values(**values)
        with storage_errors(self.engine.url, "recording a job's progress"), self.engine.begin() as conn:
            return bool(conn.execute(stmt).rowcount)

    def count_events(self, job_id: str) -> int:
        """Events stored with ``events.job_id = job_id``."""
        stmt = select(func.count()).select_from(Event).where(Event.job_id == job_id)
        with storage_errors(self.engine.url, "counting a job's events"), self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def delete(self, job_id: str) -> bool:
        """Delete the job's row if it is finished (``done``, ``failed``, ``cancelled``); one statement, so a job
        claimed meanwhile is never deleted. Its events are not touched (:meth:`delete_events`).

        Returns:
            True when a row was deleted; False when there is none or it is queued or running.
        """
        stmt = delete(Job).where(Job.id == job_id, Job.state.in_(FINISHED))
        with storage_errors(self.engine.url, "deleting a job"), self.engine.begin() as conn:
            return bool(conn.execute(stmt).rowcount)

    def delete_events(self, job_id: str) -> int:
        """Delete the events stored with ``events.job_id = job_id`` (with their vectors and snapshot rows, by
        ``ON DELETE CASCADE``), in transactions of at most :data:`EVENT_CHUNK` events; returns how many. Their
        snapshot files lie in the job's folder (the caller removes it)."""
        deleted = 0
        while True:
            ids = select(Event.id).where(Event.job_id == job_id).limit(EVENT_CHUNK).scalar_subquery()
            with storage_errors(self.engine.url, "deleting a job's events"), \
                    self.engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
                n = conn.execute(delete(Event).where(Event.id.in_(ids))).rowcount
            deleted += n
            if n < EVENT_CHUNK:
                return deleted

    def finished_before(self, cutoff: datetime, limit: int = 1000) -> list[JobRow]:
        """Finished jobs that ended (or, without an end time, were created) before ``cutoff`` (aware UTC), oldest
        first, at most ``limit``."""
        ended = func.coalesce(Job.ended_at, Job.created_at)
        stmt = (select(Job).where(Job.state.in_(FINISHED), ended < cutoff)
                .order_by(ended.asc(), Job.id.asc()).limit(limit))
        with storage_errors(self.engine.url, "listing old jobs"), self.engine.connect() as conn:
            return [_row(r._mapping) for r in conn.execute(stmt)]

    def referenced(self, job_ids: Collection[str]) -> set[str]:
        """The ``job_ids`` that still have a job row or an event (whose snapshot may lie in the job's folder)."""
        ids, found = sorted(set(job_ids)), set()
        with storage_errors(self.engine.url, "looking up jobs"), self.engine.connect() as conn:
            for i in range(0, len(ids), EVENT_CHUNK):
                part = ids[i:i + EVENT_CHUNK]
                found.update(conn.execute(select(Job.id).where(Job.id.in_(part))).scalars())
                found.update(conn.execute(select(Event.job_id).where(Event.job_id.in_(part)).distinct()).scalars())
        return found
