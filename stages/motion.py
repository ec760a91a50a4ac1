"""Motion gate: skip the object detector on frames where nothing changes.

Background subtraction against a running-average background (the classic
exponential moving average, ``cv2.accumulateWeighted``): each frame is
downscaled, converted to grey and blurred; pixels whose grey level differs
from the background by more than ``pixel_threshold`` count as changed, and the
frame is "moving" when the changed fraction reaches ``min_changed_fraction``.
The background is then updated with weight ``background_alpha``.
The changed pixels' connected components (8-connectivity, after a 3x3
dilation joins fragments) are the frame's motion boxes, which
:mod:`stages.regions` turns into detector crops, as Frigate's motion regions.

State is per camera: use one :class:`MotionGate` per camera (feeding frames of
two cameras to one gate compares each against the other's background).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.config import MotionConfig

_BLUR_KSIZE = (5, 5)  # Gaussian blur on the downscaled frame: suppresses sensor noise and compression artefacts
_DILATE = np.ones((3, 3), np.uint8)  # joins the fragments of one moving object into one motion box


@dataclass(frozen=True)
class MotionResult:
    """Motion decision for one frame.

    Attributes:
        moving: True when the detector should run on this frame.
        changed_fraction: fraction of downscaled pixels that changed, [0, 1]
            (1.0 on a first frame and when the gate is disabled).
        boxes: ``(n, 4) float32`` bounding boxes ``x1, y1, x2, y2`` of the
            changed areas in frame pixels, or None when the whole frame counts
            as changed (first frame, gate disabled).
    """

    moving: bool
    changed_fraction: float
    boxes: np.ndarray | None = None


def _changed_boxes(changed: np.ndarray, to_frame: float) -> np.ndarray:
    """Bounding boxes of the connected changed areas of a ``(h, w) bool`` mask, scaled by ``to_frame`` to frame
    pixels: ``(n, 4) float32`` ``x1, y1, x2, y2``."""
    mask = cv2.dilate(changed.astype(np.uint8), _DILATE)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    x, y, w, h = (stats[1:, i].astype(np.float32) for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    return (np.stack((x, y, x + w, y + h), axis=1) * np.float32(to_frame)).reshape(n - 1, 4)


class MotionGate:
    """Running-average background motion detector for one camera.

    Args:
        cfg: motion settings (``enabled``, ``width_px``, ``pixel_threshold``,
            ``min_changed_fraction``, ``background_alpha``).
    """

    def __init__(self, cfg: MotionConfig) -> None:
        self._cfg = cfg
        self._background: np.ndarray | None = None  # (h, w) float32 grey levels
        self._frame_shape: tuple[int, ...] | None = None

    def reset(self) -> None:
        """Forget the background; the next frame initialises it again."""
        self._background = None
        self._frame_shape = None

    def process(self, frame: np.ndarray) -> MotionResult:
        """Compare one frame with the background, then update the background.

        The first frame (and the first after a frame-size change or
        :meth:`reset`) initialises the background and counts as moving.

        Args:
            frame: ``(H, W, 3) uint8`` BGR image.

        Returns:
            The :class:`MotionResult` for this frame.

        Raises:
            ValueError: ``frame`` is not an ``(H, W, 3) uint8`` array.
        """
        if not self._cfg.enabled:
            return MotionResult(moving=True, changed_fraction=1.0)
        grey = self._prepare(frame)
        if self._background is None or frame.shape != self._frame_shape:
            self._background = grey.astype(np.float32)
            self._frame_shape = frame.shape
            return MotionResult(moving=True, changed_fraction=1.0)
        changed = cv2.absdiff(grey, cv2.convertScaleAbs(self._background)) > self._cfg.pixel_threshold
        fraction = float(np.count_nonzero(changed)) / changed.size
        cv2.accumulateWeighted(grey, self._background, self._cfg.background_alpha)
        moving = fraction >= self._cfg.min_changed_fraction
        boxes = _changed_boxes(changed, frame.shape[1] / grey.shape[1]) if moving else np.zeros((0, 4), np.float32)
        return MotionResult(moving=moving, changed_fraction=fraction, boxes=boxes)

    def _prepare(self, frame: np.ndarray) -> np.ndarray:
        """Downscale to ``width_px`` wide (never upscale), grey, blur: ``(h, w) uint8``."""
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or frame.size == 0:
            got = f"{frame.dtype} array of shape {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"MotionGate.process frame: expected a non-empty (H, W, 3) uint8 BGR image, got {got}")
        h, w = frame.shape[:2]
        width = min(self._cfg.width_px, w)
        height = max(1, round(h * width / w))
        small = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA) if width != w else frame
        return cv2.GaussianBlur(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY), _BLUR_KSIZE, 0)
