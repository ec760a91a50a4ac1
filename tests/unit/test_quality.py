"""Face quality gate on real faces, blurred copies and keypoint geometry."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import FaceConfig, FaceQualityConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig
from stages.face import Face, FaceAnalyzer
from stages.quality import assess, yaw_from_keypoints

GATE = FaceQualityConfig()
FRONTAL = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]], np.float32)  # ArcFace template


@pytest.fixture(scope="module")
def analyzer(models: Path) -> FaceAnalyzer:
    return FaceAnalyzer(FaceConfig(detector=OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"),
                                   embedder=OnnxFaceEmbedderConfig(path=models / "mobilefacenet_128d.onnx")))


@pytest.mark.parametrize("image", ["obama/obama.jpg", "biden/biden.jpg", "rose_leslie/img1.jpg", "obama/obama_small.jpg"])
def test_real_faces_pass_and_their_blurred_copies_do_not(analyzer: FaceAnalyzer, faces: Path, image: str) -> None:
    img = cv2.imread(str(faces / image))
    (face,) = analyzer.analyze(img)
    assert assess(img, face, GATE).ok
    blurred = cv2.GaussianBlur(img, (0, 0), 3 * max(1.0, face.width / 112))
    q = assess(blurred, face, GATE)
    assert q.reason == "blurry" and q.sharpness < GATE.min_sharpness


def _rotate(kps: np.ndarray, degrees: float) -> np.ndarray:
    m = cv2.getRotationMatrix2D((56.0, 56.0), degrees, 1.0)
    return (kps @ m[:, :2].T + m[:, 2]).astype(np.float32)


@pytest.mark.parametrize(
    "nose_dx, roll_deg, reason",
    [(0.0, 0.0, None), (0.0, 30.0, None), (10.0, 0.0, None), (30.0, 0.0, "pose"), (-30.0, 20.0, "pose")],
)
def test_pose_uses_yaw_not_roll(nose_dx: float, roll_deg: float, reason: str | None) -> None:
    kps = FRONTAL.copy()
    kps[2, 0] += nose_dx
    kps = _rotate(kps, roll_deg)
    img = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)  # sharp texture
    face = Face(xyxy=np.array([20, 20, 92, 100], np.float32), score=0.9, kps=kps, embedding=np.zeros(4, np.float32))
    assert assess(img, face, GATE).reason == reason


def test_yaw_sign_and_scale() -> None:
    assert yaw_from_keypoints(FRONTAL) == pytest.approx(-0.002, abs=0.01)
    kps = FRONTAL.copy()
    kps[2, 0] = kps[1, 0]  # nose under the right eye: about half an eye distance
    assert yaw_from_keypoints(kps) == pytest.approx(0.5, abs=0.01)
