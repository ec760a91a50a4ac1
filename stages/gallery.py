"""Face gallery: enrolled identities and open-set matching of probe embeddings.

Terms: the *gallery* holds one *template* per enrolled identity, built from
the embeddings of its *enrollment* images; a *probe* is the embedding of a face
seen at run time. Matching is *open-set*: a probe gets the identity of the
template with the highest cosine similarity only if that similarity reaches
the threshold, otherwise it is unknown (None). Embeddings come from an
ArcFace-style model (Deng et al. 2019), whose training makes cosine similarity
the right score.

Threshold calibration (``face.match_threshold``, default 0.50): on 1456
LFW news photos (``scripts/eval_faces.py --set``, README "Face
calibration", SCRFD-500M + MobileFaceNet-128d, ~140 people enrolled) the
best similarity of a never-enrolled person's face reaches 0.48 with one
enrollment photo per person and 0.53 with three (at 0.40, 20 of 755
strangers' photos were named), while 95 % of enrolled people's photos score
>= 0.43 (one photo) / 0.55 (three) with their own template. 0.50 named 0 or
1 of the 755 strangers' photos and left 1.8 % of enrolled people's photos
unknown with three enrollment photos (12 % with one). On the small asset
set the gap is 0.18-0.57 (``tests/unit/test_gallery.py``). Recalibrate with
another embedder.

Negative examples (``facepro events relabel EVENT --not Bob``): a face vector
stored as "not Bob". The rule: a probe is refused Bob when its cosine
similarity to Bob's most similar negative is at least its similarity to Bob's
template (the probe looks at least as much like the face a person said was not
Bob as like Bob); the next identity above the threshold that is not refused
wins, else the probe is unknown. A genuine Bob probe scores ~0.6-0.9 against
Bob's template and near 0.1-0.3 against another person's face, so a negative
only refuses faces of the wrongly named person (or of someone who looks more
like them than like Bob).

Everything here is pure numpy except the helpers that take a
:class:`stages.face.FaceAnalyzer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from stages.enrollment import EnrollmentError, NoDominantFace, choose_face, pick_subject, reading_order

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import FaceQualityConfig
    from stages.face import Face, FaceAnalyzer

__all__ = ["EnrollmentError", "NoDominantFace", "EnrolledFace", "Gallery", "IdentifiedFace", "Match",
           "enrollment_embedding", "enrollment_face", "identify"]

#: Default gap below the median leave-one-out similarity at which an
#: enrollment embedding is rejected as an outlier (see :class:`Gallery`).
OUTLIER_MARGIN = 0.25


@dataclass(frozen=True)
class Match:
    """Result of matching one probe.

    Attributes:
        identity: enrolled name, or None when the best cosine similarity is
            below the threshold (open-set "unknown") or the gallery is empty.
        similarity: cosine similarity to the chosen identity's template; for
            an unknown probe the best one over all templates (0.0 for an empty
            gallery).
        refused: identities above the threshold refused by a negative example,
            most similar first (see the module docstring).
    """

    identity: str | None
    similarity: float
    refused: tuple[str, ...] = ()


def _unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _outlier_mask(rows: np.ndarray, margin: float) -> np.ndarray:
    """Which rows of one identity to keep (bool ``(n,)``); rule in :class:`Gallery`."""
    n = rows.shape[0]
    keep = np.ones(n, dtype=bool)
    if n <= 2:
        return keep
    total = rows.sum(axis=0)
    others = _unit_rows(total[None, :] - rows)  # leave-one-out mean direction for each row
    loo = np.einsum("ij,ij->i", rows, others)
    keep &= loo >= np.median(loo) - margin
    return keep


class Gallery:
    """Immutable set of identity templates for open-set face identification.

    Building the templates: every embedding row is L2-normalised. For an
    identity with three or more rows, each row's *leave-one-out similarity*
    is its cosine similarity to the normalised mean of that identity's other
    rows; a row whose leave-one-out similarity is more than ``outlier_margin``
    below the identity's median is rejected (a wrong person, a bad crop). The
    median rule keeps at least half of the rows. Identities with one or two
    rows keep all of them (no majority to judge by). The template is the
    L2-normalised mean of the kept rows.

    Why 0.25: on the real face set the leave-one-out similarities of genuine
    images of one person spread by at most 0.20 (0.66-0.86 for one identity),
    while an impostor row scores near 0.1-0.2 against a template whose
    genuine rows score 0.6-0.9, a gap of 0.4 or more.

    Args:
        names: identity name of each embedding row (several rows per identity allowed).
        embeddings: ``(k, d) float32`` embeddings, one row per name (need not
            be normalised). ``k`` may be 0 (empty gallery).
        threshold: cosine similarity needed to name a probe (``face.match_threshold``).
        outlier_margin: see above; ``None`` or ``inf`` disables rejection.
        model_name: embedder that produced the rows (for messages).
        negatives: ``(names, (n, d) float32 vectors)``: faces each named
            identity must not be given (module docstring); rows of identities
            not in the gallery are ignored. None: no negatives.

    Raises:
        ValueError: ``embeddings`` is not 2-D, has non-finite values or a
            row count different from ``len(names)``; a name is empty; the
            negatives' shape disagrees with their names or the gallery's ``d``.
    """

    def __init__(
        self,
        names: Sequence[str],
        embeddings: np.ndarray,
        threshold: float = 0.50,
        outlier_margin: float | None = OUTLIER_MARGIN,
        model_name: str | None = None,
        negatives: tuple[Sequence[str], np.ndarray] | None = None,
    ) -> None:
        emb = np.asarray(embeddings, dtype=np.float32)
        names = list(names)
        if emb.ndim == 1 and emb.size == 0:
            emb = emb.reshape(0, 0)
        if emb.ndim != 2:
            raise ValueError(f"Gallery embeddings: expected a (k, d) array, got shape {emb.shape}")
        if emb.shape[0] != len(names):
            raise ValueError(f"Gallery: {len(names)} names but {emb.shape[0]} embedding rows")
        if not np.all(np.isfinite(emb)):
            raise ValueError("Gallery embeddings contain NaN or infinite values")
        if any(not isinstance(n, str) or not n for n in names):
            raise ValueError("Gallery names must be non-empty strings")
        margin = np.inf if outlier_margin is None else float(outlier_margin)
        self.threshold = float(threshold)
        self.model_name = model_name
        self._dim = int(emb.shape[1])
        unit = _unit_rows(emb)
        ids: list[str] = []
        templates: list[np.ndarray] = []
        rejected: list[int] = []
        name_arr = np.array(names, dtype=object)
        for name in dict.fromkeys(names):  # first-seen order
            idx = np.flatnonzero(name_arr == name)
            keep = _outlier_mask(unit[idx], margin)
            rejected.extend(int(i) for i in idx[~keep])
            t = unit[idx[keep]].mean(axis=0)
            ids.append(name)
            templates.append(t / max(float(np.linalg.norm(t)), 1e-12))
        self._identities = tuple(ids)
        self._templates = np.stack(templates).astype(np.float32) if templates else np.zeros((0, self._dim), np.float32)
        self._templates.setflags(write=False)
        self._rejected = tuple(sorted(rejected))
        self._negatives = self._index_negatives(negatives)

    def _index_negatives(self, negatives: tuple[Sequence[str], np.ndarray] | None) -> dict[int, np.ndarray]:
        """``{template row: (k, d) unit negative vectors}``."""
        if negatives is None or len(negatives[0]) == 0:
            return {}
        names, vectors = list(negatives[0]), np.asarray(negatives[1], np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(names) or (len(self) and vectors.shape[1] != self._dim):
            raise ValueError(f"Gallery negatives: {len(names)} names, vectors {vectors.shape}, gallery dimension {self._dim}")
        row = {name: i for i, name in enumerate(self._identities)}
        unit = _unit_rows(vectors)
        out: dict[int, list[np.ndarray]] = {}
        for name, v in zip(names, unit):
            if name in row:
                out.setdefault(row[name], []).append(v)
        return {i: np.stack(vs) for i, vs in out.items()}

    @property
    def negatives(self) -> int:
        """Negative examples in force (of identities in the gallery)."""
        return sum(v.shape[0] for v in self._negatives.values())

    @property
    def identities(self) -> tuple[str, ...]:
        """Enrolled names, in first-enrolled order (row order of :attr:`templates`)."""
        return self._identities

    @property
    def templates(self) -> np.ndarray:
        """``(n_identities, d) float32`` unit-norm templates (read-only)."""
        return self._templates

    @property
    def rejected(self) -> tuple[int, ...]:
        """Indices of the input embedding rows rejected as outliers."""
        return self._rejected

    @property
    def dim(self) -> int:
        """Embedding length ``d`` the gallery was enrolled with."""
        return self._dim

    def __len__(self) -> int:
        return len(self._identities)

    def similarities(self, probes: np.ndarray) -> np.ndarray:
        """Cosine similarities ``(m, n_identities) float32`` of probes to every template.

        Raises:
            ValueError: ``probes`` is not ``(m, d)`` or ``d`` differs from the gallery's.
        """
        p = np.asarray(probes, dtype=np.float32)
        if p.ndim != 2:
            raise ValueError(f"probes: expected an (m, d) array, got shape {p.shape}")
        if len(self) == 0:
            return np.zeros((p.shape[0], 0), np.float32)
        if p.shape[1] != self._dim:
            model = f" ({self.model_name})" if self.model_name else ""
            raise ValueError(
                f"probe embeddings have dimension {p.shape[1]} but the gallery has dimension {self._dim}: "
                f"the gallery was enrolled with another face embedding model{model}; re-enroll with the current model"
            )
        return _unit_rows(p) @ self._templates.T

    def match(self, probes: np.ndarray) -> list[Match]:
        """Open-set identification of each probe.

        Args:
            probes: ``(m, d) float32`` probe embeddings (normalised here).

        Returns:
            One :class:`Match` per probe: the most similar identity whose
            cosine similarity >= ``threshold`` and that no negative example
            refuses (module docstring), else ``identity=None``. An empty
            gallery gives all unknown.

        Raises:
            ValueError: ``probes`` is not 2-D, or its dimension differs from
                the gallery's (enrolled with another model).
        """
        sims = self.similarities(probes)
        if sims.shape[1] == 0:
            return [Match(None, 0.0) for _ in range(sims.shape[0])]
        unit = _unit_rows(np.asarray(probes, dtype=np.float32))
        return [self._match_one(unit[i], sims[i]) for i in range(sims.shape[0])]

    def _match_one(self, probe: np.ndarray, sims: np.ndarray) -> Match:
        best = int(np.argmax(sims))
        if not self._negatives or sims[best] < self.threshold:
            s = float(sims[best])
            return Match(self._identities[best] if s >= self.threshold else None, s)
        refused: list[str] = []
        for j in np.argsort(-sims, kind="stable"):
            s = float(sims[j])
            if s < self.threshold:
                break
            neg = self._negatives.get(int(j))
            if neg is not None and float((neg @ probe).max()) >= s:
                refused.append(self._identities[j])
                continue
            return Match(self._identities[j], s, tuple(refused))
        return Match(None, float(sims[best]), tuple(refused))


@dataclass(frozen=True)
class IdentifiedFace:
    """One face of an image with its identification.

    Attributes:
        xyxy: ``(4,) float32`` box ``x1, y1, x2, y2``, image pixels.
        identity: enrolled name or None (unknown).
        similarity: cosine similarity to the best template.
        score: face detection score in [0, 1].
        quality: why the face failed the quality gate (``"blurry"``, ``"pose"``; :mod:`stages.quality`), None
            when it passed or no gate was applied. A rejected face is never named.
    """

    xyxy: np.ndarray
    identity: str | None
    similarity: float
    score: float
    quality: str | None = None


@dataclass(frozen=True)
class EnrolledFace:
    """The face of an enrollment photo that is enrolled.

    Attributes:
        face: the :class:`~stages.face.Face` (box, keypoints, ``(d,) float32`` unit embedding).
        index: its number among the photo's faces in reading order
            (:func:`stages.enrollment.reading_order`, the ``--face N`` numbering).
        n_faces: faces found in the photo (narrower than ``min_face_px`` not counted).
        ratio: its prominence over the runner-up's (``inf`` for a lone face,
            ``nan`` when chosen by index); see :func:`stages.enrollment.pick_subject`.
    """

    face: Face
    index: int
    n_faces: int
    ratio: float


def enrollment_face(analyzer: FaceAnalyzer, image: np.ndarray, source: str, face: int | None = None,
                    dominance: float | None = None) -> EnrolledFace:
    """The face to enroll from a photo: the only one, the dominant one, or the one chosen.

    Args:
        analyzer: face pipeline (its ``min_face_px`` and detector threshold apply).
        image: ``(H, W, 3) uint8`` BGR.
        source: name of the image for messages (file path).
        face: 0-based index of the face to take, faces numbered in reading
            order (left to right); None: the dominant face
            (:func:`stages.enrollment.pick_subject`).
        dominance: the margin of the dominance rule; None: ``analyzer.cfg.enroll_dominance``.

    Returns:
        :class:`EnrolledFace`.

    Raises:
        EnrollmentError: no face found, or ``face`` out of range.
        NoDominantFace: several faces, ``face`` is None and none dominates;
            lists every face's index and box.
        ValueError: ``image`` is not ``(H, W, 3) uint8``.
    """
    found = analyzer.analyze(image)
    if not found:
        raise EnrollmentError(
            f"{source}: no face found (detector score >= {analyzer.cfg.detector.score_threshold}, "
            f"width >= {analyzer.cfg.min_face_px} px); use a sharp, roughly frontal photo of one person"
        )
    boxes = np.stack([f.xyxy for f in found])
    order = reading_order(boxes)
    boxes = boxes[order]
    if face is not None:
        choice = choose_face(boxes, face, source)
    else:
        margin = analyzer.cfg.enroll_dominance if dominance is None else dominance
        choice = pick_subject(boxes, image.shape[:2], margin, source)
    return EnrolledFace(found[int(order[choice.index])], choice.index, choice.n_faces, choice.ratio)


def enrollment_embedding(analyzer: FaceAnalyzer, image: np.ndarray, source: str) -> tuple[np.ndarray, Face]:
    """The embedding of the subject of an enrollment photo (:func:`enrollment_face` without a chosen index).

    Returns:
        ``((d,) float32 unit-norm embedding, the Face)``.

    Raises:
        EnrollmentError: no face found.
        NoDominantFace: several faces and none dominates.
        ValueError: ``image`` is not ``(H, W, 3) uint8``.
    """
    got = enrollment_face(analyzer, image, source)
    return got.face.embedding, got.face


def identify(analyzer: FaceAnalyzer, gallery: Gallery, image: np.ndarray,
             quality: FaceQualityConfig | None = None) -> list[IdentifiedFace]:
    """Detect every face in an image and match it against the gallery.

    Args:
        quality: the face quality gate (:func:`stages.quality.assess`: sharpness and pose); a face that fails it
            gets ``identity=None`` and the reason in ``quality``. None: no gate (faces narrower than
            ``min_face_px`` are skipped by the analyzer either way).

    Returns:
        One :class:`IdentifiedFace` per face found (best detection score first).

    Raises:
        ValueError: bad image, or embedder/gallery dimension mismatch.
    """
    faces = analyzer.analyze(image)
    if not faces:
        return []
    matches = gallery.match(np.stack([f.embedding for f in faces]))
    if quality is None:
        return [IdentifiedFace(f.xyxy, m.identity, m.similarity, f.score) for f, m in zip(faces, matches)]
    from stages.quality import assess

    out = []
    for f, m in zip(faces, matches):
        reason = assess(image, f, quality).reason
        out.append(IdentifiedFace(f.xyxy, m.identity if reason is None else None, m.similarity, f.score, reason))
    return out
