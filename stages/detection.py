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
import supervision as sv

from pipeline.config import MotionConfig, RegionConfig
from pipeline.messages import Detections, FrameRef
from stages.detector import DetectionResult, ObjectDetector
from stages.motion import MotionGate, MotionResult
from stages.regions import RegionDetector
from stages.runtime import buckets

_EMPTY_XYXY = np.zeros((0, 4), np.float32)
_EMPTY_F = np.zeros(0, np.float32)
_EMPTY_I = np.zeros(0, np.int32)


def empty_detections(ref: FrameRef, *, motion: bool = True, valid: bool = True, detect_ms: float = 0.0,
                     held: bool = False) -> Detections:
    """A :class:`Detections` with no objects for ``ref`` (skipped or unreadable frame)."""
    return Detections(frame=ref, xyxy=_EMPTY_XYXY, confidence=_EMPTY_F, class_id=_EMPTY_I,
                      motion=motion, valid=valid, detect_ms=detect_ms, held=held)


def same_scene(prev_xyxy: np.ndarray, prev_class: np.ndarray, xyxy: np.ndarray, class_id: np.ndarray,
               min_iou: float) -> bool:
    """True if two detector results show the same objects in nearly the same places.

    Each box of the new result must have IoU >= ``min_iou`` with a box of the
    same class in the previous one, one to one (the best match of every new
    box is a different previous box), and both have as many boxes per class.
    Two empty results are the same scene.

    Args:
        prev_xyxy, xyxy: ``(n, 4)`` float boxes ``x1, y1, x2, y2``, pixels.
        prev_class, class_id: ``(n,)`` int class ids.
        min_iou: IoU threshold in (0, 1].
    """
    if len(xyxy) != len(prev_xyxy) or sorted(class_id.tolist()) != sorted(prev_class.tolist()):
        return False
    if len(xyxy) == 0:
        return True
    iou = sv.box_iou_batch(np.asarray(xyxy, np.float64), np.asarray(prev_xyxy, np.float64))
    iou[class_id[:, None] != prev_class[None, :]] = 0.0
    best = iou.argmax(axis=1)
    return bool(np.all(iou[np.arange(len(best)), best] >= min_iou)) and len(set(best.tolist())) == len(best)


class StableScene:
    """Per camera: may the detector skip its next moving frame? (``detection.stable_skip``)

    DeepStream's ``nvinfer`` runs the detector every ``interval + 1`` frames and
    lets its tracker carry the objects in between; here the interval adapts:
    after a detector frame whose objects match those of the camera's previous
    detector frame (:func:`same_scene`: same classes, every box's IoU >=
    ``min_iou`` with its own previous box) up to ``max_skip`` frames are
    skipped, then the detector looks again. Objects that move fast, arrive or
    leave change the boxes, so the detector runs on every frame while they do;
    a new object is seen at most ``max_skip`` frames late.

    Args:
        max_skip: frames skipped in a row after a stable detector frame (0: never skip).
        min_iou: IoU a box needs with its previous box for the scene to be stable.
    """

    def __init__(self, max_skip: int, min_iou: float) -> None:
        self.max_skip = max_skip
        self.min_iou = min_iou
        self._last: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # camera -> its last detector frame's boxes, classes
        self._allowed: dict[str, int] = {}  # camera -> frames it may still skip

    def take(self, camera: str) -> bool:
        """True if the camera's next moving frame skips the detector (one of its allowance is used)."""
        if self._allowed.get(camera, 0) <= 0:
            return False
        self._allowed[camera] -= 1
        return True

    def observe(self, camera: str, xyxy: np.ndarray, class_id: np.ndarray) -> None:
        """Record a detector frame's result; a stable one allows the next ``max_skip`` frames to skip."""
        prev = self._last.get(camera)
        self._last[camera] = (xyxy, class_id)
        stable = self.max_skip > 0 and prev is not None and same_scene(prev[0], prev[1], xyxy, class_id, self.min_iou)
        self._allowed[camera] = self.max_skip if stable else 0


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
    With motion regions active (``detection.regions`` on the CPU, :class:`~stages.regions.RegionDetector`)
    a batch is answered frame by frame: each frame's regions depend on the previous frame's objects, and
    crops of many shapes would not share a model run anyway.

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

    def __init__(self, detector: ObjectDetector, motion: MotionConfig, batch: int = 1, stable_skip: int = 0,
                 stable_iou: float = 0.6, regions: RegionConfig = RegionConfig(enabled=False)) -> None:
        self.detector = detector
        self.regions = RegionDetector(detector, regions, detector.input_hw)
        self.motion_cfg = motion
        self.batch = batch
        self.stable = StableScene(stable_skip, stable_iou)
        self.gates: dict[str, MotionGate] = {}
        self.last_hit: dict[str, int] = {}  # camera -> last frame index with detections (the hold's start)
        self.empty_still: dict[str, int] = {}  # camera -> still frames in a row the hold ran the detector on for nothing
        self.drops = {"motion_skipped": 0}
        self.counts: dict[str, int] = {"stable_skipped": 0, **self.regions.counts}

    def wants_frame(self, meta: object) -> bool:
        return True

    def warmup(self) -> None:
        """Run the detector once on a blank frame (and on a blank batch when batching): ONNX Runtime's first run
        of a shape allocates and is several times slower, and must not fall on a live camera's first frames."""
        h, w = self.detector.input_hw
        blank = np.zeros((h, w, 3), np.uint8)
        self.detector.detect(blank)
        sizes = buckets(self.batch) if getattr(self.detector, "static", False) else [self.batch]
        for n in (n for n in sizes if n > 1):  # static shapes: every padded batch size runs once here
            self.detector.detect_batch([blank] * n)

    def _holding(self, meta: FrameRef) -> bool:
        return meta.frame_index - self.last_hit.get(meta.camera, -10**9) <= self.motion_cfg.hold_frames

    def _gate(self, frame: np.ndarray, meta: FrameRef) -> MotionResult:
        return self.gates.setdefault(meta.camera, MotionGate(self.motion_cfg)).process(frame)

    def _run(self, frames: Sequence[np.ndarray], refs: Sequence[FrameRef], motion: Sequence[MotionResult]) -> list[DetectionResult]:
        """The detector on frames (on their motion regions where cheaper); the region counters copied to :attr:`counts`."""
        found = self.regions.detect(frames, [r.camera for r in refs], [m.boxes for m in motion])
        self.counts.update(self.regions.counts)
        return found

    def process(self, frame: np.ndarray | None, meta: object) -> list[Detections]:
        assert isinstance(meta, FrameRef)
        t0 = time.perf_counter()
        if frame is None:
            return [empty_detections(meta, valid=False)]
        motion = self._gate(frame, meta)
        moving = motion.moving
        if not moving and not self._holding(meta):
            self.drops["motion_skipped"] += 1
            return [empty_detections(meta, motion=False, detect_ms=(time.perf_counter() - t0) * 1e3)]
        if self.stable.take(meta.camera):
            self.counts["stable_skipped"] += 1
            return [empty_detections(meta, held=True, detect_ms=(time.perf_counter() - t0) * 1e3)]
        r = self._run([frame], [meta], [motion])[0]
        self._after_detect(meta, moving, r)
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
        if self.regions.active:  # crops of many shapes share no model run: frame by frame, each planned on the last
            return [self.process(frame, meta) for frame, meta in zip(frames, metas)]
        assert all(isinstance(m, FrameRef) for m in metas)
        refs: list[FrameRef] = list(metas)  # type: ignore[arg-type]
        gated: list[MotionResult | None] = [None] * len(refs)
        gate_ms = [0.0] * len(refs)
        for i, (frame, meta) in enumerate(zip(frames, refs)):
            if frame is not None:
                t0 = time.perf_counter()
                gated[i] = self._gate(frame, meta)
                gate_ms[i] = (time.perf_counter() - t0) * 1e3
        moving = [g is not None and g.moving for g in gated]
        held = self._held(frames, refs, moving)
        need = [i for i in self._may_need_detector(frames, refs, moving) if not held[i]]
        results, share_ms = self._detect(frames, refs, gated, need)
        out = []
        for i, (frame, meta) in enumerate(zip(frames, refs)):
            if frame is None:
                out.append([empty_detections(meta, valid=False)])
            elif not moving[i] and not self._holding(meta):
                self.drops["motion_skipped"] += 1
                self.counts["detector_discarded"] += i in results
                out.append([empty_detections(meta, motion=False, detect_ms=gate_ms[i])])
            elif held[i]:
                self.counts["stable_skipped"] += 1
                out.append([empty_detections(meta, held=True, detect_ms=gate_ms[i])])
            else:
                r = results[i]
                self._after_detect(meta, moving[i], r)
                out.append([Detections(frame=meta, xyxy=r.xyxy, confidence=r.confidence, class_id=r.class_id,
                                       detect_ms=gate_ms[i] + share_ms)])
        return out

    def _held(self, frames: Sequence[np.ndarray | None], refs: Sequence[FrameRef], moving: list[bool]) -> list[bool]:
        """Per frame of a batch: skipped by :class:`StableScene` (only a camera's first frame in the batch can be:
        the results of its earlier frames in the batch are not known before the batch runs)."""
        held, seen = [False] * len(refs), set()
        for i, (frame, meta) in enumerate(zip(frames, refs)):
            if frame is not None and meta.camera not in seen and (moving[i] or self._holding(meta)):
                held[i] = self.stable.take(meta.camera)
            seen.add(meta.camera)
        return held

    def _after_detect(self, meta: FrameRef, moving: bool, result: DetectionResult) -> None:
        """Update the camera's hold and stable-scene state after the detector ran on a frame."""
        cam = meta.camera
        self.stable.observe(cam, result.xyxy, result.class_id)
        found = len(result)
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

    def _detect(self, frames: Sequence[np.ndarray | None], refs: Sequence[FrameRef], gated: Sequence[MotionResult | None],
                need: list[int]) -> tuple[dict, float]:
        """Detector results by position for the frames at ``need`` (one batch), and each one's share of its time, ms."""
        for key in ("detector_batches", "detector_batch_frames", "detector_runs", "detector_discarded"):
            self.counts.setdefault(key, 0)
        if not need:
            return {}, 0.0
        runs, t0 = self.detector.session_runs, time.perf_counter()
        found = self._run([frames[i] for i in need], [refs[i] for i in need], [gated[i] for i in need])  # type: ignore[misc]
        share_ms = (time.perf_counter() - t0) * 1e3 / len(need)
        self.counts["detector_batches"] += 1
        self.counts["detector_batch_frames"] += len(need)
        self.counts["detector_runs"] += self.detector.session_runs - runs
        return dict(zip(need, found)), share_ms

    def tick(self, now_ns: int) -> list[object]:
        return []

    def finish(self) -> list[object]:
        return []
