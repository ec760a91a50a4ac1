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
from typing import Sequence

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
    tracked (a running-average background absorbs them within seconds); the
    hold ends early once ``motion.release_after_empty`` still frames in a row
    had no detection (the scene emptied: no need to look for a person standing
    still), counted as ``hold_released``.

    Every frame yields exactly one :class:`Detections` (empty when the motion
    gate skipped the detector, ``valid=False`` when the frame was overwritten
    before it could be copied), so the recognition stage sees a gap-free
    sequence per camera.

    :meth:`process_batch` does the same for frames of several cameras at once
    (``detection.batch``): motion gating per camera first, then one
    :meth:`~stages.detector.ObjectDetector.detect_batch` over the frames that
    need the detector; the results are those of :meth:`process` on each frame in turn.

    Args:
        detector: the object detector.
        motion: motion gate settings.
        batch: frames per batch the runner hands over (:meth:`warmup` runs the model on one such batch).

    Attributes:
        drops: cumulative ``{"motion_skipped": n}`` for the stage's counters.
        counts: cumulative batch counters for status, filled by :meth:`process_batch`:
            ``detector_batches`` (detector calls), ``detector_batch_frames`` (frames in them),
            ``detector_runs`` (model runs they took) and ``detector_discarded`` (frames detected in
            case an earlier frame of the batch kept the detector on, then answered as motion-skipped).
    """

    def __init__(self, detector: ObjectDetector, motion: MotionConfig, batch: int = 1) -> None:
        self.detector = detector
        self.motion_cfg = motion
        self.batch = batch
        self.gates: dict[str, MotionGate] = {}
        self.last_hit: dict[str, int] = {}  # camera -> last frame index with detections (the hold's start)
        self.empty_still: dict[str, int] = {}  # camera -> still frames in a row the hold ran the detector on for nothing
        self.drops = {"motion_skipped": 0}
        self.counts: dict[str, int] = {}

    def wants_frame(self, meta: object) -> bool:
        return True

    def warmup(self) -> None:
        """Run the detector once on a blank frame (and on a blank batch when batching): ONNX Runtime's first run
        of a shape allocates and is several times slower, and must not fall on a live camera's first frames."""
        h, w = self.detector.input_hw
        blank = np.zeros((h, w, 3), np.uint8)
        self.detector.detect(blank)
        if self.batch > 1:
            self.detector.detect_batch([blank] * self.batch)

    def _holding(self, meta: FrameRef) -> bool:
        return meta.frame_index - self.last_hit.get(meta.camera, -10**9) <= self.motion_cfg.hold_frames

    def _moving(self, frame: np.ndarray, meta: FrameRef) -> bool:
        return self.gates.setdefault(meta.camera, MotionGate(self.motion_cfg)).process(frame).moving

    def process(self, frame: np.ndarray | None, meta: object) -> list[Detections]:
        assert isinstance(meta, FrameRef)
        t0 = time.perf_counter()
        if frame is None:
            return [empty_detections(meta, valid=False)]
        moving = self._moving(frame, meta)
        if not moving and not self._holding(meta):
            self.drops["motion_skipped"] += 1
            return [empty_detections(meta, motion=False, detect_ms=(time.perf_counter() - t0) * 1e3)]
        r = self.detector.detect(frame)
        self._after_detect(meta, moving, len(r))
        return [Detections(frame=meta, xyxy=r.xyxy, confidence=r.confidence, class_id=r.class_id,
                           detect_ms=(time.perf_counter() - t0) * 1e3)]

    def process_batch(self, frames: Sequence[np.ndarray | None], metas: Sequence[object]) -> list[list[Detections]]:
        """:meth:`process` for several frames at once, with one detector batch.

        Args:
            frames: per message an ``(H, W, 3) uint8`` BGR frame (sizes may differ), or None (overwritten).
            metas: the :class:`~pipeline.messages.FrameRef` of each frame, in the order received
                (each camera's frames in increasing ``frame_index``).

        Returns:
            Per message, in order, a one-element list with its :class:`Detections`: the same
            boxes (``xyxy`` frame pixels, float32) as :meth:`process` on the frames in turn, up to
            float rounding of batched inference; ``detect_ms`` is the frame's motion gate time plus
            its share of the detector batch.

        Raises:
            ValueError: ``frames`` and ``metas`` differ in length, or a frame is not ``(H, W, 3) uint8``.
        """
        if len(frames) != len(metas):
            raise ValueError(f"process_batch: {len(frames)} frames for {len(metas)} messages")
        assert all(isinstance(m, FrameRef) for m in metas)
        refs: list[FrameRef] = list(metas)  # type: ignore[arg-type]
        moving, gate_ms = [False] * len(refs), [0.0] * len(refs)
        for i, (frame, meta) in enumerate(zip(frames, refs)):
            if frame is not None:
                t0 = time.perf_counter()
                moving[i] = self._moving(frame, meta)
                gate_ms[i] = (time.perf_counter() - t0) * 1e3
        need = self._may_need_detector(frames, refs, moving)
        results, share_ms = self._detect(frames, need)
        out = []
        for i, (frame, meta) in enumerate(zip(frames, refs)):
            if frame is None:
                out.append([empty_detections(meta, valid=False)])
            elif not moving[i] and not self._holding(meta):
                self.drops["motion_skipped"] += 1
                self.counts["detector_discarded"] += i in results
                out.append([empty_detections(meta, motion=False, detect_ms=gate_ms[i])])
            else:
                r = results[i]
                self._after_detect(meta, moving[i], len(r))
                out.append([Detections(frame=meta, xyxy=r.xyxy, confidence=r.confidence, class_id=r.class_id,
                                       detect_ms=gate_ms[i] + share_ms)])
        return out

    def _after_detect(self, meta: FrameRef, moving: bool, found: int) -> None:
        """Update the camera's hold after the detector ran on a frame with ``found`` objects."""
        cam = meta.camera
        if found:
            self.last_hit[cam] = meta.frame_index
        if found or moving:
            self.empty_still[cam] = 0
            return
        self.empty_still[cam] = self.empty_still.get(cam, 0) + 1
        release = self.motion_cfg.release_after_empty
        if release is not None and self.empty_still[cam] >= release and cam in self.last_hit:
            del self.last_hit[cam]  # nobody is standing there: still frames skip the detector again
            self.counts["hold_released"] = self.counts.get("hold_released", 0) + 1

    def _may_need_detector(self, frames: Sequence[np.ndarray | None], refs: Sequence[FrameRef],
                           moving: list[bool]) -> list[int]:
        """Positions of the frames :meth:`process` in turn might run the detector on: moving, or held by the
        last hit before the batch or (if it finds something) by an earlier such frame of the same camera."""
        hit = dict(self.last_hit)  # as if every detector frame of the batch found something
        need = []
        for i, (frame, meta) in enumerate(zip(frames, refs)):
            if frame is None:
                continue
            if moving[i] or meta.frame_index - hit.get(meta.camera, -10**9) <= self.motion_cfg.hold_frames:
                need.append(i)
                hit[meta.camera] = max(hit.get(meta.camera, meta.frame_index), meta.frame_index)
        return need

    def _detect(self, frames: Sequence[np.ndarray | None], need: list[int]) -> tuple[dict, float]:
        """Detector results by position for the frames at ``need`` (one batch), and each one's share of its time, ms."""
        for key in ("detector_batches", "detector_batch_frames", "detector_runs", "detector_discarded"):
            self.counts.setdefault(key, 0)
        if not need:
            return {}, 0.0
        runs, t0 = self.detector.session_runs, time.perf_counter()
        found = self.detector.detect_batch([frames[i] for i in need])  # type: ignore[misc]
        share_ms = (time.perf_counter() - t0) * 1e3 / len(need)
        self.counts["detector_batches"] += 1
        self.counts["detector_batch_frames"] += len(need)
        self.counts["detector_runs"] += self.detector.session_runs - runs
        return dict(zip(need, found)), share_ms

    def tick(self, now_ns: int) -> list[object]:
        return []

    def finish(self) -> list[object]:
        return []
