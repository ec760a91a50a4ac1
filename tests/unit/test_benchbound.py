"""scripts/bench_e2e.py's helpers on synthetic data: the schedule read from a run summary, the bound's
arithmetic, the spread of timed calls, the person-event checks, and scripts/gpu_check.py's dmon parsing."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from pipeline.config import parse_config
from scripts.benchbound import ModelTime, Schedule, bound, inference_parallelism, spread


def summary(counts: dict, frames: int = 100, motion_skipped: int = 30, stable_skipped: int | None = None) -> dict:
    det = {"frames_out": frames, "dropped": {"motion_skipped": motion_skipped}}
    if stable_skipped is not None:
        det["counts"] = {"stable_skipped": stable_skipped}
    return {"stages": {"detection": det, "recognition": {"frames_out": frames, "counts": counts}}}


def test_schedule_from_the_run_summary_counters() -> None:
    s = Schedule.from_summary(summary({"faces_used": 4, "face_analyses": 10, "face_analyses_frame": 3,
                                       "face_embeddings": 6, "face_embed_runs": 5, "reid_crops": 12, "reid_runs": 4}), 2.0)
    assert (s.frames, s.detector_runs, s.face_frame_runs, s.face_region_runs) == (100, 70, 3, 7)
    assert (s.face_embeddings, s.face_embed_runs, s.reid_crops, s.reid_runs, s.parallel) == (6, 5, 12, 4, 2.0)
    assert Schedule.from_summary(summary({}), 1.0).face_frame_runs == 0  # no face work: counters absent = 0
    assert Schedule.from_summary(summary({}, stable_skipped=20), 1.0).detector_runs == 50  # held frames: no detector


def test_a_summary_with_face_work_but_no_work_counters_is_an_older_pipeline() -> None:
    with pytest.raises(SystemExit, match="PYTHONPATH"):
        Schedule.from_summary(summary({"faces_used": 4}), 2.0)


def test_bound_is_frames_over_model_time_per_core() -> None:
    s = Schedule(frames=100, detector_runs=100, face_frame_runs=0, face_region_runs=0, face_embeddings=0,
                 face_embed_runs=0, reid_crops=0, reid_runs=0, parallel=2.0)
    b = bound(s, {"object_detector": ModelTime(100, 50, 20.0), "reid_embedder": ModelTime(0, 0, 0.0)}, pipeline_fps=50.0)
    assert b["model_s"] == 2.0 and b["fps"] == 100.0 and b["share"] == 0.5  # 100 frames / (2 s / 2 cores)
    assert bound(s, {}, 50.0)["fps"] is None


def test_spread_covers_the_frames_evenly_and_repeats_when_asked_for_more() -> None:
    assert spread(10, 5) == [0, 2, 4, 7, 9] and spread(3, 6) == [0, 1, 2, 0, 1, 2] and spread(0, 4) == []


def test_parallelism_is_the_inference_threads_on_cpu_and_the_processes_on_gpu(tmp_path: Path) -> None:
    tree = {"cameras": [{"name": "c", "source": "x.avi"}],
            "detection": {"processes": 2, "detector": {"path": "d.onnx", "layout": "yolox"}},
            "recognition": {"processes": 2, "face": {"detector": {"path": "f.onnx"}, "embedder": {"path": "e.onnx"}}}}
    assert inference_parallelism(parse_config(tree), cpu_count=16) == 16.0  # 4 processes x 4 threads
    assert inference_parallelism(parse_config(tree), cpu_count=2) == 2.0  # 4 processes x 1 thread, capped at 2 cores
    tree["runtime"] = {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    assert inference_parallelism(parse_config(tree), cpu_count=16) == 4.0


def test_person_event_checks_apply_to_unmodified_asset_videos_only() -> None:
    from scripts.bench_e2e import Source, check_events

    sources = [Source(Path("a.mp4"), "one-by-one-person-detection", False), Source(Path("b.avi"), "vtest", False),
               Source(Path("c.avi"), "vtest", True)]
    got = check_events(sources, {"cam0": 6, "cam1": 30, "cam2": 5}, baseline=27)
    assert [c["ok"] for c in got] == [True, False, None]  # 30 is more than 10 % above 27
    assert check_events(sources[1:2], {"cam0": 29}, 27)[0]["ok"] is True


def test_dmon_log_gives_sm_utilisation_per_time_window(tmp_path: Path) -> None:
    from scripts.gpu_check import Dmon, util

    log = tmp_path / "dmon.log"
    log.write_text("#Date       Time        gpu     sm    mem    enc    dec    jpg    ofa\n"
                   "#YYYYMMDD   HH:MM:SS    Idx      %      %      %      %      %      %\n"
                   " 20261127   08:01:02      0     40     12      0      0      0      0\n"
                   " 20261127   08:01:03      0     60     12      0      0      0      0\n"
                   " 20261127   08:01:09      0      -      -      -      -      -      -\n")
    d = Dmon.__new__(Dmon)
    d.log = log
    samples = d.samples()
    t0 = datetime(2026, 11, 27, 8, 1, 2).timestamp()
    assert [u for _, u in samples] == [40.0, 60.0]
    assert util(samples, [t0, t0 + 1]) == "50/60" and util(samples, [t0 + 5, t0 + 6]) == "-" and util(samples, None) == "-"


def test_eval_numbers_count_as_unchanged_within_the_readme_precision() -> None:
    from scripts.bench_e2e import _same

    assert _same(0.5785, 0.578) and not _same(0.5795, 0.578) and not _same(None, 0.578)
    assert _same("14/14", "14/14") and not _same(5, 6)


def test_copy_probe_times_each_model_three_ways_on_the_cpu_provider(models: Path, capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/gpu_check.py's copy probe (the IOBinding question) runs here on the CPU provider: per model, a numpy
    run, a run on an input bound in place with the output left there, and one with the output copied back."""
    from scripts.gpu_check import COPY_CASES, copy_probe

    monkeypatch.setenv("FACEPRO_ASSETS", str(models.parent))
    assert copy_probe("cpu", n=3) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(COPY_CASES)
    for (name, shape), line in zip(COPY_CASES, lines):
        assert line.strip().startswith(f"{name} (CPUExecutionProvider), input {'x'.join(map(str, shape))}")
        assert all(f"{k} " in line for k in ("run", "bound", "bound+out")) and "copies at most" in line


@pytest.mark.parametrize("providers, cameras, variants", [
    ("CUDAExecutionProvider,CPUExecutionProvider", 1, ["nobind:runtime.io_binding=off"]),
    ("CUDAExecutionProvider,CPUExecutionProvider", 4, ["batch8:detection.batch=8,recognition.batch=8"]),
    ("CPUExecutionProvider", 1, []),
    ("CPUExecutionProvider", 16, []),
])
def test_gpu_runs_add_the_batch_and_io_binding_variants(providers: str, cameras: int, variants: list[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/gpu_check.py: several GPU cameras also run batched; one GPU camera also runs without IOBinding."""
    import subprocess

    import scripts.gpu_check as gc

    seen: list[list[str]] = []
    monkeypatch.setattr(gc, "sh", lambda cmd, **kw: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0, '{"ok": 1}\n', ""))
    doc = gc.bench(gc.parse_args([]), [Path("a.avi")], cameras, providers, 60)
    (cmd,) = seen
    assert doc["ok"] == 1 and [cmd[i + 1] for i, a in enumerate(cmd) if a == "--variant"] == variants
