"""Which face an enrollment photo enrolls: the pick rule on synthetic boxes, then on the real photos and models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError, FaceConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig
from stages.enrollment import (DEFAULT_DOMINANCE, EnrollmentError, NoDominantFace, choose_face, format_box, pick_subject,
                               prominence, reading_order)
from stages.face import FaceAnalyzer
from stages.gallery import enrollment_face
from stages.runtime import SessionOptions
from tests.face_photos import read, with_bystander

HW = (1000, 1000)  # (height, width) of the synthetic photos
ERR = "none dominates"


def _box(cx: float, cy: float, side: float) -> list[float]:
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]


# --- the rule on synthetic boxes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("boxes", "dominance", "expected"),
    [
        ([_box(500, 500, 200)], 2.0, 0),  # one face is always the subject
        ([_box(500, 400, 200), _box(950, 100, 50)], 2.0, 0),  # centred subject, small bystander at the edge
        ([_box(950, 100, 50), _box(500, 400, 200)], 2.0, 1),  # the same, listed the other way round
        ([_box(300, 500, 200), _box(700, 500, 200)], 2.0, ERR),  # two equal faces side by side
        ([_box(300, 500, 200), _box(700, 500, 195)], 2.0, ERR),  # nearly equal
        ([_box(500, 500, 200 * math.sqrt(1.9)), _box(500, 520, 200)], 2.0, ERR),  # 1.9x area, same place: short of 2x
        ([_box(500, 500, 200 * math.sqrt(2.1)), _box(500, 520, 200)], 2.0, 0),  # 2.1x area: dominates
        ([_box(500, 500, 100), _box(950, 950, 100)], 2.0, ERR),  # equal size, centre vs a corner: 1.8x, refused
        ([_box(500, 500, 100), _box(750, 750, 100)], 2.0, ERR),  # equal size, centre vs half-way out: 1.33x
        ([_box(500, 500, 200 * math.sqrt(1.5)), _box(900, 900, 200)], 2.0, 0),  # 1.5x area, centre vs corner: 2.5x
        ([_box(500, 500, 100), _box(1500, 1500, 400)], 2.0, 0),  # a box wholly outside the image counts 0
        ([_box(500, 500, 200), _box(-100, 500, 300)], 2.0, 0),  # cut by the edge: only its visible sixth counts
        ([_box(300, 500, 200), _box(700, 500, 200)], 1.0, ERR),  # a tie is refused even at margin 1
        ([_box(300, 500, 200), _box(700, 500, 190)], 1.0, 0),  # margin 1: the most prominent face
        ([_box(500, 500, 200 * math.sqrt(2.5)), _box(500, 520, 200)], 3.0, ERR),  # 2.5x with margin 3
        ([_box(500, 400, 220), _box(200, 300, 60), _box(850, 250, 70)], 2.0, 0),  # subject among two bystanders
        ([_box(500, 400, 220), _box(200, 300, 200), _box(850, 250, 70)], 2.0, ERR),  # a second large face
    ],
)
def test_pick_rule(boxes: list[list[float]], dominance: float, expected: int | str) -> None:
    xyxy = np.array(boxes, np.float32)
    if expected == ERR:
        with pytest.raises(NoDominantFace, match=ERR) as info:
            pick_subject(xyxy, HW, dominance, "photo.jpg")
        assert len(info.value.face_lines) == len(boxes)
    else:
        got = pick_subject(xyxy, HW, dominance, "photo.jpg")
        assert got.index == expected and got.n_faces == len(boxes)
        np.testing.assert_array_equal(got.xyxy, xyxy[expected])
        assert got.ratio >= dominance


def test_refusal_lists_every_face_with_index_and_clipped_rounded_box() -> None:
    xyxy = np.array([[100.4, 200.6, 300.2, 400.0], [-10.0, 190.0, 210.0, 410.5]], np.float32)
    with pytest.raises(NoDominantFace) as info:
        pick_subject(xyxy, (480, 640), 2.0, "group.jpg")
    err = info.value
    assert err.summary.startswith("group.jpg: 2 faces found and none dominates (the most prominent is ")
    assert "needs 2x" in err.summary
    assert err.face_lines == ("face 0: box 100,201,300,400", "face 1: box 0,190,210,410")
    assert str(err) == "\n".join([err.summary, *err.face_lines])
    np.testing.assert_array_equal(err.boxes, [[100, 201, 300, 400], [0, 190, 210, 410]])
    assert isinstance(err, EnrollmentError) and isinstance(err, ValueError)


def test_prominence_is_area_times_centrality() -> None:
    p = prominence(np.array([_box(500, 500, 100), _box(1000, 1000, 100), _box(500, 1000, 100)], np.float32), HW)
    # centred: full area; centre at a corner: clipped to a quarter of the area, weight 0.5;
    # centre at the middle of the bottom edge: half the area, its visible centre 475 px from the image's
    assert p[0] == pytest.approx(100 * 100)
    assert p[1] == pytest.approx(50 * 50 * (1 - 0.5 * math.hypot(475, 475) / math.hypot(500, 500)))
    assert p[2] == pytest.approx(100 * 50 * (1 - 0.5 * 475 / math.hypot(500, 500)))


def test_reading_order_is_left_to_right_then_top_to_bottom() -> None:
    xyxy = np.array([_box(700, 100, 50), _box(100, 900, 50), _box(700, 50, 50), _box(400, 500, 300)], np.float32)
    assert reading_order(xyxy).tolist() == [1, 3, 2, 0]


@pytest.mark.parametrize(("index", "ok"), [(0, True), (2, True), (3, False), (-1, False)])
def test_choose_face_by_index(index: int, ok: bool) -> None:
    xyxy = np.array([_box(100, 100, 50), _box(300, 100, 50), _box(500, 100, 50)], np.float32)
    if ok:
        got = choose_face(xyxy, index, "g.jpg")
        assert got.index == index and math.isnan(got.ratio)
        np.testing.assert_array_equal(got.xyxy, xyxy[index])
    else:
        with pytest.raises(EnrollmentError, match=rf"^g\.jpg: face {index} does not exist \(3 face\(s\) found, valid: 0\.\.2\)$"):
            choose_face(xyxy, index, "g.jpg")


@pytest.mark.parametrize(
    ("xyxy", "hw", "dominance", "message"),
    [
        (np.zeros((2, 3)), HW, 2.0, r"\(n, 4\)"),
        (np.array([[0, 0, np.nan, 1]]), HW, 2.0, "finite"),
        (np.zeros((1, 4)), (0, 10), 2.0, "image_hw"),
        (np.zeros((1, 4)), HW, 0.5, "dominance"),
    ],
)
def test_bad_inputs_are_value_errors(xyxy: np.ndarray, hw: tuple[int, int], dominance: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pick_subject(xyxy, hw, dominance)


def test_no_face_is_an_enrollment_error() -> None:
    with pytest.raises(EnrollmentError, match="no face"):
        pick_subject(np.zeros((0, 4), np.float32), HW)


def test_margin_is_configured_under_recognition_face(models: Path) -> None:
    kw = {"detector": OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"),
          "embedder": OnnxFaceEmbedderConfig(path=models / "mobilefacenet_128d.onnx")}
    assert FaceConfig(**kw).enroll_dominance == DEFAULT_DOMINANCE == 1.5
    assert FaceConfig(**kw, enroll_dominance=3).enroll_dominance == 3.0
    for bad in (0.9, 101):
        with pytest.raises((ConfigError, ValueError), match="enroll_dominance"):
            FaceConfig(**kw, enroll_dominance=bad)


def test_format_box() -> None:
    assert format_box(np.array([1.49, 2.5, 3.51, -0.4])) == "1,2,4,0"


# --- real photos and models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def analyzer(models: Path) -> FaceAnalyzer:
    cfg = FaceConfig(detector=OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"),
                     embedder=OnnxFaceEmbedderConfig(path=models / "mobilefacenet_128d.onnx"))
    return FaceAnalyzer(cfg, SessionOptions(threads=1))


def _embedding(analyzer: FaceAnalyzer, path: Path) -> np.ndarray:
    (face,) = analyzer.analyze(read(path))
    return face.embedding


def test_photo_with_a_small_bystander_enrolls_the_subject(analyzer: FaceAnalyzer, faces: Path) -> None:
    photo = with_bystander(faces)
    got = enrollment_face(analyzer, photo, "obama+bystander")
    assert got.n_faces == 2 and got.ratio > 10
    x1, _, x2, _ = got.face.xyxy
    assert x2 < photo.shape[1] * 0.8  # Obama's face, not the bystander at the right edge
    obama, biden = _embedding(analyzer, faces / "obama/obama.jpg"), _embedding(analyzer, faces / "biden/biden.jpg")
    assert float(got.face.embedding @ obama) > 0.9 and float(got.face.embedding @ biden) < 0.3
    # the bystander was found and is Biden: the rule, not the detector, left him out
    (other,) = [f for f in analyzer.analyze(photo) if f.xyxy[0] > x2]
    assert float(other.embedding @ biden) > 0.4


def test_two_similar_faces_are_refused_then_chosen_by_index(analyzer: FaceAnalyzer, faces: Path) -> None:
    photo = read(faces / "_multi/kit_with_rose.jpg")
    with pytest.raises(NoDominantFace, match=r"^kit_with_rose\.jpg: 2 faces found and none dominates") as info:
        enrollment_face(analyzer, photo, "kit_with_rose.jpg")
    boxes = info.value.boxes
    assert boxes.shape == (2, 4) and boxes[0, 0] < boxes[1, 0]  # listed left to right
    kit = _embedding(analyzer, faces / "kit_harington/john1.jpeg")
    rose = _embedding(analyzer, faces / "rose_leslie/img1.jpg")
    right = enrollment_face(analyzer, photo, "kit_with_rose.jpg", face=1)
    assert right.index == 1 and math.isnan(right.ratio)
    np.testing.assert_allclose(right.face.xyxy, boxes[1], atol=1)
    assert float(right.face.embedding @ kit) > 0.4 > float(right.face.embedding @ rose)
    left = enrollment_face(analyzer, photo, "kit_with_rose.jpg", face=0)
    assert float(left.face.embedding @ rose) > 0.4 > float(left.face.embedding @ kit)
    # margin 1 takes the most prominent face: Kit's, 1.4x Rose's
    assert enrollment_face(analyzer, photo, "kit_with_rose.jpg", dominance=1.0).index == 1
    with pytest.raises(EnrollmentError, match="face 2 does not exist"):
        enrollment_face(analyzer, photo, "kit_with_rose.jpg", face=2)


def test_group_photo_of_six_similar_faces_is_refused(analyzer: FaceAnalyzer, faces: Path) -> None:
    with pytest.raises(NoDominantFace, match=r"^t1\.jpg: 6 faces found and none dominates") as info:
        enrollment_face(analyzer, read(faces / "_multi/t1.jpg"), "t1.jpg")
    assert [line.split(":")[0] for line in info.value.face_lines] == [f"face {i}" for i in range(6)]
    assert np.all(np.diff(info.value.boxes[:, 0] + info.value.boxes[:, 2]) >= 0)
