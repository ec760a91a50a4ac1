"""Which face of an enrollment photo is its subject: pure numpy, no models.

An ordinary photo of a person often shows other faces too (a bystander at the
edge, a poster, a crowd behind). :func:`pick_subject` takes the face that
clearly dominates the photo; when none does it refuses and
:class:`NoDominantFace` lists every face so that the user chooses one
(:func:`choose_face`, ``facepro enroll --face N``).

Conventions: boxes are ``x1, y1, x2, y2`` float pixels of the full image
(``x`` to the right, ``y`` down; a detector box may reach outside the image);
image sizes are ``(height, width)`` pixels, as ``image.shape[:2]``. Faces are
numbered in *reading order* (:func:`reading_order`: left to right by box
centre, then top to bottom), the order in which they are listed to the user.

The rule (:func:`pick_subject`): a face is the subject when its
:func:`prominence` (visible box area × a centrality weight, 1.0 at the image
centre to 0.5 at a corner) is at least ``recognition.face.enroll_dominance``
(default 1.5) times that of every other face, and strictly larger.

Why size first, centrality second: the subject of a portrait or news photo
is the person nearest the camera, so the largest face; a bystander is smaller
and usually off-centre. Centrality tips the balance only when sizes already
differ (a centred face with 1.5× the area of a face near a corner scores
2.5×); between two whole faces of equal size it never reaches 2 (that would
need a box centred exactly on a corner, which is three quarters cut off).

Why 1.5 (``recognition.face.enroll_dominance``), measured with
``scripts/eval_faces.py --set`` on 1627 LFW news photos with SCRFD-500M
(README "Face calibration"): 277 show several faces. At 2.0, 53 of them
would be refused, and about 30 of the 40 between 1.5 and 2.0 show one clear
subject (a centred person, bystanders cut by the edges). Of the 13 below 1.5
(1.01-1.48×), 11 are two people photographed together (couples, cheek to
cheek) and 2 a subject with a large face at the edge (1.36×, 1.43×); the
asset group photos score 1.42× (kit_with_rose), 1.01-1.02× (obama_and_biden)
and 1.15× (t1, six faces) and stay refused. Between 1.5 and 2.0 the most
prominent face was the named person in every genuine probe (16 of 16). 1.5
is about 1.22× the face width, or two faces of equal size, one centred and
one at the image's side edge (weight 0.65: 1.54×). A bystander a quarter
of the subject's width scores about 16× less (17.6× in the test photo, where
it is also off-centre).
Detector scores are not used: they measure how face-like a box is, not who
the subject is (0.74-0.90 for the asset subjects, 0.78-0.88 for the faces
in the group photos).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Default of ``recognition.face.enroll_dominance`` (see :func:`pick_subject`).
DEFAULT_DOMINANCE = 1.5

#: Weight of a face whose box centre is at an image corner (1.0 at the image centre, linear in between).
CORNER_WEIGHT = 0.5


class EnrollmentError(ValueError):
    """An enrollment image that cannot be used; the message names the image."""


class NoDominantFace(EnrollmentError):
    """Several faces and none dominates: the user must choose one.

    Attributes:
        summary: one line naming the image, the face count and the measured ratio.
        boxes: ``(n, 4) int64`` boxes ``x1, y1, x2, y2`` in pixels (rounded,
            clipped to the image), row ``i`` = face ``i`` in reading order.
        face_lines: ``n`` lines ``face i: box x1,y1,x2,y2``.

    The message (``str(err)``) is the summary followed by the face lines, one per line.
    """

    def __init__(self, summary: str, boxes: np.ndarray) -> None:
        self.summary = summary
        self.boxes = boxes
        self.face_lines = tuple(f"face {i}: box {format_box(b)}" for i, b in enumerate(boxes))
        super().__init__("\n".join((summary, *self.face_lines)))


@dataclass(frozen=True)
class SubjectChoice:
    """The face chosen as the subject of an enrollment photo.

    Attributes:
        index: row of the chosen face in the boxes given.
        xyxy: ``(4,) float32`` its box ``x1, y1, x2, y2``, pixels (as given, not clipped).
        ratio: its prominence divided by the runner-up's (``inf`` with one face,
            or when the face was chosen by index: ``nan``).
        n_faces: faces in the photo.
    """

    index: int
    xyxy: np.ndarray
    ratio: float
    n_faces: int


def _check(xyxy: np.ndarray, image_hw: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    b = np.asarray(xyxy, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4 or not np.all(np.isfinite(b)):
        raise ValueError(f"xyxy: expected an (n, 4) array of finite x1, y1, x2, y2, got shape {b.shape}")
    if len(image_hw) != 2 or min(int(image_hw[0]), int(image_hw[1])) < 1:
        raise ValueError(f"image_hw: expected (height, width) >= 1 pixel, got {image_hw!r}")
    return b, int(image_hw[0]), int(image_hw[1])


def _clipped(b: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.clip(b, 0.0, [w, h, w, h])


def format_box(xyxy: np.ndarray) -> str:
    """``"x1,y1,x2,y2"`` with the coordinates rounded to whole pixels."""
    return ",".join(str(int(round(float(v)))) for v in np.asarray(xyxy).reshape(4))


def reading_order(xyxy: np.ndarray) -> np.ndarray:
    """Indices that sort faces left to right by box centre ``x``, ties top to bottom by centre ``y``.

    Args:
        xyxy: ``(n, 4)`` boxes ``x1, y1, x2, y2``, pixels.

    Returns:
        ``(n,) int64`` permutation (``xyxy[order]`` is in reading order).

    Raises:
        ValueError: ``xyxy`` is not ``(n, 4)`` finite.
    """
    b, _, _ = _check(xyxy, (1, 1))
    cx, cy = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    return np.lexsort((cy, cx)).astype(np.int64)


def prominence(xyxy: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """How much each face dominates the photo: visible box area times a centrality weight.

    ``area`` is the box area clipped to the image (px²); the weight falls
    linearly from 1.0 for a box centred in the image to :data:`CORNER_WEIGHT`
    (0.5) for a centre at a corner: ``1 - 0.5 * d``, ``d`` = distance of the
    clipped box's centre from the image centre divided by half the image
    diagonal (0..1).

    Args:
        xyxy: ``(n, 4)`` boxes ``x1, y1, x2, y2``, pixels.
        image_hw: ``(height, width)`` of the image, pixels.

    Returns:
        ``(n,) float64`` prominence, px² (0 for a box wholly outside the image).

    Raises:
        ValueError: bad shapes or a non-positive image size.
    """
    b, h, w = _check(xyxy, image_hw)
    c = _clipped(b, h, w)
    area = np.maximum(c[:, 2] - c[:, 0], 0.0) * np.maximum(c[:, 3] - c[:, 1], 0.0)
    centre = np.stack([(c[:, 0] + c[:, 2]) / 2 - w / 2, (c[:, 1] + c[:, 3]) / 2 - h / 2], axis=1)
    d = np.minimum(np.linalg.norm(centre, axis=1) / (0.5 * np.hypot(w, h)), 1.0)
    return area * (1.0 - (1.0 - CORNER_WEIGHT) * d)


def pick_subject(xyxy: np.ndarray, image_hw: tuple[int, int], dominance: float = DEFAULT_DOMINANCE,
                 source: str = "image") -> SubjectChoice:
    """The face that clearly dominates an enrollment photo.

    Rule: a face is the subject when its :func:`prominence` (visible box area
    × centrality weight, 1.0 at the centre to 0.5 at a corner) is at least
    ``dominance`` times that of every other face, and strictly larger. One
    face is always the subject.

    Why this rule and why a margin of 2: see the module docstring.

    Args:
        xyxy: ``(n, 4)`` boxes ``x1, y1, x2, y2``, pixels, ``n >= 1``; number
            them in :func:`reading_order` first if the error's listing is shown
            to a user (its indices are rows of ``xyxy``).
        image_hw: ``(height, width)`` of the photo, pixels.
        dominance: the margin, ``>= 1``.
        source: image name for messages.

    Returns:
        :class:`SubjectChoice` of the dominant face.

    Raises:
        NoDominantFace: no face dominates by ``dominance``; lists every face's
            index and box (rounded, clipped to the image).
        EnrollmentError: ``n == 0``.
        ValueError: bad shapes, image size or ``dominance < 1``.
    """
    b, h, w = _check(xyxy, image_hw)
    if not dominance >= 1.0:
        raise ValueError(f"dominance: expected >= 1, got {dominance}")
    n = b.shape[0]
    if n == 0:
        raise EnrollmentError(f"{source}: no face to choose from")
    p = prominence(b, (h, w))
    order = np.argsort(-p, kind="stable")
    best = int(order[0])
    if n == 1:
        return SubjectChoice(best, b[best].astype(np.float32), float("inf"), 1)
    runner_up = float(p[order[1]])
    ratio = float(p[best] / runner_up) if runner_up > 0 else float("inf")
    if p[best] > runner_up and ratio >= dominance:
        return SubjectChoice(best, b[best].astype(np.float32), ratio, n)
    boxes = np.rint(_clipped(b, h, w)).astype(np.int64)
    raise NoDominantFace(
        f"{source}: {n} faces found and none dominates (the most prominent is {ratio:.2f}x the next, "
        f"enrollment needs {dominance:g}x: size x centrality)", boxes)


def choose_face(xyxy: np.ndarray, index: int, source: str = "image") -> SubjectChoice:
    """Face ``index`` of a photo, chosen by the user.

    Args:
        xyxy: ``(n, 4)`` boxes ``x1, y1, x2, y2``, pixels, in the order listed to the user.
        index: 0-based row of ``xyxy``.
        source: image name for messages.

    Returns:
        :class:`SubjectChoice` with ``ratio`` nan.

    Raises:
        EnrollmentError: ``index`` is outside ``0..n-1`` (one line naming the valid range).
        ValueError: bad shapes.
    """
    b, _, _ = _check(xyxy, (1, 1))
    n = b.shape[0]
    if not 0 <= index < n:
        valid = "no face found" if n == 0 else f"{n} face(s) found, valid: 0..{n - 1}"
        raise EnrollmentError(f"{source}: face {index} does not exist ({valid})")
    return SubjectChoice(int(index), b[index].astype(np.float32), float("nan"), n)
