"""Fitted canvases and motion regions: the detector on less pixels finds the same objects.

Synthetic cases prove each rule (canvas sizes, region growth and merging, the
cut rule, the area limit, the retry); the real YOLOX-Nano on the asset videos
proves the property that matters: the same persons, found on fewer pixels.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import supervision as sv

from pipeline.config import MotionConfig, OnnxDetectorConfig, RegionConfig
from stages.detector import DetectionResult, ObjectDetector, fit_canvas, letterbox
from stages.motion import MotionGate
from stages.regions import RegionDetector, grow_and_merge, touches_inner_side
from stages.runtime import SessionOptions

ONE_THREAD = SessionOptions(threads=1)


@pytest.mark.parametrize("image_hw, scale, expected", [
    ((360, 480), None, ((320, 416), 416 / 480)),  # vtest: 416x312 rounded up to 416x320
    ((432, 768), None, ((256, 416), 416 / 768)),  # one-by-one, 16:9: 416x234 -> 416x256
    ((416, 416), None, ((416, 416), 1.0)),
    ((1080, 1920), None, ((256, 416), 416 / 1920)),
    ((100, 50), 0.5, ((64, 32), 0.5)),  # a crop at its frame's scale: 50x25 -> 64x32
    ((10, 10), 0.5, ((32, 32), 0.5)),  # never below one stride
    ((2000, 400), None, ((416, 96), 416 / 2000)),  # portrait
])  # fmt: skip
def test_fit_canvas(image_hw, scale, expected):
    (h, w), s = fit_canvas(image_hw, (416, 416), scale)
    assert ((h, w), pytest.approx(s)) == (expected[0], pytest.approx(expected[1]))
    assert h % 32 == 0 and w % 32 == 0 and h >= round(image_hw[0] * s) and w >= round(image_hw[1] * s)


@pytest.mark.parametrize("image_hw, scale, message", [((0, 10), None, "positive sizes"), ((10, 10), 0.0, "positive number")])
def test_fit_canvas_rejects(image_hw, scale, message):
    with pytest.raises(ValueError, match=message):
        fit_canvas(image_hw, (416, 416), scale)


def test_letterbox_at_a_given_scale_keeps_it_and_refuses_what_does_not_fit():
    img = np.full((100, 60, 3), 7, np.uint8)
    lb = letterbox(img, (64, 64), scale=0.5)
    assert lb.scale == 0.5 and lb.image.shape == (64, 64, 3)
    assert (lb.image[:50, :30] == 7).all() and (lb.image[50:, :] == 114).all()
    with pytest.raises(ValueError, match="does not fit"):
        letterbox(img, (64, 64), scale=1.0)


# --------------------------------------------------------------------------- the real detector, fitted


def _frames(videos, name: str, indices: range) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(videos / name))
    out, i = [], 0
    while i <= indices[-1]:
        ok, frame = cap.read()
        assert ok, f"{name} ended at frame {i}"
        if i in indices:
            out.append(frame)
        i += 1
    return out


def _same_objects(a: DetectionResult, b: DetectionResult, min_iou: float) -> bool:
    """Same number of objects, and each box of ``a`` has a box of ``b`` at IoU >= ``min_iou``."""
    if len(a) != len(b):
        return False
    return len(a) == 0 or bool(sv.box_iou_batch(a.xyxy.astype(np.float64), b.xyxy.astype(np.float64)).max(axis=1).min() >= min_iou)


@pytest.mark.parametrize("video, canvas", [("vtest.avi", (320, 416)), ("one-by-one-person-detection.mp4", (256, 416))])
def test_fitted_yolox_finds_what_the_fixed_one_finds(models, videos, video, canvas):
    path = models / "yolox_nano.onnx"
    fixed = ObjectDetector(OnnxDetectorConfig(path=path, layout="yolox", canvas="fixed"), ONE_THREAD)
    fitted = ObjectDetector(OnnxDetectorConfig(path=path, layout="yolox"), ONE_THREAD)
    assert not fixed.fits and fitted.fits and fitted.crops_pay and not fixed.crops_pay
    frames = _frames(videos, video, range(0, 400, 20))
    assert fitted.canvas(frames[0].shape[:2])[0] == canvas
    a, b = [fixed.detect(f) for f in frames], [fitted.detect(f) for f in frames]
    assert sum(len(r) for r in a) >= 10  # persons were there to find
    assert sum(_same_objects(x, y, 0.85) for x, y in zip(a, b)) >= len(frames) - 1


def test_a_model_that_cannot_take_other_sizes_falls_back_to_fixed(models, caplog):
    """The asset YOLOv8n's head reshapes to its 8400 anchors: the probe fails, the fixed 640x640 input stays."""
    det = ObjectDetector(OnnxDetectorConfig(path=models / "yolov8n_int8.onnx", layout="yolov8"), ONE_THREAD)
    assert not det.fits and det.canvas((360, 480))[0] == (640, 640)
    assert "falls back to the fixed 640x640 input" in caplog.text
    assert det.detect(np.zeros((360, 480, 3), np.uint8)).xyxy.shape == (0, 4)


# --------------------------------------------------------------------------- region rules


@pytest.mark.parametrize("boxes, expected", [
    ([], []),
    ([[100, 100, 140, 180]], [(80, 80, 160, 200)]),  # grows by 0.25 x 80 = 20 px
    ([[10, 10, 20, 20]], [(0, 0, 36, 36)]),  # at least 16 px, clipped to the frame
    ([[100, 100, 140, 180], [150, 100, 190, 180]], [(80, 80, 210, 200)]),  # grown boxes overlap: one region
    ([[0, 0, 40, 40], [300, 180, 340, 220]], [(0, 0, 56, 56), (284, 164, 356, 236)]),  # far apart: two
    ([[0, 0, 40, 40], [300, 180, 340, 220], [30, 30, 310, 190]], [(0, 0, 380, 240)]),  # a third joins them, clipped
])  # fmt: skip
def test_grow_and_merge(boxes, expected):
    assert grow_and_merge(np.array(boxes, np.float32).reshape(-1, 4), (240, 380), 0.25, 16) == expected


@pytest.mark.parametrize("box, expected", [
    ([100, 100, 110, 120], (45, 50, 165, 170)),  # grown to 120 x 120 about its centre
    ([0, 0, 10, 10], (0, 0, 120, 120)),  # moved inside the frame
    ([370, 230, 380, 240], (260, 120, 380, 240)),
    ([100, 20, 300, 30], (96, 0, 304, 120)),  # wide enough already: only its height grows
])  # fmt: skip
def test_small_regions_grow_to_the_minimum_side(box, expected):
    assert grow_and_merge(np.array([box], np.float32), (240, 380), 0.0, 4, min_side_px=120) == [expected]


@pytest.mark.parametrize("box, cut", [
    ([50, 50, 80, 90], False),  # inside
    ([20, 50, 80, 90], True),  # at the region's left side, which is inside the frame
    ([50, 50, 80, 118], True),  # at its bottom side
    ([50, 0, 80, 40], False),  # at its top side, the frame's border
    ([50, 50, 160, 90], False),  # at its right side, the frame's border
])  # fmt: skip
def test_touches_inner_side(box, cut):
    assert touches_inner_side(np.array([box], np.float32), (20, 0, 160, 120), (240, 160), 4.0) is cut


class _Recorder:
    """A fitted fake detector: one box per image where a bright (255) block is, at its bounding box; records calls."""

    crops_pay = True
    input_hw = (64, 64)

    def __init__(self) -> None:
        self.calls: list[list[tuple]] = []

    def canvas(self, image_hw, scale=None):
        return fit_canvas(image_hw, self.input_hw, scale, stride=8)

    def detect_batch(self, frames, scales=None):
        self.calls.append([f.shape[:2] for f in frames])
        out = []
        for f in frames:
            ys, xs = np.nonzero(f[:, :, 0] == 255)
            if len(xs):
                out.append(DetectionResult(np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32),
                                           np.array([0.9], np.float32), np.zeros(1, np.int32)))
            else:
                out.append(DetectionResult(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32)))
        return out


def _scene(block: tuple[int, int, int, int]) -> np.ndarray:
    frame = np.full((120, 160, 3), 40, np.uint8)
    x1, y1, x2, y2 = block
    frame[y1:y2, x1:x2] = 255
    return frame


SETTINGS = RegionConfig(margin=0.25, min_margin_px=4, max_area=0.6, max_regions=2, edge_tol_px=1.0, min_side=0,
                        remember=1, whole_every=1000)


def test_a_small_motion_box_runs_a_crop_and_maps_boxes_back():
    det = _Recorder()
    rd = RegionDetector(det, SETTINGS, det.input_hw)
    rd.detect([np.full((120, 160, 3), 40, np.uint8)], ["c"], [None])  # a camera's first frame runs whole
    [r] = rd.detect([_scene((60, 40, 80, 80))], ["c"], [np.array([[58, 38, 82, 82]], np.float32)])
    assert det.calls[1:] == [[(66, 46)]]  # the box grown by 0.25 x 44 = 11 px: (47, 27)-(93, 93) cropped, not the 120x160 frame
    np.testing.assert_array_equal(r.xyxy, [[60, 40, 80, 80]])  # frame pixels
    assert rd.counts["region_frames"] == 1 and rd.counts["region_retried"] == 0


@pytest.mark.parametrize("motion, why", [
    (None, "the whole frame changed"),
    (np.array([[0, 0, 150, 110]], np.float32), "the region costs more than max_area"),
    (np.array([[0, 0, 8, 8], [140, 0, 150, 8], [0, 100, 8, 110]], np.float32), "more regions than max_regions"),
    (np.zeros((0, 4), np.float32), "nothing moved and nothing was there"),
])  # fmt: skip
def test_whole_frame_when_regions_do_not_pay(motion, why):
    det = _Recorder()
    rd = RegionDetector(det, SETTINGS, det.input_hw)
    rd.detect([np.full((120, 160, 3), 40, np.uint8)], ["c"], [None])
    rd.detect([_scene((60, 40, 80, 80))], ["c"], [motion])
    assert det.calls == [[(120, 160)]] * 2, why
    assert rd.counts["region_frames"] == 0


def test_an_object_cut_by_the_crop_is_detected_again_on_the_whole_frame():
    det = _Recorder()
    rd = RegionDetector(det, SETTINGS, det.input_hw)
    rd.detect([np.full((120, 160, 3), 40, np.uint8)], ["c"], [None])
    [r] = rd.detect([_scene((20, 20, 100, 100))], ["c"], [np.array([[50, 50, 60, 60]], np.float32)])  # motion: a part
    assert det.calls[1:] == [[(18, 18)], [(120, 160)]]  # the crop (46, 46)-(64, 64), then the whole frame
    np.testing.assert_array_equal(r.xyxy, [[20, 20, 100, 100]])
    assert rd.counts["region_retried"] == 1


def test_the_last_objects_of_a_camera_stay_in_its_regions():
    """Someone standing still: no motion, but last frame's box keeps a crop around them; other cameras apart."""
    det = _Recorder()
    rd = RegionDetector(det, SETTINGS, det.input_hw)
    rd.detect([_scene((60, 40, 80, 80))], ["c"], [None])
    [r] = rd.detect([_scene((60, 40, 80, 80))], ["c"], [np.zeros((0, 4), np.float32)])
    assert det.calls[-1] == [(60, 40)] and len(r) == 1  # the last box grown by 10 px
    assert rd.plan("other", (120, 160), np.zeros((0, 4), np.float32)) is None


def test_every_nth_detector_frame_of_a_camera_runs_whole():
    det = _Recorder()
    rd = RegionDetector(det, SETTINGS.model_copy(update={"whole_every": 3}), det.input_hw)
    box = np.array([[58, 38, 82, 82]], np.float32)
    for _ in range(7):
        rd.detect([_scene((60, 40, 80, 80))], ["c"], [box])
    assert [call[0] == (120, 160) for call in det.calls] == [True, False, False, True, False, False, True]


def test_objects_of_the_last_frames_are_remembered():
    """One frame that misses someone does not drop them from the regions: the last `remember` frames count."""
    det = _Recorder()
    rd = RegionDetector(det, SETTINGS.model_copy(update={"remember": 2, "max_regions": 4}), det.input_hw)
    rd.detect([_scene((10, 10, 20, 30))], ["c"], [None])  # whole frame: finds the block at (10, 10)
    rd.detect([_scene((130, 80, 140, 100))], ["c"], [np.array([[128, 78, 142, 102]], np.float32)])  # it moved away
    assert len(rd.plan("c", (120, 160), np.zeros((0, 4), np.float32))) == 2  # both places, one frame each
    rd.detect([_scene((130, 80, 140, 100))], ["c"], [np.zeros((0, 4), np.float32)])
    assert len(rd.plan("c", (120, 160), np.zeros((0, 4), np.float32))) == 1  # the first place is forgotten


def test_no_regions_where_crops_do_not_pay():
    """A fixed canvas (every crop costs a whole run) or a GPU provider (a tuning per new shape)."""
    det = _Recorder()
    det.crops_pay = False
    rd = RegionDetector(det, SETTINGS, det.input_hw)
    assert rd.plan("c", (120, 160), np.array([[58, 38, 82, 82]], np.float32)) is None


def test_motion_boxes_surround_the_moving_square_in_frame_pixels():
    gate = MotionGate(MotionConfig(width_px=160))
    background = np.full((240, 320, 3), 60, np.uint8)
    gate.process(background)
    frame = background.copy()
    frame[100:140, 200:240] = 230
    result = gate.process(frame)
    assert result.moving and result.boxes is not None and len(result.boxes) == 1
    x1, y1, x2, y2 = result.boxes[0]
    assert x1 <= 200 <= 240 <= x2 and y1 <= 100 <= 140 <= y2 and x2 - x1 <= 60 and y2 - y1 <= 60


# --------------------------------------------------------------------------- the real thing


def _matched(a: np.ndarray, b: np.ndarray, min_iou: float = 0.5) -> int:
    """Boxes of ``a`` with a box of ``b`` at IoU >= ``min_iou``."""
    if not len(a) or not len(b):
        return 0
    return int((sv.box_iou_batch(a.astype(np.float64), b.astype(np.float64)).max(axis=1) >= min_iou).sum())


@pytest.mark.parametrize("video, frames, uses_regions", [
    ("one-by-one-person-detection.mp4", range(0, 700), True),  # one person at a time: small regions
    ("vtest.avi", range(0, 300), False),  # people all over the path: the whole frame is cheaper
])  # fmt: skip
def test_motion_regions_find_the_persons_the_whole_frame_finds(models, videos, video, frames, uses_regions):
    """The motion gate's boxes and the real YOLOX-Nano: the persons found on regions are those found on the
    whole frame (recall and precision >= 0.98 at IoU 0.5), on fewer pixels where regions pay."""
    det = ObjectDetector(OnnxDetectorConfig(path=models / "yolox_nano.onnx", layout="yolox"), ONE_THREAD)
    rd = RegionDetector(det, RegionConfig(), det.input_hw)
    gate = MotionGate(MotionConfig())
    whole_n = region_n = found = kept = moving = 0
    for frame in _frames(videos, video, frames):
        motion = gate.process(frame)
        if not motion.moving:
            continue
        moving += 1
        [on_regions] = rd.detect([frame], ["cam"], [motion.boxes])
        whole = det.detect(frame)
        whole_n, region_n = whole_n + len(whole), region_n + len(on_regions)
        found += _matched(whole.xyxy, on_regions.xyxy)
        kept += _matched(on_regions.xyxy, whole.xyxy)
    assert whole_n >= 0.5 * moving  # persons on many moving frames: the property is not shown on empty ones
    assert found >= 0.98 * whole_n and kept >= 0.98 * region_n, (found, whole_n, kept, region_n)
    if uses_regions:
        assert rd.counts["region_frames"] >= 0.3 * moving
        whole_area = np.prod(det.canvas(frame.shape[:2])[0]) / np.prod(det.input_hw)
        assert rd.counts["detector_kpx"] < 0.85 * whole_area * rd.counts["detector_kpx_fixed"]
