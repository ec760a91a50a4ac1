"""Crashes that change nothing: in file mode a killed or stalled process must leave the run's results as a clean run's.

A real clip (the first 480 frames of the one-by-one video: two people, one
after the other) is run once undisturbed per module (``clean``), then once per
case with one process hurt mid-run. Every case compares with
:func:`scripts.chaoslib.compare_runs` and asserts there is no problem at all:
exit code 0; capture, detection and recognition ``frames_out`` equal the clean
run's (every frame exactly once); no ``lost``/``overwritten``/``queue_full``/
``malformed`` drop; the same number of events, none duplicated, every one
ended, each matching a clean event by frame IoU ≥ 0.8 and starting and ending
within :data:`TOLERANCE_FRAMES` of it (a resumed track must stay one event);
no ``/dev/shm/facepro_<run_id>*`` segment and no worker process left; only the
hurt stage restarted, once. A failure lists every difference with its size.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import pytest

from scripts.chaoslib import (STAGES, RunResult, compare_runs, finish_run, format_table, problems, signal_pid,
                              stage_doc, stage_pids, start_run, stop_for, wait_for, write_config)
from tests.integration.conftest import pipeline_config, write_clip

pytestmark = pytest.mark.slow

FRAMES = 480  # people at frames 63-194 and 228-447 in a clean run
PACE_FPS = 30  # the chaos runs last ~16 s, so a hit lands mid-run
HEARTBEAT_S = 3.0  # runtime.heartbeat_timeout_s of the stall cases
RUN_TIMEOUT_S = 150  # a run lasts ~30 s here; one still going after this long is hung
TOLERANCE_FRAMES = 5  # event start/end offset allowed against the clean run (a restarted motion gate relearns its background)

Hurt = Callable[[subprocess.Popen, Path], dict]


@pytest.fixture(scope="module")
def clip(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(videos / "one-by-one-person-detection.mp4", tmp_path_factory.mktemp("clip") / "one480.avi", FRAMES)


def _tree(models: Path, clip: Path, max_fps: float | None = None, heartbeat_s: float | None = None) -> dict:
    tree = pipeline_config(models, {"cam": clip})
    if max_fps:
        tree["cameras"][0]["max_fps"] = max_fps
    if heartbeat_s:
        tree["runtime"]["heartbeat_timeout_s"] = heartbeat_s
    return tree


def _run(tree: dict, hurt: Hurt | None = None) -> RunResult:
    """One run of ``tree`` in a short temp data dir; ``hurt(proc, data_dir)`` returns its hits and ``run_id``."""
    d = Path(tempfile.mkdtemp(prefix="fp-", dir="/tmp"))
    try:
        proc = start_run(write_config(tree, d), d)
        try:
            hits = hurt(proc, d) if hurt else {}
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        result = finish_run(proc, d, tree, timeout_s=RUN_TIMEOUT_S, run_id=hits.pop("run_id", None))
        result.kills = hits
        return result
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def clean(clip: Path, models: Path) -> RunResult:
    """The undisturbed run the chaos runs are held against (unpaced, default heartbeat timeout)."""
    res = _run(_tree(models, clip))
    frames = res.summary.get("stages", {}).get("recognition", {}).get("frames_out")
    assert res.exit_code == 0 and frames == FRAMES and len(res.events) >= 2, (
        f"clean run: exit {res.exit_code}, recognition frames_out {frames} (expected {FRAMES}), "
        f"{len(res.events)} events (expected >= 2)\n{res.output}")
    return res


def _busy(stage: str) -> Callable[[dict], bool]:
    """Status predicate: ``stage`` has a process and has passed frames on (recognition too, so the run is mid-way)."""
    return lambda doc: bool(stage_pids(doc, stage)) and stage_doc(doc, stage)["rate_fps"] > 0 \
        and stage_doc(doc, "recognition")["rate_fps"] > 0


def _victim(proc: subprocess.Popen, d: Path, stage: str) -> tuple[int, str]:
    doc = wait_for(proc, d, _busy(stage), timeout_s=180)
    assert doc is not None, f"the run ended (exit {proc.poll()}) before {stage} had processed frames"
    return stage_pids(doc, stage)[0], doc["run_id"]


def _kill(stage: str) -> Hurt:
    def hurt(proc: subprocess.Popen, d: Path) -> dict:
        pid, run_id = _victim(proc, d, stage)
        assert signal_pid(pid, signal.SIGKILL), f"{stage} pid {pid} was gone before the kill"
        return {stage: 1, "run_id": run_id}
    return hurt


def _stop(stage: str, seconds: float) -> Hurt:
    def hurt(proc: subprocess.Popen, d: Path) -> dict:
        pid, run_id = _victim(proc, d, stage)
        assert stop_for(pid, seconds), f"{stage} pid {pid} was gone before the SIGSTOP"
        return {f"stop:{stage}": 1, "run_id": run_id}
    return hurt


def _assert_unchanged(clean: RunResult, chaos: RunResult, restarted: dict[str, int]) -> None:
    """No problem against the clean run, and exactly ``restarted`` restarts per stage (others 0)."""
    report = compare_runs(clean, chaos)
    lines = problems(report, frame_tolerance=TOLERANCE_FRAMES)
    for stage in STAGES:
        got, want = report["stages"][stage]["restarts_chaos"], restarted.get(stage, 0)
        if got != want:
            lines.append(f"{stage} restarted {got} times, expected {want}")
    if not chaos.summary:
        lines.append("the chaos run wrote no last_run.json")
    assert not lines, "\n".join(lines) + "\n\n" + format_table(report) + "\n\nchaos run output:\n" + chaos.output


@pytest.mark.parametrize("stage", STAGES)
def test_a_process_killed_mid_run_changes_nothing(stage: str, clip: Path, models: Path, clean: RunResult) -> None:
    chaos = _run(_tree(models, clip, max_fps=PACE_FPS), _kill(stage))
    _assert_unchanged(clean, chaos, {stage: 1})


@pytest.mark.parametrize("stage", ["recognition"])
def test_a_process_stopped_past_the_heartbeat_timeout_is_replaced_and_changes_nothing(
        stage: str, clip: Path, models: Path, clean: RunResult) -> None:
    """SIGSTOP for heartbeat + 2 s: the supervisor must kill and replace it.

    Recognition releases the ring slots, so while it is stopped and then reloads its models the capture waits
    for a free slot far longer than the heartbeat timeout; it must not be killed for that (capture restarts 0).
    """
    chaos = _run(_tree(models, clip, max_fps=PACE_FPS, heartbeat_s=HEARTBEAT_S), _stop(stage, HEARTBEAT_S + 2.0))
    _assert_unchanged(clean, chaos, {stage: 1})


def test_a_capture_blocked_on_a_full_ring_is_not_killed(clip: Path, models: Path, clean: RunResult) -> None:
    """Unpaced capture, heartbeat timeout 3 s, recognition stopped for 1.5 s mid-run: nothing may restart.

    An unpaced file capture is ring-bound for the whole run: it waits for a free slot during the start-up while
    detection and recognition load their models, and on almost every frame after. While recognition (the stage
    that releases slots) is stopped, the ring stays full and the capture waits throughout. The stop is half the
    heartbeat timeout, so that recognition itself (last beat up to a stats interval before, first beat after
    SIGCONT delayed by a busy CPU) is not due for a kill either. Waiting is not a failure: no stage may be
    restarted, and nothing may change.
    """
    chaos = _run(_tree(models, clip, heartbeat_s=HEARTBEAT_S), _stop("recognition", HEARTBEAT_S / 2))
    _assert_unchanged(clean, chaos, {})
