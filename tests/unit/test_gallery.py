"""Gallery templates, open-set matching and enrollment: synthetic vectors and the real face set."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import FaceConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig
from stages.face import FaceAnalyzer
from stages.gallery import EnrollmentError, Gallery, Match, enrollment_embedding, identify
from stages.runtime import SessionOptions

THRESHOLD = FaceConfig.model_fields["match_threshold"].default
FaceSet = tuple[list[str], list[str], np.ndarray]  # identity, file, embedding row per image
D = 16


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _basis(i: int, d: int = D) -> np.ndarray:
    e = np.zeros(d, np.float32)
    e[i] = 1.0
    return e


def _at_cosine(c: float, a: int = 0, b: int = 1) -> np.ndarray:
    """A unit vector with cosine similarity ``c`` to basis vector ``a``."""
    return (c * _basis(a) + np.sqrt(1 - c * c) * _basis(b)).astype(np.float32)


def _around(center: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at cosine ``cos`` from ``center`` in a random direction."""
    r = rng.standard_normal(center.shape[0])
    r -= (r @ center) * center
    r /= np.linalg.norm(r)
    return (cos * center + np.sqrt(1 - cos * cos) * r).astype(np.float32)


# --- synthetic vectors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cosine", "threshold", "expected"),
    [
        (0.95, 0.40, "alice"),
        (0.41, 0.40, "alice"),
        (0.39, 0.40, None),
        (0.10, 0.40, None),
        (-0.50, 0.40, None),
        (0.50, 0.60, None),
        (0.50, -1.00, "alice"),
    ],
)
def test_open_set_threshold(cosine: float, threshold: float, expected: str | None) -> None:
    g = Gallery(["alice"], _basis(0)[None, :], threshold=threshold)
    (m,) = g.match(_at_cosine(cosine)[None, :])
    assert m.identity == expected
    assert m.similarity == pytest.approx(cosine, abs=1e-5)


def test_best_identity_wins_and_probes_are_normalised() -> None:
    g = Gallery(["alice", "bob", "carol"], np.stack([_basis(0), _basis(1), _basis(2)]) * 7.0)
    probes = np.stack([3 * _basis(0) + 1 * _basis(1), 1 * _basis(0) + 3 * _basis(1), _basis(3) * 10])
    got = g.match(probes)
    assert [m.identity for m in got] == ["alice", "bob", None]
    assert got[0].similarity == pytest.approx(3 / np.sqrt(10), abs=1e-5)
    assert got[2].similarity == pytest.approx(0.0, abs=1e-6)


def test_template_is_normalised_mean_per_identity() -> None:
    rows = np.stack([_basis(0), _basis(1), _basis(2) * 5])
    g = Gallery(["alice", "alice", "bob"], rows)
    assert g.identities == ("alice", "bob") and len(g) == 2 and g.dim == D
    np.testing.assert_allclose(g.templates[0], _unit(_basis(0) + _basis(1)), atol=1e-6)
    np.testing.assert_allclose(g.templates[1], _basis(2), atol=1e-6)
    with pytest.raises(ValueError):
        g.templates[0, 0] = 1.0  # immutable


def test_outlier_enrollment_embedding_is_rejected() -> None:
    rng = np.random.default_rng(1)
    center = _basis(0)
    genuine = [_around(center, c, rng) for c in (0.9, 0.85, 0.8, 0.75)]
    impostor = _basis(5)  # another person: cosine ~0 to everyone else
    rows = np.stack([genuine[0], genuine[1], impostor, genuine[2], genuine[3]])
    g = Gallery(["alice"] * 5, rows)
    assert g.rejected == (2,)
    np.testing.assert_allclose(g.templates[0], _unit(np.sum(genuine, axis=0)), atol=1e-5)
    # without rejection the impostor drags the template towards itself
    g_all = Gallery(["alice"] * 5, rows, outlier_margin=None)
    assert g_all.rejected == ()
    assert float(g_all.templates[0] @ impostor) > float(g.templates[0] @ impostor) + 0.1


def test_genuine_spread_is_not_rejected() -> None:
    rng = np.random.default_rng(2)
    center = _basis(0)
    # same-person spread as seen on the real face set: cosine 0.6-0.95 to the identity's direction
    rows = np.stack([_around(center, c, rng) for c in (0.95, 0.9, 0.8, 0.7, 0.6)])
    assert Gallery(["bob"] * 5, rows).rejected == ()


@pytest.mark.parametrize("n_rows", [1, 2])
def test_one_or_two_rows_are_all_kept(n_rows: int) -> None:
    rows = np.stack([_basis(0), _basis(1)])[:n_rows]  # even when orthogonal
    g = Gallery(["x"] * n_rows, rows)
    assert g.rejected == ()
    np.testing.assert_allclose(g.templates[0], _unit(rows.sum(axis=0)), atol=1e-6)


def test_rejection_keeps_at_least_half() -> None:
    # three people under one name: the median rule cannot drop the majority
    rows = np.stack([_basis(0), _basis(0), _basis(1), _basis(2)])
    assert len(Gallery(["x"] * 4, rows).rejected) <= 2


@pytest.mark.parametrize(
    "gallery",
    [Gallery([], np.zeros((0, 128), np.float32)), Gallery([], np.zeros((0,), np.float32))],
    ids=["empty-128", "empty-no-dim"],
)
def test_empty_gallery_gives_all_unknown(gallery: Gallery) -> None:
    assert len(gallery) == 0
    got = gallery.match(np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32))
    assert got == [Match(None, 0.0)] * 3


def test_dimension_mismatch_names_both_dimensions() -> None:
    g = Gallery(["alice"], _basis(0, 128)[None, :], model_name="mobilefacenet_128d")
    with pytest.raises(ValueError, match=r"dimension 512 .* dimension 128.*enrolled with another .*mobilefacenet_128d"):
        g.match(np.ones((1, 512), np.float32))


@pytest.mark.parametrize(
    ("names", "rows", "message"),
    [
        (["a", "b"], np.zeros((1, D), np.float32), "2 names but 1 embedding rows"),
        (["a"], np.zeros((D,), np.float32), r"expected a \(k, d\) array"),
        (["a"], np.full((1, D), np.nan, np.float32), "NaN"),
        ([""], np.ones((1, D), np.float32), "non-empty"),
    ],
    ids=["row-count", "1-d", "nan", "empty-name"],
)
def test_gallery_rejects_bad_input(names: list[str], rows: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Gallery(names, rows)


def test_match_rejects_1d_probe() -> None:
    with pytest.raises(ValueError, match=r"\(m, d\)"):
        Gallery(["a"], _basis(0)[None, :]).match(_basis(0))


# --- real images and models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def analyzer(models: Path) -> FaceAnalyzer:
    cfg = FaceConfig(
        detector=OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"),
        embedder=OnnxFaceEmbedderConfig(path=models / "mobilefacenet_128d.onnx"),
    )
    return FaceAnalyzer(cfg, SessionOptions(threads=1))


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path))
    assert img is not None, f"cannot read {path}"
    return img


@pytest.fixture(scope="module")
def face_set(analyzer: FaceAnalyzer, faces: Path) -> FaceSet:
    """(identity, file, embedding row) of every single-person image, via enrollment."""
    names, files, rows = [], [], []
    for folder in sorted(p for p in faces.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for f in sorted(folder.iterdir()):
            emb, _ = enrollment_embedding(analyzer, _read(f), str(f))
            names.append(folder.name)
            files.append(f"{folder.name}/{f.name}")
            rows.append(emb)
    assert len(rows) >= 14
    return names, files, np.stack(rows)


def test_leave_one_out_separates_genuine_from_impostor(face_set: FaceSet) -> None:
    """Each image against a gallery of all the others: its own identity above the threshold, every other below."""
    names, files, rows = face_set
    genuine, impostor = [], []
    for i in range(len(names)):
        others = [j for j in range(len(names)) if j != i]
        g = Gallery([names[j] for j in others], rows[others], threshold=THRESHOLD)
        sims = g.similarities(rows[i : i + 1])[0]
        for ident, s in zip(g.identities, sims):
            (genuine if ident == names[i] else impostor).append((float(s), files[i], ident))
        assert g.match(rows[i : i + 1])[0].identity == names[i], files[i]
    low = min(genuine)
    high = max(impostor)
    print(f"\nleave-one-out genuine min {low[0]:.3f} ({low[1]}), impostor max {high[0]:.3f} ({high[1]} vs {high[2]})")
    assert low[0] >= THRESHOLD, low
    assert high[0] < THRESHOLD, high


def test_pairwise_same_person_above_and_different_person_below(face_set: FaceSet) -> None:
    names, files, rows = face_set
    sims = rows @ rows.T
    n = len(names)
    same = [(float(sims[i, j]), files[i], files[j]) for i in range(n) for j in range(i + 1, n) if names[i] == names[j]]
    diff = [(float(sims[i, j]), files[i], files[j]) for i in range(n) for j in range(i + 1, n) if names[i] != names[j]]
    print(f"\npairs: same-person min {min(same)[0]:.3f} mean {np.mean([s for s, *_ in same]):.3f}; "
          f"different-person max {max(diff)[0]:.3f}")
    assert min(same)[0] >= THRESHOLD, min(same)
    assert max(diff)[0] < THRESHOLD, max(diff)


def test_obama_and_biden_are_named_and_the_third_face_is_unknown(analyzer: FaceAnalyzer, faces: Path) -> None:
    e_obama, _ = enrollment_embedding(analyzer, _read(faces / "obama/obama.jpg"), "obama.jpg")
    e_biden, _ = enrollment_embedding(analyzer, _read(faces / "biden/biden.jpg"), "biden.jpg")
    g = Gallery(["obama", "biden"], np.stack([e_obama, e_biden]), threshold=THRESHOLD)
    found = identify(analyzer, g, _read(faces / "_multi/obama_and_biden.jpg"))
    assert len(found) == 3
    by_name = {f.identity: f for f in found}
    assert set(by_name) == {"obama", "biden", None}
    assert by_name["obama"].similarity >= THRESHOLD and by_name["biden"].similarity >= THRESHOLD
    assert by_name[None].similarity < THRESHOLD
    # in the photo Biden stands left of Obama
    assert by_name["biden"].xyxy[2] < by_name["obama"].xyxy[0]


def test_kit_and_rose_are_named_in_their_joint_photo(analyzer: FaceAnalyzer, faces: Path, face_set: FaceSet) -> None:
    names, _, rows = face_set
    found = identify(analyzer, Gallery(names, rows, threshold=THRESHOLD), _read(faces / "_multi/kit_with_rose.jpg"))
    assert sorted(f.identity for f in found) == ["kit_harington", "rose_leslie"]


def test_no_face_of_t1_matches_any_enrolled_identity(analyzer: FaceAnalyzer, faces: Path, face_set: FaceSet) -> None:
    names, _, rows = face_set
    g = Gallery(names, rows, threshold=THRESHOLD)
    assert len(g) == 5 and g.rejected == ()
    found = identify(analyzer, g, _read(faces / "_multi/t1.jpg"))
    assert len(found) == 6
    assert [f.identity for f in found] == [None] * 6, [(f.identity, round(f.similarity, 3)) for f in found]


def test_mislabelled_enrollment_image_is_rejected(face_set: FaceSet) -> None:
    names, files, rows = face_set
    idx = [i for i, n in enumerate(names) if n == "obama"] + [files.index("biden/biden.jpg")]
    g = Gallery(["obama"] * len(idx), rows[idx])
    assert g.rejected == (len(idx) - 1,)  # the Biden photo filed under Obama


def test_enrollment_returns_the_single_face(analyzer: FaceAnalyzer, faces: Path) -> None:
    img = _read(faces / "kun/kun.jpg")
    emb, face = enrollment_embedding(analyzer, img, "kun.jpg")
    assert emb.shape == (128,) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb, face.embedding)
    crop_emb, _ = enrollment_embedding(analyzer, _read(faces / "kun/kun_crop.jpg"), "kun_crop.jpg")
    assert float(emb @ crop_emb) > 0.9  # the crop is the same photo


@pytest.mark.parametrize(
    "image",
    [np.zeros((480, 640, 3), np.uint8), np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8)],
    ids=["blank", "noise"],
)
def test_enrollment_without_a_face_fails(analyzer: FaceAnalyzer, image: np.ndarray) -> None:
    with pytest.raises(EnrollmentError, match=r"^blank-or-noise\.jpg: no face found"):
        enrollment_embedding(analyzer, image, "blank-or-noise.jpg")


def test_enrollment_with_several_faces_fails(analyzer: FaceAnalyzer, faces: Path) -> None:
    with pytest.raises(EnrollmentError, match=r"^t1\.jpg: 6 faces found and none dominates"):
        enrollment_embedding(analyzer, _read(faces / "_multi/t1.jpg"), "t1.jpg")


def test_identify_on_empty_gallery_and_faceless_image(analyzer: FaceAnalyzer, faces: Path) -> None:
    found = identify(analyzer, Gallery([], np.zeros((0, 128), np.float32)), _read(faces / "_multi/kit_with_rose.jpg"))
    assert len(found) == 2 and all(f.identity is None for f in found)
    g = Gallery(["x"], np.ones((1, 128), np.float32))
    assert identify(analyzer, g, np.zeros((200, 200, 3), np.uint8)) == []


def test_gallery_from_another_model_is_a_clear_error(analyzer: FaceAnalyzer, faces: Path) -> None:
    g = Gallery(["someone"], np.ones((1, 512), np.float32), model_name="w600k_r50")
    with pytest.raises(ValueError, match="dimension 128 but the gallery has dimension 512"):
        identify(analyzer, g, _read(faces / "kun/kun.jpg"))
