"""Motion regions in the real pipeline: one person at a time walks into the one-by-one room; with regions the
detector runs on less of each frame, and the run stores the same person events as whole frames do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import facepro, finish_run, pipeline_config, save_config, start_run, write_clip

FRAMES = 460  # the empty room, the first person (~75-190), the room empty again, the second (~250-440)


def _run(models: Path, clip: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, regions: bool) -> tuple[dict, list]:
    data_dir.mkdir()
    monkeypatch.setenv("FACEPRO_DATA_DIR", str(data_dir))
    tree = pipeline_config(models, {"hall": clip})
    tree["detection"]["regions"] = {"enabled": regions}
    cfg = save_config(tree, data_dir / "cfg.yaml")
    summary = finish_run(start_run(cfg), data_dir)
    res = facepro("events", "--config", str(cfg), "--json", "--limit", "1000", check=True)
    events = sorted((e["first_frame"], e["last_frame"]) for e in map(json.loads, res.stdout.splitlines()) if e["label"] == "person")
    return summary, events


def test_regions_store_the_persons_whole_frames_store_on_less_canvas(videos: Path, models: Path, short_data_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    clip = write_clip(videos / "one-by-one-person-detection.mp4", short_data_dir / "hall.avi", FRAMES)
    on, events_on = _run(models, clip, short_data_dir / "on", monkeypatch, regions=True)
    off, events_off = _run(models, clip, short_data_dir / "off", monkeypatch, regions=False)
    for summary in (on, off):
        assert summary["complete"] is True and summary["losses"] == {}
        assert summary["stages"]["recognition"]["frames_out"] == FRAMES
    c_on, c_off = on["stages"]["detection"]["counts"], off["stages"]["detection"]["counts"]
    assert c_on["region_frames"] >= 50 and c_off["region_frames"] == 0
    assert c_on["detector_kpx"] < 0.85 * c_off["detector_kpx"] * c_on["detector_kpx_fixed"] / c_off["detector_kpx_fixed"]
    assert len(events_on) == len(events_off) == 2  # the two people, once each
    for (a1, a2), (b1, b2) in zip(events_on, events_off):
        assert abs(a1 - b1) <= 3 and abs(a2 - b2) <= 3  # the same walks, to a few frames
