"""Open-set face identification on a folder of person folders: ``eval_faces.py --set DIR``.

Protocol (a user enrolling people from ordinary photos, then identifying
new photos of them and of strangers):

1. **Split** (:func:`split_people`). Each sub-folder of the set is one person
   (folders starting with ``_`` or ``.`` are skipped), photos sorted by file
   name. A person is *never enrolled* when the first 8 hex digits of
   ``sha256(folder name)``, read as a fraction of 2³², are below ``holdout``
   (the same people whatever else is in the set), or when the person has no
   more than ``k`` photos (nothing would be left to probe with). Every other
   person is *enrolled* with their first ``k`` photos; the rest (at most
   ``max_probes``) are their *genuine probes*. Every photo of a never-enrolled
   person is an *impostor probe*.
2. **Enrollment** (:func:`enroll`) goes through :func:`stages.gallery.enrollment_face`,
   as ``facepro enroll`` does: the only face, or the dominant one
   (``recognition.face.enroll_dominance``); a refused photo is an enrollment
   failure (``no_face`` or ``no_dominant_face``, the latter with the
   measured prominence ratio). The quality gate (``stages/quality.py``) is
   measured on each enrolled face and reported; with ``enroll_gate`` a face
   that fails it is refused (``quality_gate``). The gallery is a
   :class:`stages.gallery.Gallery` (one template per person, outlier rule).
3. **Probes** (:func:`probe`): the probe face of a photo is its most
   prominent face (:func:`stages.enrollment.pick_subject` with margin 1: the
   largest, most central one, as the subject of a news photo), so that a
   bystander who happens to be enrolled is not counted against the photo's
   subject. Its sharpness and yaw are measured for the gate.
4. **Scores** (:func:`score_probes`, :class:`Scores`): a probe's *best*
   similarity is to its most similar template. At threshold ``t`` a genuine
   probe is a *hit* (best template is its own, similarity >= t), *wrong*
   (another person's, >= t) or *unknown* (< t, no face found, or refused by
   the gate); an impostor probe whose best similarity is >= t is a *false
   accept*. *Rank-1* ignores the threshold. The *genuine* distribution is
   each genuine probe's similarity to its own template, the *impostor*
   distribution each impostor probe's best similarity.
5. **Threshold** (:func:`zero_fa_threshold`): the lowest threshold at which
   no name goes to the wrong person (no false accept, nothing wrong), i.e.
   just above the highest such score; hits only fall as the threshold rises,
   so it is the zero-false-accept threshold with the most hits.
   :func:`sweep` lists the counts on a grid of thresholds.

All scores are cosine similarities in [-1, 1] of L2-normalised embeddings.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import FaceQualityConfig
from stages.enrollment import NoDominantFace, prominence
from stages.gallery import EnrollmentError, Gallery, enrollment_face
from stages.quality import assess, gate_reason

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

#: Thresholds of the sweep table (the configured and the zero-false-accept ones are added).
SWEEP_THRESHOLDS = tuple(round(0.20 + 0.05 * i, 2) for i in range(11))

#: Dominance margins compared by :func:`dominance_table` (``recognition.face.enroll_dominance``).
DOMINANCE_MARGINS = (1.25, 1.5, 1.6, 1.7, 1.8, 2.0, 2.5, 3.0)

#: Quality-gate settings compared by :func:`gate_sweep`: (min_sharpness, max_abs_yaw).
GATE_SETTINGS = ((0.0, math.inf), (20.0, math.inf), (40.0, math.inf), (80.0, math.inf),
                 (0.0, 0.4), (0.0, 0.6), (0.0, 0.8), (20.0, 0.6), (40.0, 0.6), (40.0, 0.8))


def holdout_fraction(name: str) -> float:
    """A stable pseudo-random number in [0, 1) for a person's folder name (sha256, first 32 bits)."""
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def list_people(root: Path) -> dict[str, list[Path]]:
    """``{person: photo paths sorted by name}`` of a set folder (see the module docstring).

    Raises:
        ValueError: ``root`` is not a folder or has no person folder with a photo.
    """
    if not root.is_dir():
        raise ValueError(f"evaluation set {root} is not a folder; pass --set DIR (one sub-folder per person)")
    people = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        photos = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if photos:
            people[d.name] = photos
    if not people:
        raise ValueError(f"evaluation set {root} has no person folders with photos ({', '.join(IMAGE_SUFFIXES)})")
    return people


@dataclass(frozen=True)
class Split:
    """Who is enrolled with which photos, and which photos probe.

    Attributes:
        enroll: ``{person: the first k photos}`` of the enrolled people.
        probes: ``{person: their other photos (at most max_probes)}``, same people.
        never: ``{person: all photos}`` of the people never enrolled.
    """

    enroll: dict[str, list[Path]]
    probes: dict[str, list[Path]]
    never: dict[str, list[Path]]


def split_people(people: dict[str, list[Path]], k: int, holdout: float, max_probes: int | None = None) -> Split:
    """Split people into enrolled and never enrolled (rule in the module docstring).

    Args:
        people: ``{person: photos in order}``.
        k: enrollment photos per person, ``>= 1``.
        holdout: fraction of people never enrolled by :func:`holdout_fraction`, in [0, 1].
        max_probes: cap on each enrolled person's probes (None: all).

    Raises:
        ValueError: ``k < 1``, ``holdout`` outside [0, 1] or ``max_probes < 1``.
    """
    if k < 1 or not 0.0 <= holdout <= 1.0 or (max_probes is not None and max_probes < 1):
        raise ValueError(f"split: need k >= 1, 0 <= holdout <= 1, max_probes >= 1; got {k}, {holdout}, {max_probes}")
    enroll, probes, never = {}, {}, {}
    for name, photos in people.items():
        if len(photos) <= k or holdout_fraction(name) < holdout:
            never[name] = list(photos)
        else:
            enroll[name] = list(photos[:k])
            probes[name] = list(photos[k:] if max_probes is None else photos[k:k + max_probes])
    return Split(enroll, probes, never)


def read_image(path: Path) -> np.ndarray:
    """``(H, W, 3) uint8`` BGR. Raises ValueError when the file cannot be read as an image."""
    img = cv2.imread(str(path))
    if img is None:
        raise ValueError(f"cannot read image {path}: missing or not an image file")
    return img


def _ratio(err: NoDominantFace, image_hw: tuple[int, int]) -> float:
    """Prominence of the best face over the runner-up's, from the refused photo's boxes."""
    p = np.sort(prominence(err.boxes.astype(np.float64), image_hw))[::-1]
    return float(p[0] / p[1]) if p.size > 1 and p[1] > 0 else math.inf


@dataclass
class Enrollment:
    """The gallery built from the enrollment photos and what happened to each photo.

    Attributes:
        names, files: person and photo (relative to the set) of each enrolled embedding.
        embeddings: ``(m, d) float32`` unit-norm embeddings.
        failures: one ``{"file", "person", "reason", ...}`` per refused photo; reason
            ``no_face``, ``no_dominant_face`` (with ``faces`` and ``ratio``) or ``quality_gate`` (with ``gate``).
        gate_fails: enrolled photos whose face fails the quality gate (``{"file", "gate", "sharpness", "yaw"}``).
        ratios: ``{file: (faces found, prominence ratio of the best face over the next)}`` of every
            photo with a face (ratio ``inf`` for one face).
        seconds: wall time of the face analysis.
    """

    names: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    gate_fails: list[dict] = field(default_factory=list)
    ratios: dict[str, tuple[int, float]] = field(default_factory=dict)
    seconds: float = 0.0


def enroll(analyzer, split: Split, root: Path, gate: FaceQualityConfig, enroll_gate: bool = False) -> Enrollment:
    """Enroll every enrolled person's photos as ``facepro enroll`` would (one photo at a time).

    Args:
        analyzer: :class:`stages.face.FaceAnalyzer` (its ``cfg.enroll_dominance`` and ``min_face_px`` apply).
        split: from :func:`split_people`.
        root: the set folder (file names are reported relative to it).
        gate: quality gate measured on each enrolled face.
        enroll_gate: refuse a photo whose face fails the gate.
    """
    out = Enrollment()
    t0 = time.perf_counter()
    for person, photos in split.enroll.items():
        for path in photos:
            rel, img = str(path.relative_to(root)), read_image(path)
            try:
                got = enrollment_face(analyzer, img, rel)
            except NoDominantFace as err:
                out.ratios[rel] = (int(err.boxes.shape[0]), _ratio(err, img.shape[:2]))
                out.failures.append({"file": rel, "person": person, "reason": "no_dominant_face",
                                     "faces": out.ratios[rel][0], "ratio": out.ratios[rel][1]})
                continue
            except EnrollmentError:
                out.failures.append({"file": rel, "person": person, "reason": "no_face"})
                continue
            face, out.ratios[rel] = got.face, (got.n_faces, got.ratio)
            q = assess(img, face, gate)
            if not q.ok:
                row = {"file": rel, "gate": q.reason, "sharpness": q.sharpness, "yaw": q.yaw}
                out.gate_fails.append(row)
                if enroll_gate:
                    out.failures.append({"person": person, "reason": "quality_gate", **row})
                    continue
            out.names.append(person)
            out.files.append(rel)
            out.embeddings.append(face.embedding)
    out.seconds = time.perf_counter() - t0
    return out


@dataclass(frozen=True)
class ProbeFace:
    """The probe face of one photo (embedding None when the photo gave none).

    Attributes:
        file: photo path relative to the set; person: its folder; enrolled: whether that person is enrolled.
        embedding: ``(d,) float32`` unit-norm, or None.
        reason: why there is no embedding (``no_face``, ``tie``), else None.
        faces: faces found in the photo; width: probe face box width, px.
        ratio: prominence of the probe face over the next face's (``inf`` for one face, see
            :func:`stages.enrollment.pick_subject`): the photo could be enrolled at any margin up to it.
        sharpness, yaw: :func:`stages.quality.assess` measures of the probe face (nan without one).
    """

    file: str
    person: str
    enrolled: bool
    embedding: np.ndarray | None
    reason: str | None = None
    faces: int = 0
    width: float = math.nan
    sharpness: float = math.nan
    yaw: float = math.nan
    ratio: float = math.nan


def probe(analyzer, split: Split, root: Path, gate: FaceQualityConfig) -> tuple[list[ProbeFace], float]:
    """The probe face of every probe photo (genuine first, then impostor); returns ``(probes, seconds)``."""
    jobs = [(p, True, path) for p, paths in split.probes.items() for path in paths]
    jobs += [(p, False, path) for p, paths in split.never.items() for path in paths]
    out, t0 = [], time.perf_counter()
    for person, enrolled, path in jobs:
        rel, img = str(path.relative_to(root)), read_image(path)
        try:
            got = enrollment_face(analyzer, img, rel, dominance=1.0)
        except NoDominantFace as err:  # two faces of exactly equal prominence
            out.append(ProbeFace(rel, person, enrolled, None, "tie", int(err.boxes.shape[0]), ratio=1.0))
            continue
        except EnrollmentError:
            out.append(ProbeFace(rel, person, enrolled, None, "no_face"))
            continue
        q = assess(img, got.face, gate)
        out.append(ProbeFace(rel, person, enrolled, got.face.embedding, None, got.n_faces, got.face.width,
                             q.sharpness, q.yaw, got.ratio))
    return out, time.perf_counter() - t0


@dataclass(frozen=True)
class Scored:
    """One probe against the gallery: ``best`` identity and similarity, ``own`` similarity (nan when
    the person is not enrolled or the photo gave no face; ``best`` None then too)."""

    probe: ProbeFace
    best: str | None
    best_sim: float
    own_sim: float


def score_probes(probes: list[ProbeFace], gallery: Gallery) -> list[Scored]:
    """Similarities of every probe face to every template (:meth:`Gallery.similarities`)."""
    rows = [i for i, p in enumerate(probes) if p.embedding is not None]
    out = [Scored(p, None, math.nan, math.nan) for p in probes]
    if not rows or len(gallery) == 0:
        return out
    sims = gallery.similarities(np.stack([probes[i].embedding for i in rows]))
    index = {name: j for j, name in enumerate(gallery.identities)}
    for r, i in enumerate(rows):
        j = int(np.argmax(sims[r]))
        own = index.get(probes[i].person) if probes[i].enrolled else None
        out[i] = Scored(probes[i], gallery.identities[j], float(sims[r, j]), math.nan if own is None else float(sims[r, own]))
    return out


@dataclass(frozen=True)
class Scores:
    """The arrays every metric is computed from.

    Attributes:
        genuine_best: ``(g,) float64`` best similarity of each genuine probe that has a (gated) face.
        genuine_correct: ``(g,) bool``: that best template is the probe's own person.
        genuine_own: ``(g,) float64`` similarity to the own template.
        genuine_missing: genuine probes without a usable face (none found, or refused by the gate).
        impostor_best: ``(n,) float64`` best similarity of each impostor probe with a usable face.
        impostor_missing: impostor probes without a usable face.
    """

    genuine_best: np.ndarray
    genuine_correct: np.ndarray
    genuine_own: np.ndarray
    genuine_missing: int
    impostor_best: np.ndarray
    impostor_missing: int

    @staticmethod
    def of(scored: list[Scored], gate: FaceQualityConfig | None = None) -> Scores:
        """Collect the arrays; with ``gate``, probes whose face fails it count as missing
        (:func:`stages.quality.gate_reason` on the measured sharpness and yaw)."""
        def usable(s: Scored) -> bool:
            return s.best is not None and (gate is None or gate_reason(s.probe.sharpness, s.probe.yaw, gate) is None)

        gen = [s for s in scored if s.probe.enrolled]
        imp = [s for s in scored if not s.probe.enrolled]
        g = [s for s in gen if usable(s)]
        i = [s for s in imp if usable(s)]
        return Scores(np.array([s.best_sim for s in g], np.float64), np.array([s.best == s.probe.person for s in g], bool),
                      np.array([s.own_sim for s in g], np.float64), len(gen) - len(g),
                      np.array([s.best_sim for s in i], np.float64), len(imp) - len(i))


def metrics_at(s: Scores, threshold: float) -> dict:
    """Counts and rates at one threshold (definitions in the module docstring).

    Returns:
        ``{"threshold", "hits", "wrong", "unknown", "missing", "genuine_probes", "hit_rate",
        "unknown_rate", "false_accepts", "impostor_probes", "false_accept_rate"}``; rates are
        fractions of the probe counts (nan when there are none); ``unknown`` includes ``missing``.
    """
    accepted = s.genuine_best >= threshold
    hits = int(np.sum(accepted & s.genuine_correct))
    wrong = int(np.sum(accepted & ~s.genuine_correct))
    n_gen = int(s.genuine_best.size) + s.genuine_missing
    n_imp = int(s.impostor_best.size) + s.impostor_missing
    fa = int(np.sum(s.impostor_best >= threshold))
    rate = lambda a, b: a / b if b else math.nan  # noqa: E731
    return {"threshold": float(threshold), "hits": hits, "wrong": wrong, "unknown": n_gen - hits - wrong,
            "missing": s.genuine_missing, "genuine_probes": n_gen, "hit_rate": rate(hits, n_gen),
            "unknown_rate": rate(n_gen - hits - wrong, n_gen), "false_accepts": fa, "impostor_probes": n_imp,
            "false_accept_rate": rate(fa, n_imp)}


def zero_fa_threshold(s: Scores) -> float:
    """The lowest threshold with no false accept and no wrong name: just above the highest impostor best
    similarity and the highest best similarity of a genuine probe whose best template is another
    person's (-1.0 when there is neither). Hits never rise with the threshold, so no threshold with zero
    false accepts has more hits."""
    false = np.concatenate([s.impostor_best, s.genuine_best[~s.genuine_correct]])
    return float(np.nextafter(false.max(), np.inf)) if false.size else -1.0


def sweep(s: Scores, thresholds: tuple[float, ...] | list[float] = SWEEP_THRESHOLDS) -> list[dict]:
    """:func:`metrics_at` for each threshold, sorted ascending (duplicates dropped)."""
    return [metrics_at(s, t) for t in sorted(set(float(t) for t in thresholds))]


def gate_sweep(scored: list[Scored], threshold: float, settings=GATE_SETTINGS) -> list[dict]:
    """For each ``(min_sharpness, max_abs_yaw)``: :func:`metrics_at` at ``threshold`` and at that gate's own
    zero-false-accept threshold, with the probes the gate refuses counted as missing."""
    out = []
    for sharp, yaw in settings:
        s = Scores.of(scored, FaceQualityConfig(min_sharpness=sharp, max_abs_yaw=min(yaw, 10.0)))
        t0 = zero_fa_threshold(s)
        out.append({"min_sharpness": sharp, "max_abs_yaw": yaw, "at_threshold": metrics_at(s, threshold),
                    "zero_fa": metrics_at(s, t0)})
    return out


def dominance_table(ratios: dict[str, tuple[int, float]], margins=DOMINANCE_MARGINS) -> dict:
    """How many photos enrollment would refuse at each margin, had every photo been an enrollment photo.

    Args:
        ratios: ``{file: (faces found, prominence ratio of the best face over the next)}`` of photos with a face.

    Returns:
        ``{"photos", "several_faces", "refused": {margin: count}, "close": [{"file", "faces", "ratio"}]}``:
        a photo is refused at margin ``m`` when its ratio is below ``m``; ``close`` lists the photos with
        several faces and a ratio below the largest margin, lowest first.
    """
    multi = {f: r for f, r in ratios.items() if r[0] > 1}
    close = sorted((f for f, r in multi.items() if r[1] < max(margins)), key=lambda f: multi[f][1])
    return {"photos": len(ratios), "several_faces": len(multi),
            "refused": {str(m): sum(r[1] < m for r in multi.values()) for m in margins},
            "close": [{"file": f, "faces": multi[f][0], "ratio": multi[f][1]} for f in close]}


def percentiles(x: np.ndarray) -> dict:
    """``n, mean, min, p1, p5, p25, p50, p75, p95, p99, max`` of a score array (nan when empty)."""
    a = np.asarray(x, np.float64)
    keys = ("min", "p1", "p5", "p25", "p50", "p75", "p95", "p99", "max")
    if a.size == 0:
        return {"n": 0, "mean": math.nan, **{k: math.nan for k in keys}}
    vals = np.percentile(a, [0, 1, 5, 25, 50, 75, 95, 99, 100])
    return {"n": int(a.size), "mean": float(a.mean()), **{k: float(v) for k, v in zip(keys, vals)}}


def text_histogram(genuine: np.ndarray, impostor: np.ndarray, lo: float = -0.2, hi: float = 1.0,
                   step: float = 0.05, width: int = 30) -> list[str]:
    """Text histogram lines ``"[lo, hi)  gen count bar | imp count bar"``, bars scaled to the largest bin,
    from the first to the last non-empty bin. Scores outside ``[lo, hi)`` fall in the first or last bin."""
    edges = np.round(np.arange(lo, hi + step / 2, step), 6)
    g = np.histogram(np.clip(genuine, lo, hi - 1e-9), edges)[0]
    i = np.histogram(np.clip(impostor, lo, hi - 1e-9), edges)[0]
    top = max(int(g.max(initial=0)), int(i.max(initial=0)), 1)
    bar = lambda c: "#" * int(round(width * c / top))  # noqa: E731
    used = np.flatnonzero((g + i) > 0)
    keep = slice(used[0], used[-1] + 1) if used.size else slice(0, 0)  # empty bins at both ends left out
    return [f"[{a + 0:+.2f},{b + 0:+.2f})  {gc:5d} {bar(gc):<{width}} | {ic:5d} {bar(ic)}"
            for a, b, gc, ic in zip(edges[:-1][keep], edges[1:][keep], g[keep], i[keep])]


def _enrollment_report(split: Split, en: Enrollment, gallery: Gallery) -> dict:
    reasons: dict[str, int] = {}
    for f in en.failures:
        reasons[f["reason"]] = reasons.get(f["reason"], 0) + 1
    photos = sum(map(len, split.enroll.values()))
    return {"photos": photos, "enrolled": len(en.files), "failures": len(en.failures), "by_reason": reasons,
            "failed": en.failures, "gate_would_refuse": en.gate_fails,
            "people_not_enrolled": sorted(set(split.enroll) - set(en.names)),
            "gallery_outliers_rejected": [en.files[i] for i in gallery.rejected],
            "ms_per_photo": 1000 * en.seconds / max(photos, 1)}


def _probe_row(s: Scored) -> dict:
    p = s.probe
    return {"file": p.file, "enrolled": p.enrolled, "faces": p.faces, "ratio": p.ratio, "best": s.best,
            "similarity": s.best_sim, "own": s.own_sim, "width": p.width, "sharpness": p.sharpness, "yaw": p.yaw}


def _listing(scored: list[Scored], threshold: float) -> dict:
    """Which probes went wrong at ``threshold``: false accepts, wrong names, unknowns (worst first)."""
    fa = [s for s in scored if not s.probe.enrolled and s.best is not None and s.best_sim >= threshold]
    wrong = [s for s in scored if s.probe.enrolled and s.best is not None and s.best_sim >= threshold and s.best != s.probe.person]
    unk = [s for s in scored if s.probe.enrolled and (s.best is None or s.best_sim < threshold)]
    row = lambda s: {"file": s.probe.file, "named": s.best, "similarity": s.best_sim, "own": s.own_sim,  # noqa: E731
                     "reason": s.probe.reason, "sharpness": s.probe.sharpness, "yaw": s.probe.yaw, "width": s.probe.width}
    return {"false_accepts": [row(s) for s in sorted(fa, key=lambda s: -s.best_sim)],
            "wrong": [row(s) for s in sorted(wrong, key=lambda s: -s.best_sim)],
            "unknown": [row(s) for s in sorted(unk, key=lambda s: (s.best is not None, s.own_sim))]}


def evaluate_set(analyzer, root: Path, k: int, holdout: float, threshold: float, gate: FaceQualityConfig,
                 max_probes: int | None = None, enroll_gate: bool = False) -> dict:
    """The whole protocol of the module docstring on one set folder; returns the JSON-able report.

    Args:
        analyzer: :class:`stages.face.FaceAnalyzer` with the models and ``cfg`` (dominance, min_face_px) to evaluate.
        root: the set folder. k, holdout, max_probes: see :func:`split_people`.
        threshold: the match threshold to report at (``recognition.face.match_threshold``).
        gate: the quality gate (``recognition.face.quality``). enroll_gate: see :func:`enroll`.

    Raises:
        ValueError: bad set folder, unreadable image, bad split parameters, or nobody could be enrolled.
    """
    root = root.resolve()
    split = split_people(list_people(root), k, holdout, max_probes)
    if not split.enroll:
        raise ValueError(f"evaluation set {root}: nobody to enroll with k={k} and holdout={holdout} "
                         f"(a person needs more than k photos)")
    en = enroll(analyzer, split, root, gate, enroll_gate)
    if not en.names:
        raise ValueError(f"evaluation set {root}: every enrollment photo was refused: {en.failures[:3]}")
    gallery = Gallery(en.names, np.stack(en.embeddings), threshold=threshold, model_name=analyzer.model_name)
    probes, seconds = probe(analyzer, split, root, gate)
    kept = set(gallery.identities)
    probes = [p for p in probes if not p.enrolled or p.person in kept]  # people whose enrollment all failed: left out
    scored = score_probes(probes, gallery)
    plain, gated = Scores.of(scored), Scores.of(scored, gate)
    t0, t0_gated = zero_fa_threshold(plain), zero_fa_threshold(gated)
    return {
        "mode": "set", "set": str(root),
        "config": {"enroll_dominance": analyzer.cfg.enroll_dominance, "min_face_px": analyzer.cfg.min_face_px,
                   "quality": gate.model_dump(), "enroll_gate": enroll_gate},
        "split": {"k": k, "holdout": holdout, "max_probes": max_probes, "people": len(split.enroll) + len(split.never),
                  "enrolled_people": len(gallery), "never_enrolled_people": len(split.never),
                  "genuine_probes": sum(p.enrolled for p in probes), "impostor_probes": sum(not p.enrolled for p in probes)},
        "enrollment": _enrollment_report(split, en, gallery),
        "probe_ms_per_photo": 1000 * seconds / max(len(probes), 1),
        "probe_no_face": sum(p.embedding is None for p in probes),
        "rank1": {"correct": int(plain.genuine_correct.sum()), "probes": int(plain.genuine_correct.size)},
        "threshold": threshold,
        "at_threshold": metrics_at(plain, threshold), "at_threshold_gated": metrics_at(gated, threshold),
        "zero_fa": metrics_at(plain, t0), "zero_fa_gated": metrics_at(gated, t0_gated),
        "genuine": percentiles(plain.genuine_own), "impostor": percentiles(plain.impostor_best),
        "histogram": text_histogram(plain.genuine_own, plain.impostor_best),
        "face_width": percentiles(np.array([p.width for p in probes if p.embedding is not None])),
        "dominance": dominance_table({**en.ratios, **{p.file: (p.faces, p.ratio) for p in probes if p.faces}}),
        "sweep": sweep(plain, SWEEP_THRESHOLDS + (threshold,)),
        "gate_sweep": gate_sweep(scored, threshold),
        "errors_at_threshold": _listing(scored, threshold),
        "probes": [_probe_row(s) for s in scored],
    }


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f} %"


def _metrics_line(m: dict) -> str:
    return (f"t={m['threshold']:.4f}: hits {m['hits']}/{m['genuine_probes']} ({_pct(m['hit_rate'])}), "
            f"unknown {m['unknown']} ({_pct(m['unknown_rate'])}; no usable face {m['missing']}), wrong name {m['wrong']}, "
            f"false accepts {m['false_accepts']}/{m['impostor_probes']}")


def _print_enrollment(r: dict) -> None:
    e = r["enrollment"]
    print(f"enrollment: {e['enrolled']}/{e['photos']} photos enrolled ({e['ms_per_photo']:.0f} ms/photo); "
          f"failures {e['failures']} {e['by_reason']}")
    for f in e["failed"]:
        extra = f" ({f['faces']} faces, best {f['ratio']:.2f}x the next)" if f["reason"] == "no_dominant_face" else ""
        extra = f" ({f['gate']}, sharpness {f['sharpness']:.0f}, yaw {f['yaw']:+.2f})" if f["reason"] == "quality_gate" else extra
        print(f"  refused {f['file']}: {f['reason']}{extra}")
    if e["people_not_enrolled"]:
        print(f"  people left out (no photo enrolled): {', '.join(e['people_not_enrolled'])}")
    if e["gate_would_refuse"] and not r["config"]["enroll_gate"]:
        print(f"  enrolled faces the quality gate would refuse: {len(e['gate_would_refuse'])} "
              f"({', '.join(f['file'] + ' ' + f['gate'] for f in e['gate_would_refuse'][:8])}{' ...' if len(e['gate_would_refuse']) > 8 else ''})")
    if e["gallery_outliers_rejected"]:
        print(f"  gallery outliers rejected: {', '.join(e['gallery_outliers_rejected'])}")


def _print_dominance(r: dict) -> None:
    d = r["dominance"]
    refused = ", ".join(f"{m}x: {n}" for m, n in d["refused"].items())
    print(f"enroll_dominance, all {d['photos']} photos with a face as if each were enrolled: {d['several_faces']} have "
          f"several faces; refused at margin {refused}")


def _print_scores(r: dict) -> None:
    print(f"{'similarity':<12}{'n':>6}{'mean':>7}" + "".join(f"{k:>7}" for k in ("min", "p1", "p5", "p25", "p50", "p75", "p95", "p99", "max")))
    for key, label in (("genuine", "genuine"), ("impostor", "impostor")):
        s = r[key]
        print(f"{label:<12}{s['n']:>6}" + "".join(f"{s[k]:>7.3f}" for k in ("mean", "min", "p1", "p5", "p25", "p50", "p75", "p95", "p99", "max")))
    print("histogram (genuine: own template | impostor: best template)")
    for line in r["histogram"]:
        print("  " + line)


def _print_sweeps(r: dict) -> None:
    print(f"{'threshold':>10}{'hits':>7}{'hit %':>8}{'unknown %':>10}{'wrong':>7}{'false acc.':>11}")
    for m in r["sweep"]:
        mark = "  <- configured" if m["threshold"] == r["threshold"] else ""
        print(f"{m['threshold']:>10.3f}{m['hits']:>7}{100 * m['hit_rate']:>8.1f}{100 * m['unknown_rate']:>10.1f}"
              f"{m['wrong']:>7}{m['false_accepts']:>11}{mark}")
    print(f"\nquality gate on probes (refused: enrolled people's probes it refuses, counted unknown); at t={r['threshold']:.3f} | "
          "at its zero-false-accept threshold")
    print(f"{'sharp>=':>8}{'|yaw|<=':>8}{'refused':>8}{'hits':>6}{'unk %':>7}{'FA':>4}  |{'t0':>8}{'hits':>6}{'unk %':>7}")
    for g in r["gate_sweep"]:
        a, z = g["at_threshold"], g["zero_fa"]
        print(f"{g['min_sharpness']:>8.0f}{g['max_abs_yaw']:>8.1f}{a['missing'] - r['at_threshold']['missing']:>8}{a['hits']:>6}"
              f"{100 * a['unknown_rate']:>7.1f}{a['false_accepts'] + a['wrong']:>4}  |{z['threshold']:>8.3f}{z['hits']:>6}{100 * z['unknown_rate']:>7.1f}")


def _print_errors(r: dict, limit: int = 12) -> None:
    err = r["errors_at_threshold"]
    for key, title in (("false_accepts", "false accepts"), ("wrong", "wrong names"), ("unknown", "unknown (lowest own similarity first)")):
        rows = err[key]
        if not rows:
            continue
        print(f"{title} at {r['threshold']:.3f}: {len(rows)}")
        for e in rows[:limit]:
            what = e["reason"] if e["similarity"] != e["similarity"] else f"named {e['named']} {e['similarity']:.3f}, own {e['own']:.3f}"
            print(f"  {e['file']:<48} {what} (width {e['width']:.0f} px, sharpness {e['sharpness']:.0f}, yaw {e['yaw']:+.2f})")
        if len(rows) > limit:
            print(f"  ... {len(rows) - limit} more (--json lists all)")


def print_set_report(r: dict) -> None:
    """The report of :func:`evaluate_set` as text tables."""
    sp, c = r["split"], r["config"]
    print(f"models: detector {r['detector']} (input {r['det_size']} px), embedder {r['embedder']}")
    print(f"set {r['set']}: {sp['people']} people; enrolled {sp['enrolled_people']} with k={sp['k']} photo(s) each, "
          f"never enrolled {sp['never_enrolled_people']} (holdout {sp['holdout']:g} + people with <= k photos)")
    print(f"probes: {sp['genuine_probes']} genuine, {sp['impostor_probes']} impostor ({r['probe_ms_per_photo']:.0f} ms/photo); "
          f"no face found in {r['probe_no_face']}; probe face width p5/p50 {r['face_width']['p5']:.0f}/{r['face_width']['p50']:.0f} px")
    print(f"config: match_threshold {r['threshold']:g}, enroll_dominance {c['enroll_dominance']:g}, min_face_px {c['min_face_px']}, "
          f"quality gate sharpness >= {c['quality']['min_sharpness']:g}, |yaw| <= {c['quality']['max_abs_yaw']:g}"
          f"{' (also on enrollment)' if c['enroll_gate'] else ''}")
    print()
    _print_enrollment(r)
    _print_dominance(r)
    print()
    rk = r["rank1"]
    print(f"rank-1 (closed set, no threshold): {rk['correct']}/{rk['probes']} ({_pct(rk['correct'] / rk['probes'] if rk['probes'] else math.nan)})")
    print(f"at the configured threshold         {_metrics_line(r['at_threshold'])}")
    print(f"  same, probes through the gate     {_metrics_line(r['at_threshold_gated'])}")
    print(f"zero-false-accept threshold         {_metrics_line(r['zero_fa'])}")
    print(f"  same, probes through the gate     {_metrics_line(r['zero_fa_gated'])}")
    print()
    _print_scores(r)
    print()
    _print_sweeps(r)
    print()
    _print_errors(r)
    m = r["at_threshold"]
    print(f"\ntargets at {r['threshold']:g}: false accepts {m['false_accepts']} (target 0): {'PASS' if m['false_accepts'] == 0 else 'FAIL'}; "
          f"unknown rate of enrolled people {_pct(m['unknown_rate'])} (target < 3 %): {'PASS' if m['unknown_rate'] < 0.03 else 'FAIL'}; "
          f"enrollment failures {r['enrollment']['failures']} (target: none for photos with one clear subject: see the list)")
