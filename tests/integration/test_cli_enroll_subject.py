"""``facepro enroll`` on photos with several faces: the dominant face, a refusal listing the faces, ``--face N``."""

from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import pytest

from pipeline.cli import main
from tests.face_photos import with_bystander
from tests.integration.conftest import facepro, identify_faces as _identify

ROOT = Path(__file__).resolve().parents[2]
FACE_LINE = re.compile(r"^face (\d+): box (-?\d+),(-?\d+),(-?\d+),(-?\d+)$")




def _identities(cfg: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["identities", "list", "--config", cfg]) == 0
    return capsys.readouterr().out


def test_photo_with_a_small_bystander_enrolls_the_subject(cfg: str, faces: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    photo = tmp_path / "obama_with_bystander.jpg"
    cv2.imwrite(str(photo), with_bystander(faces))
    capsys.readouterr()
    assert main(["enroll", "--config", cfg, "Barack Obama", str(photo)]) == 0
    out = capsys.readouterr().out
    m = re.search(r": face (\d) of 2, box (\d+),(\d+),(\d+),(\d+) \((\d+\.\d)x the next face's size x centrality\)", out)
    assert m, out
    assert int(m[4]) < cv2.imread(str(photo)).shape[1] * 0.8 and float(m[6]) > 10  # the subject, not the bystander
    assert "1 embedding(s)" in _identities(cfg, capsys)
    assert [f["identity"] for f in _identify(cfg, faces / "obama/obama2.jpg", capsys)] == ["Barack Obama"]
    # the bystander (Biden) was not enrolled: neither his own photo nor his face in the composite is named
    assert [f["identity"] for f in _identify(cfg, faces / "biden/biden.jpg", capsys)] == [None]
    assert sorted(str(f["identity"]) for f in _identify(cfg, photo, capsys)) == ["Barack Obama", "None"]


def test_two_similar_faces_are_refused_then_face_n_enrolls_the_chosen_one(
        cfg: str, faces: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    photo = faces / "_multi/kit_with_rose.jpg"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = facepro("enroll", "--config", cfg, "Kit Harington", str(photo), timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if " INFO " not in ln]
    assert lines[0].startswith(f"facepro enroll: {photo}: 2 faces found and none dominates"), lines
    assert lines[0].endswith("choose one with --face N:"), lines
    boxes = [tuple(map(int, FACE_LINE.match(ln).groups())) for ln in lines[1:]]  # type: ignore[union-attr]
    assert [b[0] for b in boxes] == [0, 1] and len(lines) == 3
    assert boxes[0][1] < boxes[1][1]  # numbered left to right
    assert "Kit Harington" not in _identities(cfg, capsys)  # nothing enrolled

    found = {round(f["bbox"][0]): f["bbox"] for f in _identify(cfg, photo, capsys)}  # the same boxes as identify's
    for _, x1, y1, x2, y2 in boxes:
        (bbox,) = [b for bx, b in found.items() if abs(bx - x1) <= 1]
        assert [x1, y1, x2, y2] == pytest.approx(bbox, abs=1)

    assert main(["enroll", "--config", cfg, "Kit Harington", str(photo), "--face", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{photo}: face 1 of 2, box {','.join(map(str, boxes[1][1:]))} (chosen with --face 1)" in out
    assert [f["identity"] for f in _identify(cfg, faces / "kit_harington/john1.jpeg", capsys)] == ["Kit Harington"]
    assert [f["identity"] for f in _identify(cfg, faces / "rose_leslie/img1.jpg", capsys)] == [None]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["_multi/kit_with_rose.jpg", "--face", "2"], r"kit_with_rose\.jpg: face 2 does not exist \(2 face\(s\) found, valid: 0\.\.1\)$"),
        (["obama/obama.jpg", "--face", "1"], r"obama\.jpg: face 1 does not exist \(1 face\(s\) found, valid: 0\.\.0\)$"),
        (["obama/obama.jpg", "obama/obama2.jpg", "--face", "0"], r"--face N chooses a face in one image"),
    ],
)
def test_bad_face_choices_are_one_line_errors(cfg: str, faces: Path, args: list[str], error: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(faces / a) if a.endswith(".jpg") else a for a in args]
    assert main(["enroll", "--config", cfg, "Someone", *argv]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and " INFO " not in ln]
    assert len(err) == 1 and re.search(error, err[0]), err
    assert "Someone" not in _identities(cfg, capsys)


def test_face_zero_of_a_single_face_photo_enrolls_it(cfg: str, faces: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["enroll", "--config", cfg, "Barack Obama", str(faces / "obama/obama.jpg"), "--face", "0"]) == 0
    assert capsys.readouterr().out.startswith("enrolled Barack Obama: 1 image(s)")  # one face: nothing to say which
    assert [f["identity"] for f in _identify(cfg, faces / "obama/obama2.jpg", capsys)] == ["Barack Obama"]


def test_a_refused_image_among_several_enrolls_none_of_them(cfg: str, faces: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["enroll", "--config", cfg, "Kit Harington", str(faces / "kit_harington/john1.jpeg"),
                 str(faces / "_multi/kit_with_rose.jpg")]) == 2
    assert "none dominates" in capsys.readouterr().err
    assert "Kit Harington" not in _identities(cfg, capsys)
