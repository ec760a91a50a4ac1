#!/usr/bin/env python
"""Evaluate the clustering of unknown faces (``storage/clustering.py``) open-set on a folder of person folders.

Protocol (``--set DIR``, e.g. the LFW subset of ``scripts/lfw_subset.py``; README "Face calibration"):

1. **Tracks.** Every photo's most prominent face (as ``eval_faces.py --set`` takes its probes:
   :func:`stages.gallery.enrollment_face` with margin 1) that passes the configured quality gate stands for one
   person track; its embedding is the track vector. A real track's vector is the mean of its best faces of one
   sighting (:func:`storage.clustering.track_vector`), so one photo a track is the noisier case.
2. **Clustering**, as the storage process does it: the tracks are streamed in ``--orders`` random orders
   (seeded, ``--seed``) through :class:`storage.clustering.OnlineClusters` (the leader rule at the cluster
   threshold), then :func:`storage.clustering.consolidate` at the merge threshold (``--merge``, default: the
   same) merges groups into their oldest cluster, once, as at the end of a run.
3. **Metrics** per threshold, the mean over the orders:

   - *impure clusters*: clusters holding photos of more than one person (naming one names a stranger);
   - *misplaced*: photos not of their cluster's most frequent person;
   - *pair precision*: of the photo pairs that share a cluster, the share of same-person pairs;
   - *pair recall*: of the same-person pairs, the share that share a cluster;
   - *clusters per person*: the mean number of clusters the photos of a person with two or more spread over
     (1.0: one anonymous identity each).

Thresholds are cosine similarities of L2-normalised embeddings. The models and the quality gate are those of
``--config`` (``recognition.face``), else :class:`pipeline.config.FaceConfig`'s defaults with
``--detector``/``--embedder``; the thresholds compared are ``--thresholds`` plus the configured
``match_threshold`` (the clustering default, ``recognition.face.unknowns``).

Usage::

    FACEPRO_ASSETS=../shared python scripts/eval_unknowns.py --set ~/evaldata/lfw-news [--orders 5] [--json]

Exit status: 0 after the report, 2 on a usage or model error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_faces import run_report, set_face_config, set_folder  # noqa: E402
from faceset import list_people, read_image  # noqa: E402
from stages.face import FaceAnalyzer  # noqa: E402
from stages.gallery import EnrollmentError, enrollment_face  # noqa: E402
from stages.quality import assess  # noqa: E402
from stages.runtime import SessionOptions  # noqa: E402
from storage.clustering import OnlineClusters, consolidate  # noqa: E402

THRESHOLDS = (0.40, 0.45, 0.50, 0.55, 0.60)


def embed_set(analyzer: FaceAnalyzer, root: Path, gate) -> tuple[np.ndarray, np.ndarray, Counter]:
    """``(names (n,) str, vectors (n, d) float32 unit-norm, skipped reasons)``: one face a photo (step 1)."""
    names, vectors, skipped = [], [], Counter()
    for person, paths in list_people(root).items():
        for path in paths:
            img = read_image(path)
            try:
                face = enrollment_face(analyzer, img, str(path), dominance=1.0).face
            except EnrollmentError:  # no face, or two of exactly equal prominence
                skipped["no_face"] += 1
                continue
            reason = assess(img, face, gate).reason
            if reason is not None:
                skipped[reason] += 1
                continue
            names.append(person)
            vectors.append(face.embedding)
    if not vectors:
        raise ValueError(f"evaluation set {root}: no photo gave a face that passes the quality gate")
    return np.array(names), np.stack(vectors).astype(np.float32), skipped


def cluster_labels(vectors: np.ndarray, order: np.ndarray, threshold: float, merge: float) -> np.ndarray:
    """The cluster key of each row of ``vectors`` after streaming them in ``order`` and one consolidation."""
    clusters = OnlineClusters([], np.zeros((0, 0)), np.zeros(0, np.int64), threshold)
    labels = np.empty(vectors.shape[0], np.int64)
    for i in order:
        labels[i] = clusters.assign(vectors[i]).key
    into = {}
    for group in consolidate(clusters.centroids(), merge):
        into.update({clusters.keys[j]: clusters.keys[group[0]] for j in group[1:]})
    return np.array([into.get(int(k), int(k)) for k in labels], np.int64)


def clustering_metrics(names: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The metrics of step 3 for one clustering (``names[i]``: the person of row ``i``, ``labels[i]``: its cluster).

    Raises:
        ValueError: ``names`` and ``labels`` of different lengths.
    """
    if names.shape != labels.shape:
        raise ValueError(f"clustering_metrics: {names.shape[0]} names and {labels.shape[0]} labels")
    members: dict[int, list[str]] = {}
    for name, label in zip(names.tolist(), labels.tolist()):
        members.setdefault(label, []).append(name)
    impure = misplaced = together = together_same = 0
    for people in members.values():
        count = Counter(people)
        impure += len(count) > 1
        misplaced += len(people) - count.most_common(1)[0][1]
        together += len(people) * (len(people) - 1) // 2
        together_same += sum(c * (c - 1) // 2 for c in count.values())
    per_person = Counter(names.tolist())
    same_pairs = sum(c * (c - 1) // 2 for c in per_person.values())
    spread = [len(set(labels[names == p].tolist())) for p, c in per_person.items() if c >= 2]
    return {"clusters": float(len(members)), "impure_clusters": float(impure), "misplaced": float(misplaced),
            "pair_precision": together_same / together if together else 1.0,
            "pair_recall": together_same / same_pairs if same_pairs else 1.0,
            "clusters_per_person": float(np.mean(spread)) if spread else 1.0}


def sweep(names: np.ndarray, vectors: np.ndarray, thresholds: list[float], merge: float | None, orders: int,
          seed: int) -> list[dict]:
    """One row a threshold: the mean of :func:`clustering_metrics` over ``orders`` shuffled orders."""
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(vectors.shape[0]) for _ in range(orders)]
    rows = []
    for t in thresholds:
        runs = [clustering_metrics(names, cluster_labels(vectors, p, t, t if merge is None else merge)) for p in perms]
        rows.append({"threshold": t, "merge": t if merge is None else merge,
                     **{k: float(np.mean([r[k] for r in runs])) for k in runs[0]}})
    return rows


def evaluate(args: argparse.Namespace) -> dict:
    """The report: the set's counts, the configured threshold and one :func:`sweep` row a threshold."""
    if args.orders < 1:
        raise ValueError(f"--orders: expected at least 1, got {args.orders}")
    root = set_folder(args.set)
    cfg = set_face_config(args)
    t0 = time.perf_counter()
    names, vectors, skipped = embed_set(FaceAnalyzer(cfg, SessionOptions(threads=args.threads)), root, cfg.quality)
    seconds = time.perf_counter() - t0
    thresholds = sorted({round(t, 4) for t in (*args.thresholds, cfg.match_threshold)})
    return {"set": str(root), "photos": int(names.shape[0]), "people": len(set(names.tolist())),
            "people_with_2": sum(1 for c in Counter(names.tolist()).values() if c >= 2),
            "skipped": dict(skipped), "embed_seconds": round(seconds, 1), "orders": args.orders,
            "match_threshold": cfg.match_threshold,
            "rows": sweep(names, vectors, thresholds, args.merge, args.orders, args.seed)}


def print_report(r: dict) -> None:
    print(f"{r['set']}: {r['photos']} photos (tracks) of {r['people']} people ({r['people_with_2']} with two or "
          f"more); skipped {r['skipped'] or 'none'}; embedded in {r['embed_seconds']} s; mean of {r['orders']} orders")
    print("threshold merge  clusters impure misplaced pair-precision pair-recall clusters/person")
    for row in r["rows"]:
        mark = "  <- match_threshold (the default)" if row["threshold"] == r["match_threshold"] else ""
        print(f"{row['threshold']:9.2f} {row['merge']:5.2f} {row['clusters']:9.1f} {row['impure_clusters']:6.1f} "
              f"{row['misplaced']:9.1f} {row['pair_precision']:15.4f} {row['pair_recall']:11.4f} "
              f"{row['clusters_per_person']:15.3f}{mark}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", nargs="?", const="", metavar="DIR", required=True,
                   help="folder with one sub-folder of photos per person (--set alone: $FACEPRO_EVAL_FACES)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS), help="cluster thresholds compared")
    p.add_argument("--merge", type=float, help="consolidation's merge threshold (default: each cluster threshold)")
    p.add_argument("--orders", type=int, default=5, help="shuffled orders averaged (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the orders (default %(default)s)")
    p.add_argument("--config", help="take recognition.face (models, threshold, quality gate) from this FacePro config")
    p.add_argument("--assets", help="assets folder with models/ and data/ (default: $FACEPRO_ASSETS)")
    p.add_argument("--detector", default="scrfd_500m.onnx", help="SCRFD model: file in <assets>/models or a path")
    p.add_argument("--embedder", default="mobilefacenet_128d.onnx", help="embedder: file in <assets>/models or a path")
    p.add_argument("--det-size", type=int, default=640, help="face detector input size, pixels (default %(default)s)")
    p.add_argument("--det-score", type=float, default=0.5, help="face detector score threshold (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.set_defaults(threshold=None, dominance=None, min_sharpness=None, max_yaw=None)  # set_face_config's overrides
    return p


def main(argv: list[str] | None = None) -> int:
    return 0 if run_report("eval_unknowns", evaluate, print_report, build_parser().parse_args(argv)) is not None else 2


if __name__ == "__main__":
    sys.exit(main())
