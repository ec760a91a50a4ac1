"""Open-set clustering of unknown faces (storage/clustering.py): synthetic vectors built to prove one property
each, and the real embeddings of the asset face photos (people not enrolled: one cluster per person)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import FaceConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig
from stages.face import FaceAnalyzer
from stages.gallery import enrollment_embedding
from stages.runtime import SessionOptions
from storage.clustering import CLUSTER_THRESHOLD, OnlineClusters, consolidate, track_vector

D = 32


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _around(center: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at cosine ``cos`` from unit ``center`` in a random direction."""
    r = rng.standard_normal(center.shape[0])
    r -= (r @ center) * center
    r /= np.linalg.norm(r)
    return (cos * center + np.sqrt(1 - cos * cos) * r).astype(np.float32)


def _basis(i: int, d: int = D) -> np.ndarray:
    e = np.zeros(d, np.float32)
    e[i] = 1.0
    return e


# ----------------------------------------------------------------- leader assignment


@pytest.mark.parametrize(("cosine", "threshold", "joins"), [
    (0.90, 0.45, True), (0.46, 0.45, True), (0.44, 0.45, False), (0.0, 0.45, False), (-0.5, 0.45, False),
    (0.50, 0.60, False), (0.50, -1.0, True),
])
def test_a_track_joins_the_nearest_centroid_only_at_the_threshold(cosine: float, threshold: float, joins: bool) -> None:
    clusters = OnlineClusters([7], _basis(0)[None, :], np.array([3]), threshold)
    probe = (cosine * _basis(0) + np.sqrt(1 - cosine * cosine) * _basis(1)).astype(np.float32)
    a = clusters.assign(probe)
    assert a.created is not joins
    assert a.key == (7 if joins else -1)
    assert a.similarity == pytest.approx(cosine if joins else 1.0, abs=1e-6)
    assert clusters.counts.tolist() == ([4] if joins else [3, 1])


def test_the_nearest_of_several_centroids_wins_and_moves_towards_the_track() -> None:
    clusters = OnlineClusters([1, 2], np.stack([_basis(0), _basis(1)]), np.array([1, 1]), 0.45)
    probe = _unit(0.6 * _basis(0) + 0.8 * _basis(1))  # 0.6 to cluster 1, 0.8 to cluster 2
    a = clusters.assign(probe)
    assert (a.key, round(a.similarity, 4)) == (2, 0.8)
    np.testing.assert_allclose(clusters.centroids()[1], _unit(_basis(1) + probe), atol=1e-6)  # the sum's direction
    np.testing.assert_allclose(clusters.centroids()[0], _basis(0), atol=1e-6)  # the other did not move


def test_new_clusters_get_keys_minus_one_two_in_creation_order_and_later_tracks_join_them() -> None:
    clusters = OnlineClusters([], np.zeros((0, 0)), np.zeros(0, np.int64))
    got = [clusters.assign(v) for v in (_basis(0), _basis(1), _unit(_basis(0) + 0.1 * _basis(2)), _basis(3))]
    assert [(a.key, a.created) for a in got] == [(-1, True), (-2, True), (-1, False), (-3, True)]


def test_an_open_set_stream_gives_one_cluster_per_person_in_any_order() -> None:
    """Eight people, each seen in 6 tracks whose vectors lie at cosine 0.8 from the person's own direction
    (random directions in 128-d are nearly orthogonal: people at cosine ~0); tracks arrive shuffled."""
    rng = np.random.default_rng(3)
    people = _unit(rng.standard_normal((8, 128)))
    tracks = [(p, _around(people[p], 0.8, rng)) for p in range(8) for _ in range(6)]
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(len(tracks))
        clusters = OnlineClusters([], np.zeros((0, 0)), np.zeros(0, np.int64))
        assigned: dict[int, set[int]] = {}
        for i in order:
            person, vector = tracks[i]
            assigned.setdefault(clusters.assign(vector).key, set()).add(person)
        assert len(clusters) == 8 and all(len(p) == 1 for p in assigned.values()), (seed, assigned)


def test_assign_refuses_a_vector_of_another_dimension() -> None:
    clusters = OnlineClusters([1], _basis(0)[None, :], np.array([1]))
    with pytest.raises(ValueError, match=r"expected a \(32,\) vector"):
        clusters.assign(np.ones(16, np.float32))
    with pytest.raises(ValueError, match="keys must be distinct"):
        OnlineClusters([1, 1], np.stack([_basis(0), _basis(1)]), np.array([1, 1]))


# ----------------------------------------------------------------- track vector


def test_track_vector_averages_the_best_faces_by_quality() -> None:
    good, bad = _basis(0), _basis(1)
    vectors = np.stack([bad, good * 3, good, bad])
    tv = track_vector(vectors, np.array([0.1, 0.9, 0.8, 0.2]), best=2, min_faces=2)
    np.testing.assert_allclose(tv.vector, good, atol=1e-6)  # the two low-quality faces are left out
    assert (tv.faces, tv.reason) == (2, None) and tv.consistency == pytest.approx(1.0)


@pytest.mark.parametrize(("n", "cos", "min_faces", "reason"), [
    (1, 0.9, 2, "few_faces"),  # one face is not enough by default
    (1, 0.9, 1, None),
    (5, 0.9, 2, None),  # faces of one person agree
    (5, 0.0, 2, "inconsistent"),  # orthogonal faces (different people): norm of the mean sqrt(1/5) = 0.45
])
def test_track_vector_rejects_few_or_disagreeing_faces(n: int, cos: float, min_faces: int, reason: str | None) -> None:
    rng = np.random.default_rng(0)
    if cos > 0:
        vectors = np.stack([_around(_basis(0), cos, rng) for _ in range(n)])
    else:
        vectors = np.stack([_basis(i) for i in range(n)])
    tv = track_vector(vectors, np.ones(n), best=5, min_faces=min_faces, min_consistency=0.6)
    assert tv.reason == reason and (tv.vector is None) == (reason is not None)


# ----------------------------------------------------------------- consolidation


def test_consolidation_merges_drifted_clusters_into_the_oldest() -> None:
    rng = np.random.default_rng(1)
    a, b = _basis(0), _basis(5)
    centroids = np.stack([a, b, _around(a, 0.8, rng), _basis(9), _around(b, 0.7, rng)])
    assert consolidate(centroids, 0.45) == [[0, 2], [1, 4]]


def test_consolidation_uses_average_linkage_so_a_chain_does_not_join_two_people() -> None:
    """x ~ y at 0.5 and y ~ z at 0.5, but x and z are different people (cosine 0): single linkage would join all
    three; average linkage merges one pair and leaves z, whose average similarity to that pair is 0.25."""
    x = _basis(0)
    z = _basis(1)
    y = _unit(0.5 * x + 0.5 * z + np.sqrt(0.5) * _basis(2))  # cosine 0.5 to both x and z
    groups = consolidate(np.stack([x, y, z]), 0.45)
    assert len(groups) == 1 and len(groups[0]) == 2 and set(groups[0]) < {0, 1, 2}


def test_consolidation_of_fewer_than_two_clusters_is_empty() -> None:
    assert consolidate(np.zeros((0, D))) == [] and consolidate(_basis(0)[None, :]) == []


# ----------------------------------------------------------------- the real asset faces


@pytest.fixture(scope="module")
def analyzer(models: Path) -> FaceAnalyzer:
    cfg = FaceConfig(detector=OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"),
                     embedder=OnnxFaceEmbedderConfig(path=models / "mobilefacenet_128d.onnx"))
    return FaceAnalyzer(cfg, SessionOptions(threads=1))


def _track_of(analyzer: FaceAnalyzer, image: np.ndarray, source: str) -> np.ndarray:
    """A track of one photo: its face at three sizes (a person walking closer), as the track vector."""
    faces = []
    for scale in (1.0, 0.7, 0.5):
        img = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale != 1.0 else image
        faces.append(enrollment_embedding(analyzer, img, source)[0])
    tv = track_vector(np.stack(faces), np.ones(len(faces)))
    assert tv.vector is not None, (source, tv)
    return tv.vector


def test_the_asset_faces_of_people_nobody_enrolled_give_one_cluster_per_person(analyzer: FaceAnalyzer, faces: Path) -> None:
    """Every single-person asset photo (5 people, 2-5 photos each) is one track; the six strangers of the group
    photo t1.jpg are one track each. In every shuffled order: one cluster per person, no cluster with two."""
    tracks: list[tuple[str, np.ndarray]] = []
    for folder in sorted(p for p in faces.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for f in sorted(folder.iterdir()):
            tracks.append((folder.name, _track_of(analyzer, cv2.imread(str(f)), str(f))))
    group = cv2.imread(str(faces / "_multi" / "t1.jpg"))
    strangers = analyzer.analyze(group)
    assert len(strangers) == 6
    tracks += [(f"t1-{i}", f.embedding) for i, f in enumerate(strangers)]
    people = {p for p, _ in tracks}
    assert len(people) == 11
    for seed in range(10):
        clusters = OnlineClusters([], np.zeros((0, 0)), np.zeros(0, np.int64), CLUSTER_THRESHOLD)
        members: dict[int, set[str]] = {}
        for i in np.random.default_rng(seed).permutation(len(tracks)):
            person, vector = tracks[i]
            members.setdefault(clusters.assign(vector).key, set()).add(person)
        assert sorted(len(m) for m in members.values()) == [1] * 11, (seed, members)
        assert len(members) == len(people)
        assert consolidate(clusters.centroids(), CLUSTER_THRESHOLD) == []  # nothing left to merge


def test_consolidation_per_linked_component_equals_one_global_fit() -> None:
    """The component-wise fit (memory O(1024 k)) merges exactly what one global scikit-learn fit merges."""
    from sklearn.cluster import AgglomerativeClustering

    rng = np.random.default_rng(7)
    people = _unit(rng.standard_normal((40, D)))
    centroids = np.stack([_around(people[i % 40], 0.8, rng) for i in range(150)])
    labels = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                     distance_threshold=1 - 0.45).fit_predict(centroids)
    expected = sorted((sorted(np.flatnonzero(labels == lab).tolist()) for lab in np.unique(labels)
                       if (labels == lab).sum() > 1), key=lambda g: g[0])
    assert consolidate(centroids, 0.45) == expected and len(expected) > 10
