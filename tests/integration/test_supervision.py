"""Supervisor health: a killed process is restarted, shown in status, and the run completes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from pipeline.ring import list_segments
from tests.integration.conftest import finish_run, pipeline_config, save_config, start_run, wait_status, write_clip

FRAMES = 300


@pytest.fixture(scope="module")
def clip(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(videos / "vtest.avi", tmp_path_factory.mktemp("clip") / "vtest300.avi", FRAMES)


def _stage(doc: dict, name: str) -> dict:
    return next(s for s in doc["stages"] if s["stage"] == name)


def test_killed_detection_process_is_restarted_and_run_completes(clip: Path, models: Path, short_data_dir: Path) -> None:
    tree = pipeline_config(models, {"campus": clip}, ring__release_timeout_s=2.0, tracking__reorder_timeout_s=1.0)
    tree["cameras"][0]["max_fps"] = 25  # paced, so the run outlasts the kill and the restart
    cfg = save_config(tree, short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    try:
        doc = wait_status(proc, until=lambda d: _stage(d, "detection")["rate_fps"] > 0 and _stage(d, "detection")["pids"])
        victim = _stage(doc, "detection")["pids"][0]
        os.kill(victim, signal.SIGKILL)
        doc = wait_status(proc, until=lambda d: _stage(d, "detection")["restarts"] >= 1 and _stage(d, "detection")["processes"] == 1)
        assert victim not in _stage(doc, "detection")["pids"]
    finally:
        summary = finish_run(proc, short_data_dir, codes=(0,))
    stages = summary["stages"]
    assert stages["capture"]["frames_out"] == FRAMES
    assert stages["detection"]["restarts"] == 1 and summary["restarts"]["detection"] == 1
    # Frames the killed process held were replayed to its successor: every frame took effect exactly once.
    assert stages["recognition"]["frames_out"] == FRAMES
    assert not set(stages["recognition"]["dropped"]) & {"lost", "overwritten", "queue_full"}
    assert summary["complete"] is True and not summary["losses"]
    assert list_segments(summary["run_id"]) == []


def test_scaling_detection_up_and_down_processes_every_frame_exactly_once(clip: Path, models: Path, short_data_dir: Path) -> None:
    from tests.integration.conftest import facepro

    tree = pipeline_config(models, {"campus": clip}, detection__motion={"enabled": False})
    tree["cameras"][0]["max_fps"] = 20  # paced, so the run outlasts the scale requests (~15 s)
    cfg = save_config(tree, short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    try:
        wait_status(proc, until=lambda d: _stage(d, "detection")["rate_fps"] > 0)
        up = facepro("scale", "--config", str(cfg), "detection=2")
        assert up.returncode == 0 and "1 -> 2" in up.stdout, up.stderr
        wait_status(proc, until=lambda d: _stage(d, "detection")["processes"] == 2 and _stage(d, "detection")["rate_fps"] > 0)
        down = facepro("scale", "--config", str(cfg), "detection=1")
        assert down.returncode == 0, down.stderr
        wait_status(proc, until=lambda d: _stage(d, "detection")["processes"] == 1)
    finally:
        summary = finish_run(proc, short_data_dir)
    stages = summary["stages"]
    assert len(stages["detection"]["peak_rss_mb"]) == 2  # two processes took part
    assert stages["detection"]["restarts"] == 0
    # Exactly once: the detection processes together handled each frame once, and recognition got all of them in order.
    assert stages["capture"]["frames_out"] == FRAMES
    assert stages["detection"]["frames_out"] == FRAMES
    assert stages["recognition"]["frames_out"] == FRAMES
    assert "lost" not in stages["recognition"]["dropped"]


@pytest.mark.parametrize("spec, error", [("capture=2", "not supported"), ("detection", "expected STAGE=N")])
def test_scale_rejects_bad_requests(clip: Path, models: Path, short_data_dir: Path, spec: str, error: str) -> None:
    from tests.integration.conftest import facepro

    cfg = save_config(pipeline_config(models, {"campus": clip}), short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    try:
        wait_status(proc)
        res = facepro("scale", "--config", str(cfg), spec)
        assert res.returncode == 2
        assert error in res.stdout + res.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    # A drained SIGINT exits 0 unless frames already announced were lost on the way out (exit 3, named in the summary).
    summary = json.loads((short_data_dir / "last_run.json").read_text())
    assert summary["interrupted"] is True
    assert proc.returncode == (3 if summary["losses"] else 0), summary["losses"]


def test_a_broken_model_is_refused_before_any_process_starts(clip: Path, models: Path, short_data_dir: Path) -> None:
    broken = short_data_dir / "broken.onnx"
    broken.write_bytes(b"not an onnx model" * 100)
    tree = pipeline_config(models, {"campus": clip})
    tree["recognition"]["face"]["embedder"]["path"] = str(broken)
    cfg = save_config(tree, short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("facepro run: recognition.face: face embedder model") and "broken.onnx" in last, last
    assert not (short_data_dir / "last_run.json").exists()  # nothing was started


def test_a_stage_that_keeps_failing_stops_the_pipeline_with_its_error(clip: Path, models: Path, short_data_dir: Path) -> None:
    import shutil

    embedder = short_data_dir / "embedder.onnx"
    shutil.copy(models / "mobilefacenet_128d.onnx", embedder)
    tree = pipeline_config(models, {"campus": clip})
    tree["recognition"]["face"]["embedder"]["path"] = str(embedder)
    tree["cameras"][0]["max_fps"] = 10
    cfg = save_config(tree, short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    doc = wait_status(proc, until=lambda d: _stage(d, "recognition")["pids"] and _stage(d, "recognition")["rate_fps"] > 0)
    embedder.write_bytes(b"not an onnx model" * 100)  # the model file is damaged on disk while the run goes on
    os.kill(_stage(doc, "recognition")["pids"][0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert "stage recognition failed" in last and "embedder.onnx" in last, last
    summary = json.loads((short_data_dir / "last_run.json").read_text())
    assert summary["stages"]["recognition"]["restarts"] == 6
    assert list_segments(summary["run_id"]) == []


def test_scaling_recognition_repartitions_cameras_and_loses_no_frame(clip: Path, models: Path, short_data_dir: Path) -> None:
    from tests.integration.conftest import facepro

    tree = pipeline_config(models, {"east": clip, "west": clip})
    for cam in tree["cameras"]:
        cam["max_fps"] = 20  # paced, so the run outlasts the rescale
    cfg = save_config(tree, short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    try:
        wait_status(proc, until=lambda d: _stage(d, "recognition")["rate_fps"] > 0)
        res = facepro("scale", "--config", str(cfg), "recognition=2")
        assert res.returncode == 0 and "1 -> 2" in res.stdout, res.stdout + res.stderr
        wait_status(proc, until=lambda d: _stage(d, "recognition")["processes"] == 2 and _stage(d, "recognition")["rate_fps"] > 0)
    finally:
        summary = finish_run(proc, short_data_dir)
    stages = summary["stages"]
    assert len(stages["recognition"]["peak_rss_mb"]) == 3  # the first process, then two after the rescale
    assert stages["recognition"]["restarts"] == 0
    assert stages["capture"]["frames_out"] == 2 * FRAMES
    assert stages["recognition"]["frames_out"] == 2 * FRAMES  # every frame of both cameras exactly once
    assert "lost" not in stages["recognition"]["dropped"]


def _children_of_current_run(data_dir: Path) -> tuple[str, list[dict]]:
    info = json.loads((data_dir / "run" / "current.json").read_text())
    run = json.loads((Path(info["runtime_dir"]) / "run.json").read_text())
    return run["run_id"], run["children"]


def test_no_stage_process_outlives_a_killed_supervisor(clip: Path, models: Path, short_data_dir: Path) -> None:
    import time

    from pipeline.runs import cleanup_stale_runs, pid_alive

    tree = pipeline_config(models, {"campus": clip})
    tree["cameras"][0]["max_fps"] = 10  # a 30 s run: the kill arrives while every stage runs
    cfg = save_config(tree, short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    try:
        wait_status(proc, until=lambda d: all(s["processes"] >= 1 for s in d["stages"]) and _stage(d, "recognition")["rate_fps"] > 0)
        run_id, children = _children_of_current_run(short_data_dir)
        assert sorted(c["stage"] for c in children) == ["capture", "detection", "recognition", "storage"]
        assert all("pipeline.worker" in c["cmdline"] for c in children)
        os.kill(proc.pid, signal.SIGKILL)  # the supervisor only: its children get no signal from us
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(pid_alive(c["pid"]) for c in children):
            time.sleep(0.1)
        assert [c for c in children if pid_alive(c["pid"])] == []
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert list_segments(run_id), "SIGKILL leaves the rings and counter blocks behind"
    cleanup_stale_runs(short_data_dir)  # what the next run does first
    assert list_segments(run_id) == []


def test_a_new_run_stops_a_dead_runs_leftover_stage_process_and_removes_its_segments(short_data_dir: Path) -> None:
    import subprocess
    import sys

    import psutil

    from pipeline.counters import CounterBlock, block_name
    from pipeline.runs import cleanup_stale_runs, runs_dir

    stale = f"d{os.getpid() % 10**7:07d}"  # unique per test process
    run_dir = runs_dir(short_data_dir) / stale
    run_dir.mkdir(parents=True)
    # The leftover: a process whose recorded pid and command line match (as if PDEATHSIG had failed); the decoy's pid
    # is recorded too, but with another command line (a recycled pid): it must be left alone.
    sleeper = "import time; time.sleep(120)"
    leftover = subprocess.Popen([sys.executable, "-c", sleeper, "pipeline.worker", str(run_dir), "detection", "0"])
    decoy = subprocess.Popen([sys.executable, "-c", sleeper, "decoy"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # the dead run's supervisor
    try:
        children = [{"stage": "detection", "index": 0, "pid": leftover.pid, "cmdline": psutil.Process(leftover.pid).cmdline()},
                    {"stage": "capture", "index": 0, "pid": decoy.pid, "cmdline": [sys.executable, "-m", "pipeline.worker", "x"]}]
        (run_dir / "run.json").write_text(json.dumps({"run_id": stale, "pid": gone.pid, "runtime_dir": str(run_dir),
                                                      "socket_dir": str(run_dir), "children": children}))
        ring = Path("/dev/shm") / f"facepro_{stale}_campus_{leftover.pid}_0"
        ring.write_bytes(b"\0" * 4096)
        CounterBlock.create(block_name(stale, "detection", 0, 1), owner_pid=gone.pid).close()
        assert len(list_segments(stale)) == 2
        removed = cleanup_stale_runs(short_data_dir)
        leftover.wait(timeout=5)  # killed (and already reaped by the cleanup's wait, so no exit status here)
        assert decoy.poll() is None, "a process whose command line does not match must not be touched"
        assert removed == 2 and list_segments(stale) == [] and not run_dir.exists()
    finally:
        for p in (leftover, decoy):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_a_stopped_process_stops_beating_and_is_killed_and_restarted(clip: Path, models: Path, short_data_dir: Path) -> None:
    tree = pipeline_config(models, {"campus": clip}, ring__release_timeout_s=2.0, tracking__reorder_timeout_s=1.0)
    tree["runtime"]["heartbeat_timeout_s"] = 8.0  # short, yet above a start on a loaded 2-core box (imports hold the GIL)
    tree["cameras"][0]["max_fps"] = 25
    cfg = save_config(tree, short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    try:
        doc = wait_status(proc, until=lambda d: _stage(d, "detection")["rate_fps"] > 0)
        victim = _stage(doc, "detection")["pids"][0]
        assert _stage(doc, "recognition")["restarts"] == 0  # nobody busy loading a model was killed
        os.kill(victim, signal.SIGSTOP)
        doc = wait_status(proc, until=lambda d: _stage(d, "detection")["restarts"] >= 1 and _stage(d, "detection")["processes"] == 1)
        assert victim not in _stage(doc, "detection")["pids"] and "no heartbeat" in _stage(doc, "detection")["last_error"]
    finally:
        summary = finish_run(proc, short_data_dir, codes=(0, 3))
    assert summary["restarts"]["detection"] == 1 and summary["stages"]["capture"]["frames_out"] == FRAMES
