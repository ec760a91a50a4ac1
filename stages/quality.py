"""Face quality gate: size, sharpness and pose, so that only usable faces vote for a track's identity.

- size: box width below ``face.min_face_px`` (checked by the face analyzer);
- blur: variance of the Laplacian of the aligned 112x112 grey crop (Pech-Pacheco
  et al. 2000, "Diatom autofocusing in brightfield microscopy") below
  ``face.quality.min_sharpness``;
- pose: yaw estimated from the 5 SCRFD keypoints as the horizontal offset of
  the nose from the eye midpoint divided by the eye distance (0 frontal,
  about ±1 in profile) beyond ``face.quality.max_abs_yaw``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.config import FaceQualityConfig
from stages.face import Face, align

#: Rejection reasons, in the order they are checked.
REJECT_REASONS: tuple[str, ...] = ("small", "blurry", "pose")


@dataclass(frozen=True)
class FaceQuality:
    """Measured quality of one face.

    Attributes:
        sharpness: variance of the Laplacian of the aligned grey crop (grey levels²).
        yaw: nose offset from the eye midpoint / eye distance (signed, unitless).
        reason: first failed check (``"blurry"``, ``"pose"``) or None when the face passes.
    """

    sharpness: float
    yaw: float
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.reason is None


def yaw_from_keypoints(kps: np.ndarray) -> float:
    """Yaw proxy from ``(5, 2)`` keypoints (left eye, right eye, nose, left mouth, right mouth; x, y pixels)."""
    eyes = kps[1] - kps[0]
    dist = float(np.hypot(*eyes))
    if dist < 1e-6:
        return float("inf")
    mid = (kps[0] + kps[1]) / 2
    # Offset of the nose along the eye axis, so in-plane roll does not count as yaw.
    return float(np.dot(kps[2] - mid, eyes) / dist**2)


def sharpness(aligned: np.ndarray) -> float:
    """Variance of the Laplacian of a ``(112, 112, 3) uint8`` BGR aligned crop."""
    grey = cv2.cvtColor(aligned, cv2.COLOR_BGR2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def assess(image: np.ndarray, face: Face, cfg: FaceQualityConfig) -> FaceQuality:
    """Measure ``face`` (found in ``image``, ``(H, W, 3) uint8`` BGR) against the gate ``cfg``."""
    return assess_aligned(align(image, face.kps), face.kps, cfg)


def assess_aligned(aligned: np.ndarray, kps: np.ndarray, cfg: FaceQualityConfig) -> FaceQuality:
    """:func:`assess` of a face already aligned: ``aligned`` ``(112, 112, 3) uint8`` BGR from
    :func:`~stages.face.align`, ``kps`` its ``(5, 2)`` keypoints ``x, y`` in image pixels."""
    sharp = sharpness(aligned)
    yaw = yaw_from_keypoints(kps)
    return FaceQuality(sharpness=sharp, yaw=yaw, reason=gate_reason(sharp, yaw, cfg))


def gate_reason(sharp: float, yaw: float, cfg: FaceQualityConfig) -> str | None:
    """The gate's verdict on measured values: ``"blurry"`` when ``sharp < cfg.min_sharpness``, else
    ``"pose"`` when ``|yaw| > cfg.max_abs_yaw``, else None (passes). ``sharp`` is :func:`sharpness`
    (grey levels²), ``yaw`` is :func:`yaw_from_keypoints` (unitless)."""
    if sharp < cfg.min_sharpness:
        return "blurry"
    if abs(yaw) > cfg.max_abs_yaw:
        return "pose"
    return None
