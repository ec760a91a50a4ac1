"""The detection stage: motion gate then detector per frame, and the same answers for frames in batches."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import MotionConfig, OnnxDetectorConfig
from pipeline.messages import Detections, FrameRef
from stages.detection import DetectionStage, StableScene, same_scene
from stages.detector import DetectionResult, ObjectDetector
from stages.runtime import SessionOptions

_NONE = DetectionResult(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))


class _MarkerDetector:
    """Finds one box in a frame whose pixel (0, 0) is green-marked (value 255 in channel 1); counts calls."""

    input_hw = (8, 8)
    crops_pay = False  # a fixed canvas: no motion regions

    def __init__(self) -> None:
        self.session_runs = 0
        self.batches: list[int] = []

    def _one(self, frame: np.ndarray) -> DetectionResult:
        if frame[0, 0, 1] != 255:
            return _NONE
        h, w = frame.shape[:2]
        return DetectionResult(np.array([[1, 1, w - 1, h - 1]], np.float32), np.array([0.9], np.float32), np.zeros(1, np.int32))

    def detect(self, frame: np.ndarray) -> DetectionResult:
        self.session_runs += 1
        return self._one(frame)

    def canvas(self, image_hw, scale=None):
        return self.input_hw, 1.0

    def detect_batch(self, frames, scales=None) -> list[DetectionResult]:
        self.session_runs += 1
        self.batches.append(len(frames))
        return [self._one(f) for f in frames]


def _scripted_frames(cameras: int, per_camera: int, seed: int) -> list[tuple[FrameRef, np.ndarray]]:
    """Frames of ``cameras`` interleaved at random (each camera in order): the whole frame changes grey level
    (motion) or not, and carries the detector's marker (a hit) or not, at random."""
    rng = np.random.default_rng(seed)
    level = [60] * cameras
    streams = []
    for cam in range(cameras):
        frames = []
        for i in range(per_camera):
            if rng.random() < 0.3:
                level[cam] = 160 if level[cam] == 60 else 60
            frame = np.full((48, 64, 3), level[cam], np.uint8)
            if rng.random() < 0.3:
                frame[0, 0, 1] = 255
            ref = FrameRef(camera=f"cam{cam}", ring=f"r{cam}", slot=i % 8, seq=i + 1, frame_index=i, captured_at_ns=0,
                           height=48, width=64)
            frames.append((ref, frame))
        streams.append(frames)
    order = rng.permutation(np.repeat(np.arange(cameras), per_camera))
    pos = [0] * cameras
    out = []
    for cam in order:
        out.append(streams[cam][pos[cam]])
        pos[cam] += 1
    return out


def _key(d: Detections) -> tuple:
    return (d.frame.camera, d.frame.frame_index, d.motion, d.valid, d.xyxy.tobytes(), d.confidence.tobytes(), d.class_id.tobytes())


MOTION = MotionConfig(hold_frames=2, min_changed_fraction=0.05)


@pytest.mark.parametrize("batch", [2, 3, 5, 8, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batches_answer_like_frame_by_frame_with_motion_gate_and_hold(batch: int, seed: int) -> None:
    script = _scripted_frames(cameras=3, per_camera=40, seed=seed)
    script[7] = (script[7][0], None)  # a frame overwritten before it could be read
    one = DetectionStage(_MarkerDetector(), MOTION)
    expected = [d for ref, frame in script for d in one.process(frame, ref)]
    many = DetectionStage(_MarkerDetector(), MOTION, batch=batch)
    got = []
    for start in range(0, len(script), batch):
        part = script[start : start + batch]
        answers = many.process_batch([f for _, f in part], [ref for ref, _ in part])
        assert all(len(a) == 1 for a in answers)  # exactly one Detections per frame
        got += [a[0] for a in answers]
    assert [_key(d) for d in got] == [_key(d) for d in expected]
    assert many.drops == one.drops and one.drops["motion_skipped"] >= 5  # the gate skipped frames: it was tested
    assert sum(d.valid and len(d.xyxy) > 0 for d in expected) > 5  # and the hold after hits mattered
    detected = one.detector.session_runs
    c = many.counts
    assert c["detector_batch_frames"] - c["detector_discarded"] == detected  # only frames that needed the detector
    assert c["detector_runs"] == c["detector_batches"] == len(many.detector.batches)
    assert max(many.detector.batches) <= batch


def test_a_still_camera_goes_unbatched_while_a_moving_one_is_detected() -> None:
    stage = DetectionStage(_MarkerDetector(), MotionConfig(hold_frames=0, min_changed_fraction=0.05), batch=4)
    refs = [FrameRef(camera=c, ring=c, slot=i, seq=i + 1, frame_index=i, captured_at_ns=0, height=48, width=64)
            for i in range(3) for c in ("still", "moving")]
    frames = [np.full((48, 64, 3), 60 if r.camera == "still" else 40 + 90 * r.frame_index, np.uint8) for r in refs]
    answers = stage.process_batch(frames, refs)
    motion = [(a[0].frame.camera, a[0].motion) for a in answers]
    # a camera's first frame starts its background and counts as moving
    assert motion == [("still", True), ("moving", True), ("still", False), ("moving", True), ("still", False), ("moving", True)]
    assert stage.detector.batches == [4] and stage.drops["motion_skipped"] == 2


def test_process_batch_needs_one_frame_per_message() -> None:
    stage = DetectionStage(_MarkerDetector(), MOTION, batch=2)
    ref = FrameRef(camera="c", ring="r", slot=0, seq=1, frame_index=0, captured_at_ns=0, height=4, width=4)
    with pytest.raises(ValueError, match="1 frames for 2 messages"):
        stage.process_batch([None], [ref, ref])


def test_two_cameras_of_vtest_through_yolox_batched_equal_frame_by_frame(models: Path, videos: Path) -> None:
    cap = cv2.VideoCapture(str(videos / "vtest.avi"))
    frames = []
    while len(frames) < 24:
        ok, frame = cap.read()
        assert ok
        frames.append(frame)
    cap.release()
    # camera a: frames 0-11, camera b: frames 12-23 cropped to another size; interleaved
    script = []
    for i in range(12):
        script.append((FrameRef(camera="a", ring="ra", slot=i, seq=i + 1, frame_index=i, captured_at_ns=0, height=576, width=768), frames[i]))
        crop = np.ascontiguousarray(frames[12 + i][60:, 80:])
        script.append((FrameRef(camera="b", ring="rb", slot=i, seq=i + 1, frame_index=i, captured_at_ns=0,
                                height=crop.shape[0], width=crop.shape[1]), crop))
    detector = ObjectDetector(OnnxDetectorConfig(path=models / "yolox_nano.onnx", layout="yolox"), SessionOptions(threads=1))
    one = DetectionStage(detector, MotionConfig())
    expected = [one.process(frame, ref)[0] for ref, frame in script]
    many = DetectionStage(detector, MotionConfig(), batch=4)
    got = []
    for start in range(0, len(script), 4):
        part = script[start : start + 4]
        got += [a[0] for a in many.process_batch([f for _, f in part], [ref for ref, _ in part])]
    assert sum(len(d.xyxy) for d in expected) >= 24 * 3  # pedestrians: not a comparison of empties
    for g, e in zip(got, expected, strict=True):
        assert (g.frame, g.motion, g.valid, len(g.xyxy)) == (e.frame, e.motion, e.valid, len(e.xyxy))
        np.testing.assert_allclose(g.xyxy, e.xyxy, atol=1e-3)
        np.testing.assert_allclose(g.confidence, e.confidence, atol=1e-5)
        np.testing.assert_array_equal(g.class_id, e.class_id)
    assert many.counts["detector_batches"] == 6 and many.counts["detector_runs"] == 24  # fixed batch 1: one run per frame


@pytest.mark.parametrize("release, detector_frames", [
    (None, list(range(0, 31))),    # the hold keeps the detector on for 30 still frames after the last hit
    (5, list(range(0, 6))),        # the scene emptied: 5 empty still frames end the hold
    (1, [0, 1]),
])
def test_an_emptied_scene_releases_the_hold_early(release: int | None, detector_frames: list[int]) -> None:
    """Frame 0 has a person (marker) and motion; then the same still frame without anyone for 40 frames."""
    stage = DetectionStage(_MarkerDetector(), MotionConfig(hold_frames=30, release_after_empty=release))  # type: ignore[arg-type]
    ran = []
    for i in range(41):
        frame = np.full((48, 64, 3), 60, np.uint8)
        if i == 0:
            frame[0, 0, 1] = 255
        ref = FrameRef(camera="c", ring="r", slot=i % 8, seq=i + 1, frame_index=i, captured_at_ns=0, height=48, width=64)
        before = stage.detector.session_runs
        stage.process(frame, ref)
        if stage.detector.session_runs > before:
            ran.append(i)
    assert ran == detector_frames
    assert stage.counts.get("hold_released", 0) == (release is not None)


# ------------------------------------------------------------------ stable scenes (the detector skips a frame)
_A = [10.0, 10.0, 50.0, 90.0]
_B = [100.0, 20.0, 140.0, 100.0]


def _shifted(box: list[float], dx: float) -> list[float]:
    return [box[0] + dx, box[1], box[2] + dx, box[3]]


@pytest.mark.parametrize("prev, cur, classes_prev, classes_cur, expected", [
    ([], [], [], [], True),                                        # nothing, still nothing
    ([_A, _B], [_B, _A], [0, 0], [0, 0], True),                    # order does not matter
    ([_A], [_shifted(_A, 8)], [0], [0], True),                     # 40x80 box moved 8 px: IoU 0.67
    ([_A], [_shifted(_A, 20)], [0], [0], False),                   # moved 20 px: IoU 0.33
    ([_A], [_A, _B], [0], [0, 0], False),                          # someone arrived
    ([_A, _B], [_A], [0, 0], [0], False),                          # someone left
    ([_A], [_A], [0], [1], False),                                 # another class in the same place
    ([_A, _shifted(_A, 2)], [_A, _A], [0, 0], [0, 0], False),      # two boxes cannot match the same previous box
])
def test_same_scene(prev, cur, classes_prev, classes_cur, expected: bool) -> None:
    arr = lambda b: np.array(b, np.float32).reshape(-1, 4)  # noqa: E731
    assert same_scene(arr(prev), np.array(classes_prev, np.int32), arr(cur), np.array(classes_cur, np.int32), 0.5) is expected


def test_stable_scene_allows_max_skip_frames_after_a_stable_detector_frame() -> None:
    one = np.array([_A], np.float32), np.zeros(1, np.int32)
    moved = np.array([_shifted(_A, 30)], np.float32), np.zeros(1, np.int32)
    scene = StableScene(max_skip=2, min_iou=0.5)
    assert not scene.take("c")
    scene.observe("c", *one)             # first detector frame: nothing to compare with
    assert not scene.take("c")
    scene.observe("c", *one)             # same objects in place: the next 2 frames may skip
    assert [scene.take("c") for _ in range(3)] == [True, True, False]
    assert not scene.take("other")       # per camera
    scene.observe("c", *moved)           # the object moved: detect every frame again
    assert not scene.take("c")
    off = StableScene(max_skip=0, min_iou=0.5)
    off.observe("c", *one)
    off.observe("c", *one)
    assert not off.take("c")


@pytest.mark.parametrize("batch", [1, 4])
def test_detection_stage_holds_the_frame_after_two_stable_ones(batch: int) -> None:
    """A marked (moving) scene that does not change: the detector runs on 2 frames, skips 1, runs, skips... with
    batch 1; every frame still gets exactly one Detections, the skipped ones held (no boxes) and counted."""
    det = _MarkerDetector()
    stage = DetectionStage(det, MotionConfig(hold_frames=1000, min_changed_fraction=0.0), batch=batch, stable_skip=1)
    frames = []
    for i in range(12):
        frame = np.full((48, 64, 3), 60, np.uint8)
        frame[0, 0, 1] = 255
        frames.append((FrameRef(camera="c", ring="r", slot=i % 8, seq=i + 1, frame_index=i, captured_at_ns=0,
                                height=48, width=64), frame))
    out = []
    for k in range(0, len(frames), batch):
        chunk = frames[k:k + batch]
        if batch == 1:
            out += stage.process(chunk[0][1], chunk[0][0])
        else:
            out += [d for ds in stage.process_batch([f for _, f in chunk], [r for r, _ in chunk]) for d in ds]
    assert [d.frame.frame_index for d in out] == list(range(12))
    held = [d.frame.frame_index for d in out if d.held]
    assert all(len(d) == 0 for d in out if d.held) and all(len(d) == 1 for d in out if not d.held)
    assert stage.counts["stable_skipped"] == len(held) and stage.drops["motion_skipped"] == 0
    # batch 1: frames 0, 1 detected, 2 held, 3 detected (compared with 1: stable), 4 held ...; a batch can only
    # hold a camera's first frame in it (the others' results are not known before it runs).
    assert held == ([2, 4, 6, 8, 10] if batch == 1 else [4, 8])


def test_with_motion_regions_a_batch_is_answered_as_frame_by_frame(models: Path, videos: Path) -> None:
    """Regions depend on the previous frame's objects: a batch runs frame by frame, with the same answers."""
    from pipeline.config import RegionConfig

    cap = cv2.VideoCapture(str(videos / "one-by-one-person-detection.mp4"))
    script = []
    for i in range(140):
        ok, frame = cap.read()
        assert ok
        if i >= 60:
            script.append((FrameRef(camera="hall", ring="r", slot=i % 8, seq=i + 1, frame_index=i, captured_at_ns=0,
                                    height=frame.shape[0], width=frame.shape[1]), frame))
    cap.release()
    detector = ObjectDetector(OnnxDetectorConfig(path=models / "yolox_nano.onnx", layout="yolox"), SessionOptions(threads=1))
    one = DetectionStage(detector, MotionConfig(), regions=RegionConfig())
    expected = [one.process(frame, ref)[0] for ref, frame in script]
    many = DetectionStage(detector, MotionConfig(), batch=4, regions=RegionConfig())
    got = [a[0] for start in range(0, len(script), 4)
           for a in many.process_batch([f for _, f in script[start : start + 4]], [r for r, _ in script[start : start + 4]])]
    assert one.counts["region_frames"] >= 20  # the person walking in ran on regions
    assert [_key(d) for d in got] == [_key(d) for d in expected]
    assert many.counts == one.counts
