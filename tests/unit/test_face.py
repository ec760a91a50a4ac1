"""Face detection (SCRFD), alignment and embedding (MobileFaceNet) on the real test images and models."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import FaceConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig
from stages.face import ALIGNED_SIZE, FaceAnalyzer, FaceDetections, FaceDetector, FaceEmbedder, align
from stages.runtime import ModelError, SessionOptions

ONE_THREAD = SessionOptions(threads=1)

#: Faces in each image (checked by eye: every face of the picture, nothing else).
FACE_COUNTS = [
    ("obama/obama.jpg", 1),
    ("obama/obama1.jpg", 1),
    ("obama/obama2.jpg", 1),
    ("obama/obama3.jpg", 1),
    ("obama/obama_small.jpg", 1),
    ("biden/biden.jpg", 1),
    ("biden/biden2.jpg", 1),
    ("kit_harington/john1.jpeg", 1),
    ("kit_harington/john2.jpeg", 1),
    ("kit_harington/johnsnow_test1.jpg", 1),
    ("rose_leslie/img1.jpg", 1),
    ("rose_leslie/img2.jpg", 1),
    ("kun/kun.jpg", 1),
    ("kun/kun_crop.jpg", 1),
    ("_multi/kit_with_rose.jpg", 2),
    ("_multi/obama_and_biden.jpg", 3),
    ("_multi/t1.jpg", 6),
]


def _read(faces: Path, rel: str) -> np.ndarray:
    img = cv2.imread(str(faces / rel))
    assert img is not None, f"cannot read {faces / rel}"
    return img


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def detector(models: Path) -> FaceDetector:
    return FaceDetector(OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"), ONE_THREAD)


@pytest.fixture(scope="module")
def embedder(models: Path) -> FaceEmbedder:
    return FaceEmbedder(OnnxFaceEmbedderConfig(path=models / "mobilefacenet_128d.onnx"), ONE_THREAD)


@pytest.fixture(scope="module")
def analyzer(models: Path) -> FaceAnalyzer:
    cfg = FaceConfig(
        detector=OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"),
        embedder=OnnxFaceEmbedderConfig(path=models / "mobilefacenet_128d.onnx"),
    )
    return FaceAnalyzer(cfg, ONE_THREAD)


# --- detection -------------------------------------------------------------


@pytest.mark.parametrize(("rel", "expected"), FACE_COUNTS)
def test_detector_finds_every_face(detector: FaceDetector, faces: Path, rel: str, expected: int) -> None:
    img = _read(faces, rel)
    dets = detector.detect(img)
    assert len(dets) == expected
    n = len(dets)
    assert dets.xyxy.shape == (n, 4) and dets.score.shape == (n,) and dets.kps.shape == (n, 5, 2)
    assert dets.xyxy.dtype == dets.score.dtype == dets.kps.dtype == np.float32
    assert np.all(dets.score >= detector.cfg.score_threshold) and np.all(dets.score <= 1.0)
    assert np.all(np.diff(dets.score) <= 0), "best score first"
    h, w = img.shape[:2]
    for box, kps in zip(dets.xyxy, dets.kps):
        x1, y1, x2, y2 = box
        assert -0.1 * w < x1 < x2 < 1.1 * w and -0.1 * h < y1 < y2 < 1.1 * h
        # keypoints lie inside their box, in template order: eyes above nose above mouth,
        # "left" points on the image's left
        assert np.all((kps[:, 0] >= x1) & (kps[:, 0] <= x2) & (kps[:, 1] >= y1) & (kps[:, 1] <= y2))
        assert kps[0, 0] < kps[1, 0] and kps[3, 0] < kps[4, 0]
        assert max(kps[0, 1], kps[1, 1]) < kps[2, 1] < min(kps[3, 1], kps[4, 1])


@pytest.mark.parametrize(
    "model", ["scrfd_500m.onnx", "scrfd_2.5g_bnkps.onnx", "scrfd_500m_bnkps.onnx"], ids=["500m", "2.5g", "500m-fixed640"]
)
def test_every_scrfd_export_finds_the_six_faces_of_t1(models: Path, faces: Path, model: str) -> None:
    det = FaceDetector(OnnxFaceDetectorConfig(path=models / model), ONE_THREAD)
    assert len(det.detect(_read(faces, "_multi/t1.jpg"))) == 6


@pytest.mark.parametrize(
    "image",
    [np.zeros((480, 640, 3), np.uint8), np.full((480, 640, 3), 200, np.uint8),
     np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)],
    ids=["black", "grey", "noise"],
)
def test_no_face_in_synthetic_images(detector: FaceDetector, image: np.ndarray) -> None:
    dets = detector.detect(image)
    assert len(dets) == 0
    assert dets.xyxy.shape == (0, 4) and dets.kps.shape == (0, 5, 2) and dets.score.dtype == np.float32


def test_region_detection_maps_back_to_full_image(detector: FaceDetector, faces: Path) -> None:
    img = _read(faces, "_multi/obama_and_biden.jpg")
    full = detector.detect(img)
    for box in full.xyxy:
        w, h = box[2] - box[0], box[3] - box[1]
        region = box + np.array([-w, -h, w, 2 * h], np.float32)  # a padded "person" box around this face
        sub = detector.detect(img, region_xyxy=region)
        assert len(sub) == 1
        assert _iou(sub.xyxy[0], box) > 0.8
        # keypoints in full-image pixels too: close to the full-image detection's
        j = int(np.argmax([_iou(b, sub.xyxy[0]) for b in full.xyxy]))
        assert np.abs(sub.kps[0] - full.kps[j]).max() < 0.1 * w


@pytest.mark.parametrize(
    "region",
    [[0, 0, 0, 0], [5000, 5000, 6000, 6000], [10, 10, 11, 200]],
    ids=["zero-area", "outside", "one-pixel-wide"],
)
def test_empty_region_gives_no_faces(detector: FaceDetector, faces: Path, region: list[float]) -> None:
    assert len(detector.detect(_read(faces, "_multi/t1.jpg"), region_xyxy=np.array(region, np.float32))) == 0


def test_region_covering_the_image_equals_full_detection(detector: FaceDetector, faces: Path) -> None:
    img = _read(faces, "_multi/t1.jpg")
    h, w = img.shape[:2]
    a = detector.detect(img)
    b = detector.detect(img, region_xyxy=np.array([-50, -50, w + 50, h + 50], np.float32))
    np.testing.assert_allclose(a.xyxy, b.xyxy)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32), np.zeros((0, 10, 3), np.uint8)],
    ids=["grey", "float", "empty"],
)
def test_detector_rejects_bad_images(detector: FaceDetector, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8|empty"):
        detector.detect(bad)


def test_input_size_keeps_the_long_side(detector: FaceDetector) -> None:
    assert detector.input_size_for(886, 1280) == (640, 448)
    assert detector.input_size_for(1280, 886) == (448, 640)
    assert detector.input_size_for(300, 300) == (640, 640)
    assert detector.input_size_for(10, 2000) == (640, 32)


def test_face_detections_validates_shapes() -> None:
    with pytest.raises(ValueError, match="inconsistent"):
        FaceDetections(np.zeros((2, 4), np.float32), np.zeros((1,), np.float32), np.zeros((2, 5, 2), np.float32))


# --- alignment and embedding ------------------------------------------------


def test_align_maps_keypoints_onto_the_arcface_template(detector: FaceDetector, faces: Path) -> None:
    img = _read(faces, "obama/obama.jpg")
    kps = detector.detect(img).kps[0]
    crop = align(img, kps)
    assert crop.shape == (ALIGNED_SIZE, ALIGNED_SIZE, 3) and crop.dtype == np.uint8
    # the face fills the crop: re-detecting on the (padded) crop finds it with eyes near the template
    padded = cv2.copyMakeBorder(crop, 56, 56, 56, 56, cv2.BORDER_CONSTANT)
    again = detector.detect(padded)
    assert len(again) == 1
    template = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]])
    assert np.abs(again.kps[0] - 56 - template).max() < 6.0


def test_align_rejects_wrong_keypoints(faces: Path) -> None:
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        align(_read(faces, "kun/kun.jpg"), np.zeros((4, 2), np.float32))


def test_embedder_output_is_unit_norm_and_batch_invariant(embedder: FaceEmbedder, detector: FaceDetector, faces: Path) -> None:
    img = _read(faces, "_multi/t1.jpg")
    crops = np.stack([align(img, k) for k in detector.detect(img).kps])
    emb = embedder.embed(crops)
    assert emb.shape == (6, 128) and emb.dtype == np.float32
    assert embedder.dim == 128 and embedder.model_name == "mobilefacenet_128d"
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    one = embedder.embed(crops[2:3])
    np.testing.assert_allclose(one[0], emb[2], atol=1e-4)
    assert embedder.embed(np.zeros((0, 112, 112, 3), np.uint8)).shape == (0, 128)


@pytest.mark.parametrize(
    "bad", [np.zeros((112, 112, 3), np.uint8), np.zeros((1, 96, 96, 3), np.uint8), np.zeros((1, 112, 112, 3), np.float32)],
    ids=["no-batch", "96px", "float"],
)
def test_embedder_rejects_bad_crops(embedder: FaceEmbedder, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"\(B, 112, 112, 3\)"):
        embedder.embed(bad)


# --- model file errors --------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("osnet_x0_25_msmt17.onnx", r"expected \[B, 3, 112, 112\].*ArcFace-style 112x112 model works by config alone"),
        ("yolox_nano.onnx", r"expected \[B, 3, 112, 112\]"),
        ("scrfd_500m.onnx", r"expected \[B, 3, 112, 112\]"),
        ("no_such_model.onnx", r"face embedder model not found: .*no_such_model\.onnx"),
    ],
)
def test_embedder_rejects_wrong_or_missing_model(models: Path, model: str, message: str) -> None:
    with pytest.raises(ModelError, match=message) as err:
        FaceEmbedder(OnnxFaceEmbedderConfig(path=models / model), ONE_THREAD)
    assert model in str(err.value)


@pytest.mark.parametrize(
    ("model", "input_size", "message"),
    [
        ("mobilefacenet_128d.onnx", 640, r"1 outputs, expected an SCRFD model with keypoints"),
        ("yolox_nano.onnx", 640, r"1 outputs, expected an SCRFD model"),
        ("scrfd_500m_bnkps.onnx", 320, r"fixed input of 640x640 pixels but face.detector.input_size is 320"),
        ("no_such_model.onnx", 640, r"face detector model not found"),
    ],
)
def test_detector_rejects_wrong_or_missing_model(models: Path, model: str, input_size: int, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        FaceDetector(OnnxFaceDetectorConfig(path=models / model, input_size=input_size), ONE_THREAD)


def test_empty_model_file_is_a_model_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="is empty"):
        FaceEmbedder(OnnxFaceEmbedderConfig(path=empty), ONE_THREAD)


# --- analyzer ---------------------------------------------------------------------


def test_analyzer_embeds_every_face(analyzer: FaceAnalyzer, faces: Path) -> None:
    img = _read(faces, "_multi/obama_and_biden.jpg")
    with warnings.catch_warnings(record=True) as caught:
        found = analyzer.analyze(img)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], "face_align deprecation noise leaked"
    assert len(found) == 3
    assert analyzer.dim == 128 and analyzer.model_name == "mobilefacenet_128d"
    for f in found:
        assert f.xyxy.shape == (4,) and f.kps.shape == (5, 2) and f.embedding.shape == (128,)
        assert f.embedding.dtype == np.float32 and abs(float(np.linalg.norm(f.embedding)) - 1.0) < 1e-5
        assert 0.5 <= f.score <= 1.0
    # three different people: no two embeddings alike
    emb = np.stack([f.embedding for f in found])
    sims = emb @ emb.T
    assert np.all(sims[~np.eye(3, dtype=bool)] < 0.4)


def test_analyzer_skips_faces_narrower_than_min_face_px(analyzer: FaceAnalyzer, faces: Path) -> None:
    img = _read(faces, "_multi/obama_and_biden.jpg")
    widths = sorted(f.width for f in analyzer.analyze(img, min_face_px=4))
    assert len(widths) == 3
    cut = (widths[0] + widths[1]) / 2  # between the smallest and the next face
    kept = analyzer.analyze(img, min_face_px=int(cut))
    assert len(kept) == 2 and all(f.width >= cut for f in kept)
    assert analyzer.analyze(img, min_face_px=1000) == []


def test_analyzer_in_a_region_finds_only_that_face(analyzer: FaceAnalyzer, faces: Path) -> None:
    img = _read(faces, "_multi/t1.jpg")
    everyone = analyzer.analyze(img)
    target = everyone[3]
    w = target.width
    region = target.xyxy + np.array([-w / 2, -w / 2, w / 2, w], np.float32)
    only = analyzer.analyze(img, region_xyxy=region)
    assert len(only) == 1
    assert _iou(only[0].xyxy, target.xyxy) > 0.8
    assert float(only[0].embedding @ target.embedding) > 0.9  # same face, same embedding
