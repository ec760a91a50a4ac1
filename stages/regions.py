"""Motion regions: run the object detector on crops around what moves, not on the whole frame.

Frigate's approach (``frigate/util/object.py``: motion boxes grown into
regions, only those crops detected): a detector frame's region boxes are the
motion gate's changed areas plus the camera's objects of its last
``remember`` detector frames (so people who stand still, or move only a
little, stay inside a crop even when one frame misses them), and every
``whole_every``-th detector frame of a camera runs whole, as Frigate
re-checks stationary objects, so nothing outside the regions stays unseen for long. Each box is grown by a margin, overlapping grown boxes are merged until
the regions are disjoint, and each region is cropped and run at the scale of
the whole frame, on a canvas fitted to it (:func:`stages.detector.fit_canvas`):
objects keep the size in pixels the detector sees them at on the whole frame,
and the model's cost, which grows with the canvas area, shrinks with the crop.

Two rules keep the result the same as the whole frame's:

- when the regions' canvases add up to more than ``max_area`` of the whole
  frame's canvas (or there are more than ``max_regions``), the whole frame runs;
- a detection touching a region's side that is not a frame border may be a cut
  object: the whole frame runs again for that frame (``region_retried``).

Regions need a detector whose canvas fits the image (``detection.detector.canvas:
fit``; with a fixed canvas every crop would cost a whole frame's run) and that
runs on the CPU (on a GPU, cuDNN tunes and TensorRT builds per input shape,
and crops come in many shapes; whole frames there are cheap anyway).
"""

from __future__ import annotations

from collections import deque
from typing import Protocol, Sequence

import numpy as np

from pipeline.config import RegionConfig
from stages.detector import DetectionResult

#: A region ``(x1, y1, x2, y2)`` in frame pixels, integers, ``x1 < x2``, ``y1 < y2``.
Region = tuple[int, int, int, int]


class CanvasDetector(Protocol):
    """What :class:`RegionDetector` needs of :class:`stages.detector.ObjectDetector`."""

    crops_pay: bool

    def canvas(self, image_hw: tuple[int, int], scale: float | None = None) -> tuple[tuple[int, int], float]: ...

    def detect_batch(self, frames: Sequence[np.ndarray], scales: Sequence[float | None] | None = None) -> list[DetectionResult]: ...


def grow_and_merge(boxes: np.ndarray, frame_hw: tuple[int, int], margin: float, min_margin_px: int,
                   min_side_px: float = 0.0) -> list[Region]:
    """Grow boxes by a margin and merge overlapping ones into disjoint regions.

    Args:
        boxes: ``(n, 4)`` float boxes ``x1, y1, x2, y2``, frame pixels.
        frame_hw: the frame's ``(height, width)``; regions are clipped to it.
        margin: each side grows by ``margin`` times the box's longer side ...
        min_margin_px: ... but by at least this many pixels.
        min_side_px: grown boxes narrower or lower than this grow about their centre to it (moved inside
            the frame where it ends), so an object keeps some context around it.

    Returns:
        Disjoint (non-overlapping) integer regions, sorted by ``(y1, x1)``; empty for no boxes.
    """
    h, w = frame_hw
    rects: list[list[int]] = []
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        grow = max(margin * max(x2 - x1, y2 - y1), float(min_margin_px))
        x1, x2 = _at_least(x1 - grow, x2 + grow, min_side_px, w)
        y1, y2 = _at_least(y1 - grow, y2 + grow, min_side_px, h)
        r = [max(0, int(np.floor(x1))), max(0, int(np.floor(y1))), min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))]
        if r[0] < r[2] and r[1] < r[3]:
            rects.append(r)
    merged = True
    while merged:
        merged = False
        for i in range(len(rects)):
            for j in range(i + 1, len(rects)):
                a, b = rects[i], rects[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    rects[i] = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
                    del rects[j]
                    merged = True
                    break
            if merged:
                break
    return sorted((tuple(r) for r in rects), key=lambda r: (r[1], r[0]))  # type: ignore[misc]


def _at_least(lo: float, hi: float, side: float, limit: int) -> tuple[float, float]:
    """The span ``lo..hi`` widened about its centre to ``side`` (at most ``limit``), shifted into ``0..limit``."""
    if hi - lo >= side:
        return lo, hi
    side = min(side, float(limit))
    lo = (lo + hi - side) / 2
    lo = min(max(0.0, lo), limit - side)
    return lo, lo + side


def touches_inner_side(xyxy: np.ndarray, region: Region, frame_hw: tuple[int, int], tol_px: float) -> bool:
    """True if a box (frame pixels) lies within ``tol_px`` of a side of ``region`` that is not on the frame's border
    (the object may go on outside the crop)."""
    x1, y1, x2, y2 = region
    h, w = frame_hw
    b = np.asarray(xyxy, np.float64).reshape(-1, 4)
    cut = np.zeros(len(b), bool)
    if x1 > 0:
        cut |= b[:, 0] <= x1 + tol_px
    if y1 > 0:
        cut |= b[:, 1] <= y1 + tol_px
    if x2 < w:
        cut |= b[:, 2] >= x2 - tol_px
    if y2 < h:
        cut |= b[:, 3] >= y2 - tol_px
    return bool(cut.any())


class RegionDetector:
    """Detector runs on motion regions (or whole frames), with per-camera memory of the last objects.

    Args:
        detector: the object detector (regions are used only when crops pay, ``detector.crops_pay``: its canvas
            fits and it runs on the CPU).
        settings: the region rules (``detection.regions``).
        fixed_hw: the model's declared input ``(height, width)``, for ``detector_kpx_fixed``.

    Attributes:
        counts: cumulative ``region_frames`` (frames detected on crops), ``region_crops``,
            ``region_retried`` (crop results replaced by a whole-frame run), ``detector_kpx`` (thousands of
            canvas pixels the detector ran on) and ``detector_kpx_fixed`` (what the model's declared input
            size would have cost for the same frames).
    """

    def __init__(self, detector: CanvasDetector, settings: RegionConfig, fixed_hw: tuple[int, int]) -> None:
        self.detector = detector
        self.settings = settings
        self._fixed_px = fixed_hw[0] * fixed_hw[1]
        self.last: dict[str, deque[np.ndarray]] = {}  # camera -> (n, 4) boxes of its last `remember` detector frames
        self.since_whole: dict[str, int] = {}  # camera -> detector frames since its last whole one
        self.counts = {"region_frames": 0, "region_crops": 0, "region_retried": 0, "detector_kpx": 0, "detector_kpx_fixed": 0}
        self._px = 0  # canvas pixels not yet counted in whole kpx
        self._px_fixed = 0

    @property
    def active(self) -> bool:
        """True if frames may run on regions (``enabled`` and the detector's crops pay)."""
        return self.settings.enabled and self.detector.crops_pay

    def plan(self, camera: str, frame_hw: tuple[int, int], motion_boxes: np.ndarray | None) -> list[Region] | None:
        """The regions to detect on for one frame, or None for the whole frame.

        Args:
            camera: the frame's camera (its last objects join the motion boxes).
            frame_hw: the frame's ``(height, width)``.
            motion_boxes: ``(n, 4)`` changed areas in frame pixels, or None (the whole frame changed).
        """
        s = self.settings
        if not self.active or motion_boxes is None:
            return None
        if self.since_whole.get(camera, s.whole_every) + 1 >= s.whole_every:
            return None
        boxes = np.concatenate([np.asarray(motion_boxes, np.float32).reshape(-1, 4), *self.last.get(camera, ())])
        (fh, fw), scale = self.detector.canvas(frame_hw)
        regions = grow_and_merge(boxes, frame_hw, s.margin, s.min_margin_px, s.min_side / scale)
        if not regions or len(regions) > s.max_regions:
            return None
        cost = sum(np.prod(self.detector.canvas((r[3] - r[1], r[2] - r[0]), scale)[0]) for r in regions)
        return regions if cost <= s.max_area * fh * fw else None

    def detect(self, frames: Sequence[np.ndarray], cameras: Sequence[str],
               motion_boxes: Sequence[np.ndarray | None]) -> list[DetectionResult]:
        """Detect on each frame (its regions, or whole), in one detector batch (plus one for retried frames).

        Args:
            frames: ``(H, W, 3) uint8`` BGR frames.
            cameras: each frame's camera; each camera's frames in order.
            motion_boxes: each frame's motion boxes (:attr:`stages.motion.MotionResult.boxes`).

        Returns:
            One :class:`DetectionResult` per frame, boxes in frame pixels, highest score first;
            the camera's last objects are updated.
        """
        plans = [self.plan(c, f.shape[:2], m) for f, c, m in zip(frames, cameras, motion_boxes)]
        images, scales, owner = [], [], []
        for i, (frame, plan) in enumerate(zip(frames, plans)):
            for r in plan or [None]:
                scale = None if r is None else self.detector.canvas(frame.shape[:2])[1]
                images.append(frame if r is None else frame[r[1] : r[3], r[0] : r[2]])
                scales.append(scale)
                owner.append(i)
        found = self.detector.detect_batch(images, scales) if images else []
        out, retry = [], []
        for i, (frame, plan) in enumerate(zip(frames, plans)):
            parts = [r for r, o in zip(found, owner) if o == i]
            result = parts[0] if plan is None else self._join(parts, plan, frame.shape[:2])
            if result is None:
                retry.append(i)
            out.append(result)
        for i, result in zip(retry, self.detector.detect_batch([frames[i] for i in retry]) if retry else []):
            out[i] = result
            self.counts["region_retried"] += 1
        self._count(frames, plans, images, scales, retry)
        for camera, plan, result in zip(cameras, plans, out):
            self.last.setdefault(camera, deque(maxlen=self.settings.remember)).append(result.xyxy)
            self.since_whole[camera] = self.since_whole.get(camera, 0) + 1 if plan is not None else 0
        return out

    def _join(self, parts: list[DetectionResult], plan: list[Region], frame_hw: tuple[int, int]) -> DetectionResult | None:
        """The crops' results in frame pixels as one result, or None if an object may be cut by a crop's side."""
        boxes, conf, cls = [], [], []
        for r, part in zip(plan, parts):
            xyxy = part.xyxy + np.array([r[0], r[1], r[0], r[1]], np.float32)
            if len(xyxy) and touches_inner_side(xyxy, r, frame_hw, self.settings.edge_tol_px):
                return None
            boxes.append(xyxy)
            conf.append(part.confidence)
            cls.append(part.class_id)
        confidence = np.concatenate(conf).astype(np.float32)
        order = np.argsort(-confidence, kind="stable")
        return DetectionResult(xyxy=np.concatenate(boxes).astype(np.float32)[order], confidence=confidence[order],
                               class_id=np.concatenate(cls).astype(np.int32)[order])

    def _count(self, frames: Sequence[np.ndarray], plans: list, images: list, scales: list, retry: list[int]) -> None:
        """Update :attr:`counts` for one call."""
        self.counts["region_frames"] += sum(p is not None for p in plans)
        self.counts["region_crops"] += sum(len(p) for p in plans if p is not None)
        px = sum(int(np.prod(self.detector.canvas(im.shape[:2], s)[0])) for im, s in zip(images, scales))
        px += sum(int(np.prod(self.detector.canvas(frames[i].shape[:2])[0])) for i in retry)
        self._px += px
        self._px_fixed += self._fixed_px * len(frames)
        for key, attr in (("detector_kpx", "_px"), ("detector_kpx_fixed", "_px_fixed")):
            whole, rest = divmod(getattr(self, attr), 1000)
            self.counts[key] += whole
            setattr(self, attr, rest)
