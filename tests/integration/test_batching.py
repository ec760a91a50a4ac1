"""Cross-camera batching in the real pipeline: two cameras with ``detection.batch: 2``, or with
``recognition.batch: 4`` (face and Re-ID crops of both cameras in one embedder run), store what frame-by-frame
handling stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import facepro, finish_run, pipeline_config, save_config, start_run, write_clip

FRAMES = 100


def _run(models: Path, clips: dict[str, Path], data_dir: Path, monkeypatch: pytest.MonkeyPatch, batch: int,
         stage: str = "detection", reid: bool = False) -> tuple[dict, list]:
    data_dir.mkdir()
    monkeypatch.setenv("FACEPRO_DATA_DIR", str(data_dir))
    tree = pipeline_config(models, clips)
    tree[stage].update(batch=batch, batch_timeout_ms=20)
    if reid:
        tree["recognition"]["reid"] = {"path": str(models / "osnet_x0_25_msmt17.onnx"), "every_n_frames": 2}
    cfg = save_config(tree, data_dir / "cfg.yaml")
    summary = finish_run(start_run(cfg), data_dir)
    res = facepro("events", "--config", str(cfg), "--json", "--limit", "1000", check=True)
    events = sorted((e["camera"], e["track_id"], e["first_frame"], e["last_frame"], e["label"], e["identity"])
                    for e in map(json.loads, res.stdout.splitlines()))
    return summary, events


def test_two_cameras_batched_by_two_store_what_frame_by_frame_stores(videos: Path, models: Path, short_data_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    clips = {"campus": write_clip(videos / "vtest.avi", short_data_dir / "a.avi", FRAMES),
             "hall": write_clip(videos / "one-by-one-person-detection.mp4", short_data_dir / "b.avi", FRAMES)}
    one, events_one = _run(models, clips, short_data_dir / "b1", monkeypatch, batch=1)
    two, events_two = _run(models, clips, short_data_dir / "b2", monkeypatch, batch=2)
    for summary in (one, two):
        assert summary["complete"] is True and summary["losses"] == {}
        for stage in ("capture", "detection", "recognition"):
            assert summary["stages"][stage]["frames_out"] == 2 * FRAMES, stage  # every frame of both files, once
    counts = two["stages"]["detection"]["counts"]
    assert counts["batch_frames"] == 2 * FRAMES and FRAMES <= counts["batches"] < 2 * FRAMES  # batches of 1 and 2 frames
    assert "batches" not in one["stages"]["detection"]["counts"]  # batch 1: frame by frame, no batch counters
    assert {e[0] for e in events_one} == {"campus", "hall"}
    assert events_two == events_one  # same detections, so the same tracks on each camera


def test_two_cameras_with_recognition_batched_store_what_frame_by_frame_stores(videos: Path, models: Path,
                                                                               short_data_dir: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Faces and Re-ID on both cameras; ``recognition.batch: 4`` hands the recognition process up to 4 frames at
    once: the same events and identities, the same face and Re-ID work, in fewer embedder runs."""
    clips = {"campus": write_clip(videos / "vtest.avi", short_data_dir / "a.avi", FRAMES),
             "hall": write_clip(videos / "one-by-one-person-detection.mp4", short_data_dir / "b.avi", FRAMES)}
    one, events_one = _run(models, clips, short_data_dir / "r1", monkeypatch, 1, "recognition", reid=True)
    four, events_four = _run(models, clips, short_data_dir / "r4", monkeypatch, 4, "recognition", reid=True)
    for summary in (one, four):
        assert summary["complete"] is True and summary["losses"] == {}
        assert summary["stages"]["recognition"]["frames_out"] == 2 * FRAMES  # every frame of both files, once
    a, b = one["stages"]["recognition"]["counts"], four["stages"]["recognition"]["counts"]
    assert b["batch_frames"] == 2 * FRAMES and b["batches"] < 2 * FRAMES and "batches" not in a
    for key in ("face_analyses", "faces_used", "face_embeddings", "reid_crops"):
        assert a.get(key, 0) == b.get(key, 0), key
    assert a["reid_crops"] > 0 and b["reid_runs"] < a["reid_runs"]  # the same crops in fewer OSNet runs
    assert events_four == events_one
