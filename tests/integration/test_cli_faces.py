"""``facepro enroll`` / ``identify`` / ``events`` through the real CLI on the shared face images."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import FaceConfig
from tests.integration.conftest import identify_faces as _identify




def test_enroll_then_identify_group_photo(cfg: str, faces: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["enroll", "--config", cfg, "Barack Obama", str(faces / "obama/obama.jpg")]) == 0
    assert main(["enroll", "--config", cfg, "Joe Biden", str(faces / "biden/biden.jpg")]) == 0
    capsys.readouterr()
    found = _identify(cfg, faces / "_multi/obama_and_biden.jpg", capsys)
    assert len(found) == 3
    names = sorted((f["identity"] or "") for f in found)
    assert names == ["", "Barack Obama", "Joe Biden"]  # the third face stays unknown
    for f in found:
        x1, y1, x2, y2 = f["bbox"]
        assert x1 < x2 and y1 < y2
        assert (f["similarity"] >= FaceConfig.model_fields["match_threshold"].default) == (f["identity"] is not None)
    assert all(f["identity"] is None for f in _identify(cfg, faces / "_multi/t1.jpg", capsys))


def test_enroll_adds_images_to_an_identity(cfg: str, faces: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["enroll", "--config", cfg, "Barack Obama", str(faces / "obama/obama.jpg")]) == 0
    assert main(["enroll", "--config", cfg, "Barack Obama", str(faces / "obama/obama2.jpg"), str(faces / "obama/obama3.jpg")]) == 0
    capsys.readouterr()
    found = _identify(cfg, faces / "obama/obama1.jpg", capsys)
    assert [f["identity"] for f in found] == ["Barack Obama"]


@pytest.mark.parametrize(
    "image, error",
    [("_multi/t1.jpg", "6 faces found"), ("missing.jpg", "cannot read image")],
)
def test_enroll_rejects_bad_images(cfg: str, faces: Path, image: str, error: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["enroll", "--config", cfg, "Someone", str(faces / image)]) == 2
    assert error in capsys.readouterr().err


def test_enroll_rejects_an_image_without_face(cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import cv2
    import numpy as np

    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((480, 640, 3), 200, np.uint8))
    assert main(["enroll", "--config", cfg, "Nobody", str(blank)]) == 2
    assert "no face found" in capsys.readouterr().err


def test_events_on_an_empty_database_prints_nothing(cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["events", "--config", cfg, "--json"]) == 0
    assert capsys.readouterr().out == ""


def test_identities_list_and_delete(cfg: str, faces: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["enroll", "--config", cfg, "Joe Biden", str(faces / "biden/biden.jpg"), str(faces / "biden/biden2.jpg")]) == 0
    assert main(["identities", "list", "--config", cfg]) == 0
    assert "Joe Biden" in capsys.readouterr().out
    assert main(["identities", "delete", "Joe Biden", "--config", cfg]) == 0
    capsys.readouterr()
    assert [f["identity"] for f in _identify(cfg, faces / "biden/biden2.jpg", capsys)] == [None]  # no longer known
    assert main(["identities", "delete", "Joe Biden", "--config", cfg]) == 2
    assert "no identity named" in capsys.readouterr().err


def test_identities_merge(cfg: str, faces: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["enroll", "--config", cfg, "Barack Obama", str(faces / "obama/obama.jpg")]) == 0
    assert main(["enroll", "--config", cfg, "B. Obama", str(faces / "obama/obama2.jpg"), str(faces / "obama/obama3.jpg")]) == 0
    capsys.readouterr()
    assert main(["identities", "merge", "Barack Obama", "B. Obama", "--config", cfg]) == 0
    assert "merged B. Obama into Barack Obama: 2 embedding(s) and 0 event(s) moved" in capsys.readouterr().out
    assert main(["identities", "list", "--config", cfg]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [ln.split()[-2:] for ln in listed] == [["3", "embedding(s)"]] and listed[0].startswith("Barack Obama ")
    assert [f["identity"] for f in _identify(cfg, faces / "obama/obama1.jpg", capsys)] == ["Barack Obama"]
    for argv, error in [(["Barack Obama", "B. Obama"], "no identity named 'B. Obama'"),
                        (["Barack Obama"], "identities merge needs two names")]:
        assert main(["identities", "merge", *argv, "--config", cfg]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if " INFO " not in ln]
        assert len(err) == 1 and error in err[0], err
