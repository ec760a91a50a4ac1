"""The motion/detection stage: motion gate, then the object detector, per frame.

Per-camera state is only the motion gate's background. With several
detection processes, each process keeps one :class:`~stages.motion.MotionGate`
per camera and feeds it the frames of that camera it receives: a subsequence
of the stream in order, which a running-average background model handles
like a lower frame rate. Tracking (which needs every frame in order) is not
done here but in the recognition process that owns the camera.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.config import MotionConfig
from pipeline.messages import Detections, FrameRef
from stages.detector import ObjectDetector
from stages.motion import MotionGate

_EMPTY_XYXY = np.zeros((0, 4), np.float32)
_EMPTY_F = np.zeros(0, np.float32)
_EMPTY_I = np.zeros(0, np.int32)


def empty_detections(ref: FrameRef, *, motion: bool = True, valid: bool = True, detect_ms: float = 0.0) -> Detections:
    """A :class:`Detections` with no objects for ``ref`` (skipped or unreadable frame)."""
    return Detections(frame=ref, xyxy=_EMPTY_XYXY, confidence=_EMPTY_F, class_id=_EMPTY_I,
                      motion=motion, valid=valid, detect_ms=detect_ms)


class DetectionStage:
    """``process(frame, FrameRef) -> [Detections]``: motion gate, then detector.

    The detector also runs on still frames for ``motion.hold_frames`` frames
    after the last frame with detections, so people who stand still stay
    tracked (a running-average background absorbs them within seconds).

    Every frame yields exactly one :class:`Detections` (empty when the motion
    gate skipped the detector, ``valid=False`` when the frame was overwritten
    before it could be copied), so the recognition stage sees a gap-free
    sequence per camera.

    Attributes:
        drops: cumulative ``{"motion_skipped": n}`` for the stage's counters.
    """

    def __init__(self, detector: ObjectDetector, motion: MotionConfig) -> None:
        self.detector = detector
        self.motion_cfg = motion
        self.gates: dict[str, MotionGate] = {}
        self.last_hit: dict[str, int] = {}  # camera -> last frame index with detections
        self.drops = {"motion_skipped": 0}

    def wants_frame(self, meta: object) -> bool:
        return True

    def warmup(self) -> None:
        """Run the detector once on a blank frame: ONNX Runtime's first run allocates and is several times
        slower, and must not fall on a live camera's first frames."""
        h, w = self.detector.input_hw
        self.detector.detect(np.zeros((h, w, 3), np.uint8))

    def process(self, frame: np.ndarray | None, meta: object) -> list[Detections]:
        assert isinstance(meta, FrameRef)
        t0 = time.perf_counter()
        if frame is None:
            return [empty_detections(meta, valid=False)]
        gate = self.gates.setdefault(meta.camera, MotionGate(self.motion_cfg))
        moving = gate.process(frame).moving
        holding = meta.frame_index - self.last_hit.get(meta.camera, -10**9) <= self.motion_cfg.hold_frames
        if not moving and not holding:
            self.drops["motion_skipped"] += 1
            return [empty_detections(meta, motion=False, detect_ms=(time.perf_counter() - t0) * 1e3)]
        r = self.detector.detect(frame)
        if len(r):
            self.last_hit[meta.camera] = meta.frame_index
        return [Detections(frame=meta, xyxy=r.xyxy, confidence=r.confidence, class_id=r.class_id,
                           detect_ms=(time.perf_counter() - t0) * 1e3)]

    def tick(self, now_ns: int) -> list[object]:
        return []

    def finish(self) -> list[object]:
        return []
