"""IOBinding (``runtime.io_binding``, on by default on GPUs): the same answers as ``session.run``.

There is no GPU here, so the bound path runs with its inputs on the host
(``io_binding: on``); the asset models, and the pipeline's detector, SCRFD and
embedders built on them, must answer exactly as unbound sessions do, and a
caller may keep every array a run returned.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import OnnxDetectorConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig, parse_config
from stages import runtime as rt
from stages.binding import BoundSession, binding_device
from stages.detector import ObjectDetector
from stages.face import FaceDetector, FaceEmbedder, align
from stages.reid import ReidEmbedder

BOUND = rt.SessionOptions(threads=1, io_binding=True)
PLAIN = rt.SessionOptions(threads=1, io_binding=False)


@pytest.mark.parametrize("provider, setting, expected", [
    ("CPUExecutionProvider", None, None),  # auto: the CPU's sessions run unbound
    ("CPUExecutionProvider", False, None),
    ("CPUExecutionProvider", True, "cpu"),
    ("CUDAExecutionProvider", None, "cuda"),  # auto: GPU sessions are bound, inputs on the device
    ("TensorrtExecutionProvider", None, "cuda"),
    ("CUDAExecutionProvider", True, "cuda"),
    ("CUDAExecutionProvider", False, None),
])
def test_the_binding_device_follows_the_setting_and_the_provider(provider: str, setting: bool | None,
                                                                 expected: str | None) -> None:
    assert binding_device(provider, setting) == expected


@pytest.mark.parametrize("setting, bound", [(True, True), (False, False), (None, False)])  # None: auto, CPU here
def test_open_session_binds_when_the_setting_says(models: Path, setting: bool | None, bound: bool) -> None:
    session = rt.open_session("onnx", models / "osnet_x0_25_msmt17.onnx", "re-id", rt.SessionOptions(io_binding=setting))
    assert isinstance(session, BoundSession) is bound
    assert session.get_providers()[0] == "CPUExecutionProvider"  # the session's own attributes pass through


@pytest.mark.parametrize("model, shapes, bound_shapes", [
    ("yolox_nano.onnx", [(1, 3, 416, 416)], 1),
    # 9 outputs whose sizes follow the input's, declared at 640x640: other inputs run unbound (ONNX Runtime checks)
    ("scrfd_500m.onnx", [(1, 3, 640, 640), (1, 3, 320, 480)], 1),
    ("mobilefacenet_128d.onnx", [(1, 3, 112, 112), (4, 3, 112, 112)], 2),
    ("osnet_x0_25_msmt17.onnx", [(2, 3, 256, 128), (4, 3, 256, 128)], 2),
])
def test_bound_runs_equal_plain_runs_and_every_result_stays_the_callers(models: Path, model: str,
                                                                        shapes: list[tuple[int, ...]], bound_shapes: int) -> None:
    bound = rt.open_session("onnx", models / model, "model", BOUND)
    plain = rt.open_session("onnx", models / model, "model", PLAIN)
    name = plain.get_inputs()[0].name
    rng = np.random.default_rng(3)
    kept = []
    for shape in shapes:
        for _ in range(3):  # the first run of a shape is a plain one (it learns the outputs), the others are bound
            x = rng.uniform(0, 1, shape).astype(np.float32)
            got, want = bound.run(None, {name: x}), plain.run(None, {name: x})
            assert [g.shape for g in got] == [w.shape for w in want]
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)
            kept.append((got, [w.copy() for w in want]))
    for got, want in kept:  # later runs wrote into arrays of their own
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    assert bound.bound_runs == 2 * bound_shapes and bound.failed is None


def test_inputs_copied_into_the_sessions_own_values_give_the_same_answers(models: Path) -> None:
    """The GPU's path (one input ``OrtValue`` per shape, refreshed by ``update_inplace``), here on the host."""
    plain = rt.open_session("onnx", models / "osnet_x0_25_msmt17.onnx", "re-id", PLAIN)
    bound = BoundSession(rt.open_session("onnx", models / "osnet_x0_25_msmt17.onnx", "re-id", PLAIN), "cpu", "re-id",
                         own_inputs=True)
    name = plain.get_inputs()[0].name
    rng = np.random.default_rng(4)
    for _ in range(3):
        x = rng.uniform(0, 1, (2, 3, 256, 128)).astype(np.float32)
        np.testing.assert_array_equal(bound.run(None, {name: x})[0], plain.run(None, {name: x})[0])
    (plan,) = bound._plans.values()
    assert bound.bound_runs == 2 and list(plan.inputs) == [name] and plan.inputs[name].shape() == [2, 3, 256, 128]


def test_threads_sharing_a_bound_session_each_get_their_own_answers(models: Path) -> None:
    """The API's enrollment runs the face models from a thread pool: one binding a signature, so runs take turns."""
    from concurrent.futures import ThreadPoolExecutor

    plain = rt.open_session("onnx", models / "mobilefacenet_128d.onnx", "face embedder", PLAIN)
    bound = BoundSession(rt.open_session("onnx", models / "mobilefacenet_128d.onnx", "face embedder", PLAIN), "cpu",
                         "face embedder", own_inputs=True)
    name = plain.get_inputs()[0].name
    xs = [np.random.default_rng(i).uniform(0, 1, (1, 3, 112, 112)).astype(np.float32) for i in range(64)]
    bound.run(None, {name: xs[0]})
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: bound.run(None, {name: x})[0], xs))
    for g, x in zip(got, xs):
        np.testing.assert_array_equal(g, plain.run(None, {name: x})[0])
    assert bound.bound_runs == len(xs)


def test_asking_for_some_outputs_binds_just_those(models: Path) -> None:
    bound = rt.open_session("onnx", models / "scrfd_500m_bnkps.onnx", "face detector", BOUND)
    plain = rt.open_session("onnx", models / "scrfd_500m_bnkps.onnx", "face detector", PLAIN)
    names = [o.name for o in plain.get_outputs()][::3]
    x = np.random.default_rng(1).uniform(0, 1, (1, 3, 640, 640)).astype(np.float32)
    for _ in range(2):
        got = bound.run(names, {plain.get_inputs()[0].name: x})
    assert bound.bound_runs == 1 and len(got) == len(names) == 3
    for g, w in zip(got, plain.run(names, {plain.get_inputs()[0].name: x})):
        np.testing.assert_array_equal(g, w)


def test_a_bound_run_that_fails_is_logged_once_and_the_session_runs_unbound(models: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    bound = rt.open_session("onnx", models / "mobilefacenet_128d.onnx", "face embedder", BOUND)
    name = bound.get_inputs()[0].name
    x = np.random.default_rng(2).uniform(0, 1, (2, 3, 112, 112)).astype(np.float32)
    want = bound.run(None, {name: x})[0]  # learns the output shape
    plan = next(iter(bound._plans.values()))
    plan.outputs = [((3, 128), np.dtype(np.float32))]  # a model whose output shape changed: ONNX Runtime refuses
    with caplog.at_level(logging.WARNING, logger="facepro.runtime"):
        got = [bound.run(None, {name: x})[0] for _ in range(3)]
    assert bound.failed is not None and bound.bound_runs == 0
    assert caplog.text.count("IOBinding failed") == 1 and "face embedder" in caplog.text
    for g in got:
        np.testing.assert_array_equal(g, want)


def test_the_pipelines_models_answer_the_same_bound(models: Path, videos: Path, faces: Path) -> None:
    """Detector (static shapes: padded batches), SCRFD and both embedders, each bound and unbound, on real inputs."""
    cap = cv2.VideoCapture(str(videos / "vtest.avi"))
    frames = [cap.read()[1] for _ in range(3)]
    cap.release()
    static = dict(static_shapes=True)
    det_cfg = OnnxDetectorConfig(path=models / "yolox_nano.onnx", layout="yolox")
    b, p = (ObjectDetector(det_cfg, rt.SessionOptions(threads=1, io_binding=v, **static)) for v in (True, False))
    for _ in range(2):  # the first batch of 8 (padded) is a plain run, as the detection stage's warm-up is
        for got, want in zip(b.detect_batch(frames * 2), p.detect_batch(frames * 2)):
            assert len(want) > 0
            np.testing.assert_array_equal(got.xyxy, want.xyxy)
    assert b._session.bound_runs == 1
    image = cv2.imread(str(faces / "_multi" / "t1.jpg"))
    face_cfg = OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx")
    fb, fp = (FaceDetector(face_cfg, rt.SessionOptions(threads=1, io_binding=v, **static)) for v in (True, False))
    runs = fb.session.bound_runs  # the square input already ran (the batch probe)
    got, want = fb.detect(image), fp.detect(image)
    assert len(want) >= 5 and fb.session.bound_runs == runs + 1
    np.testing.assert_array_equal(got.kps, want.kps)
    crops = np.stack([align(image, k) for k in want.kps[:5]])
    emb_cfg = OnnxFaceEmbedderConfig(path=models / "mobilefacenet_128d.onnx")
    np.testing.assert_array_equal(FaceEmbedder(emb_cfg, BOUND).embed(crops), FaceEmbedder(emb_cfg, PLAIN).embed(crops))
    boxes = np.array([[10, 20, 90, 220], [200, 50, 260, 200], [300, 100, 380, 330]], np.float32)
    reid = models / "osnet_x0_25_msmt17.onnx"
    np.testing.assert_array_equal(ReidEmbedder(reid, BOUND).embed(frames[0], boxes),
                                  ReidEmbedder(reid, PLAIN).embed(frames[0], boxes))


def test_io_binding_is_auto_by_default() -> None:
    from pipeline.worker import _session_options
    from tests.unit.test_config import BASE

    opts = _session_options(parse_config(BASE), "detection")
    assert opts.io_binding is None  # auto: decided per session (bound on a GPU provider); a wrong value: test_config
