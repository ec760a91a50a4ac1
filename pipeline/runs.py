"""Run files and the cleanup of runs that died: ``<data dir>/run/<run_id>/run.json`` and ``run/current.json``.

``run.json`` (and ``current.json``, a copy for the CLI) holds ``run_id``,
``pid`` (the supervisor), ``runtime_dir``, ``socket_dir``, ``started_at``,
``config_path`` (the config file, or null), ``metrics_port`` and ``children``: one ``{"stage", "index", "pid",
"cmdline"}`` per live stage process, rewritten (atomically) at every spawn
and exit.

A run is dead when its supervisor pid no longer exists (or is a zombie). A
new run first stops the stage processes a dead run left behind, each matched
by its recorded pid AND command line (never by name, so an unrelated process
that got a recycled pid is left alone), then removes that run's files and
every ``facepro_`` shared-memory segment whose owner is dead: a ring's owner
is the capture pid in its name, a counter block's owner the supervisor pid
inside it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import psutil

from pipeline.counters import owner_of
from pipeline.ring import list_segments, run_id_of, unlink_segments

log = logging.getLogger("facepro.runs")


def runs_dir(data_dir: Path) -> Path:
    return data_dir / "run"


def current_run_file(data_dir: Path) -> Path:
    """JSON file describing the running pipeline (``run_id``, ``pid``, ``runtime_dir``, ``socket_dir``...)."""
    return runs_dir(data_dir) / "current.json"


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return False


def read_current_run(data_dir: Path) -> dict | None:
    """The running pipeline's description, or None when none is running (stale files are ignored)."""
    try:
        info = json.loads(current_run_file(data_dir).read_text())
    except (OSError, ValueError):
        return None
    return info if pid_alive(int(info.get("pid", -1))) else None


def write_json(path: Path, doc: dict) -> None:
    """Write ``doc`` to ``path`` atomically (readers see the old or the new file, never a part)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def stop_leftovers(children: list[dict], timeout_s: float = 3.0) -> int:
    """SIGKILL the recorded stage processes that still run with the recorded command line; returns how many."""
    victims = []
    for child in children:
        try:
            proc = psutil.Process(int(child["pid"]))
            if proc.cmdline() == list(child["cmdline"]) and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
                victims.append(proc)
                log.warning("stopping pid %d left running by a dead run: %s", proc.pid, " ".join(child["cmdline"]))
        except (psutil.Error, KeyError, TypeError, ValueError):
            continue
    psutil.wait_procs(victims, timeout=timeout_s)
    return len(victims)


def _owner_dead(segment: str) -> bool:
    """A counter block or a ring whose supervisor (pid in the block header, or in the ring name) no longer runs."""
    owner = owner_of(segment)
    if owner is not None:
        return not pid_alive(owner)
    try:
        pid = int(segment.rsplit("_", 2)[-2])
    except (ValueError, IndexError):
        return True
    return not pid_alive(pid)


def cleanup_stale_runs(data_dir: Path) -> int:
    """Stop what dead runs left running, remove their run dirs and their segments (``facepro_`` prefix only).

    Returns the number of segments removed.
    """
    alive = set()
    base = runs_dir(data_dir)
    for run_json in base.glob("*/run.json") if base.is_dir() else []:
        try:
            info = json.loads(run_json.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("pid") and pid_alive(int(info["pid"])):
            alive.add(info.get("run_id"))
            continue
        stop_leftovers(info.get("children", []))
        shutil.rmtree(run_json.parent, ignore_errors=True)
        if info.get("socket_dir") and Path(info["socket_dir"]) != run_json.parent:
            shutil.rmtree(info["socket_dir"], ignore_errors=True)
    stale = [s for s in list_segments() if run_id_of(s) not in alive and _owner_dead(s)]
    return unlink_segments(stale)
