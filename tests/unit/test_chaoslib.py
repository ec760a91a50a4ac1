"""The crash-recovery comparison (scripts/chaoslib.py) on synthetic event lists and summaries."""

from __future__ import annotations

import json
from pathlib import Path

from scripts.chaoslib import (EventSpan, RunResult, compare_runs, duplicated, format_table, frame_iou,
                              max_frame_offset, problems, read_events, unmatched)


def ev(eid: str, first: int, last: int, track: int | None = None, ended: bool = True, camera: str = "cam") -> EventSpan:
    return EventSpan(eid, camera, track if track is not None else int(eid.strip("abcdefghijklmnopqrstuvwxyz") or 0),
                     first, last, ended)


CLEAN = [ev("c1", 63, 194, 1), ev("c2", 228, 447, 2), ev("c3", 506, 696, 3)]


def summary(frames: int = 500, run_id: str = "r", **drops: int) -> dict:
    stages = {s: {"frames_out": frames, "dropped": {}, "restarts": 0} for s in ("capture", "detection", "recognition")}
    stages["storage"] = {"frames_out": 40, "dropped": {}, "restarts": 0}
    stages["recognition"]["dropped"] = dict(drops)
    return {"run_id": run_id, "stages": stages}


def test_frame_iou_uses_inclusive_ranges() -> None:
    assert frame_iou(ev("a", 0, 9), ev("b", 0, 9)) == 1.0
    assert frame_iou(ev("a", 0, 9), ev("b", 5, 14)) == 5 / 15
    assert frame_iou(ev("a", 0, 9), ev("b", 10, 19)) == 0.0
    assert frame_iou(ev("a", 0, 9), ev("b", 9, 9)) == 1 / 10


def test_a_clean_run_compared_with_itself_has_no_problem() -> None:
    run = RunResult(0, summary(), CLEAN)
    report = compare_runs(run, run)
    assert report["ok"] and problems(report, frame_tolerance=0) == []
    assert (report["duplicated"], report["never_closed"], report["unmatched_clean"], report["unmatched_chaos"]) == (0, 0, 0, 0)
    assert report["max_frame_offset"] == 0
    assert "RESULT: OK" in format_table(report)


def test_overlapping_copies_of_one_event_are_duplicates() -> None:
    chaos = [ev("x1", 63, 194, 1), ev("x2", 70, 190, 7), ev("x3", 228, 447, 2), ev("x4", 506, 696, 3)]
    assert [e.event_id for e in duplicated(CLEAN, chaos)] == ["x2"]  # x1 has the better IoU with c1


def test_a_split_track_is_unmatched_but_not_duplicated() -> None:
    chaos = [ev("x1", 63, 120, 1), ev("x2", 121, 194, 9), ev("x3", 228, 447, 2), ev("x4", 506, 696, 3)]
    assert duplicated(CLEAN, chaos) == []
    assert [e.event_id for e in unmatched(CLEAN, chaos)] == ["c1"]
    assert [e.event_id for e in unmatched(chaos, CLEAN)] == ["x1", "x2"]


def test_the_same_track_id_stored_twice_is_a_duplicate() -> None:
    chaos = [ev("x1", 63, 194, 1), ev("x2", 228, 447, 1), ev("x3", 506, 696, 3)]
    assert [e.event_id for e in duplicated(CLEAN, chaos)] == ["x2"]


def test_events_of_another_camera_never_match() -> None:
    chaos = [ev("x1", 63, 194, 1, camera="other"), ev("x2", 228, 447, 2), ev("x3", 506, 696, 3)]
    assert [e.event_id for e in unmatched(CLEAN, chaos)] == ["c1"]
    assert max_frame_offset(CLEAN, chaos) is None


def test_every_loss_is_reported_with_its_size() -> None:
    clean = RunResult(0, summary(500), CLEAN)
    chaos_events = [ev("x1", 63, 194, 1, ended=False), ev("x2", 66, 194, 8), ev("x3", 228, 447, 2)]
    chaos = RunResult(1, summary(487, "q", lost=13), chaos_events, ["facepro_q_cam_1_0"], ["42: python -m pipeline.worker"],
                      kills={"recognition": 2})
    report = compare_runs(clean, chaos)
    lines = problems(report, frame_tolerance=3)
    assert "capture frames_out 487 != clean 500 (-13)" in lines
    assert "recognition dropped {'lost': 13} (clean: {})" in lines
    assert "1 duplicated events" in lines and "1 events never closed (ended false)" in lines
    assert "1 clean events without a chaos event at frame IoU >= 0.8" in lines  # c3
    assert any(line.startswith("chaos run left 1 segments") for line in lines)
    assert any(line.startswith("chaos run left 1 orphan workers") for line in lines)
    assert "chaos run exit code 1 (failure: None)" in lines
    assert report["lost_frames"] == 13 and report["stages"]["recognition"]["kills"] == 2
    assert not report["ok"] and "FAIL" in format_table(report)
    assert json.loads(json.dumps(report)) == report  # --json prints it as it is


def test_frame_tolerance_bounds_the_start_and_end_offsets() -> None:
    chaos = [ev("x1", 60, 194, 1), ev("x2", 228, 450, 2), ev("x3", 506, 696, 3)]
    report = compare_runs(RunResult(0, summary(), CLEAN), RunResult(0, summary(), chaos))
    assert report["max_frame_offset"] == 3
    assert problems(report, frame_tolerance=3) == []
    assert problems(report, frame_tolerance=2) == ["event frame ranges differ by up to 3 frames (tolerance 2)"]


def test_events_are_read_from_the_database(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from sqlalchemy.orm import Session

    from storage.db import open_engine, upgrade
    from storage.models import Camera, Event

    url = f"sqlite:///{tmp_path / 'f.db'}"
    upgrade(url, backup=False)
    engine = open_engine(url)
    now = datetime.now(timezone.utc)
    with Session(engine) as s:
        cam = Camera(name="cam")
        s.add(cam)
        s.flush()
        for eid, first, last, ended in (("b" * 32, 50, 60, False), ("a" * 32, 10, 20, True)):
            s.add(Event(id=eid, camera_id=cam.id, track_id=first, label="person", started_at=now, ended_at=now,
                        first_frame=first, last_frame=last, best_score=0.9, x1=0, y1=0, x2=1, y2=1,
                        identity_score=0.0, ended=ended))
        s.commit()
    engine.dispose()
    assert read_events(url) == [EventSpan("a" * 32, "cam", 10, 10, 20, True), EventSpan("b" * 32, "cam", 50, 50, 60, False)]
