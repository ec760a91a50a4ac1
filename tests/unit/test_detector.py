"""Object detector: decode math on synthetic tensors, NMS, letterbox geometry, config errors, real models."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import supervision as sv

from pipeline.config import OnnxDetectorConfig
from stages.detector import (
    class_names_of,
    COCO80,
    DetectionResult,
    ObjectDetector,
    boxes_to_frame,
    decode_yolov8,
    decode_yolox,
    letterbox,
    nms_per_class,
)
from stages.runtime import ModelError, SessionOptions

ONE_THREAD = SessionOptions(threads=1)
YOLOX_HW = (416, 416)
YOLOX_ROWS = 52 * 52 + 26 * 26 + 13 * 13  # 3549 grid cells for strides 8, 16, 32


def _yolox_row(stride: int, gx: int, gy: int) -> int:
    """Output row of grid cell (gx, gy) at ``stride`` for a 416x416 input."""
    offset = sum((416 // s) ** 2 for s in (8, 16, 32) if s < stride)
    return offset + gy * (416 // stride) + gx


# ----------------------------------------------------------------- decode_yolox


@pytest.mark.parametrize(
    "stride, gx, gy, dxdy, wh, expected_xyxy",
    [
        # centre = (g + d) * stride, size = exp(log size) * stride
        (8, 0, 0, (0.5, 0.5), (2.0, 4.0), (-4.0, -12.0, 12.0, 20.0)),
        (16, 5, 3, (0.5, 0.25), (4.0, 2.0), (56.0, 36.0, 120.0, 68.0)),
        (32, 12, 12, (0.0, 1.0), (1.0, 3.0), (368.0, 368.0, 400.0, 464.0)),
    ],
)
def test_decode_yolox_known_cell(stride, gx, gy, dxdy, wh, expected_xyxy):
    out = np.zeros((1, YOLOX_ROWS, 85), np.float32)
    row = _yolox_row(stride, gx, gy)
    out[0, row, :4] = (dxdy[0], dxdy[1], math.log(wh[0]), math.log(wh[1]))
    out[0, row, 4] = 0.8  # objectness
    out[0, row, 5 + 3] = 0.5  # class 3 (motorcycle)
    out[0, row, 5 + 7] = 0.25  # a weaker class: not the argmax
    xyxy, scores, class_ids = decode_yolox(out, YOLOX_HW)
    assert xyxy.shape == (YOLOX_ROWS, 4) and xyxy.dtype == np.float32
    assert scores.dtype == np.float32 and class_ids.dtype == np.int32
    np.testing.assert_allclose(xyxy[row], expected_xyxy, atol=1e-4)
    assert scores[row] == pytest.approx(0.4)
    assert class_ids[row] == 3
    assert np.count_nonzero(scores) == 1  # every other cell has objectness 0


def test_decode_yolox_accepts_unbatched_rows():
    out = np.random.default_rng(0).random((1, YOLOX_ROWS, 85), dtype=np.float32)
    batched = decode_yolox(out, YOLOX_HW)
    unbatched = decode_yolox(out[0], YOLOX_HW)
    for a, b in zip(batched, unbatched):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, YOLOX_ROWS, 85), "batch 1"),
        ((YOLOX_ROWS, 85, 1, 1), "2-D or batch-1"),
        ((1, 100, 85), "N = 3549"),  # grid of another input size
        ((1, YOLOX_ROWS, 5), r"5 \+ classes"),
    ],
)
def test_decode_yolox_rejects_bad_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        decode_yolox(np.zeros(shape, np.float32), YOLOX_HW)


# ----------------------------------------------------------------- decode_yolov8


@pytest.mark.parametrize("batched", [True, False])
def test_decode_yolov8_center_size_to_xyxy(batched):
    out = np.zeros((84, 8400), np.float32)
    out[:4, 17] = (100.0, 50.0, 40.0, 20.0)  # cx, cy, w, h
    out[4 + 2, 17] = 0.7  # class 2 (car)
    out[4 + 0, 17] = 0.3
    xyxy, scores, class_ids = decode_yolov8(out[None] if batched else out)
    assert xyxy.shape == (8400, 4) and xyxy.dtype == np.float32
    np.testing.assert_allclose(xyxy[17], (80.0, 40.0, 120.0, 60.0))
    assert scores[17] == pytest.approx(0.7) and class_ids[17] == 2
    assert np.count_nonzero(scores) == 1


@pytest.mark.parametrize("shape, message", [((2, 84, 10), "batch 1"), ((4, 10), r"4 \+ classes"), ((84,), "2-D")])
def test_decode_yolov8_rejects_bad_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        decode_yolov8(np.zeros(shape, np.float32))


# ----------------------------------------------------------------- NMS


@pytest.mark.parametrize(
    "boxes, scores, class_ids, expected_kept",
    [
        # IoU([0,0,100,100],[10,0,110,100]) = 0.82: the lower score goes
        ([[0, 0, 100, 100], [10, 0, 110, 100]], [0.9, 0.8], [0, 0], {0}),
        # same boxes, the second scores higher: the first goes
        ([[0, 0, 100, 100], [10, 0, 110, 100]], [0.6, 0.8], [0, 0], {1}),
        # same position, different class: both stay
        ([[0, 0, 100, 100], [0, 0, 100, 100]], [0.9, 0.8], [0, 24], {0, 1}),
        # IoU([0,0,100,100],[60,0,160,100]) = 0.25 < 0.45: both stay
        ([[0, 0, 100, 100], [60, 0, 160, 100]], [0.9, 0.8], [0, 0], {0, 1}),
        # overlap chain: 1 suppressed by 0, 2 overlaps only 1 → kept
        ([[0, 0, 100, 100], [10, 0, 110, 100], [75, 0, 175, 100]], [0.9, 0.8, 0.7], [0, 0, 0], {0, 2}),
    ],
)
def test_nms_per_class(boxes, scores, class_ids, expected_kept):
    keep = nms_per_class(np.array(boxes, np.float32), np.array(scores, np.float32), np.array(class_ids, np.int32), 0.45)
    assert keep.dtype == np.int64
    assert set(keep.tolist()) == expected_kept


def test_nms_empty_input():
    assert nms_per_class(np.empty((0, 4), np.float32), np.empty(0, np.float32), np.empty(0, np.int32), 0.5).shape == (0,)


# ----------------------------------------------------------------- letterbox


@pytest.mark.parametrize("frame_hw", [(360, 480), (432, 768), (640, 640), (200, 900), (100, 50)])
@pytest.mark.parametrize("center", [False, True])
def test_letterbox_round_trip_maps_a_drawn_box_back_within_1px(frame_hw, center):
    h, w = frame_hw
    frame = np.zeros((h, w, 3), np.uint8)
    box = np.array([w * 0.3, h * 0.2, w * 0.7, h * 0.9]).round().astype(int)  # x1, y1, x2, y2 (exclusive)
    frame[box[1] : box[3], box[0] : box[2]] = 255
    lb = letterbox(frame, (416, 416), center=center)
    assert lb.image.shape == (416, 416, 3) and lb.image.dtype == np.uint8
    # find the drawn box on the canvas, then map it back
    x, y, bw, bh = cv2.boundingRect((lb.image[:, :, 0] > 200).astype(np.uint8))
    back = boxes_to_frame(np.array([[x, y, x + bw, y + bh]], np.float32), lb, (h, w))
    assert back.dtype == np.float32
    # edges are found on the canvas grid: 1 px there is 1 / scale px in the frame
    np.testing.assert_allclose(back[0], box, atol=max(1.0, 1.0 / lb.scale))
    # and the exact geometry: frame → canvas (x * scale + pad) → frame is the identity
    on_canvas = box * lb.scale + np.array([lb.pad_x, lb.pad_y, lb.pad_x, lb.pad_y])
    np.testing.assert_allclose(boxes_to_frame(on_canvas[None], lb, (h, w))[0], box, atol=1e-3)


@pytest.mark.parametrize(
    "center, frame_hw, expected_pad_xy, pad_region",
    [
        (False, (360, 480), (0, 0), (slice(312, 416), slice(0, 416))),  # 416x312 image at the top-left
        (True, (360, 480), (0, 52), (slice(0, 52), slice(0, 416))),  # centred: 52 px bands above and below
        (True, (480, 360), (52, 0), (slice(0, 416), slice(0, 52))),
    ],
)
def test_letterbox_places_image_and_pads_with_114(center, frame_hw, expected_pad_xy, pad_region):
    lb = letterbox(np.zeros((*frame_hw, 3), np.uint8), (416, 416), center=center)
    assert (lb.pad_x, lb.pad_y) == expected_pad_xy
    assert lb.scale == pytest.approx(416 / max(frame_hw))
    assert np.all(lb.image[pad_region] == 114)
    assert np.all(lb.image[lb.pad_y + 5, lb.pad_x + 5] == 0)


def test_boxes_to_frame_clips_to_the_frame():
    lb = letterbox(np.zeros((360, 480, 3), np.uint8), (416, 416))
    out = boxes_to_frame(np.array([[-20, -5, 500, 400]], np.float32), lb, (360, 480))
    np.testing.assert_allclose(out[0], (0, 0, 480, 360))


@pytest.mark.parametrize(
    "image, size_hw, message",
    [
        (np.zeros((10, 10), np.uint8), (416, 416), r"\(H, W, 3\) uint8"),
        (np.zeros((10, 10, 3), np.float32), (416, 416), "float32"),
        (np.zeros((10, 10, 3), np.uint8), (0, 416), "positive"),
    ],
)
def test_letterbox_rejects_bad_input(image, size_hw, message):
    with pytest.raises(ValueError, match=message):
        letterbox(image, size_hw)


# ----------------------------------------------------------------- config errors


def _cfg(models: Path, name: str, layout: str, **kw) -> OnnxDetectorConfig:
    return OnnxDetectorConfig(path=models / name, layout=layout, **kw)


def test_unknown_class_name_lists_valid_names(models):
    with pytest.raises(ValueError, match=r"unknown class name\(s\) \['persn'\]; valid names: person, bicycle"):
        ObjectDetector(_cfg(models, "yolox_nano.onnx", "yolox", classes=("person", "persn")), ONE_THREAD)


@pytest.mark.parametrize(
    "file, layout, found",
    [
        ("yolox_nano.onnx", "yolov8", r"expects output \[1, 84, 3549\], found output with shape \[1, 3549, 85\]; set detection.detector.layout to 'yolox'"),
        ("yolov8n_int8.onnx", "yolox", r"expects output \[1, 8400, 85\], found output0 with shape \[1, 84, 8400\]; set detection.detector.layout to 'yolov8'"),
        ("osnet_x0_25_msmt17.onnx", "yolox", r"found output with shape \['batch', 512\]; set detection.detector.layout or"),
    ],
)
def test_wrong_layout_for_model_file_is_a_model_error(models, file, layout, found):
    with pytest.raises(ModelError, match=found) as err:
        ObjectDetector(_cfg(models, file, layout), ONE_THREAD)
    assert file in str(err.value)


def test_missing_model_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "yolox_nano.onnx"
    with pytest.raises(ModelError, match="not found") as err:
        ObjectDetector(OnnxDetectorConfig(path=missing, layout="yolox"), ONE_THREAD)
    assert str(missing) in str(err.value)


# ----------------------------------------------------------------- real models


def _vtest_frames(videos: Path, indices: tuple[int, ...]) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(videos / "vtest.avi"))
    frames, i = [], 0
    while len(frames) < len(indices):
        ok, frame = cap.read()
        assert ok, f"vtest.avi ended before frame {i}"
        if i in indices:
            frames.append(frame)
        i += 1
    cap.release()
    return frames


@pytest.fixture(scope="module")
def vtest_frames(videos) -> list[np.ndarray]:
    return _vtest_frames(videos, (0, 150, 300))


@pytest.fixture(scope="module")
def yolox(models) -> ObjectDetector:
    return ObjectDetector(_cfg(models, "yolox_nano.onnx", "yolox"), ONE_THREAD)


@pytest.fixture(scope="module")
def yolov8(models) -> ObjectDetector:
    return ObjectDetector(_cfg(models, "yolov8n_int8.onnx", "yolov8"), ONE_THREAD)


def _assert_plausible_persons(result: DetectionResult, frame_hw: tuple[int, int], at_least: int) -> None:
    h, w = frame_hw
    assert isinstance(result, DetectionResult)
    assert result.xyxy.dtype == np.float32 and result.confidence.dtype == np.float32 and result.class_id.dtype == np.int32
    assert len(result) >= at_least
    assert np.all(result.class_id == 0)  # only the configured class: person
    assert np.all(result.confidence >= 0.35) and np.all(result.confidence <= 1.0)
    assert np.all(np.diff(result.confidence) <= 0)  # highest score first
    x1, y1, x2, y2 = result.xyxy.T
    assert np.all((x1 >= 0) & (y1 >= 0) & (x2 <= w) & (y2 <= h))
    heights, widths = y2 - y1, x2 - x1
    assert np.all((heights > 10) & (heights < h * 0.8)), heights  # pedestrians far from the camera
    assert np.median(heights / widths) > 1.5  # standing people are tall and narrow


def test_yolox_nano_finds_pedestrians_in_vtest(yolox, vtest_frames):
    assert yolox.class_names == COCO80
    for frame in vtest_frames:
        _assert_plausible_persons(yolox.detect(frame), frame.shape[:2], at_least=3)


def test_yolov8_int8_agrees_with_yolox(yolox, yolov8, vtest_frames):
    assert yolov8.class_names[:3] == ("person", "bicycle", "car")  # read from the model metadata
    assert class_names_of(yolov8._cfg) == yolov8.class_names and class_names_of(yolox._cfg) == COCO80
    frame = vtest_frames[0]
    v8 = yolov8.detect(frame)
    _assert_plausible_persons(v8, frame.shape[:2], at_least=3)
    best_iou = sv.box_iou_batch(v8.xyxy, yolox.detect(frame).xyxy).max(axis=1)
    assert np.mean(best_iou > 0.5) >= 0.75, best_iou


@pytest.mark.parametrize(
    "frame, message",
    [
        (np.zeros((360, 480), np.uint8), r"\(H, W, 3\) uint8 BGR"),
        (np.zeros((360, 480, 3), np.float32), "float32"),
        (np.zeros((360, 480, 4), np.uint8), r"shape \(360, 480, 4\)"),
        ([[0, 0, 0]], "list"),
        (np.zeros((0, 480, 3), np.uint8), "empty"),
    ],
)
def test_detect_rejects_bad_frames(yolox, frame, message):
    with pytest.raises(ValueError, match=message):
        yolox.detect(frame)


def test_detect_on_empty_scene_returns_typed_empty_result(yolox):
    result = yolox.detect(np.full((360, 480, 3), 90, np.uint8))
    assert len(result) == 0
    assert result.xyxy.shape == (0, 4) and result.xyxy.dtype == np.float32
    assert result.confidence.dtype == np.float32 and result.class_id.dtype == np.int32


# ----------------------------------------------------------------- batches


def _dynamic_batch_copy(src: Path, dst: Path) -> Path:
    """``src`` (a YOLOX export with batch dimension fixed to 1) with a dynamic batch dimension ``N``: its
    Reshape targets ``[1, 85, -1]`` become ``[0, 85, -1]`` (0: keep the input's batch size)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    targets = {n.input[1] for n in model.graph.node if n.op_type == "Reshape"}
    changed = 0
    for init in model.graph.initializer:
        shape = numpy_helper.to_array(init)
        if init.name in targets and shape.ndim == 1 and shape[0] == 1:
            init.CopyFrom(numpy_helper.from_array(np.concatenate(([0], shape[1:])).astype(shape.dtype), init.name))
            changed += 1
    assert changed == 3, "expected the three head Reshapes of YOLOX (strides 8, 16, 32)"
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    del model.graph.value_info[:]
    onnx.save(model, str(dst))
    return dst


def _toy_yolox(path: Path, batch: int | str, hw: int = 32, seed: int = 0, one_output: bool = False) -> Path:
    """A decoder-compatible toy YOLOX: ``sigmoid(flatten(x / 255) @ W)`` reshaped to ``[batch, cells, 85]``
    for a ``hw`` x ``hw`` input (cells of strides 8, 16, 32), batch dimension ``batch`` (int: fixed);
    ``one_output``: a broken export that averages the batch into one image."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cells = sum((hw // s) ** 2 for s in (8, 16, 32))
    weights = np.random.default_rng(seed).standard_normal((3 * hw * hw, cells * 85)).astype(np.float32) * 0.05
    nodes = [helper.make_node("Mul", ["images", "inv255"], ["x"]), helper.make_node("Flatten", ["x"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W"], ["y"]), helper.make_node("Sigmoid", ["y"], ["p"]),
             helper.make_node("Reshape", ["p", "shape"], ["output"])]
    if one_output:
        nodes.insert(4, helper.make_node("ReduceMean", ["p"], ["p1"], axes=[0], keepdims=1))
        nodes[-1].input[0] = "p1"
    inits = [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(np.array(1 / 255, np.float32), "inv255"),
             numpy_helper.from_array(np.array([-1, cells, 85], np.int64), "shape")]
    graph = helper.make_graph(nodes, "toy_yolox", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, hw, hw])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, cells, 85])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _assert_same_results(batched: list[DetectionResult], single: list[DetectionResult]) -> None:
    assert len(batched) == len(single)
    for b, s in zip(batched, single):
        assert b.xyxy.dtype == np.float32 and b.confidence.dtype == np.float32 and b.class_id.dtype == np.int32
        assert len(b) == len(s)
        np.testing.assert_allclose(b.xyxy, s.xyxy, atol=1e-3)  # pixels
        np.testing.assert_allclose(b.confidence, s.confidence, atol=1e-5)
        np.testing.assert_array_equal(b.class_id, s.class_id)


@pytest.fixture(scope="module")
def vtest_batch(videos) -> list[np.ndarray]:
    """Five vtest frames, one of them a cropped (other size) frame, as from cameras of several resolutions."""
    frames = _vtest_frames(videos, (0, 75, 150, 225, 300))
    frames[2] = np.ascontiguousarray(frames[2][40:, 100:])
    return frames


def test_fixed_batch_yolox_runs_a_batch_frame_by_frame_with_the_same_results(yolox, vtest_batch):
    assert yolox.batch_dim == 1
    single = [yolox.detect(f) for f in vtest_batch]
    runs = yolox.session_runs
    batched = yolox.detect_batch(vtest_batch)
    assert yolox.session_runs - runs == len(vtest_batch)  # batch dimension fixed to 1: one run per frame
    _assert_same_results(batched, single)
    assert sum(len(r) for r in batched) >= 15  # pedestrians in every frame: the comparison is not of empties


def test_dynamic_batch_yolox_runs_once_per_batch_with_the_same_results(models, tmp_path, vtest_batch):
    path = _dynamic_batch_copy(models / "yolox_nano.onnx", tmp_path / "yolox_nano_dynamic.onnx")
    det = ObjectDetector(OnnxDetectorConfig(path=path, layout="yolox", canvas="fixed"), ONE_THREAD)
    assert det.batch_dim is None
    single = [det.detect(f) for f in vtest_batch]
    runs = det.session_runs
    batched = det.detect_batch(vtest_batch)
    assert det.session_runs - runs == 1  # one [5, 3, 416, 416] run
    _assert_same_results(batched, single)
    assert sum(len(r) for r in batched) >= 15
    _assert_same_results(det.detect_batch(vtest_batch[:1]), single[:1])


@pytest.mark.parametrize("batch_dim, n, runs", [("N", 5, 1), (2, 5, 3), (2, 4, 2), (5, 5, 1), (4, 1, 1)])
def test_toy_model_batches_in_chunks_of_its_batch_dim(tmp_path, batch_dim, n, runs):
    path = _toy_yolox(tmp_path / "toy.onnx", batch_dim)
    det = ObjectDetector(OnnxDetectorConfig(path=path, layout="yolox", confidence=0.2, classes=tuple(COCO80)), ONE_THREAD)
    assert det.batch_dim == (None if batch_dim == "N" else batch_dim)
    assert not det.fits  # its MatMul takes only the declared 32x32 input: the probe fell back to the fixed canvas
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (24 + 8 * i, 40, 3), dtype=np.uint8) for i in range(n)]
    batched = det.detect_batch(frames)
    assert det.session_runs == runs
    single = [det.detect(f) for f in frames]  # a fixed batch > 1: each frame padded alone
    assert det.session_runs == runs + n
    _assert_same_results(batched, single)
    assert all(len(r) > 0 for r in batched)  # every image has boxes: the property is not shown on empties
    assert len({r.xyxy.tobytes() for r in batched}) == n  # and they differ per image (no mixed-up rows)


def test_detect_batch_names_the_bad_frame_and_accepts_none(yolox):
    assert yolox.detect_batch([]) == []
    with pytest.raises(ValueError, match="detect_batch frame 1"):
        yolox.detect_batch([np.zeros((10, 10, 3), np.uint8), np.zeros((10, 10), np.uint8)])


def test_a_model_that_answers_a_batch_with_one_image_is_a_model_error(tmp_path):
    path = _toy_yolox(tmp_path / "broken.onnx", "N", one_output=True)
    det = ObjectDetector(OnnxDetectorConfig(path=path, layout="yolox"), ONE_THREAD)
    frame = np.zeros((32, 32, 3), np.uint8)
    assert isinstance(det.detect(frame), DetectionResult)  # a batch of one is fine
    with pytest.raises(ModelError, match=r"broken.onnx: a batch of 3 images gave outputs of shape \[1, 21, 85\]"):
        det.detect_batch([frame] * 3)
