"""Unknown faces end to end: a stream of the asset face photos (nobody enrolled) through ``facepro run`` twice on
one data dir gives one anonymous id per person, the same in both runs; naming a cluster relabels its events and
enrolls the person; a negative example stops a wrong name (``facepro events relabel --not``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.cli import main
from tests.integration.conftest import finish_run, pipeline_config, save_config, start_run

ROOT = Path(__file__).resolve().parents[2]
W, H = 640, 480
SHOW, GAP = 12, 16  # frames a photo is shown, then empty frames (the track ends: see face_stream)
#: Photos in the order they are shown: four people, each seen 2-5 times, interleaved.
PHOTOS = ("obama/obama.jpg", "biden/biden.jpg", "kit_harington/john1.jpeg", "rose_leslie/img1.jpg",
          "obama/obama1.jpg", "kit_harington/john2.jpeg", "biden/biden2.jpg", "obama/obama2.jpg",
          "rose_leslie/img2.jpg", "kit_harington/johnsnow_test1.jpg", "obama/obama3.jpg", "obama/obama_small.jpg")


def _person(photo: str) -> str:
    return photo.split("/")[0]


def face_stream(faces: Path, path: Path) -> Path:
    """Each photo letterboxed into a 640x480 frame for SHOW frames (drifting 1 px a frame, as a person moving a
    little), then GAP grey frames; MJPG AVI at 10 frames/s. The grey frames are a stable scene, so the detector skips
    about every other one (``detection.stable_skip``, the tracker holds its tracks over those): GAP leaves more detector
    frames than the test's ``tracking.lost_track_buffer_frames`` (5), so each photo's track ends."""
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (W, H))
    grey = np.full((H, W, 3), 128, np.uint8)
    for photo in PHOTOS:
        img = cv2.imread(str(faces / photo))
        assert img is not None, photo
        s = min((W - 20) / img.shape[1], (H - 20) / img.shape[0])
        small = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        for i in range(SHOW):
            frame = grey.copy()
            y, x = (H - small.shape[0]) // 2, (W - small.shape[1]) // 2 - 8 + i
            frame[y:y + small.shape[0], x:x + small.shape[1]] = small
            out.write(frame)
        for _ in range(GAP):
            out.write(grey)
    out.release()
    return path


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``facepro ARGS`` in-process (exit code 0 asserted): its standard output."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _events(capsys: pytest.CaptureFixture[str], cfg: Path) -> list[dict]:
    out = cli(capsys, "events", "--config", str(cfg), "--json", "--limit", "1000", "--label", "person")
    return [json.loads(line) for line in out.splitlines()]


def _by_photo(events: list[dict]) -> dict[int, dict]:
    """The face event of each photo (by its frame range): exactly one per photo has a face and so an anonymous id
    (a photo may hold a second person box without a face, e.g. obama2.jpg: such events stay without one)."""
    out: dict[int, dict] = {}
    for e in events:
        assert e["identity"] is None, e
        if e["unknown"] is None:
            continue
        k = e["first_frame"] // (SHOW + GAP)
        assert k not in out, f"two face events for photo {PHOTOS[k]}: {out[k]} and {e}"
        out[k] = e
    assert sorted(out) == list(range(len(PHOTOS))), [(e["first_frame"], e["unknown"]) for e in events]
    return out


@pytest.mark.slow
def test_unknown_faces_keep_their_ids_across_runs_and_can_be_named_and_corrected(
        faces: Path, models: Path, short_data_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    clip = face_stream(faces, short_data_dir / "faces.avi")
    tree = pipeline_config(models, {"faces": clip}, tracking__lost_track_buffer_frames=5)
    tree["detection"]["motion"] = {"enabled": False}
    cfg = save_config(tree, short_data_dir / "cfg.yaml")

    runs = []
    for _ in range(2):  # the same data dir: the second run reads the clusters the first one made
        finish_run(start_run(cfg), short_data_dir, timeout_s=240)
        seen = {e["event_id"] for r in runs for e in r.values()}
        runs.append(_by_photo([e for e in _events(capsys, cfg) if e["event_id"] not in seen]))
    ids: dict[str, set[str | None]] = {}
    for run in runs:
        for k, e in run.items():
            ids.setdefault(_person(PHOTOS[k]), set()).add(e["unknown"])
    assert all(len(v) == 1 and None not in v for v in ids.values()), ids  # one id per person, in both runs
    assert len({next(iter(v)) for v in ids.values()}) == 4, ids  # four people, four ids
    listed = [json.loads(line) for line in cli(capsys, "identities", "list", "--unknown", "--json", "--config", str(cfg)).splitlines()]
    assert {u["name"]: u["events"] for u in listed} == {
        next(iter(ids[p])): 2 * sum(_person(ph) == p for ph in PHOTOS) for p in ids}
    assert all(u["sample_event"] and Path(u["sample_snapshot"]).is_file() for u in listed)

    # naming: Obama's cluster becomes an enrolled identity; his events of both runs are relabelled
    obama = next(iter(ids["obama"]))
    assert f"named {obama} Barack Obama (new identity)" in cli(capsys, "identities", "name", obama, "Barack Obama",
                                                               "--config", str(cfg))
    named = cli(capsys, "events", "--config", str(cfg), "--json", "--identity", "Barack Obama", "--limit", "100")
    assert {json.loads(line)["event_id"] for line in named.splitlines()} == {
        e["event_id"] for run in runs for k, e in run.items() if _person(PHOTOS[k]) == "obama"}
    ident = cli(capsys, "identify", "--config", str(cfg), "--json", str(faces / "obama/obama.jpg"))
    assert [f["identity"] for f in json.loads(ident)["faces"]] == ["Barack Obama"]

    # a wrong name and its correction: a gallery that names every face (threshold -1) calls Biden Obama ...
    tree["recognition"]["face"]["match_threshold"] = -1.0
    loose = save_config(tree, short_data_dir / "loose.yaml")
    biden = next(e for k, e in runs[0].items() if _person(PHOTOS[k]) == "biden")

    def who(photo: str) -> list:
        out = cli(capsys, "identify", "--config", str(loose), "--json", str(faces / photo))
        return [f["identity"] for f in json.loads(out)["faces"]]

    assert who("biden/biden2.jpg") == ["Barack Obama"]
    res = cli(capsys, "events", "relabel", biden["event_id"], "--not", "Barack Obama", "--config", str(loose))
    assert "stored a negative example of Barack Obama" in res
    # ... and after "not Obama" on one of Biden's events, Biden's other photo is no longer named Obama; Obama still is
    assert who("biden/biden2.jpg") == [None]
    assert who("obama/obama2.jpg") == ["Barack Obama"]
