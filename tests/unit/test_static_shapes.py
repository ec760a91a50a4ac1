"""Static shapes (``runtime.static_shapes``, on by default on GPUs): few input shapes, same answers.

On ONNX Runtime's CUDA provider each new input shape costs about a second, so
there the detector keeps its declared canvas with a free, padded batch
dimension, SCRFD a square input, and embedders pad their batches to powers of
two. Forced on here (CPU), every answer must equal the dynamic-shape one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import OnnxDetectorConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig
from stages import runtime as rt
from stages.detector import ObjectDetector, free_input_hw
from stages.face import FaceDetector, FaceEmbedder, align
from stages.reid import ReidEmbedder

STATIC = rt.SessionOptions(threads=1, static_shapes=True)
DYNAMIC = rt.SessionOptions(threads=1, static_shapes=False)


@pytest.mark.parametrize("n, expected", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (9, 16), (16, 16), (17, 32)])
def test_bucket_is_the_next_power_of_two(n: int, expected: int) -> None:
    assert rt.bucket(n) == expected


@pytest.mark.parametrize("largest, expected", [(1, [1]), (2, [1, 2]), (5, [1, 2, 4, 8]), (8, [1, 2, 4, 8])])
def test_buckets_lists_every_padded_size(largest: int, expected: list[int]) -> None:
    assert rt.buckets(largest) == expected


def test_pad_rows_appends_zero_rows_and_keeps_full_batches() -> None:
    x = np.ones((3, 2), np.float32)
    padded = rt.pad_rows(x, 4)
    assert padded.shape == (4, 2) and padded.dtype == np.float32 and (padded[3] == 0).all() and (padded[:3] == 1).all()
    assert rt.pad_rows(x, 3) is x


def _frames(videos: Path, n: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(videos / "vtest.avi"))
    out = []
    for i in range(200):
        ok, frame = cap.read()
        assert ok
        if i % 50 == 10:
            out.append(frame)
    cap.release()
    return out[:n]


def test_the_yolox_batch_dimension_is_freed_and_a_padded_batch_equals_one_by_one(models: Path, videos: Path) -> None:
    cfg = OnnxDetectorConfig(path=models / "yolox_nano.onnx", layout="yolox")
    static, dynamic = ObjectDetector(cfg, STATIC), ObjectDetector(cfg, DYNAMIC)
    assert static.static and not static.fits and static.batch_dim is None  # declared batch 1, freed after the probe
    assert dynamic.fits and dynamic.batch_dim == 1
    frames = _frames(videos, 3)
    runs = static.session_runs
    batched = static.detect_batch(frames)
    assert static.session_runs == runs + 1  # three frames, one run padded to four
    fixed = ObjectDetector(cfg.model_copy(update={"canvas": "fixed"}), DYNAMIC)
    for got, frame in zip(batched, frames):
        want = fixed.detect(frame)  # the same declared canvas, one frame a run
        assert len(got) == len(want) > 0
        np.testing.assert_allclose(got.xyxy, want.xyxy, atol=0.05)
        np.testing.assert_allclose(got.confidence, want.confidence, atol=1e-4)


def test_freeing_the_batch_rewrites_only_leading_ones_of_reshape_targets(models: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(free_input_hw(models / "yolox_nano.onnx", 3549, hw=False, batch=True))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 416, 416]
    targets = {n.input[1] for n in model.graph.node if n.op_type == "Reshape"}
    values = [numpy_helper.to_array(i).tolist() for i in model.graph.initializer if i.name in targets]
    assert values == [[0, 85, -1]] * 3


def test_a_model_whose_batch_cannot_be_freed_keeps_batches_one_by_one(models: Path, videos: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    cfg = OnnxDetectorConfig(path=models / "yolox_nano.onnx", layout="yolox")
    with caplog.at_level(logging.WARNING, logger="facepro"), pytest.MonkeyPatch.context() as mp:
        mp.setattr("stages.detector.free_input_hw", lambda p, rows, hw=True, batch=False: p.read_bytes())  # unchanged
        det = ObjectDetector(cfg, STATIC)
    assert det.batch_dim == 1 and "no free batch dimension" in caplog.text
    frames = _frames(videos, 2)
    runs = det.session_runs
    assert [len(r) for r in det.detect_batch(frames)] == [len(det.detect(f)) for f in frames]
    assert det.session_runs == runs + 4  # two one by one in the batch, two alone


def test_scrfd_runs_on_its_square_input_and_finds_the_same_faces(models: Path, faces: Path) -> None:
    cfg = OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx")
    static, dynamic = FaceDetector(cfg, STATIC), FaceDetector(cfg, DYNAMIC)
    assert static.input_size_for(200, 500) == (cfg.input_size, cfg.input_size)
    assert dynamic.input_size_for(200, 500) != (cfg.input_size, cfg.input_size)
    image = cv2.imread(str(faces / "_multi" / "kit_with_rose.jpg"))
    got, want = static.detect(image), dynamic.detect(image)
    assert len(got) == len(want) == 2
    np.testing.assert_allclose(got.xyxy, want.xyxy, atol=2.0)  # the same scale; only the padding differs


def _scrfd_cases(faces: Path) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Real photos, whole and in regions (one region holds no pixel): 11 images, more than one warmed chunk."""
    photos = [cv2.imread(str(faces / rel)) for rel in ("_multi/kit_with_rose.jpg", "_multi/t1.jpg", "_multi/obama_and_biden.jpg",
                                                        "obama/obama.jpg", "biden/biden.jpg")]
    images, regions = [], []
    for img in photos:
        h, w = img.shape[:2]
        images += [img, img]
        regions += [None, np.array([w * 0.1, h * 0.05, w * 0.6, h * 0.9], np.float32)]
    images.append(photos[0])
    regions.append(np.array([5, 5, 6, 6], np.float32))  # under 2x2 pixels: no faces, no model input
    return images, regions


def test_scrfd_batches_give_each_image_what_detect_gives(models: Path, faces: Path) -> None:
    """Static shapes: SCRFD's batch dimension is freed (probed), and a batch of crops of several photos gives each one
    the faces, scores and keypoints that InsightFace's own one-image path gives (within 0.01 px / 1e-4)."""
    det = FaceDetector(OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"), STATIC)
    assert det._batch is not None
    images, regions = _scrfd_cases(faces)
    runs = det.session_runs
    got = det.detect_batch(images, regions)
    assert det.session_runs - runs == 2  # 10 crops with pixels: chunks of 8 and 2
    want = [det.detect(i, r) for i, r in zip(images, regions)]
    assert sum(len(w) for w in want) > 10 and len(want[-1]) == 0
    for g, w in zip(got, want):
        assert len(g) == len(w)
        np.testing.assert_allclose(g.xyxy, w.xyxy, atol=1e-2)
        np.testing.assert_allclose(g.kps, w.kps, atol=1e-2)
        np.testing.assert_allclose(g.score, w.score, atol=1e-4)


def test_without_static_shapes_scrfd_batches_run_one_image_at_a_time(models: Path, faces: Path) -> None:
    det = FaceDetector(OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"), DYNAMIC)
    images, regions = _scrfd_cases(faces)
    runs = det.session_runs
    got = det.detect_batch(images, regions)
    assert det._batch is None and det.session_runs - runs == len(images) - 1  # the empty region runs nothing
    for g, (i, r) in zip(got, zip(images, regions)):
        np.testing.assert_array_equal(g.xyxy, det.detect(i, r).xyxy)
    with pytest.raises(ValueError, match="1 regions for 2 images"):
        det.detect_batch(images[:2], regions[:1])


def test_an_scrfd_whose_batch_cannot_be_freed_keeps_crops_one_by_one(models: Path, faces: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING):
        mp.setattr("stages.detector.free_input_hw", lambda p, rows, hw=True, batch=False, what="": p.read_bytes())  # unchanged
        det = FaceDetector(OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"), STATIC)
    assert det._batch is None and "no free batch dimension" in caplog.text
    images, regions = _scrfd_cases(faces)
    assert [len(d) for d in det.detect_batch(images, regions)] == [len(det.detect(i, r)) for i, r in zip(images, regions)]


def test_padded_face_and_reid_batches_give_the_unpadded_embeddings(models: Path, faces: Path, videos: Path) -> None:
    image = cv2.imread(str(faces / "_multi" / "t1.jpg"))
    found = FaceDetector(OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"), DYNAMIC).detect(image)
    crops = np.stack([align(image, k) for k in found.kps[:5]])
    cfg = OnnxFaceEmbedderConfig(path=models / "mobilefacenet_128d.onnx")
    np.testing.assert_allclose(FaceEmbedder(cfg, STATIC).embed(crops), FaceEmbedder(cfg, DYNAMIC).embed(crops), atol=1e-5)
    frame = _frames(videos, 1)[0]
    boxes = np.array([[10, 20, 90, 220], [200, 50, 260, 200], [300, 100, 380, 330]], np.float32)
    path = models / "osnet_x0_25_msmt17.onnx"
    got, want = ReidEmbedder(path, STATIC).embed(frame, boxes), ReidEmbedder(path, DYNAMIC).embed(frame, boxes)
    assert got.shape == want.shape == (3, 512)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("setting, expected", [(True, True), (False, False), (None, False)])  # None: auto, CPU here
def test_static_shapes_follow_the_setting_or_the_provider(models: Path, setting: bool | None, expected: bool) -> None:
    opts = rt.SessionOptions(threads=1, static_shapes=setting)
    session = rt.open_session("onnx", models / "osnet_x0_25_msmt17.onnx", "re-id", opts)
    assert rt.static_shapes(session, opts) is expected


def test_a_gpu_session_gets_static_shapes_by_default() -> None:
    class GpuSession:
        def get_providers(self) -> list[str]:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    assert rt.static_shapes(GpuSession(), rt.SessionOptions()) is True
    assert rt.static_shapes(GpuSession(), rt.SessionOptions(static_shapes=False)) is False


def test_every_scrfd_batch_shape_runs_at_start_and_no_other_runs_later(models: Path, faces: Path) -> None:
    """Static shapes: the batch sizes 1, 2, 4 and 8 run when the detector opens (on a GPU each new shape costs about
    a second), and a later batch of any length runs only those sizes (chunks of 8, padded to a power of two)."""
    from stages.face import ScrfdBatch

    started: list[int] = []
    real = ScrfdBatch.run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ScrfdBatch, "run", lambda self, images: started.append(len(images)) or real(self, images))
        det = FaceDetector(OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"), STATIC)
    assert {1, 2, 4, 8} <= set(started)

    class Recorder:
        def __init__(self, session: object) -> None:
            self.session, self.batches = session, []

        def run(self, names: object, feeds: dict) -> object:
            self.batches += [len(v) for v in feeds.values()]
            return self.session.run(names, feeds)  # type: ignore[attr-defined]

    det._batch.session = rec = Recorder(det._batch.session)  # type: ignore[union-attr, assignment]
    images, regions = _scrfd_cases(faces)
    for n in range(1, len(images) + 1):
        det.detect_batch(images[:n], regions[:n])
    assert set(rec.batches) <= {1, 2, 4, 8}
