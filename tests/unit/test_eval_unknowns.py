"""scripts/eval_unknowns.py: its clustering metrics on labellings built to prove each one, the storage's
clustering on synthetic people and a look-alike, and the whole evaluation on the real asset faces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scripts.eval_unknowns import cluster_labels, clustering_metrics, main

NAMES = np.array(["a", "a", "a", "b", "b", "c"])


@pytest.mark.parametrize("labels, expected", [
    # clusters, impure, misplaced, pair precision, pair recall, clusters per person (a and b have two or more)
    ([1, 1, 1, 2, 2, 3], (3, 0, 0, 1.0, 1.0, 1.0)),  # one cluster a person
    ([1, 1, 1, 1, 1, 1], (1, 1, 3, 4 / 15, 1.0, 1.0)),  # everyone together: 4 same-person pairs of 15
    ([1, 2, 3, 4, 5, 6], (6, 0, 0, 1.0, 0.0, 2.5)),  # everyone alone: a over 3 clusters, b over 2
    ([1, 1, 2, 2, 2, 3], (3, 1, 1, 2 / 4, 2 / 4, 1.5)),  # a split, one a with the two b
])
def test_clustering_metrics(labels: list[int], expected: tuple) -> None:
    m = clustering_metrics(NAMES, np.array(labels))
    got = (m["clusters"], m["impure_clusters"], m["misplaced"], m["pair_precision"], m["pair_recall"],
           m["clusters_per_person"])
    assert got == pytest.approx(expected)


def test_clustering_metrics_refuse_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="6 names and 2 labels"):
        clustering_metrics(NAMES, np.array([1, 2]))


def _around(center: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    r = rng.standard_normal(center.shape[0])
    r -= (r @ center) * center
    return (cos * center + np.sqrt(1 - cos * cos) * r / np.linalg.norm(r)).astype(np.float32)


@pytest.mark.parametrize("threshold, lookalike_joins", [(0.50, True), (0.70, False)])
def test_cluster_labels_follow_the_threshold(threshold: float, lookalike_joins: bool) -> None:
    """Two people (photos at cosine 0.95 from their own direction) and a look-alike of the first at 0.6 from it:
    the people never mix; the look-alike joins the first at 0.50 and stays alone at 0.70, in any order."""
    rng = np.random.default_rng(3)
    a, b = np.eye(64, dtype=np.float32)[:2]
    vectors = np.stack([_around(a, 0.95, rng) for _ in range(4)] + [_around(b, 0.95, rng) for _ in range(4)]
                       + [_around(a, 0.6, rng)])
    for seed in range(5):
        labels = cluster_labels(vectors, np.random.default_rng(seed).permutation(9), threshold, threshold)
        assert len(set(labels[:4])) == len(set(labels[4:8])) == 1 and labels[0] != labels[4]
        assert bool(labels[8] == labels[0]) is lookalike_joins


def test_the_evaluation_on_the_asset_faces(faces: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--set", str(faces), "--assets", str(assets), "--orders", "3", "--thresholds", "0.5", "0.6",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["photos"], r["people"], r["people_with_2"], r["match_threshold"]) == (14, 5, 5, 0.5)
    at = {row["threshold"]: row for row in r["rows"]}
    assert (at[0.5]["clusters"], at[0.5]["impure_clusters"], at[0.5]["clusters_per_person"]) == (5, 0, 1.0)
    assert at[0.6]["clusters"] > 5  # same-person photos score down to 0.58: someone is split at 0.60


def test_a_missing_set_is_one_line_and_exit_2(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--set", str(tmp_path / "nope"), "--assets", str(assets)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
