"""Crash-recovery proof tooling shared by ``scripts/chaos.py`` and ``tests/integration/test_crash_recovery.py``.

Three parts:

- **running** a real ``facepro run`` in its own data dir (:func:`start_run`,
  :func:`finish_run`), asking it for ``status --json`` in-process
  (:func:`status_doc`) and hurting its processes (:func:`stage_pids`,
  :func:`signal_pid`);
- **reading** what a run left: the stored events straight from its database
  (:func:`read_events`, SQLAlchemy ORM), shared-memory segments of the run
  (:func:`leaked_segments`) and worker processes still alive after the
  supervisor exited (:func:`find_orphans`);
- **comparing** a chaos run against a clean run of the same file
  (:func:`compare_runs` → a report dict, :func:`problems` → one precise line per
  difference, :func:`format_table`).

Definitions used by the comparison (frame ranges are inclusive, in frames):

- *frame IoU* of two events: overlap of their ``[first_frame, last_frame]``
  ranges divided by the length of their union.
- *match*: a clean event is matched when a chaos event of the same camera has
  frame IoU ≥ ``match_iou`` (0.8) with it, and vice versa; unmatched events are
  counted on both sides.
- *duplicated* chaos events: (a) for each clean event, the chaos events of its
  camera with frame IoU ≥ ``dup_iou`` (0.5) to it, grouped by overlapping frame
  ranges; every event of a group beyond the one with the best IoU is a
  duplicate; (b) every chaos event beyond the first with the same ``(camera,
  track_id)``. Their union is counted once per event id.
- *never closed*: stored with ``ended`` false.
- *lost* / *extra* frames: per stage (capture, detection, recognition),
  ``frames_out`` of the clean run minus (or over) that of the chaos run; the
  run's figure is the worst stage's.
- *loss drops*: drops of the reasons ``lost``, ``overwritten``, ``queue_full``
  and ``malformed`` (``motion_skipped`` and ``behind`` are not losses).

Importable as ``chaoslib`` (from ``scripts/``) and as ``scripts.chaoslib`` (from
the repo root, as the tests do). Needs the repo root on ``sys.path`` for the
``pipeline`` and ``storage`` packages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import yaml

STAGES: tuple[str, ...] = ("capture", "detection", "recognition", "storage")
FRAME_STAGES: tuple[str, ...] = ("capture", "detection", "recognition")
LOSS_REASONS: tuple[str, ...] = ("lost", "overwritten", "queue_full", "malformed")
MATCH_IOU = 0.8
DUP_IOU = 0.5
ORPHAN_GRACE_S = 5.0
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ events
@dataclass(frozen=True)
class EventSpan:
    """One stored event as the comparison sees it (frames are inclusive frame indices)."""

    event_id: str
    camera: str
    track_id: int
    first_frame: int
    last_frame: int
    ended: bool


def read_events(url: str) -> list[EventSpan]:
    """Every event stored in the database at ``url`` (SQLAlchemy URL), ordered by camera and first frame."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from storage.db import open_engine
    from storage.models import Camera, Event

    engine = open_engine(url)
    try:
        stmt = select(Event, Camera.name).join(Camera, Event.camera_id == Camera.id)
        with Session(engine) as session:
            rows = [EventSpan(e.id, cam, int(e.track_id), int(e.first_frame), int(e.last_frame), bool(e.ended))
                    for e, cam in session.execute(stmt).tuples()]
    finally:
        engine.dispose()
    return sorted(rows, key=lambda e: (e.camera, e.first_frame, e.last_frame, e.event_id))


def frame_iou(a: EventSpan, b: EventSpan) -> float:
    """Intersection over union of two events' inclusive frame ranges (0.0 to 1.0)."""
    inter = min(a.last_frame, b.last_frame) - max(a.first_frame, b.first_frame) + 1
    if inter <= 0:
        return 0.0
    union = (a.last_frame - a.first_frame + 1) + (b.last_frame - b.first_frame + 1) - inter
    return inter / union


def _overlap(a: EventSpan, b: EventSpan) -> bool:
    return a.first_frame <= b.last_frame and b.first_frame <= a.last_frame


def _same_camera(events: list[EventSpan], camera: str) -> list[EventSpan]:
    return [e for e in events if e.camera == camera]


def unmatched(ours: list[EventSpan], theirs: list[EventSpan], iou: float = MATCH_IOU) -> list[EventSpan]:
    """Events of ``ours`` with no event of ``theirs`` (same camera) at frame IoU ≥ ``iou``."""
    return [e for e in ours if not any(frame_iou(e, t) >= iou for t in _same_camera(theirs, e.camera))]


def _groups(events: list[EventSpan]) -> list[list[EventSpan]]:
    """Connected groups of events whose frame ranges overlap (events sorted by first frame)."""
    groups: list[list[EventSpan]] = []
    for e in sorted(events, key=lambda x: (x.first_frame, x.last_frame)):
        if groups and any(_overlap(e, g) for g in groups[-1]):
            groups[-1].append(e)
        else:
            groups.append([e])
    return groups


def duplicated(clean: list[EventSpan], chaos: list[EventSpan], iou: float = DUP_IOU) -> list[EventSpan]:
    """Chaos events that duplicate another chaos event (see the module docstring, (a) and (b))."""
    dups: dict[str, EventSpan] = {}
    for ref in clean:
        near = [e for e in _same_camera(chaos, ref.camera) if frame_iou(ref, e) >= iou]
        for group in _groups(near):
            best = max(group, key=lambda e: frame_iou(ref, e))
            dups.update({e.event_id: e for e in group if e is not best})
    seen: set[tuple[str, int]] = set()
    for e in sorted(chaos, key=lambda x: (x.first_frame, x.event_id)):
        key = (e.camera, e.track_id)
        if key in seen:
            dups[e.event_id] = e
        seen.add(key)
    return sorted(dups.values(), key=lambda e: (e.camera, e.first_frame, e.event_id))


def max_frame_offset(clean: list[EventSpan], chaos: list[EventSpan]) -> int | None:
    """Largest ``|Δfirst_frame|`` or ``|Δlast_frame|`` (frames) between each clean event and its best-IoU chaos event.

    None when some clean event overlaps no chaos event at all (or there are no clean events).
    """
    worst = None
    for ref in clean:
        cands = [e for e in _same_camera(chaos, ref.camera) if frame_iou(ref, e) > 0]
        if not cands:
            return None
        best = max(cands, key=lambda e: frame_iou(ref, e))
        off = max(abs(best.first_frame - ref.first_frame), abs(best.last_frame - ref.last_frame))
        worst = off if worst is None else max(worst, off)
    return worst


def compare_events(clean: list[EventSpan], chaos: list[EventSpan]) -> dict:
    """The event columns of the report: counts, duplicates, never closed, unmatched, worst frame offset."""
    return {
        "events_clean": len(clean), "events_chaos": len(chaos),
        "duplicated": len(duplicated(clean, chaos)),
        "duplicated_ids": [e.event_id for e in duplicated(clean, chaos)],
        "never_closed": sum(not e.ended for e in chaos),
        "never_closed_clean": sum(not e.ended for e in clean),
        "unmatched_clean": len(unmatched(clean, chaos)),
        "unmatched_chaos": len(unmatched(chaos, clean)),
        "max_frame_offset": max_frame_offset(clean, chaos),
    }


# ------------------------------------------------------------------ runs
@dataclass
class RunResult:
    """What one ``facepro run`` left behind.

    Attributes:
        exit_code: the run's exit code (None: it was still running at the deadline and was SIGKILLed).
        summary: ``last_run.json`` ({} when the run wrote none).
        events: the stored events.
        leaked_segments: ``/dev/shm/facepro_<run_id>*`` segments left after the run.
        orphans: ``pid: cmdline`` of worker processes alive :data:`ORPHAN_GRACE_S` s after the supervisor exited.
        kills: signals sent per stage (``{"detection": 3, ...}``; SIGSTOPs counted under ``"stop:<stage>"``).
        output: the tail of the run's stdout+stderr.
    """

    exit_code: int | None
    summary: dict
    events: list[EventSpan]
    leaked_segments: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    kills: dict[str, int] = field(default_factory=dict)
    output: str = ""


def write_config(tree: dict, data_dir: Path) -> Path:
    """Write ``tree`` as ``cfg.yaml`` in ``data_dir``; returns its path."""
    path = data_dir / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def run_env(data_dir: Path) -> dict[str, str]:
    """The environment of a run in ``data_dir`` (``FACEPRO_DATA_DIR`` set, repo root on ``PYTHONPATH``)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, FACEPRO_DATA_DIR=str(data_dir), PYTHONPATH=path)


def start_run(config: Path, data_dir: Path) -> subprocess.Popen:
    """Start ``facepro run CONFIG`` with ``data_dir`` as its data dir, in its own session (process group).

    Its stdout and stderr go to ``run.log`` in ``data_dir`` (a pipe nobody reads could block the run).
    """
    with open(data_dir / "run.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env=run_env(data_dir), start_new_session=True)


def database_url(tree: dict, data_dir: Path) -> str:
    """The run's database: ``storage.url`` of the config, else ``facepro.db`` in ``data_dir``."""
    return (tree.get("storage") or {}).get("url") or f"sqlite:///{data_dir / 'facepro.db'}"


def status_doc(data_dir: Path, timeout_s: float = 3.0) -> dict | None:
    """The ``facepro status --json`` document of the run in ``data_dir`` (asked in-process), None if none answers."""
    from pipeline.cli import status_json
    from pipeline.messages import StatusReply, StatusRequest
    from pipeline.supervisor import read_current_run
    from pipeline.transport import TransportError, request

    info = read_current_run(data_dir)
    if info is None:
        return None
    try:
        reply = request(Path(info["socket_dir"]), "control", StatusRequest(), timeout_ms=int(timeout_s * 1000))
    except TransportError:
        return None
    return status_json(reply) if isinstance(reply, StatusReply) else None


def stage_doc(doc: dict, stage: str) -> dict:
    """One stage's entry of a status document."""
    return next(s for s in doc["stages"] if s["stage"] == stage)


def stage_pids(doc: dict, stage: str) -> list[int]:
    """Pids of ``stage``'s running processes according to a status document."""
    return [int(p) for p in stage_doc(doc, stage)["pids"]]


def wait_for(proc: subprocess.Popen, data_dir: Path, until: Callable[[dict], bool], timeout_s: float = 120.0,
             poll_s: float = 0.3) -> dict | None:
    """Poll the run's status until ``until(doc)`` holds; None when the run exits or ``timeout_s`` (s) passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        doc = status_doc(data_dir)
        if doc is not None and until(doc):
            return doc
        time.sleep(poll_s)
    return None


def signal_pid(pid: int, sig: int) -> bool:
    """Send ``sig`` to ``pid``; False when the process no longer exists."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def stop_for(pid: int, seconds: float) -> bool:
    """SIGSTOP ``pid``, hold it ``seconds`` s, then SIGCONT it if it still exists; False if it was already gone."""
    if not signal_pid(pid, signal.SIGSTOP):
        return False
    time.sleep(seconds)
    signal_pid(pid, signal.SIGCONT)
    return True


def leaked_segments(run_id: str | None) -> list[str]:
    """``/dev/shm/facepro_<run_id>*`` segments that exist now ([] for a run without id)."""
    from pipeline.ring import list_segments

    return list_segments(run_id) if run_id else []


def find_orphans(data_dir: Path) -> list[str]:
    """``pid: cmdline`` of every live ``pipeline.worker`` process of a run in ``data_dir`` (its runtime dir is in the cmdline)."""
    marker = str(data_dir / "run")
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "pipeline.worker" in cmd and marker in cmd and p.info.get("status") != psutil.STATUS_ZOMBIE:
            found.append(f"{p.info['pid']}: {cmd}")
    return found


def finish_run(proc: subprocess.Popen, data_dir: Path, tree: dict, timeout_s: float = 900.0,
               grace_s: float = ORPHAN_GRACE_S, run_id: str | None = None) -> RunResult:
    """Wait up to ``timeout_s`` s for the run, then collect its :class:`RunResult`.

    A run still going at the deadline gets SIGKILL (its process group) and ``exit_code`` None.
    ``run_id`` (from a status document) names the run's segments when it wrote no summary.
    Orphans are looked for ``grace_s`` s after the supervisor exited; they are reported, then killed, and
    leaked segments are reported, then removed.
    """
    hung_status = ""
    try:
        code: int | None = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        doc = status_doc(data_dir)  # what each stage holds and waits for, before the kill
        hung_status = "\nstatus of the hung run: " + json.dumps(doc, default=str) if doc else ""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    log = data_dir / "run.log"
    out = log.read_text(errors="replace") if log.exists() else ""
    summary_path = data_dir / "last_run.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    time.sleep(grace_s)
    orphans = find_orphans(data_dir)
    for line in orphans:
        signal_pid(int(line.split(":", 1)[0]), signal.SIGKILL)
    leaked = leaked_segments(summary.get("run_id") or run_id)
    _unlink_segments(leaked)  # reported; not left on the machine
    db = database_url(tree, data_dir)
    events = read_events(db) if not db.startswith("sqlite") or (data_dir / "facepro.db").exists() else []
    return RunResult(code, summary, events, leaked, orphans, output=notable_lines(out) + out[-4000:] + hung_status)


#: Log lines worth keeping from a whole run (the periodic per-stage status lines are left out).
_NOTABLE = ("WARNING", "ERROR", "started ", "restarting", "resuming", "killing", "Traceback")


def notable_lines(log: str, most: int = 40) -> str:
    """The first ``most`` lines of ``log`` that report a start, restart, resume, warning or error, then a
    separator; '' when there are none."""
    lines = [line for line in log.splitlines() if any(word in line for word in _NOTABLE)][:most]
    return "\n".join(lines) + "\n--- tail ---\n" if lines else ""


def _unlink_segments(names: list[str]) -> None:
    from pipeline.ring import unlink_segments

    unlink_segments(names)


# ------------------------------------------------------------------ comparison
def _stage(summary: dict, stage: str) -> dict:
    return (summary.get("stages") or {}).get(stage) or {}


def compare_frames(clean: dict, chaos: dict) -> dict:
    """Per-stage frame columns from two run summaries: frames_out, lost/extra frames, loss drops, restarts."""
    rows = {}
    for stage in STAGES:
        a, b = _stage(clean, stage), _stage(chaos, stage)
        out_a, out_b = int(a.get("frames_out", 0)), int(b.get("frames_out", 0))
        rows[stage] = {
            "frames_clean": out_a, "frames_chaos": out_b,
            "lost": max(0, out_a - out_b) if stage in FRAME_STAGES else 0,
            "extra": max(0, out_b - out_a) if stage in FRAME_STAGES else 0,
            "loss_drops": {r: int(n) for r, n in (b.get("dropped") or {}).items() if r in LOSS_REASONS},
            "dropped_clean": dict(a.get("dropped") or {}), "dropped_chaos": dict(b.get("dropped") or {}),
            "restarts_clean": int(a.get("restarts", 0)), "restarts_chaos": int(b.get("restarts", 0)),
        }
    return rows


def compare_runs(clean: RunResult, chaos: RunResult) -> dict:
    """The full report of a chaos run against a clean run (a JSON-serialisable dict).

    Keys: ``stages`` (per stage: kills, frames, lost/extra, drops, restarts), ``lost_frames`` and
    ``extra_frames`` (worst of capture/detection/recognition), ``loss_drops`` (sum over stages), the event columns of
    :func:`compare_events`, ``leaked_segments`` and ``orphans`` (per run), ``exit_code`` (per run).
    """
    stages = compare_frames(clean.summary, chaos.summary)
    for stage, row in stages.items():
        row["kills"] = chaos.kills.get(stage, 0)
        row["stops"] = chaos.kills.get(f"stop:{stage}", 0)
        row["unprovoked_restarts"] = max(0, row["restarts_chaos"] - row["kills"] - row["stops"])  # e.g. heartbeat kills
    report = {
        "run_id": {"clean": clean.summary.get("run_id"), "chaos": chaos.summary.get("run_id")},
        "stages": stages,
        "lost_frames": max(r["lost"] for r in stages.values()),
        "extra_frames": max(r["extra"] for r in stages.values()),
        "loss_drops": sum(sum(r["loss_drops"].values()) for r in stages.values()),
        **compare_events(clean.events, chaos.events),
        "leaked_segments": {"clean": clean.leaked_segments, "chaos": chaos.leaked_segments},
        "orphans": {"clean": clean.orphans, "chaos": chaos.orphans},
        "exit_code": {"clean": clean.exit_code, "chaos": chaos.exit_code},
        "failure": {"clean": clean.summary.get("failure"), "chaos": chaos.summary.get("failure")},
    }
    report["ok"] = not problems(report)
    return report


def problems(report: dict, frame_tolerance: int | None = None) -> list[str]:
    """One precise line per loss in ``report`` (empty: the chaos run changed nothing).

    ``frame_tolerance`` (frames): also require every clean event's best chaos match to start and end within it.
    """
    out = []
    for stage, r in report["stages"].items():
        if stage in FRAME_STAGES and r["frames_chaos"] != r["frames_clean"]:
            d = r["frames_chaos"] - r["frames_clean"]
            out.append(f"{stage} frames_out {r['frames_chaos']} != clean {r['frames_clean']} ({d:+d})")
        if r["loss_drops"]:
            out.append(f"{stage} dropped {r['loss_drops']} (clean: {r['dropped_clean'] or '{}'})")
    if report["events_chaos"] != report["events_clean"]:
        d = report["events_chaos"] - report["events_clean"]
        out.append(f"events {report['events_chaos']} != clean {report['events_clean']} ({d:+d})")
    for key, what in (("duplicated", "duplicated events"), ("never_closed", "events never closed (ended false)"),
                      ("unmatched_clean", f"clean events without a chaos event at frame IoU >= {MATCH_IOU}"),
                      ("unmatched_chaos", f"chaos events without a clean event at frame IoU >= {MATCH_IOU}")):
        if report[key]:
            out.append(f"{report[key]} {what}")
    off = report["max_frame_offset"]
    if frame_tolerance is not None and report["events_clean"] and off is None:
        out.append("some clean event overlaps no chaos event at all (frame offset not measurable)")
    elif frame_tolerance is not None and report["events_clean"] and off > frame_tolerance:
        out.append(f"event frame ranges differ by up to {off} frames (tolerance {frame_tolerance})")
    for run in ("clean", "chaos"):
        if report["leaked_segments"][run]:
            out.append(f"{run} run left {len(report['leaked_segments'][run])} segments: {report['leaked_segments'][run]}")
        if report["orphans"][run]:
            out.append(f"{run} run left {len(report['orphans'][run])} orphan workers: {report['orphans'][run]}")
    for run in ("clean", "chaos"):
        if report["exit_code"][run] is None:
            out.append(f"{run} run did not finish before its deadline (hung; SIGKILLed)")
        elif report["exit_code"][run] != 0:
            out.append(f"{run} run exit code {report['exit_code'][run]} (failure: {report['failure'][run]})")
    return out


def format_table(report: dict) -> str:
    """The report as a text table: one row per stage, then the event, segment, orphan and exit-code lines."""
    head = (f"{'stage':<12}{'kills':>6}{'stops':>6}{'clean out':>10}{'chaos out':>10}{'lost':>6}{'extra':>6}{'restarts':>9}"
            f"{'unprovoked':>11}  loss drops / drops clean -> chaos")
    lines = [f"clean run {report['run_id']['clean']} vs chaos run {report['run_id']['chaos']}", head]
    for stage, r in report["stages"].items():
        lines.append(f"{stage:<12}{r['kills']:>6}{r['stops']:>6}{r['frames_clean']:>10}{r['frames_chaos']:>10}{r['lost']:>6}"
                     f"{r['extra']:>6}{r['restarts_chaos']:>9}{r['unprovoked_restarts']:>11}  {r['loss_drops'] or '-'} / {r['dropped_clean'] or '-'} -> {r['dropped_chaos'] or '-'}")
    lines += [
        f"frames lost {report['lost_frames']}, extra {report['extra_frames']} (worst stage), loss drops {report['loss_drops']}",
        f"events clean {report['events_clean']}, chaos {report['events_chaos']}; duplicated {report['duplicated']}; "
        f"never closed {report['never_closed']} (clean {report['never_closed_clean']}); unmatched clean "
        f"{report['unmatched_clean']}, chaos {report['unmatched_chaos']}; max frame offset {report['max_frame_offset']}",
        f"leaked segments clean {len(report['leaked_segments']['clean'])}, chaos {len(report['leaked_segments']['chaos'])}; "
        f"orphan workers clean {len(report['orphans']['clean'])}, chaos {len(report['orphans']['chaos'])}",
        f"exit code clean {report['exit_code']['clean']}, chaos {report['exit_code']['chaos']}"
        + (f" ({report['failure']['chaos']})" if report["failure"]["chaos"] else ""),
        "RESULT: " + ("OK, the crashes changed nothing" if report["ok"] else "FAIL: " + "; ".join(problems(report))),
    ]
    return "\n".join(lines)
