"""Background jobs of the HTTP API: the state machine, the runner thread, job paths, backup and enroll jobs.

A job is a row of the ``jobs`` table (revision 0006), so its state survives a page reload and a restart of
the api process. States and the only allowed moves (:data:`TRANSITIONS`)::

    queued ──► running ──► done | failed | cancelled
       └─────────────────► cancelled

:class:`JobRunner` runs one job at a time in a thread of the api process, oldest queued first. Each
type has a handler: ``analyze`` (:class:`pipeline.job_analyze.AnalyzeJobs`: the clip through its own
``facepro run`` child pipeline at a lower OS priority), ``backup`` and ``enroll`` (:func:`backup_handler`,
:func:`enroll_handler`: the :class:`~pipeline.api.Backend`'s code, as the routes). A handler returns the
job's result, raises :class:`JobFailed` (a clear one-line error), :class:`JobCancelled` or
:class:`JobInterrupted`; any other exception fails that job with its type and message (logged with the
traceback) and the runner goes on with the next one: no job can stop the runner.

Cancel (:meth:`JobRunner.cancel`): a queued job is cancelled at once; a running analyze job is
interrupted (its pipeline drains and stops; what it stored stays) and is ``cancelled`` within
:data:`CANCEL_WAIT_S`; running backup and enroll jobs take seconds and are not interruptible (409).

Restart (:meth:`JobRunner.start`): a job found ``running`` is given back to its handler when the handler
can continue it (an analyze job whose pipeline still runs, or ended with a run summary: see
:meth:`pipeline.job_analyze.AnalyzeJobs.recoverable`), before any queued job; otherwise it becomes
``failed`` with :data:`INTERRUPTED`. Queued jobs stay queued and run. A graceful stop of the api process
(:meth:`JobRunner.stop`) interrupts the running job like a cancel and records it ``failed`` ("interrupted:
the api process stopped"), so ``facepro run`` never leaves a job pipeline behind when it is stopped.

Delete and retention (:meth:`JobRunner.delete`, :meth:`JobRunner.prune`): a finished job is deleted with its
files by the injected cleanup (:class:`pipeline.job_cleanup.JobCleanup`), whose retention pass the runner's
thread runs at its start and every ``prune_every_s`` seconds, between jobs.

Job files (:func:`check_job_path`): an analyze job's ``source`` and an enroll job's ``images`` are absolute
paths of regular files under one of ``api.job_dirs``; ``..`` components and symbolic links (at or below
the job dir) are refused, and so is any path whose real location is outside its job dir.

Layering: framework; the store (:class:`JobStore`, the ``jobs`` table) and the backend come injected.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Protocol, Sequence

log = logging.getLogger("facepro.jobs")

STATES: tuple[str, ...] = ("queued", "running", "done", "failed", "cancelled")
TERMINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})
#: state → the states it may move to; anything else is refused.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled"}),
    "running": frozenset({"done", "failed", "cancelled"}),
    "done": frozenset(), "failed": frozenset(), "cancelled": frozenset(),
}
TYPES: tuple[str, ...] = ("analyze", "backup", "enroll")
#: Types whose running jobs can be cancelled.
CANCELLABLE: frozenset[str] = frozenset({"analyze"})
#: The longest a cancel of a running job takes until the job is ``cancelled``, seconds.
CANCEL_WAIT_S = 2.0
#: Error of a job found ``running`` after a restart that its handler cannot continue.
INTERRUPTED = "interrupted: the api process stopped while the job ran; submit it again"
#: Error of a job interrupted by a graceful stop of the api process.
STOPPED = "interrupted: the api process stopped (facepro run or serve was stopped); submit it again"


class JobConflict(Exception):
    """A request the job's state refuses (cancel a finished job, an invalid transition): HTTP 409."""


class JobRequestError(ValueError):
    """A job request that cannot be accepted; ``status``: 400 bad value, 403 a path refused by the job_dirs
    rule, 404 no such file."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class JobFailed(Exception):
    """A handler's clear failure: ``str(err)`` becomes the job's error, ``result`` what it left (or None)."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result


class JobCancelled(JobFailed):
    """The job stopped because it was cancelled; ``result`` is what it did before."""


class JobInterrupted(JobFailed):
    """The job stopped because the api process is stopping."""


def predecessors(state: str) -> frozenset[str]:
    """The states from which a job may move to ``state``."""
    return frozenset(s for s, nxt in TRANSITIONS.items() if state in nxt)


def check_transition(old: str, new: str) -> None:
    """Refuse a move the state machine does not allow.

    Raises:
        JobConflict: ``new`` is not in ``TRANSITIONS[old]`` (or either state is unknown).
    """
    if new not in TRANSITIONS.get(old, frozenset()):
        allowed = ", ".join(sorted(TRANSITIONS.get(old, ()))) or "nothing (it is finished)"
        raise JobConflict(f"a {old} job cannot become {new}; it can become: {allowed}")


def utcnow() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(timezone.utc)


class JobRecord(Protocol):
    """A stored job (:class:`storage.jobs.JobRow`)."""

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


class JobStore(Protocol):
    """The ``jobs`` table (:class:`storage.jobs.JobTable`); methods raise the backend's storage errors."""

    def create(self, job_id: str, job_type: str, params: dict[str, Any], source: str | None = None,
               frames_total: int | None = None) -> JobRecord:
        """Insert a queued job."""

    def get(self, job_id: str) -> JobRecord | None:
        """One job, None when unknown."""

    def list(self, state: str | None = None, limit: int = 100, oldest_first: bool = False) -> list[JobRecord]:
        """Jobs newest first (or oldest first), optionally of one state."""

    def set_state(self, job_id: str, state: str, expect: Collection[str], **fields: Any) -> JobRecord | None:
        """Compare-and-set: move to ``state`` only from one of ``expect``; None when nothing changed."""

    def set_progress(self, job_id: str, frames_done: int, frames_total: int | None, progress: float,
                     pid: int | None = None) -> bool:
        """Record a running job's progress; False when it is not running."""

    def count_events(self, job_id: str) -> int:
        """Events stored by the job's pipeline."""


Handler = Callable[[JobRecord, "JobControl"], dict[str, Any]]


# ------------------------------------------------------------------ paths
def check_job_path(raw: str, job_dirs: Sequence[Path]) -> Path:
    """The file ``raw`` if the job_dirs rule allows it (module docstring).

    Returns:
        The path, normalised (not resolved: what the job will open).

    Raises:
        JobRequestError: 400 not an absolute path or not a regular file; 403 ``..``, a link, or outside every
            job dir (or ``api.job_dirs`` empty); 404 no such file under the job dir.
    """
    if not job_dirs:
        raise JobRequestError(403, "api.job_dirs is empty: jobs read no files from the box; upload the clip "
                                   "(POST /api/uploads) or add its folder to api.job_dirs")
    if "\x00" in raw or not raw.startswith("/"):
        raise JobRequestError(400, f"{raw!r}: give an absolute path under one of api.job_dirs")
    if ".." in raw.split("/"):
        raise JobRequestError(403, f"{raw}: '..' is not allowed in job paths")
    path = Path(os.path.normpath(raw))
    for folder in job_dirs:
        root = Path(os.path.normpath(os.path.abspath(os.path.expanduser(folder))))
        if path != root and path.is_relative_to(root):
            return _walk_below(root, path, raw)
    raise JobRequestError(403, f"{raw}: outside api.job_dirs ({', '.join(str(d) for d in job_dirs)})")


def _walk_below(root: Path, path: Path, raw: str) -> Path:
    """Every component of ``path`` below ``root`` exists and is no link; the last is a regular file."""
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            raise JobRequestError(404, f"{raw}: no such file under {root}") from None
        except OSError as err:
            raise JobRequestError(403, f"{raw}: cannot be checked ({err.strerror})") from None
        if stat.S_ISLNK(mode):
            raise JobRequestError(403, f"{raw}: {current} is a symbolic link; links are not followed in job paths")
    if not stat.S_ISREG(mode):
        raise JobRequestError(400, f"{raw}: not a regular file")
    if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root)):
        raise JobRequestError(403, f"{raw}: its real location is outside {root}")
    return path


# ----------------------------------------------------------------- control
class JobControl:
    """What a running job's handler sees: the cancel and stop flags, waiting, progress reporting.

    Args:
        runner: the runner.
        job: the job (as claimed).
        report_every_s: progress is written to the store at most this often, seconds (``force`` writes now).
    """

    def __init__(self, runner: JobRunner, job: JobRecord, report_every_s: float = 0.5) -> None:
        self.runner = runner
        self.job = job
        self.report_every_s = report_every_s
        self.frames_done = job.frames_done
        self.frames_total = job.frames_total
        self._reported_at = float("-inf")

    @property
    def cancel_requested(self) -> bool:
        """True once this job was asked to cancel."""
        return self.runner.cancel_requested(self.job.id)

    @property
    def stopping(self) -> bool:
        """True once the api process is stopping."""
        return self.runner.stopping

    def should_stop(self) -> bool:
        """True once the job is cancelled or the api process is stopping."""
        return self.cancel_requested or self.stopping

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, woken early by a cancel or a stop; returns :meth:`should_stop`."""
        interrupt = self.runner.interrupt
        if interrupt.wait(seconds) and not self.should_stop():
            interrupt.clear()  # a cancel of another job: not ours (ours is checked again at every wait)
        return self.should_stop()

    def report(self, frames_done: int, frames_total: int | None, *, pid: int | None = None,
               cpu_percent: float | None = None, force: bool = False) -> None:
        """Record progress: ``frames_done`` of ``frames_total`` (progress = their ratio, 0 while the total is
        unknown); ``pid`` of the job's pipeline; ``cpu_percent`` of its processes (100 = one core, shown as
        the api's ``job_cpu_percent`` count). Written at most every ``report_every_s`` unless ``force``."""
        self.frames_done, self.frames_total = int(frames_done), frames_total
        self.runner.note(frames_done=self.frames_done, cpu_percent=cpu_percent)
        now = self.runner.clock()
        if not force and pid is None and now - self._reported_at < self.report_every_s:
            return
        self._reported_at = now
        progress = frames_done / frames_total if frames_total else 0.0
        try:
            self.runner.store.set_progress(self.job.id, self.frames_done, frames_total, progress, pid=pid)
        except Exception:  # noqa: BLE001 - progress is best effort (a locked database): the next report retries
            if pid is not None:
                raise  # the pid is what lets a restarted api continue the job: not optional
            log.warning("job %s: progress not recorded", self.job.id, exc_info=True)
            self._reported_at = float("-inf")

    def count_events(self) -> int:
        """Events stored so far with this job's id."""
        return self.runner.store.count_events(self.job.id)


# ------------------------------------------------------------------ runner
class JobRunner:
    """Runs queued jobs one at a time in a thread (module docstring).

    Args:
        store: the ``jobs`` table.
        handlers: job type → handler (a handler may have ``recoverable(job) -> bool``: it can continue a job
            found running at start).
        user_errors: exception classes whose message is a clear job error (the backend's ``errors``).
        counters: the api process's counters (``jobs_queued``, ``jobs_running``, ``job_frames``,
            ``job_cpu_percent``), None for none.
        poll_s: how often the thread looks for queued jobs when nobody wakes it, seconds.
        clock: monotonic seconds.
        cleanup: deletes finished jobs and prunes old ones (:class:`pipeline.job_cleanup.JobCleanup`); its
            ``prune()`` runs in the thread at the start and every ``prune_every_s`` seconds, between jobs.
            None: :meth:`delete` is refused.
        prune_every_s: seconds between two prunes.
    """

    def __init__(self, store: JobStore, handlers: Mapping[str, Handler], *,
                 user_errors: Sequence[type[BaseException]] = (), counters: Any = None, poll_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, cleanup: Any = None,
                 prune_every_s: float = 3600.0) -> None:
        self.store = store
        self.cleanup = cleanup
        self.prune_every_s = prune_every_s
        self._pruned_at = float("-inf")
        self.handlers = dict(handlers)
        self.user_errors = tuple(user_errors)
        self.counters = counters
        self.poll_s = poll_s
        self.clock = clock
        self.wake = threading.Event()  # a job was queued, or the runner is stopping
        self.interrupt = threading.Event()  # the running job may have to stop (a cancel, a stop)
        self._stop = threading.Event()
        self._lock = threading.Condition()
        self._cancel: set[str] = set()
        self._current: str | None = None
        self._resume: list[JobRecord] = []
        self._recovered = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ requests
    def submit(self, job_type: str, params: dict[str, Any], source: str | None = None,
               frames_total: int | None = None) -> JobRecord:
        """Queue a job; returns it (``queued``). The runner thread is woken.

        Raises:
            JobRequestError: 400 an unknown type.
        """
        if job_type not in self.handlers:
            raise JobRequestError(400, f"unknown job type {job_type!r}; known: {', '.join(sorted(self.handlers))}")
        job = self.store.create(str(uuid.uuid4()), job_type, params, source, frames_total)
        self._wakeup()
        return job

    def get(self, job_id: str) -> JobRecord | None:
        """One job from the store, None when unknown."""
        return self.store.get(job_id)

    def list(self, state: str | None = None, limit: int = 100) -> list[JobRecord]:
        """Jobs newest first, optionally of one ``state`` (at most ``limit``)."""
        return self.store.list(state, limit)

    def cancel(self, job_id: str, wait_s: float = CANCEL_WAIT_S + 1.0) -> JobRecord:
        """Cancel a job: a queued one at once; a running analyze job is interrupted and this returns once it is
        ``cancelled`` (at most ``wait_s`` seconds; the state is then whatever it reached).

        Raises:
            KeyError: no such job.
            JobConflict: it is finished, or running and of a type that cannot be interrupted.
        """
        job = self.store.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state == "running" and job.type not in CANCELLABLE:
            raise JobConflict(f"a running {job.type} job cannot be cancelled (it takes seconds); wait for it")
        check_transition(job.state, "cancelled")
        with self._lock:
            self._cancel.add(job_id)
        got = self.store.set_state(job_id, "cancelled", {"queued"}, error="cancelled by request", ended_at=utcnow())
        if got is not None:
            self._forget(job_id)
            return got
        self.interrupt.set()
        deadline = time.monotonic() + wait_s
        with self._lock:
            while self._current == job_id and time.monotonic() < deadline:
                self._lock.wait(0.05)
        job = self.store.get(job_id)
        assert job is not None
        if job.state in TERMINAL:
            self._forget(job_id)
        return job

    def delete(self, job_id: str, events: bool = False) -> Any:
        """Delete a finished job, its files and (``events``) its events: :meth:`pipeline.job_cleanup.JobCleanup.delete`.

        Raises:
            KeyError: no such job.
            JobConflict: it is queued or running (cancel it first), or no cleanup is configured.
        """
        if self.cleanup is None:
            raise JobConflict("jobs cannot be deleted in this process")
        return self.cleanup.delete(job_id, events)

    def prune(self, force: bool = False) -> Any:
        """Run the cleanup's retention pass when ``prune_every_s`` has passed since the last one (or ``force``);
        returns its result, None when not run. A failure is logged (the next pass retries)."""
        now = self.clock()
        if self.cleanup is None or (not force and now - self._pruned_at < self.prune_every_s):
            return None
        self._pruned_at = now
        try:
            return self.cleanup.prune()
        except Exception:  # noqa: BLE001 - retention never stops the runner
            log.exception("job retention failed; retried in %.0f s", self.prune_every_s)
            return None

    def cancel_requested(self, job_id: str) -> bool:
        """True once :meth:`cancel` was called for ``job_id`` (until the job is finished)."""
        with self._lock:
            return job_id in self._cancel

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._cancel.discard(job_id)

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def _wakeup(self) -> None:
        self.wake.set()

    def note(self, frames_done: int | None = None, cpu_percent: float | None = None) -> None:
        """Counters of the running job (``job_frames``, ``job_cpu_percent``)."""
        if self.counters is None:
            return
        if frames_done is not None:
            self.counters.extra["job_frames"] = int(frames_done)
        if cpu_percent is not None:
            self.counters.extra["job_cpu_percent"] = int(round(cpu_percent))

    # ---------------------------------------------------------- lifecycle
    def start(self) -> JobRunner:
        """Start the thread (it first recovers jobs found running, then runs the queue)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jobs", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread: a running job is interrupted (recorded ``failed``: :data:`STOPPED`); queued jobs stay."""
        self._stop.set()
        self._wakeup()
        self.interrupt.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def recover(self) -> None:
        """Jobs found ``running`` (module docstring): continued by their handler first, or ``failed``."""
        for job in self.store.list("running", limit=10_000, oldest_first=True):
            handler = self.handlers.get(job.type)
            can = getattr(handler, "recoverable", None)
            if can is not None and can(job):
                log.info("job %s (%s) was running when the api process stopped; continuing it", job.id, job.type)
                self._resume.append(job)
            else:
                log.warning("job %s (%s) was running when the api process stopped; marked failed", job.id, job.type)
                self.store.set_state(job.id, "failed", {"running"}, error=INTERRUPTED, ended_at=utcnow(), pid=None)
        self._recovered = True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._recovered:
                    self.recover()
                job = self._next()
                self._count()
                if job is None:
                    self.prune()
                    self.wake.wait(self.poll_s)
                    self.wake.clear()
                    continue
                self._run(job)
            except Exception:  # noqa: BLE001 - a database error must not end the runner: log, wait, go on
                log.exception("job runner")
                self._stop.wait(self.poll_s)

    def _next(self) -> JobRecord | None:
        if self._resume:
            return self._resume.pop(0)
        for job in self.store.list("queued", limit=1, oldest_first=True):
            with self._lock:
                self._current = job.id
            claimed = self.store.set_state(job.id, "running", {"queued"}, started_at=utcnow())
            if claimed is not None:
                return claimed
            self._done_with(job.id)  # cancelled (or taken) between the listing and the claim
        return None

    def _count(self) -> None:
        if self.counters is None:
            return
        self.counters.extra["jobs_queued"] = len(self.store.list("queued", limit=10_000))
        self.counters.extra["jobs_running"] = 1 if self._current else 0

    def _done_with(self, job_id: str) -> None:
        with self._lock:
            self._current = None
            self._lock.notify_all()

    def _run(self, job: JobRecord) -> None:
        with self._lock:
            self._current = job.id
        self._count()
        ctl = JobControl(self, job)
        try:
            state, fields = self._outcome(job, ctl)
            self._finish(job, state, fields)
        finally:
            self.note(frames_done=0, cpu_percent=0.0)
            self._done_with(job.id)
            self._forget(job.id)

    def _outcome(self, job: JobRecord, ctl: JobControl) -> tuple[str, dict[str, Any]]:
        """Run the handler; the final state and the fields to store with it."""
        ended = {"ended_at": utcnow(), "pid": None}
        try:
            result = self.handlers[job.type](job, ctl)
        except JobCancelled as c:
            return "cancelled", {**ended, "error": "cancelled by request", "result": c.result}
        except JobInterrupted as i:
            return "failed", {**ended, "error": str(i) or STOPPED, "result": i.result}
        except JobFailed as f:
            return "failed", {**ended, "error": str(f), "result": f.result}
        except self.user_errors as err:  # type: ignore[misc]
            return "failed", {**ended, "error": _one_line(err)}
        except Exception as err:  # noqa: BLE001 - a failing job never stops the runner
            log.exception("job %s (%s) failed", job.id, job.type)
            return "failed", {**ended, "error": f"internal error: {type(err).__name__}: {_one_line(err)}"}
        total = ctl.frames_total if ctl.frames_total is not None else (ctl.frames_done or None)
        return "done", {**ended, "progress": 1.0, "result": result, "frames_done": ctl.frames_done,
                        "frames_total": total}

    def _finish(self, job: JobRecord, state: str, fields: dict[str, Any], attempts: int = 5) -> None:
        """Store the final state (retried: a locked database must not leave the job running)."""
        check_transition("running", state)
        ended = {**fields, "ended_at": utcnow()}
        for attempt in range(attempts):
            try:
                if self.store.set_state(job.id, state, {"running"}, **ended) is None:
                    log.warning("job %s: not running any more; its outcome (%s) was not stored", job.id, state)
                return
            except Exception:  # noqa: BLE001
                if attempt == attempts - 1:
                    raise
                log.warning("job %s: storing its outcome failed; retrying", job.id, exc_info=True)
                time.sleep(0.2 * (attempt + 1))


def _one_line(err: BaseException) -> str:
    text = str(getattr(err, "message", "") or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------- backup, enroll
def backup_handler(backend: Any) -> Handler:
    """A backup job: ``backend.create_backup()`` (``facepro backup create``); the result is the archive's entry."""

    def run(job: JobRecord, ctl: JobControl) -> dict[str, Any]:
        """Write the archive; raises the backend's errors (409: not SQLite)."""
        return dict(backend.create_backup())

    return run


def enroll_handler(backend: Any, decode: Callable[[str, bytes], Any]) -> Handler:
    """An enroll job: the image files ``params["images"]`` (checked when queued) enrolled for ``params["name"]``
    with ``backend.enroll`` (the checks of ``facepro enroll``: nothing is stored unless every image shows one
    face); ``decode(name, data)`` checks and decodes one image. Result: ``{"name", "added", "model"}``."""

    def run(job: JobRecord, ctl: JobControl) -> dict[str, Any]:
        """Enroll the images; raises JobFailed (unreadable file) or the backend's errors (no single face...)."""
        uploads = []
        for path in job.params["images"]:
            try:
                data = Path(path).read_bytes()
            except OSError as err:
                raise JobFailed(f"{path}: cannot be read ({err.strerror})") from None
            uploads.append(decode(Path(path).name, data))
        ctl.report(0, len(uploads), force=True)
        added, model = backend.enroll(job.params["name"], uploads)
        ctl.report(len(uploads), len(uploads))
        return {"name": job.params["name"], "added": int(added), "model": model}

    return run
