#!/usr/bin/env python
"""Evaluate face identification on the asset face set: rank-1, genuine/impostor similarities, threshold.

Protocol (on ``<assets>/data/faces``, one folder per identity, ``_multi/``
holds group photos):

1. Every image of an identity folder is run through the face pipeline
   (SCRFD detection → ArcFace 5-point alignment → embedding, see
   :mod:`stages.face`); an image must contain one face, or one that dominates
   the others (:func:`stages.gallery.enrollment_embedding`), others are listed as skipped.
2. **Leave-one-out identification.** Each image in turn is the *probe*; the
   *gallery* is built with :class:`stages.gallery.Gallery` (one template per
   identity, the normalised mean of its embeddings, outlier rule included)
   from all *other* images. The probe's cosine similarity to its own
   identity's template is a *genuine* score, to every other template an
   *impostor* score. *Rank-1* counts probes whose most similar template is
   their own identity. Probes whose identity has no other image are impostor
   probes only (no genuine score, not counted in rank-1).
3. **Threshold for a target FAR** (``--far``, default 0.001), see
   :func:`threshold_for_far`. With ``n`` impostor scores the smallest FAR
   that can be measured is ``1/n`` (here about 1/60), so a target such as
   0.001 cannot be verified on this set: if every genuine score is above
   every impostor score the threshold is the midpoint of that gap (FAR 0 and
   TAR 1 on this set, with the largest margin on both sides); otherwise it is
   set just above the impostor score at the ``1 - far`` quantile (at most
   ``floor(far * n)`` impostor scores reach it). *TAR* (true accept rate) and
   *FAR* (false accept rate) are then measured at that threshold.
4. **Open-set check.** With the gallery of all single-face images, every
   face of ``_multi/t1.jpg`` (six people, none enrolled) must come out
   unknown at the chosen threshold. The other group photos are identified
   and compared with the names the asset README gives for them.

**Larger sets** (``--set DIR`` or ``FACEPRO_EVAL_FACES``): a folder with
one sub-folder of photos per person (e.g. a subset of LFW made by
``scripts/lfw_subset.py``) is evaluated open-set instead, as a user would
meet it: the first ``--enroll-k`` photos of each person are enrolled through
``facepro enroll``'s code path, a stable ``--holdout`` fraction of the people
is never enrolled, and the other photos probe. It reports rank-1, false
accepts among the people never enrolled, the unknown rate of the enrolled
people, enrollment failures and why, the similarity distributions, a
threshold sweep, the threshold with zero false accepts and the most hits,
and the same with the quality gate on the probes (protocol:
``scripts/faceset.py``). The models, threshold, dominance and quality gate
are the configured ones: ``--config FILE`` takes ``recognition.face`` of a
FacePro config, else the defaults of :class:`pipeline.config.FaceConfig`
with ``--detector``/``--embedder``; ``--threshold``, ``--min-sharpness``,
``--max-yaw``, ``--dominance`` override them.

Usage::

    FACEPRO_ASSETS=../shared python scripts/eval_faces.py [--far 0.001] [--png hist.png] [--json]
    python scripts/eval_faces.py --assets ../shared --detector scrfd_2.5g_bnkps.onnx
    FACEPRO_ASSETS=../shared python scripts/eval_faces.py --set ~/evaldata/lfw-news [--enroll-k 1] [--holdout 0.3] [--json]
    python scripts/eval_faces.py --set DIR --config configs/demo.yaml

``--detector``/``--embedder`` take a file name in ``<assets>/models`` or a
path. Exit status: 0 when the open-set check passes (with ``--set``: no false
accept and an unknown rate under 3 % at the threshold), 1 when it fails, 2 on
a usage or model error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faceset import evaluate_set, print_set_report  # noqa: E402
from pipeline.config import ConfigError, FaceConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig, load_config  # noqa: E402
from stages.face import FaceAnalyzer  # noqa: E402
from stages.gallery import EnrollmentError, Gallery, enrollment_embedding  # noqa: E402
from stages.runtime import ModelError, SessionOptions  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

#: Group photos and the identities the asset README says they show (None = someone not enrolled).
GROUP_PHOTOS: dict[str, list[str | None]] = {
    "t1.jpg": [None] * 6,
    "obama_and_biden.jpg": ["obama", "biden", None],
    "kit_with_rose.jpg": ["kit_harington", "rose_leslie"],
}


class UsageError(Exception):
    """Bad command-line input (missing assets folder, file, ...)."""


def assets_dir(arg: str | None) -> Path:
    """The assets folder from ``--assets`` or ``FACEPRO_ASSETS``.

    Raises:
        UsageError: neither is set, or the folder has no ``models/`` and ``data/``.
    """
    raw = arg or os.environ.get("FACEPRO_ASSETS")
    if not raw:
        raise UsageError("no assets folder: pass --assets PATH or set FACEPRO_ASSETS (e.g. FACEPRO_ASSETS=../shared)")
    path = Path(raw).expanduser().resolve()
    if not (path / "models").is_dir() or not (path / "data").is_dir():
        raise UsageError(f"assets folder {path} has no models/ and data/ subfolders")
    return path


def model_path(assets: Path, name: str) -> Path:
    """A model given as a path, or as a file name inside ``<assets>/models``."""
    p = Path(name).expanduser()
    return p if p.is_file() or p.parent != Path(".") else assets / "models" / name


@dataclass(frozen=True)
class Threshold:
    """A calibrated similarity threshold.

    Attributes:
        value: cosine similarity; a score ``>= value`` is accepted.
        rule: ``"midpoint"`` (genuine and impostor scores separate: midpoint
            of the gap) or ``"quantile"`` (they overlap: just above the
            impostor score at the ``1 - far`` quantile).
        tar: fraction of genuine scores ``>= value`` (true accept rate).
        far: fraction of impostor scores ``>= value`` (false accept rate).
        min_measurable_far: ``1 / n_impostor``.
    """

    value: float
    rule: str
    tar: float
    far: float
    min_measurable_far: float


def threshold_for_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> Threshold:
    """Pick an accept threshold for a target false accept rate.

    Rule: if ``min(genuine) > max(impostor)`` the threshold is their
    midpoint (FAR 0, TAR 1 on the data). Otherwise, with the ``n`` impostor
    scores sorted in descending order ``s[0] >= s[1] >= ...`` and
    ``k = floor(far * n)`` false accepts allowed, the threshold is the
    smallest float above ``s[k]``, so that at most ``k`` impostor scores
    reach it (empirical ``1 - far`` quantile; ``k = 0`` when ``far < 1/n``).

    Args:
        genuine: ``(g,)`` genuine cosine similarities (same identity).
        impostor: ``(n,)`` impostor cosine similarities (different identities).
        far: target false accept rate in [0, 1).

    Returns:
        The :class:`Threshold` with the TAR and FAR measured at it.

    Raises:
        ValueError: no genuine or no impostor scores, or ``far`` outside [0, 1).
    """
    g = np.asarray(genuine, dtype=np.float64).reshape(-1)
    imp = np.asarray(impostor, dtype=np.float64).reshape(-1)
    if g.size == 0 or imp.size == 0:
        raise ValueError(f"threshold_for_far: need genuine and impostor scores, got {g.size} and {imp.size}")
    if not 0.0 <= far < 1.0:
        raise ValueError(f"threshold_for_far: far must be in [0, 1), got {far}")
    if g.min() > imp.max():
        value, rule = (g.min() + imp.max()) / 2, "midpoint"
    else:
        k = int(math.floor(far * imp.size))
        value, rule = float(np.nextafter(np.sort(imp)[::-1][k], np.inf)), "quantile"
    return Threshold(float(value), rule, float(np.mean(g >= value)), float(np.mean(imp >= value)), 1.0 / imp.size)


def describe(scores: np.ndarray) -> dict[str, float | int]:
    """``{"n", "min", "mean", "max"}`` of a score array (NaN when empty)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return {"n": 0, "min": math.nan, "mean": math.nan, "max": math.nan}
    return {"n": int(s.size), "min": float(s.min()), "mean": float(s.mean()), "max": float(s.max())}


def read_image(path: Path) -> np.ndarray:
    img = cv2.imread(str(path))
    if img is None:
        raise UsageError(f"cannot read image {path}")
    return img


def enroll_folder(analyzer: FaceAnalyzer, faces_dir: Path) -> tuple[list[str], list[str], np.ndarray, list[dict]]:
    """Embed every single-face image of every identity folder.

    Returns:
        ``(names, files, (k, d) embeddings, skipped)`` where ``files`` are
        paths relative to ``faces_dir`` and ``skipped`` lists images without
        a face to enroll (``{"file", "reason"}``).
    """
    names, files, rows, skipped = [], [], [], []
    for folder in sorted(p for p in faces_dir.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for img_path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            rel = str(img_path.relative_to(faces_dir))
            try:
                emb, _ = enrollment_embedding(analyzer, read_image(img_path), rel)
            except EnrollmentError as err:
                skipped.append({"file": rel, "reason": str(err)})
                continue
            names.append(folder.name)
            files.append(rel)
            rows.append(emb)
    if not rows:
        raise UsageError(f"no usable single-face image in the identity folders of {faces_dir}")
    return names, files, np.stack(rows).astype(np.float32), skipped


def leave_one_out(names: list[str], files: list[str], emb: np.ndarray) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Leave-one-out probes against galleries of all other images.

    Returns:
        ``(probes, genuine scores, impostor scores)``; each probe is
        ``{"file", "identity", "predicted", "genuine", "best_impostor"}``
        (``genuine`` None when the identity has no other image).
    """
    probes, genuine, impostor = [], [], []
    for i in range(len(names)):
        others = [j for j in range(len(names)) if j != i]
        gallery = Gallery([names[j] for j in others], emb[others])
        sims = gallery.similarities(emb[i : i + 1])[0]
        ids = gallery.identities
        own = ids.index(names[i]) if names[i] in ids else None
        imp = [float(s) for k, s in enumerate(sims) if k != own]
        impostor += imp
        if own is not None:
            genuine.append(float(sims[own]))
        probes.append(
            {
                "file": files[i],
                "identity": names[i],
                "predicted": ids[int(np.argmax(sims))],
                "genuine": None if own is None else float(sims[own]),
                "best_impostor": max(imp) if imp else None,
            }
        )
    return probes, np.array(genuine), np.array(impostor)


def group_photos(analyzer: FaceAnalyzer, gallery: Gallery, multi_dir: Path) -> list[dict]:
    """Identify every face of the known group photos at the gallery's threshold.

    Returns:
        One ``{"file", "faces": [{"identity", "similarity"}], "expected", "ok"}``
        per group photo present; ``ok`` compares the multiset of names (None =
        unknown) with :data:`GROUP_PHOTOS`.
    """
    out = []
    for name, expected in GROUP_PHOTOS.items():
        path = multi_dir / name
        if not path.is_file():
            continue
        faces = analyzer.analyze(read_image(path))
        matches = gallery.match(np.stack([f.embedding for f in faces])) if faces else []
        found = [{"identity": m.identity, "similarity": m.similarity} for m in matches]
        key = lambda v: "" if v is None else v  # noqa: E731 - sort None with names
        ok = sorted(map(key, (f["identity"] for f in found))) == sorted(map(key, expected))
        out.append({"file": f"_multi/{name}", "faces": found, "expected": expected, "ok": ok})
    return out


def write_histogram(path: Path, genuine: np.ndarray, impostor: np.ndarray, threshold: float, title: str) -> None:
    """Save a histogram of genuine and impostor cosine similarities with the threshold line (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-0.2, 1.0, 49)
    ax.hist(impostor, bins=bins, alpha=0.6, label=f"impostor (n={impostor.size})", color="tab:red")
    ax.hist(genuine, bins=bins, alpha=0.6, label=f"genuine (n={genuine.size})", color="tab:green")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("cosine similarity (probe vs identity template)")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def set_folder(arg: str | None) -> Path:
    """The evaluation set from ``--set DIR``, or ``--set`` alone and ``FACEPRO_EVAL_FACES``.

    Raises:
        UsageError: ``--set`` alone without the variable, or not a folder.
    """
    raw = arg or os.environ.get("FACEPRO_EVAL_FACES")
    if not raw:
        raise UsageError("--set without a folder needs FACEPRO_EVAL_FACES=DIR (one sub-folder of photos per person)")
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise UsageError(f"evaluation set {path} is not a folder (expected one sub-folder of photos per person)")
    return path


def set_face_config(args: argparse.Namespace) -> FaceConfig:
    """``recognition.face`` of ``--config``, else :class:`FaceConfig` defaults with ``--detector``/``--embedder``
    (``--det-size``, ``--det-score``); then ``--threshold``, ``--dominance``, ``--min-sharpness``, ``--max-yaw``.

    Raises:
        ConfigError: the config file is invalid (message names the key). UsageError: no assets folder.
    """
    if args.config:
        cfg = load_config(args.config).recognition.face
    else:
        assets = None if Path(args.detector).is_file() and Path(args.embedder).is_file() else assets_dir(args.assets)
        cfg = FaceConfig(
            detector=OnnxFaceDetectorConfig(path=model_path(assets, args.detector) if assets else Path(args.detector),
                                            input_size=args.det_size, score_threshold=args.det_score),
            embedder=OnnxFaceEmbedderConfig(path=model_path(assets, args.embedder) if assets else Path(args.embedder)),
        )
    quality = {k: v for k, v in (("min_sharpness", args.min_sharpness), ("max_abs_yaw", args.max_yaw)) if v is not None}
    update = {k: v for k, v in (("match_threshold", args.threshold), ("enroll_dominance", args.dominance)) if v is not None}
    data = cfg.model_dump()
    data.update(update)
    data["quality"] = {**data["quality"], **quality}
    return FaceConfig.model_validate(data)


def evaluate_open_set(args: argparse.Namespace) -> dict:
    """``--set``: the open-set protocol of :mod:`faceset`; returns its report with the models named."""
    root = set_folder(args.set)
    cfg = set_face_config(args)
    analyzer = FaceAnalyzer(cfg, SessionOptions(threads=args.threads))
    report = evaluate_set(analyzer, root, args.enroll_k, args.holdout, cfg.match_threshold, cfg.quality,
                          max_probes=args.max_probes, enroll_gate=args.enroll_gate)
    report.update(detector=Path(cfg.detector.path).name, det_size=cfg.detector.input_size,
                  embedder=Path(cfg.embedder.path).name)
    return report


def evaluate(args: argparse.Namespace) -> dict:
    """Run the whole protocol; returns the JSON-able report."""
    if args.set is not None:
        return evaluate_open_set(args)
    assets = assets_dir(args.assets)
    faces_dir = assets / "data" / "faces"
    if not faces_dir.is_dir():
        raise UsageError(f"face folder {faces_dir} does not exist")
    cfg = FaceConfig(
        detector=OnnxFaceDetectorConfig(path=model_path(assets, args.detector), input_size=args.det_size, score_threshold=args.det_score),
        embedder=OnnxFaceEmbedderConfig(path=model_path(assets, args.embedder)),
    )
    analyzer = FaceAnalyzer(cfg, SessionOptions(threads=args.threads))
    names, files, emb, skipped = enroll_folder(analyzer, faces_dir)
    probes, genuine, impostor = leave_one_out(names, files, emb)
    thr = threshold_for_far(genuine, impostor, args.far)
    gallery = Gallery(names, emb, threshold=thr.value, model_name=analyzer.model_name)
    groups = group_photos(analyzer, gallery, faces_dir / "_multi")
    t1 = next((g for g in groups if g["file"] == "_multi/t1.jpg"), None)
    ranked = [p for p in probes if p["genuine"] is not None]
    report = {
        "detector": Path(cfg.detector.path).name,
        "embedder": Path(cfg.embedder.path).name,
        "identities": len(set(names)),
        "images": len(names),
        "skipped": skipped,
        "rank1": {"correct": sum(p["predicted"] == p["identity"] for p in ranked), "probes": len(ranked)},
        "genuine": describe(genuine),
        "impostor": describe(impostor),
        "target_far": args.far,
        "threshold": thr.value,
        "threshold_rule": thr.rule,
        "tar": thr.tar,
        "far": thr.far,
        "min_measurable_far": thr.min_measurable_far,
        "gallery_rejected": [files[i] for i in gallery.rejected],
        "t1_all_unknown": None if t1 is None else all(f["identity"] is None for f in t1["faces"]) and len(t1["faces"]) > 0,
        "group_photos": groups,
        "probes": probes,
        "per_identity": dict(Counter(names)),
    }
    if args.png:
        write_histogram(Path(args.png), genuine, impostor, thr.value, f"{report['detector']} + {report['embedder']}: leave-one-out")
        report["png"] = str(Path(args.png).resolve())
    return report


def print_report(r: dict) -> None:
    print(f"models: detector {r['detector']}, embedder {r['embedder']}")
    print(f"face set: {r['images']} single-face images of {r['identities']} identities {r['per_identity']}")
    for s in r["skipped"]:
        print(f"  skipped {s['file']}: {s['reason']}")
    print()
    print(f"{'probe':<36}{'identity':<16}{'rank-1':<16}{'genuine':>9}{'best imp.':>10}")
    for p in r["probes"]:
        gen = "-" if p["genuine"] is None else f"{p['genuine']:.3f}"
        imp = "-" if p["best_impostor"] is None else f"{p['best_impostor']:.3f}"
        print(f"{p['file']:<36}{p['identity']:<16}{p['predicted']:<16}{gen:>9}{imp:>10}")
    print()
    print(f"{'scores (cosine)':<22}{'n':>6}{'min':>8}{'mean':>8}{'max':>8}")
    for key in ("genuine", "impostor"):
        s = r[key]
        print(f"{key:<22}{s['n']:>6}{s['min']:>8.3f}{s['mean']:>8.3f}{s['max']:>8.3f}")
    print()
    rk = r["rank1"]
    print(f"{'rank-1 (leave-one-out)':<34}{rk['correct']}/{rk['probes']}")
    print(f"{'target FAR':<34}{r['target_far']:g} (smallest measurable: {r['min_measurable_far']:.4f} = 1/{r['impostor']['n']})")
    rule = "midpoint of the genuine/impostor gap" if r["threshold_rule"] == "midpoint" else "impostor 1-FAR quantile (scores overlap)"
    print(f"{'threshold':<34}{r['threshold']:.3f} ({rule})")
    print(f"{'TAR / FAR at threshold':<34}{r['tar']:.3f} / {r['far']:.3f}")
    if r["gallery_rejected"]:
        print(f"{'gallery outliers rejected':<34}{', '.join(r['gallery_rejected'])}")
    print()
    print(f"{'group photo':<28}{'faces':>6}  {'identified (similarity)':<70}{'check':>6}")
    for g in r["group_photos"]:
        found = ", ".join(f"{f['identity'] or 'unknown'} ({f['similarity']:.2f})" for f in g["faces"])
        print(f"{g['file']:<28}{len(g['faces']):>6}  {found:<70}{'ok' if g['ok'] else 'FAIL':>6}")
    verdict = {True: "PASS", False: "FAIL", None: "not run (t1.jpg missing)"}[r["t1_all_unknown"]]
    print(f"\nevery face of _multi/t1.jpg unknown at {r['threshold']:.3f}: {verdict}")
    if "png" in r:
        print(f"histogram written to {r['png']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", help="assets folder with models/ and data/ (default: $FACEPRO_ASSETS)")
    p.add_argument("--detector", default="scrfd_500m.onnx", help="SCRFD model: file in <assets>/models or a path (default %(default)s)")
    p.add_argument("--embedder", default="mobilefacenet_128d.onnx", help="ArcFace-style 112x112 embedder: file in <assets>/models or a path (default %(default)s)")
    p.add_argument("--det-size", type=int, default=640, help="face detector input size, pixels, multiple of 32 (default %(default)s)")
    p.add_argument("--det-score", type=float, default=0.5, help="face detector score threshold (default %(default)s)")
    p.add_argument("--far", type=float, default=0.001, help="target false accept rate for the threshold (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default %(default)s)")
    p.add_argument("--png", help="write a histogram of the genuine and impostor similarities to this PNG file")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    g = p.add_argument_group("larger sets (open-set protocol, scripts/faceset.py)")
    g.add_argument("--set", nargs="?", const="", metavar="DIR",
                   help="folder with one sub-folder of photos per person (--set alone: $FACEPRO_EVAL_FACES)")
    g.add_argument("--config", help="take recognition.face (models, threshold, dominance, quality gate) from this FacePro config")
    g.add_argument("--enroll-k", type=int, default=1, help="photos enrolled per person, the first k by name (default %(default)s)")
    g.add_argument("--holdout", type=float, default=0.3, help="fraction of people never enrolled, chosen by a hash of the name (default %(default)s)")
    g.add_argument("--max-probes", type=int, help="at most this many probe photos per enrolled person (default: all)")
    g.add_argument("--threshold", type=float, help="match threshold (default: the config's recognition.face.match_threshold)")
    g.add_argument("--dominance", type=float, help="enroll_dominance (default: the config's)")
    g.add_argument("--min-sharpness", type=float, help="quality gate: min variance of the Laplacian (default: the config's)")
    g.add_argument("--max-yaw", type=float, help="quality gate: max |yaw| (default: the config's)")
    g.add_argument("--enroll-gate", action="store_true", help="refuse enrollment photos whose face fails the quality gate")
    return p


def jsonable(obj: object) -> object:
    """``json.dumps(default=...)`` for numpy arrays and scalars.

    Raises:
        TypeError: any other type.
    """
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def run_report(prog: str, evaluate: Callable[[argparse.Namespace], dict], print_report: Callable[[dict], None],
               args: argparse.Namespace) -> dict | None:
    """Run an evaluation and print its report (JSON with ``args.json``, else tables).

    Returns:
        The report, or None after printing ``<prog>: error: ...`` for a usage,
        model or value error (the caller exits with 2).
    """
    try:
        report = evaluate(args)
    except (UsageError, ModelError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return None
    if args.json:
        print(json.dumps(report, indent=2, default=jsonable))
    else:
        print_report(report)
    return report


def print_any_report(r: dict) -> None:
    (print_set_report if r.get("mode") == "set" else print_report)(r)


def main(argv: list[str] | None = None) -> int:
    report = run_report("eval_faces", evaluate, print_any_report, build_parser().parse_args(argv))
    if report is None:
        return 2
    if report.get("mode") == "set":
        m = report["at_threshold"]
        return 0 if m["false_accepts"] == 0 and m["unknown_rate"] < 0.03 else 1
    return 0 if report["t1_all_unknown"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
