"""Motion gate: synthetic frames built to prove each rule, and the real one-by-one video."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.config import MotionConfig
from stages.motion import MotionGate, MotionResult


def _textured(h: int = 240, w: int = 320, seed: int = 0) -> np.ndarray:
    """A static scene with texture (smoothed noise), (h, w, 3) uint8 BGR."""
    noise = np.random.default_rng(seed).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR)


def _square(x: int, h: int = 240, w: int = 320) -> np.ndarray:
    frame = np.full((h, w, 3), 60, np.uint8)
    frame[100:140, x : x + 40] = 230
    return frame


def test_first_frame_counts_as_moving_then_static_frames_do_not():
    gate = MotionGate(MotionConfig())
    scene = _textured()
    results = [gate.process(scene.copy()) for _ in range(10)]
    assert results[0] == MotionResult(moving=True, changed_fraction=1.0)
    assert all(not r.moving and r.changed_fraction == 0.0 for r in results[1:])


def test_sensor_noise_below_pixel_threshold_is_not_motion():
    gate = MotionGate(MotionConfig(pixel_threshold=25))
    scene = _textured().astype(np.int16)
    rng = np.random.default_rng(1)
    gate.process(scene.astype(np.uint8))
    for _ in range(10):
        noisy = np.clip(scene + rng.normal(0, 4, scene.shape), 0, 255).astype(np.uint8)
        assert not gate.process(noisy).moving


def test_moving_square_is_motion():
    gate = MotionGate(MotionConfig())
    gate.process(_square(10))
    for x in range(20, 200, 10):
        result = gate.process(_square(x))
        assert result.moving
        # the square covers 40x40 of 320x240 px; a 10 px step changes at least the two 10x40 strips
        assert result.changed_fraction >= 2 * 10 * 40 / (320 * 240) * 0.5


def test_object_that_stops_is_absorbed_into_the_background():
    """The running average forgets a still object: with alpha 0.2 it stops counting after a few frames."""
    gate = MotionGate(MotionConfig(background_alpha=0.2))
    gate.process(_square(10))
    assert gate.process(_square(150)).moving
    later = [gate.process(_square(150)).moving for _ in range(30)]
    assert not any(later[-10:])


def test_min_changed_fraction_decides():
    frame_a, frame_b = _square(10), _square(60)
    for threshold, expected in [(0.001, True), (0.5, False)]:
        gate = MotionGate(MotionConfig(min_changed_fraction=threshold))
        gate.process(frame_a)
        assert gate.process(frame_b).moving is expected


def test_disabled_gate_is_always_moving():
    gate = MotionGate(MotionConfig(enabled=False))
    scene = _textured()
    assert all(gate.process(scene).moving for _ in range(5))


def test_frame_size_change_resets_the_background():
    gate = MotionGate(MotionConfig())
    for _ in range(3):
        gate.process(_textured(240, 320))
    assert gate.process(_textured(240, 320)).moving is False
    assert gate.process(_textured(480, 640)) == MotionResult(moving=True, changed_fraction=1.0)
    assert gate.process(_textured(480, 640)).moving is False


def test_reset_forgets_the_background():
    gate = MotionGate(MotionConfig())
    gate.process(_textured())
    gate.reset()
    assert gate.process(_textured(seed=5)) == MotionResult(moving=True, changed_fraction=1.0)


def test_frames_narrower_than_width_px_are_not_upscaled():
    gate = MotionGate(MotionConfig(width_px=640))
    gate.process(_square(10, 120, 160))
    assert gate.process(_square(60, 120, 160)).moving


@pytest.mark.parametrize(
    "frame, message",
    [
        (np.zeros((240, 320), np.uint8), r"shape \(240, 320\)"),
        (np.zeros((240, 320, 3), np.float64), "float64"),
        (np.zeros((0, 320, 3), np.uint8), "non-empty"),
        (None, "NoneType"),
    ],
)
def test_bad_frames_are_rejected(frame, message):
    with pytest.raises(ValueError, match=message):
        MotionGate(MotionConfig()).process(frame)


def test_real_video_empty_room_then_person_walking_in(videos):
    """one-by-one-person-detection.mp4: the room is empty until ~frame 60, then a woman walks in.

    She stands still at the table from ~frame 115 to ~180 and the running
    average absorbs her (the gate then reports no motion), so the walking-in
    stretch 62-115 is the one checked for motion.
    """
    cap = cv2.VideoCapture(str(videos / "one-by-one-person-detection.mp4"))
    gate = MotionGate(MotionConfig())
    moving = []
    for _ in range(116):
        ok, frame = cap.read()
        assert ok
        moving.append(gate.process(frame).moving)
    cap.release()
    assert moving[0]  # first frame initialises the background
    assert np.mean(moving[1:58]) <= 0.1
    assert np.mean(moving[62:116]) >= 0.9
