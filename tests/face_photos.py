"""Synthetic enrollment photos built from the asset face photos, each made to prove one property."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

#: Box of Biden's face in ``biden/biden.jpg`` (SCRFD-500M), pixels x1, y1, x2, y2.
BIDEN_FACE = (421, 159, 708, 566)


def read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path))
    assert img is not None, f"cannot read {path}"
    return img


def head_crop(img: np.ndarray, face_xyxy: tuple[int, int, int, int], pad: float = 0.4) -> np.ndarray:
    """The face box of ``img`` padded by ``pad`` of its size on every side (clipped to the image)."""
    x1, y1, x2, y2 = face_xyxy
    px, py = int((x2 - x1) * pad), int((y2 - y1) * pad)
    h, w = img.shape[:2]
    return img[max(0, y1 - py):min(h, y2 + py), max(0, x1 - px):min(w, x2 + px)]


def with_bystander(faces: Path, scale: float = 0.25) -> np.ndarray:
    """``obama/obama.jpg`` centred on a canvas 1.6x as wide, with Biden's head downscaled by ``scale``
    pasted near the right edge at eye height: a subject and a small bystander. ``(1137, 1456, 3) uint8`` BGR."""
    subject = read(faces / "obama/obama.jpg")
    h, w = subject.shape[:2]
    canvas = np.full((h, int(w * 1.6), 3), 128, np.uint8)
    x0 = (canvas.shape[1] - w) // 2
    canvas[:, x0:x0 + w] = subject
    head = head_crop(read(faces / "biden/biden.jpg"), BIDEN_FACE)
    small = cv2.resize(head, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    x, y = canvas.shape[1] - sw - 20, 150
    canvas[y:y + sh, x:x + sw] = small
    return canvas

