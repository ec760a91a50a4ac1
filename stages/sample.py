"""An identity's sample face: the small picture that shows who an enrolled identity is (the web page's
Identities panel, ``GET /api/identities/{name}/face.jpg``).

It is cut from an enrollment photo at enrollment (``facepro enroll``, ``POST /api/identities/{name}/faces``,
enroll jobs): a square centred on the enrolled face's detector box, its side the box's longer side plus
:data:`MARGIN` of it on each side (hair, chin and some background, so a person recognises the face: the
aligned 112x112 crop the embedder sees is cut too tightly for that), scaled to :data:`SIZE` x :data:`SIZE`
pixels (area interpolation) and JPEG-encoded (:data:`QUALITY`; a few KiB). Parts of the square outside the
photo are filled with grey, so the face stays centred and undistorted.

Conventions: images are ``(H, W, 3) uint8`` BGR (OpenCV's order); boxes ``x1, y1, x2, y2`` float pixels of
the full image (``x`` to the right, ``y`` down). Pure functions (OpenCV for scaling and JPEG), no models.
"""

from __future__ import annotations

import cv2
import numpy as np

#: Side of the sample, pixels.
SIZE = 112
#: Margin added on each side of the face box, as a fraction of its longer side.
MARGIN = 0.3
#: JPEG quality of the sample (libjpeg's 1..100 scale).
QUALITY = 85
#: Fill of the parts of the square outside the photo (BGR).
FILL = (128, 128, 128)


def sample_crop(image: np.ndarray, xyxy: np.ndarray, size: int = SIZE, margin: float = MARGIN) -> np.ndarray:
    """The square around a face box, scaled to ``size`` x ``size`` (module docstring).

    Args:
        image: ``(H, W, 3) uint8`` BGR photo.
        xyxy: ``(4,)`` face box ``x1, y1, x2, y2``, pixels (may reach outside the image).
        size: side of the result, pixels (>= 8).
        margin: added on each side, fraction of the box's longer side (>= 0).

    Returns:
        ``(size, size, 3) uint8`` BGR.

    Raises:
        ValueError: ``image`` is not ``(H, W, 3) uint8``, ``xyxy`` not 4 finite numbers with ``x2 > x1`` and
            ``y2 > y1``, the box entirely outside the image, or ``size`` / ``margin`` out of range.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 \
            or 0 in image.shape:
        raise ValueError(f"image: expected an (H, W, 3) uint8 array, got {getattr(image, 'shape', None)} "
                         f"{getattr(image, 'dtype', type(image).__name__)}")
    box = np.asarray(xyxy, dtype=np.float64).reshape(-1)
    if box.shape != (4,) or not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"xyxy: expected x1, y1, x2, y2 with x2 > x1 and y2 > y1, got {np.asarray(xyxy).tolist()}")
    if size < 8 or margin < 0:
        raise ValueError(f"size >= 8 and margin >= 0 expected, got {size} and {margin}")
    h, w = image.shape[:2]
    side = max(box[2] - box[0], box[3] - box[1]) * (1.0 + 2.0 * margin)
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    x1, y1 = int(round(cx - side / 2.0)), int(round(cy - side / 2.0))
    n = max(1, int(round(side)))
    x2, y2 = x1 + n, y1 + n
    if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
        raise ValueError(f"xyxy {box.round(1).tolist()}: entirely outside the {w}x{h} image")
    inside = image[max(0, y1):min(h, y2), max(0, x1):min(w, x2)]
    square = cv2.copyMakeBorder(inside, max(0, -y1), max(0, y2 - h), max(0, -x1), max(0, x2 - w),
                                cv2.BORDER_CONSTANT, value=FILL)
    interpolation = cv2.INTER_AREA if n >= size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interpolation)


def sample_jpeg(image: np.ndarray, xyxy: np.ndarray, size: int = SIZE, quality: int = QUALITY) -> bytes:
    """:func:`sample_crop` of the face ``xyxy`` in ``image`` as JPEG bytes.

    Raises:
        ValueError: as :func:`sample_crop`; or the encoding failed.
    """
    ok, data = cv2.imencode(".jpg", sample_crop(image, xyxy, size), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("sample face: JPEG encoding failed")
    return data.tobytes()
