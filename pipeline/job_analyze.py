"""Analyze jobs: a clip through the same stages as a camera, in its own ``facepro run`` child pipeline.

How a job runs. :class:`AnalyzeJobs` (the ``analyze`` handler of :class:`pipeline.jobs.JobRunner`) writes
a derived config (:func:`job_config`: one camera ``job-<first 8 hex of the id>`` whose source is the clip
in file mode, the same models, the same database, one detection and one recognition process, one
inference thread each, no api, no metrics port, no retention; its ``trt-cache`` is the live data dir's)
into the job's folder
``<data dir>/jobs/<job id>/`` and starts ``python -m pipeline.jobrun NICE CONFIG`` with that folder as
its ``FACEPRO_DATA_DIR`` (its run files, ``last_run.json``, snapshots and ``job.log`` stay there, apart
from the live pipeline's) and ``FACEPRO_JOB_ID`` set, so its storage process writes the job id into
every event it creates (``events.job_id``). The child runs in its own session at OS niceness
:data:`JOB_NICE` (10): on a busy box the live cameras' processes (niceness 0) get the cores first and the
job the rest, so a job slows down rather than the cameras; what live cameras lose is the CPU the job gets
when cores are idle, its memory (one more set of models, shown with its CPU as the api's
``job_cpu_percent`` count in ``facepro status``) and database write turns (one more writer). One job runs
at a time.

Progress: frames done of the clip's frames (``CAP_PROP_FRAME_COUNT``, probed before the start): the
frames the job's capture has published minus those still in its ring (not yet through recognition), read
from the job's ring as a checked reader; at the end, the capture's ``frames_out`` of the run summary.

Cancel and stop: SIGINT to the child's supervisor (it drains: what is in its ring is finished and
stored), after :data:`DRAIN_S` a second SIGINT (it kills its stages), after :data:`FORCE_S` more SIGKILL
to its whole process group; committed events are never taken back. Total at most ~1.6 s, within
:data:`pipeline.jobs.CANCEL_WAIT_S`.

After an api restart: the child does not die with the api process (own session, no parent-death
signal), its pid is stored with the job, and :meth:`AnalyzeJobs.recoverable` continues a job whose
pipeline still runs (pid alive with the job's config on its command line) or that left a run summary.

Uploads (:func:`save_upload`): ``<data dir>/uploads/<uuid><ext>`` (owner-only) with a ``.json`` note of the
client's file name, size and frame count; a clip must decode (OpenCV reads a frame), and an image is
refused. An upload is deleted when its job ends; one no job used is deleted a day later.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Protocol

import psutil

from pipeline.capture import camera_rings
from pipeline.config import ApiConfig, AppConfig, CameraConfig, models_dir, parse_config
from pipeline.jobs import JobCancelled, JobControl, JobFailed, JobInterrupted, JobRecord, JobRequestError
from pipeline.ring import RingError, RingReader
from pipeline.runs import pid_alive, read_current_run

log = logging.getLogger("facepro.jobs")

#: OS niceness of a job's pipeline (0: live cameras; 19: lowest).
JOB_NICE = 10
#: After the first SIGINT, how long the job's pipeline may drain before the second, seconds.
DRAIN_S = 1.2
#: After the second SIGINT, how long before SIGKILL of its process group, seconds.
FORCE_S = 0.3
#: How often a running job's progress is read, seconds.
POLL_S = 0.2
#: Uploads no job used are deleted after this long, seconds.
UPLOAD_TTL_S = 86_400
UPLOAD_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class JobPaths:
    """The files of one analyze job, under ``<data dir>/jobs/<job id>/`` (its pipeline's data dir)."""

    folder: Path

    @property
    def config(self) -> Path:
        """The job pipeline's config (:func:`job_config`)."""
        return self.folder / "config.yaml"

    @property
    def log(self) -> Path:
        """Its output (stdout and stderr)."""
        return self.folder / "job.log"

    @property
    def summary(self) -> Path:
        """Its run summary (``facepro run``'s ``last_run.json``)."""
        return self.folder / "last_run.json"


def job_paths(data_dir: Path, job_id: str) -> JobPaths:
    """The files of job ``job_id`` under ``<data_dir>/jobs/``."""
    return JobPaths(data_dir / "jobs" / job_id)


def camera_name(job_id: str) -> str:
    """The job's camera: ``job-`` and the first 8 hex digits of its id."""
    return f"job-{job_id.replace('-', '')[:8]}"


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` found: ``frames`` (None when the container does not say), size in pixels."""

    frames: int | None
    width: int
    height: int


def probe_video(path: Path) -> VideoInfo:
    """Open ``path`` with OpenCV and read its first frame.

    Raises:
        ValueError: not a video OpenCV can decode (the message names the file).
    """
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        ok, frame = cap.read() if cap.isOpened() else (False, None)
        if not ok or frame is None:
            raise ValueError(f"{path.name}: not a video FacePro can decode (OpenCV read no frame)")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        return VideoInfo(count if count > 0 else None, int(frame.shape[1]), int(frame.shape[0]))
    finally:
        cap.release()


def job_config(cfg: AppConfig, source: Path, camera: str, database: str) -> AppConfig:
    """The config of a job's pipeline (module docstring): validated like a config file.

    Args:
        cfg: the api's config.
        source: the clip.
        camera: the job's camera name.
        database: the SQLAlchemy URL of the live pipeline's database (absolute).
    """
    derived = cfg.model_copy(update={
        "cameras": (CameraConfig(name=camera, source=str(source), mode="file"),),
        "data_dir": None,
        "models_dir": models_dir(cfg),
        "detection": cfg.detection.model_copy(update={"processes": 1}),
        "recognition": cfg.recognition.model_copy(update={"processes": 1}),
        "storage": cfg.storage.model_copy(update={"url": database, "retention_days": None, "max_total_mb": None}),
        "runtime": cfg.runtime.model_copy(update={"metrics_port": None,
                                                  "inference_threads": cfg.runtime.inference_threads or 1}),
        "api": ApiConfig(),
        "frigate": None,  # the live pipeline's companion serves Frigate, not a job's
    })
    return parse_config(json.loads(derived.model_dump_json()), "<job config>")


# ------------------------------------------------------------------ child
class Child(Protocol):
    """A job's pipeline process (its supervisor)."""

    pid: int

    def poll(self) -> int | None:
        """Its exit code, None while it runs."""

    def wait(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` seconds; its exit code, None if it still runs."""

    def interrupt(self) -> None:
        """SIGINT to the supervisor (a first one drains, a second kills its stages)."""

    def kill(self) -> None:
        """SIGKILL to its whole process group."""


class PopenChild:
    """A job pipeline this process started (``start_new_session``: its pid is its process group)."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.pid = popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def interrupt(self) -> None:
        _signal(self.pid, signal.SIGINT, group=False)

    def kill(self) -> None:
        _signal(self.pid, signal.SIGKILL, group=True)


class AdoptedChild:
    """A job pipeline started by an earlier api process (not our child: its exit code comes from its run
    summary, -1 when it left none)."""

    def __init__(self, pid: int, paths: JobPaths) -> None:
        self.pid = pid
        self.paths = paths

    def poll(self) -> int | None:
        if pid_alive(self.pid):
            return None
        summary = read_summary(self.paths)
        return int(summary.get("exit_code", -1)) if summary else -1

    def wait(self, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while (code := self.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return code

    def interrupt(self) -> None:
        _signal(self.pid, signal.SIGINT, group=False)

    def kill(self) -> None:
        _signal(self.pid, signal.SIGKILL, group=True)


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


Spawner = Callable[[JobPaths, str, int], Child]


def spawn_pipeline(paths: JobPaths, job_id: str, nice: int) -> Child:
    """Start the job's pipeline: ``python -m pipeline.jobrun NICE CONFIG`` in its own session, output to
    ``job.log``, ``FACEPRO_DATA_DIR`` = the job folder, ``FACEPRO_JOB_ID`` = the job id.

    Raises:
        OSError: it cannot be started.
    """
    env = dict(os.environ, FACEPRO_DATA_DIR=str(paths.folder), FACEPRO_JOB_ID=job_id, PYTHONUNBUFFERED="1")
    env.pop("FACEPRO_SUPERVISOR_PID", None)  # the api's own supervisor is not the job's
    with open(paths.log, "ab") as out:
        popen = subprocess.Popen([sys.executable, "-m", "pipeline.jobrun", str(nice), str(paths.config)], env=env,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return PopenChild(popen)


def share_engine_cache(paths: JobPaths, data_dir: Path) -> None:
    """Link the job folder's ``trt-cache`` to the live data dir's, so a job's pipeline reuses the TensorRT engines
    already built (building them takes minutes) instead of building its own."""
    target, link = data_dir / "trt-cache", paths.folder / "trt-cache"
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not link.exists() and not link.is_symlink():
        link.symlink_to(target, target_is_directory=True)


def is_job_pipeline(pid: int, paths: JobPaths) -> bool:
    """True when ``pid`` runs (not a zombie) with the job's config on its command line (never a recycled pid)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and str(paths.config) in proc.cmdline()
    except psutil.Error:
        return False


def read_summary(paths: JobPaths) -> dict[str, Any] | None:
    """The job pipeline's run summary (``last_run.json``), None when it wrote none."""
    try:
        doc = json.loads(paths.summary.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def ring_frames_done(paths: JobPaths, camera: str) -> int | None:
    """Frames of the job's camera through its pipeline: published into its ring minus those still held there;
    None when its ring is not (or no longer) there."""
    info = read_current_run(paths.folder)
    names = camera_rings(str(info["run_id"]), camera) if info else []
    if not names:
        return None
    try:
        ring = RingReader.attach(names[-1])
    except RingError:
        return None
    try:
        latest = ring.latest(copy=False)
        return max(0, latest.frame_index + 1 - ring.occupancy()) if latest is not None else 0
    finally:
        ring.close()


class TreeCpu:
    """CPU use of a process and its children, percent of one core, between calls (the first call gives 0)."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, pid: int) -> float:
        """CPU percent (100 = one core) of ``pid`` and its descendants since the last call; 0 when it is gone."""
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0.0
        total = 0.0
        for p in tree:
            known = self._procs.setdefault(p.pid, p)
            try:
                total += known.cpu_percent(None)
            except psutil.Error:
                self._procs.pop(p.pid, None)
        return total


# ---------------------------------------------------------------- handler
class AnalyzeJobs:
    """The ``analyze`` job handler (module docstring).

    Args:
        cfg: the api's config (models, detection, recognition... of the job's pipeline).
        data_dir: the live pipeline's data dir (``jobs/``, ``uploads/``).
        database: the SQLAlchemy URL of its database (absolute).
        spawner: starts a job's pipeline (:func:`spawn_pipeline`; tests inject a fake).
        nice: OS niceness of the job's pipeline.
        poll_s: how often the progress is read, seconds.
    """

    def __init__(self, cfg: AppConfig, data_dir: Path, database: str, spawner: Spawner = spawn_pipeline,
                 nice: int = JOB_NICE, poll_s: float = POLL_S) -> None:
        self.cfg = cfg
        self.data_dir = data_dir
        self.database = database
        self.spawner = spawner
        self.nice = nice
        self.poll_s = poll_s

    def recoverable(self, job: JobRecord) -> bool:
        """A job found running after a restart can be continued: its pipeline runs, or it left a summary."""
        paths = job_paths(self.data_dir, job.id)
        if job.pid is not None and is_job_pipeline(job.pid, paths):
            return True
        if read_summary(paths) is not None:
            return True
        self._drop_upload(job)
        return False

    def __call__(self, job: JobRecord, ctl: JobControl) -> dict[str, Any]:
        """Run (or continue) the job; returns ``{"events", "frames", "exit_code", "run_id", "wall_s", "camera"}``.

        Raises:
            JobFailed: the source does not decode, the pipeline failed (its last error line) or vanished.
            JobCancelled, JobInterrupted: cancelled, or the api process is stopping.
        """
        paths = job_paths(self.data_dir, job.id)
        try:
            if job.pid is not None:  # continued after an api restart
                child: Child = AdoptedChild(job.pid, paths)
                total = job.frames_total
            else:
                child, total = self._start(job, ctl, paths)
            code = self._watch(child, ctl, paths, camera_name(job.id), total)
            return self._outcome(ctl, paths, code, total)
        finally:
            self._drop_upload(job)

    def _start(self, job: JobRecord, ctl: JobControl, paths: JobPaths) -> tuple[Child, int | None]:
        source = Path(job.params["path"])
        try:
            info = probe_video(source)
        except ValueError as err:
            raise JobFailed(f"source {job.source or source}: {str(err).partition(': ')[2]}") from None
        paths.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        share_engine_cache(paths, self.data_dir)
        cfg = job_config(self.cfg, source, camera_name(job.id), self.database)
        paths.config.write_text(cfg.model_dump_json(indent=1))
        try:
            child = self.spawner(paths, job.id, self.nice)
        except OSError as err:
            raise JobFailed(f"cannot start the job's pipeline: {err}") from None
        ctl.report(0, info.frames, pid=child.pid, force=True)
        return child, info.frames

    def _watch(self, child: Child, ctl: JobControl, paths: JobPaths, camera: str, total: int | None) -> int:
        """Follow the child until it exits (its code) or the job must stop (then interrupt it)."""
        cpu = TreeCpu()
        while True:
            code = child.poll()
            if code is not None:
                return code
            if ctl.should_stop():
                return interrupt(child)
            done = ring_frames_done(paths, camera)
            if done is not None:  # never backwards (the ring's two counters are read one after the other)
                ctl.report(max(done, ctl.frames_done), total, cpu_percent=cpu.sample(child.pid))
            ctl.wait(self.poll_s)

    def _outcome(self, ctl: JobControl, paths: JobPaths, code: int, total: int | None) -> dict[str, Any]:
        summary = read_summary(paths) or {}
        stages = summary.get("stages", {})
        frames = int(stages.get("capture", {}).get("frames_out", ctl.frames_done))
        through = int(stages.get("recognition", {}).get("frames_out", 0))
        if through > ctl.frames_done:  # the run went on after the last poll: a stopped job shows what it did
            ctl.report(through, total, force=True)
        result = {"events": ctl.count_events(), "frames": frames, "exit_code": code, "run_id": summary.get("run_id"),
                  "wall_s": summary.get("wall_s"), "camera": camera_name(ctl.job.id)}
        if ctl.cancel_requested:
            raise JobCancelled("cancelled by request", result)
        if ctl.stopping:
            raise JobInterrupted("", result)
        if code != 0:
            raise JobFailed(failure_line(paths, code, summary), result)
        ctl.report(frames, total or frames, force=True)
        return result

    def _drop_upload(self, job: JobRecord) -> None:
        upload = job.params.get("upload")
        if upload and UPLOAD_ID.match(str(upload)):
            for path in (self.data_dir / "uploads").glob(f"{upload}*"):
                path.unlink(missing_ok=True)


def interrupt(child: Child) -> int:
    """Stop a job's pipeline (module docstring: SIGINT, SIGINT, SIGKILL); its exit code (-9 when unknown)."""
    child.interrupt()
    code = child.wait(DRAIN_S)
    if code is None:
        child.interrupt()
        code = child.wait(FORCE_S)
    if code is None:
        child.kill()
        code = child.wait(1.0)
    return code if code is not None else -9


def failure_line(paths: JobPaths, code: int, summary: dict[str, Any]) -> str:
    """Why a job's pipeline failed, one line: its ``facepro ...:`` error line, else its summary, else the code."""
    if code == -1 and not summary:
        return "interrupted: the job's pipeline stopped without a run summary (killed?)"
    try:
        lines = [line.strip() for line in paths.log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith("facepro"):
            return line
    if summary.get("incomplete"):
        return f"not every frame was processed: {'; '.join(summary['incomplete'])}"
    if summary.get("failure"):
        return f"pipeline stopped: {summary['failure']}"
    return f"the job's pipeline exited with code {code} (see {paths.log})"


# ----------------------------------------------------------------- uploads
def save_upload(data_dir: Path, name: str, stream: IO[bytes]) -> dict[str, Any]:
    """Store an uploaded clip (module docstring) and return its note: ``upload`` (id), ``name``, ``size``
    (bytes), ``frames`` (None when unknown), ``width``, ``height`` (pixels).

    Raises:
        JobRequestError: 400 empty; 415 an image, or not a video OpenCV can decode (nothing is kept).
    """
    folder = data_dir / "uploads"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    prune_uploads(folder)
    upload = str(uuid.uuid4())
    suffix = Path(name).suffix.lower()
    keep = re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) and suffix != ".json"  # the note is <id>.json
    path = folder / (upload + (suffix if keep else ".clip"))
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        shutil.copyfileobj(stream, out, 1 << 20)
        size = out.tell()
    try:
        head = path.read_bytes()[:16]
        if size == 0:
            raise JobRequestError(400, f"{name}: empty file")
        if _image_head(head):
            raise JobRequestError(415, f"{name}: an image, not a video clip (enroll images with "
                                       "POST /api/identities/{name}/faces)")
        try:
            info = probe_video(path)
        except ValueError:
            raise JobRequestError(415, f"{name}: not a video FacePro can decode (OpenCV read no frame)") from None
    except JobRequestError:
        path.unlink(missing_ok=True)
        raise
    note = {"upload": upload, "name": name, "size": size, "frames": info.frames, "width": info.width,
            "height": info.height, "file": path.name}
    path.with_suffix(".json").write_text(json.dumps(note))
    return note


def _image_head(head: bytes) -> bool:
    return (head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n" or head[:2] == b"BM"
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"))


def find_upload(data_dir: Path, upload: str) -> tuple[Path, dict[str, Any]]:
    """The clip of upload ``upload`` and its note.

    Raises:
        JobRequestError: 404 no such upload (never made, already used by a job, or expired).
    """
    note_path = data_dir / "uploads" / f"{upload}.json"
    try:
        note = json.loads(note_path.read_text()) if UPLOAD_ID.match(upload) else None
    except (OSError, ValueError):
        note = None
    if not isinstance(note, dict) or not (data_dir / "uploads" / str(note.get("file", ""))).is_file():
        raise JobRequestError(404, f"no upload {upload} (uploads are used by one job, and kept a day)")
    return data_dir / "uploads" / note["file"], note


def prune_uploads(folder: Path, ttl_s: float = UPLOAD_TTL_S) -> int:
    """Delete upload files older than ``ttl_s`` seconds; returns how many."""
    removed, cutoff = 0, time.time() - ttl_s
    for path in folder.iterdir() if folder.is_dir() else []:
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:
            continue
    return removed
