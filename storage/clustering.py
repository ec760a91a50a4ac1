"""Open-set clustering of unknown faces: pure numpy and scikit-learn, no database.

Faces of people nobody enrolled are grouped into anonymous identities (``unknown-<n>``) as tracks end, one
vote per track (:func:`track_vector`). The method has two parts:

- **online assignment** (:class:`OnlineClusters`), the *leader* / nearest-centroid rule of sequential
  clustering (Hartigan 1975, "Clustering Algorithms", ch. 3; the "leader" algorithm): a track's embedding
  joins the cluster whose centroid is most similar (cosine) if that similarity reaches ``threshold``,
  else it starts a new cluster. A centroid is the normalised sum of its members' unit vectors, so it
  moves with every member and no member is ever stored twice.
- **consolidation** (:func:`consolidate`): scikit-learn's ``AgglomerativeClustering`` (metric ``cosine``,
  ``linkage="average"``, ``distance_threshold = 1 - merge_threshold``, ``n_clusters=None``) over the
  centroids finds groups of clusters whose centroids drifted together (a person first seen in poor light
  started a second cluster that later tracks pulled towards the first); each group is merged into its
  oldest cluster.

Why this suits an open-set stream (and why not k-means or HDBSCAN):

- the number of people is unknown and grows as new people arrive: the leader rule needs no ``k`` and
  opens a cluster the moment a face fits none;
- a person seen once is a valid identity: every track that passes the gate gets a cluster, while HDBSCAN
  would call a one-track person noise (``min_cluster_size >= 2``) and, refitted as data arrives, relabels
  its clusters from run to run, so ids would not persist; the leader rule never relabels a cluster that
  exists (ids are stable across tracks, cameras and runs: the state is only centroids and counts);
- assignment costs one ``(k, d)`` matrix-vector product per track, so it runs inside the storage
  process's write transaction;
- noise is rejected before clustering: only quality-gated faces reach storage, a track needs
  ``min_faces`` of them, and a track whose faces disagree (the norm of the mean of their unit vectors, which
  is ``sqrt(1/n + (1 - 1/n) * mean pairwise cosine)``, below ``min_consistency``: several people in one
  track, or bad crops) is not clustered at all;
- average linkage (not single) in consolidation does not chain: two groups merge only when their
  centroids are similar *on average*, so one borderline pair cannot join two people.

Thresholds are cosine similarities in the gallery's embedding space. The default for both is the match
threshold (``recognition.face.match_threshold``, 0.50; :data:`CLUSTER_THRESHOLD` here): a track joins a
cluster only at a similarity that would name it, as naming the cluster later names all of its tracks, and
never looser, because two people in one cluster is worse than one person in two (merged later by
consolidation or by ``facepro identities merge``). Measured with ``scripts/eval_unknowns.py`` on 1595 LFW news
photos of 598 people, one photo a track (SCRFD-500M + MobileFaceNet, mean of 5 orders; README "Unknown
faces"): 0.45 left 5.2 clusters holding two people, 0.50 one (a look-alike the match threshold names too,
0.55 to the other's centroid), 0.55 the same one while splitting more people (1.16 clusters a person against
1.07), 0.60 none at 1.36. On the asset faces same-person photos score 0.58-0.99 and different people at most
0.31 (one cluster each from 0.40 to 0.55).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Default cosine similarity a track needs to its nearest centroid to join that cluster (the default
#: ``recognition.face.match_threshold``; see the module docstring).
CLUSTER_THRESHOLD = 0.50


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.maximum(n, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class TrackVector:
    """The one embedding a track contributes to clustering.

    Attributes:
        vector: ``(d,) float32`` unit vector, or None when the track is not clustered.
        faces: faces averaged into it.
        consistency: norm of the mean of the chosen faces' unit vectors, in [0, 1] (1: identical faces).
        reason: why ``vector`` is None: ``"few_faces"`` or ``"inconsistent"``; None when it is set.
    """

    vector: np.ndarray | None
    faces: int
    consistency: float
    reason: str | None = None


def track_vector(vectors: np.ndarray, qualities: np.ndarray, best: int = 5, min_faces: int = 2,
                 min_consistency: float = 0.6) -> TrackVector:
    """The track-level face embedding: the normalised mean of its ``best`` highest-quality faces.

    Args:
        vectors: ``(n, d) float32`` face embeddings of one track (normalised here).
        qualities: ``(n,)`` quality of each face (the detector score), higher is better; ties keep input order.
        best: at most this many faces are averaged (>= 1).
        min_faces: fewer faces than this: not clustered (``reason="few_faces"``).
        min_consistency: the mean's norm below this: not clustered (``reason="inconsistent"``).

    Raises:
        ValueError: ``vectors`` not 2-D, or a row count different from ``qualities``, or ``best < 1``.
    """
    v = np.asarray(vectors, np.float32)
    q = np.asarray(qualities, np.float64)
    if v.ndim != 2 or q.shape != (v.shape[0],):
        raise ValueError(f"track_vector: expected (n, d) vectors and (n,) qualities, got {v.shape} and {q.shape}")
    if best < 1:
        raise ValueError(f"track_vector: best must be >= 1, got {best}")
    if v.shape[0] < max(1, min_faces):
        return TrackVector(None, int(v.shape[0]), 0.0, "few_faces")
    chosen = np.argsort(-q, kind="stable")[:best]
    mean = _unit(v[chosen]).mean(axis=0)
    consistency = float(np.linalg.norm(mean))
    if consistency < min_consistency:
        return TrackVector(None, len(chosen), consistency, "inconsistent")
    return TrackVector(_unit(mean), len(chosen), consistency)


@dataclass(frozen=True)
class Assignment:
    """Where one track went.

    Attributes:
        key: the cluster's key (an existing one, or the new key :meth:`OnlineClusters.assign` gave it).
        similarity: cosine similarity to the centroid it joined (before joining; 1.0 for a new cluster).
        created: True when the track started a new cluster.
    """

    key: int
    similarity: float
    created: bool


class OnlineClusters:
    """Leader (nearest-centroid) clustering of unit vectors with a cosine threshold; see the module docstring.

    Args:
        keys: ``k`` distinct integer keys of the existing clusters (database ids: positive).
        sums: ``(k, d)`` sum of each cluster's member unit vectors (``(0, d)`` or ``(0, 0)`` for none).
        counts: ``(k,)`` members of each cluster.
        threshold: cosine similarity to the nearest centroid needed to join it.

    New clusters get keys -1, -2, ... in creation order (the caller maps them to database ids). One assignment
    costs one ``(k, d)`` float32 matrix-vector product; the unit centroids are kept, and only the row a track
    joins is renormalised.

    Raises:
        ValueError: shapes that disagree, or repeated keys.
    """

    def __init__(self, keys: list[int], sums: np.ndarray, counts: np.ndarray, threshold: float = CLUSTER_THRESHOLD) -> None:
        s = np.asarray(sums, np.float64)
        if s.size == 0:
            s = s.reshape(0, s.shape[1] if s.ndim == 2 else 0)
        c = np.asarray(counts, np.int64)
        if s.ndim != 2 or s.shape[0] != len(keys) or c.shape != (len(keys),):
            raise ValueError(f"OnlineClusters: {len(keys)} keys, sums {s.shape}, counts {c.shape}")
        if len(set(keys)) != len(keys):
            raise ValueError("OnlineClusters: keys must be distinct")
        self.threshold = float(threshold)
        self.keys = list(keys)
        self._sums = s.copy()
        self._counts = c.copy()
        self._unit = _unit(s) if len(keys) else np.zeros((0, s.shape[1]), np.float32)
        self._n = len(keys)
        self._next_new = -1

    def __len__(self) -> int:
        return self._n

    @property
    def sums(self) -> np.ndarray:
        """``(k, d) float64`` member sums, in :attr:`keys` order."""
        return self._sums[: self._n]

    @property
    def counts(self) -> np.ndarray:
        """``(k,) int64`` members, in :attr:`keys` order."""
        return self._counts[: self._n]

    def centroids(self) -> np.ndarray:
        """``(k, d) float32`` unit centroids, in :attr:`keys` order."""
        return self._unit[: self._n]

    def _grow(self, d: int) -> None:
        if self._sums.shape[1] != d:  # the first cluster fixes d
            self._sums, self._unit = np.zeros((0, d)), np.zeros((0, d), np.float32)
        cap = max(16, 2 * self._sums.shape[0])
        self._sums = np.vstack([self._sums, np.zeros((cap - self._sums.shape[0], d))])
        self._unit = np.vstack([self._unit, np.zeros((cap - self._unit.shape[0], d), np.float32)])
        self._counts = np.concatenate([self._counts, np.zeros(cap - self._counts.shape[0], np.int64)])

    def assign(self, vector: np.ndarray) -> Assignment:
        """Put one track's ``(d,)`` embedding (normalised here) into a cluster and update that centroid.

        Raises:
            ValueError: ``vector`` is not 1-D or its dimension differs from the clusters'.
        """
        v = np.asarray(vector, np.float64)
        if v.ndim != 1 or (self._n and v.shape[0] != self._sums.shape[1]):
            raise ValueError(f"assign: expected a ({self._sums.shape[1] if self._n else 'd'},) vector, got {v.shape}")
        v = v / max(float(np.linalg.norm(v)), 1e-12)
        if self._n:
            sims = np.einsum("ij,j->i", self._unit[: self._n], v.astype(np.float32))  # no BLAS threads: no wake-up per call
            best = int(np.argmax(sims))
            if sims[best] >= self.threshold:
                self._sums[best] += v
                self._counts[best] += 1
                self._unit[best] = _unit(self._sums[best])
                return Assignment(self.keys[best], float(sims[best]), False)
        if self._n == self._sums.shape[0] or self._sums.shape[1] != v.shape[0]:
            self._grow(v.shape[0])
        key = self._next_new
        self._next_new -= 1
        self.keys.append(key)
        self._sums[self._n], self._counts[self._n], self._unit[self._n] = v, 1, v.astype(np.float32)
        self._n += 1
        return Assignment(key, 1.0, True)


def _linked_components(unit: np.ndarray, threshold: float, chunk: int = 1024) -> np.ndarray:
    """Connected components (label per row) of the graph linking rows whose cosine similarity exceeds
    ``threshold``, computed ``chunk`` rows at a time (memory ``chunk x k``, never ``k x k``)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    k = unit.shape[0]
    rows, cols = [], []
    for start in range(0, k, chunk):
        sims = unit[start:start + chunk] @ unit.T
        i, j = np.nonzero(sims > threshold)
        keep = start + i < j  # each pair once, no self-links
        rows.append(start + i[keep])
        cols.append(j[keep])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(r.shape[0], np.int8), (r, c)), shape=(k, k))
    return connected_components(graph, directed=False)[1]


def consolidate(centroids: np.ndarray, merge_threshold: float = CLUSTER_THRESHOLD) -> list[list[int]]:
    """Groups of clusters to merge: average-linkage agglomerative clustering of the centroids.

    Args:
        centroids: ``(k, d)`` cluster centroids (normalised here), oldest cluster first.
        merge_threshold: clusters merge while the average cosine similarity between the groups' centroids
            is above this (scikit-learn ``AgglomerativeClustering(metric="cosine", linkage="average",
            distance_threshold=1 - merge_threshold, n_clusters=None)``).

    Returns:
        Lists of row indices (ascending) with at least two members, ordered by their first index; rows in no
        list stay as they are. Merge each list into its first (oldest) row.

    Cost: two groups can only reach an average similarity above the threshold if some pair across them is
    above it, so the agglomerative step runs on each connected component of the "similarity above the
    threshold" graph separately (the same result as on all rows at once); the graph is built in chunks. Memory
    stays ``O(1024 k)`` instead of the ``O(k^2)`` distance matrix of one global fit.
    """
    c = np.asarray(centroids, np.float64)
    if c.ndim != 2 or c.shape[0] < 2:
        return []
    from sklearn.cluster import AgglomerativeClustering

    unit = _unit(c)
    components = _linked_components(unit, float(merge_threshold))
    groups: list[list[int]] = []
    for comp in np.unique(components):
        idx = np.flatnonzero(components == comp)
        if idx.shape[0] < 2:
            continue
        labels = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                         distance_threshold=1.0 - float(merge_threshold)).fit_predict(unit[idx])
        for label in np.unique(labels):
            members = idx[labels == label]
            if members.shape[0] > 1:
                groups.append(sorted(int(i) for i in members))
    return sorted(groups, key=lambda g: g[0])
