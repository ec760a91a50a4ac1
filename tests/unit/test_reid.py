"""Person Re-ID (OSNet) on the real one-by-one video, TrackReid aggregation and track linking."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import OnnxDetectorConfig
from stages.detector import ObjectDetector
from stages.reid import (
    DEFAULT_LINK_THRESHOLD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_HW,
    OnnxReidConfig,
    ReidEmbedder,
    ReidLink,
    TrackReid,
    clip_boxes,
    link_tracks,
)
from stages.runtime import ModelError, SessionOptions

ONE_THREAD = SessionOptions(threads=1)

#: The six different people of one-by-one-person-detection.mp4 (asset README), video frames.
PEOPLE = ((75, 190), (250, 440), (525, 690), (750, 860), (925, 1190), (1250, 1360))
FRAMES_PER_PERSON = 10


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def embedder(models: Path) -> ReidEmbedder:
    return ReidEmbedder(models / "osnet_x0_25_msmt17.onnx", ONE_THREAD)


@pytest.fixture(scope="module")
def person_crops(models: Path, videos: Path, embedder: ReidEmbedder) -> dict[int, np.ndarray]:
    """Per person: ``(10, 512)`` embeddings of the largest person box in 10 frames of their walk, in time order.

    Frames are spread over the central 70 % of each person's range (the
    person is fully in the room there); consecutive samples of one person
    are like a track's samples.
    """
    detector = ObjectDetector(OnnxDetectorConfig(path=models / "yolox_nano.onnx", layout="yolox"), ONE_THREAD)
    wanted: dict[int, int] = {}
    for person, (a, b) in enumerate(PEOPLE):
        margin = 0.15 * (b - a)
        for f in np.linspace(a + margin, b - margin, FRAMES_PER_PERSON).round().astype(int):
            wanted[int(f)] = person
    cap = cv2.VideoCapture(str(videos / "one-by-one-person-detection.mp4"))
    out: dict[int, list[np.ndarray]] = {p: [] for p in range(len(PEOPLE))}
    try:
        for index in range(max(wanted) + 1):
            if index not in wanted:
                assert cap.grab(), f"video ended at frame {index}"
                continue
            ok, frame = cap.read()
            assert ok, f"cannot decode frame {index}"
            det = detector.detect(frame)
            assert len(det) > 0, f"no person detected in frame {index}"
            area = (det.xyxy[:, 2] - det.xyxy[:, 0]) * (det.xyxy[:, 3] - det.xyxy[:, 1])
            j = int(np.argmax(area))
            out[wanted[index]].append(embedder.embed(frame, det.xyxy[j : j + 1])[0])
    finally:
        cap.release()
    return {p: np.stack(v) for p, v in out.items()}


# ------------------------------------------------------------------ model checks


def test_model_is_checked_and_described(embedder: ReidEmbedder) -> None:
    assert embedder.dim == 512
    assert embedder.model_name == "osnet_x0_25_msmt17"


@pytest.mark.parametrize("wrong", ["mobilefacenet_128d.onnx", "yolox_nano.onnx"])
def test_wrong_model_is_a_model_error_naming_the_file(models: Path, wrong: str) -> None:
    with pytest.raises(ModelError, match=rf"Re-ID embedder model .*{wrong}.*expected \[B, 3, 256, 128\]"):
        ReidEmbedder(models / wrong, ONE_THREAD)


def test_missing_model_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"Re-ID embedder model not found: .*osnet_missing\.onnx"):
        ReidEmbedder(tmp_path / "osnet_missing.onnx")


def test_config_model_defaults() -> None:
    cfg = OnnxReidConfig(path=Path("m.onnx"))
    assert (cfg.type, cfg.link_threshold, cfg.every_n_frames) == ("onnx", DEFAULT_LINK_THRESHOLD, 5)
    with pytest.raises(ValueError):
        OnnxReidConfig(path=Path("m.onnx"), link_threshold=1.5)


# ------------------------------------------------------------------ preprocessing


def test_preprocess_is_rgb_imagenet_normalised(embedder: ReidEmbedder) -> None:
    frame = np.zeros((100, 60, 3), np.uint8)
    frame[..., 0] = 255  # pure blue in BGR
    batch = embedder.preprocess(frame, np.array([[0, 0, 60, 100]], np.float32))
    assert batch.shape == (1, 3, *INPUT_HW) and batch.dtype == np.float32
    expected = (np.array([0.0, 0.0, 1.0], np.float32) - IMAGENET_MEAN) / IMAGENET_STD  # R, G, B
    np.testing.assert_allclose(batch[0].mean(axis=(1, 2)), expected, atol=1e-5)
    np.testing.assert_allclose(batch[0].std(axis=(1, 2)), 0, atol=1e-5)


def test_crop_uses_xyxy_pixel_coordinates(embedder: ReidEmbedder) -> None:
    """A box of a frame embeds like the same pixels cut out by hand (x along width, y along height)."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    x1, y1, x2, y2 = 40, 30, 110, 190
    by_box = embedder.embed(frame, np.array([[x1, y1, x2, y2]], np.float32))
    by_hand = embedder.embed(np.ascontiguousarray(frame[y1:y2, x1:x2]), np.array([[0, 0, x2 - x1, y2 - y1]], np.float32))
    np.testing.assert_allclose(by_box, by_hand, atol=1e-5)
    swapped = embedder.embed(frame, np.array([[y1, x1, y2, x2]], np.float32))
    assert float(by_box[0] @ swapped[0]) < 0.999


def test_boxes_are_clipped_and_bad_input_rejected(embedder: ReidEmbedder) -> None:
    frame = np.full((100, 80, 3), 128, np.uint8)
    np.testing.assert_array_equal(clip_boxes(np.array([[-10.5, 5.2, 90.0, 99.1]]), (100, 80)), [[0, 5, 80, 100]])
    inside = embedder.embed(frame, np.array([[0, 0, 80, 100]], np.float32))
    outside_part = embedder.embed(frame, np.array([[-20, -20, 100, 130]], np.float32))
    np.testing.assert_allclose(inside, outside_part, atol=1e-5)
    assert embedder.embed(frame, np.zeros((0, 4), np.float32)).shape == (0, 512)
    with pytest.raises(ValueError, match="box 1 .* has no pixel inside the 80x100 frame"):
        embedder.embed(frame, np.array([[0, 0, 10, 10], [200, 0, 240, 50]], np.float32))
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        embedder.embed(frame, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        embedder.embed(frame.astype(np.float32), np.zeros((0, 4), np.float32))


# ------------------------------------------------------------------ real video


def test_embeddings_are_unit_512_float32(person_crops: dict[int, np.ndarray]) -> None:
    for emb in person_crops.values():
        assert emb.shape == (FRAMES_PER_PERSON, 512) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_same_person_crops_are_more_similar_than_different_people(person_crops: dict[int, np.ndarray]) -> None:
    n = len(PEOPLE)
    mean_sim = np.zeros((n, n))
    for p in range(n):
        for q in range(n):
            s = person_crops[p] @ person_crops[q].T
            mean_sim[p, q] = s[np.triu_indices(FRAMES_PER_PERSON, 1)].mean() if p == q else s.mean()
    genuine = np.diag(mean_sim)
    impostor = mean_sim[~np.eye(n, dtype=bool)]
    # measured: genuine pair means 0.96-0.99, different-people means 0.47-0.83
    assert genuine.min() > impostor.max() + 0.05, mean_sim.round(3)
    # rank-1: every crop is closest to its own person's template (built from that person's other crops)
    correct = 0
    for p in range(n):
        for k in range(FRAMES_PER_PERSON):
            templates = np.stack([_unit(np.delete(person_crops[q], k, 0).mean(0) if q == p else person_crops[q].mean(0)) for q in range(n)])
            correct += int(np.argmax(templates @ person_crops[p][k]) == p)
    assert correct >= 0.95 * n * FRAMES_PER_PERSON


def test_fragments_link_to_their_own_person_only(person_crops: dict[int, np.ndarray]) -> None:
    """Each person's walk cut in two: the second half links back to the first half, never to another person."""
    half = FRAMES_PER_PERSON // 2
    earlier = {p: _unit(e[:half].mean(0)) for p, e in person_crops.items()}
    later = {100 + p: _unit(e[half:].mean(0)) for p, e in person_crops.items()}
    links = link_tracks(later, earlier, DEFAULT_LINK_THRESHOLD)
    assert {t: link.earlier_id for t, link in links.items()} == {100 + p: p for p in person_crops}
    assert all(link.similarity >= DEFAULT_LINK_THRESHOLD for link in links.values())
    # no person is linked to another person, even with the earlier track of the right person gone
    for p in person_crops:
        others = {q: m for q, m in earlier.items() if q != p}
        assert link_tracks({100 + p: later[100 + p]}, others, DEFAULT_LINK_THRESHOLD) == {}


# ------------------------------------------------------------------ TrackReid


def test_track_reid_samples_and_mean() -> None:
    reid = TrackReid(every_n_frames=5, max_samples=3)
    assert reid.due(7, 0) and len(reid) == 0 and 7 not in reid
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(5, 8)).astype(np.float32)
    reid.add(7, rows[:2] * 3.0, frame_index=10)  # scale must not matter: samples are normalised
    assert not reid.due(7, 14) and reid.due(7, 15)
    for i in range(2, 5):
        reid.add(7, rows[i], frame_index=10 + 5 * i)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    np.testing.assert_allclose(reid.mean(7), _unit(unit.mean(0)), atol=1e-6)  # mean of all 5 samples
    assert reid.count(7) == 5 and reid.samples(7).shape == (3, 8)  # only the last 3 kept
    np.testing.assert_allclose(reid.samples(7), unit[2:], atol=1e-6)
    assert reid.track_ids == (7,) and set(reid.means()) == {7}
    np.testing.assert_allclose(reid.pop(7), _unit(unit.mean(0)), atol=1e-6)
    assert reid.pop(7) is None and len(reid) == 0
    with pytest.raises(KeyError, match="track 7 has no Re-ID sample"):
        reid.mean(7)


@pytest.mark.parametrize("settle, samples, expected_waits", [
    (None, 12, [5] * 12),                                  # no settling: every 5 frames for life
    (8, 12, [5] * 7 + [10, 20, 40, 40, 40]),               # settled at its 8th sample: the wait doubles up to 40
    (1, 4, [10, 20, 40, 40]),
])
def test_track_reid_sampling_slows_once_the_mean_has_settled(settle, samples: int, expected_waits: list) -> None:
    reid = TrackReid(every_n_frames=5, settle_samples=settle, max_interval=40)
    frame, waits = 0, []
    for _ in range(samples):
        reid.add(3, np.ones(4, np.float32), frame_index=frame)
        wait = reid.interval(3)
        assert not reid.due(3, frame + wait - 1) and reid.due(3, frame + wait)
        assert reid.settled_wait(3, frame + 5) is (wait > 5)  # a plain Re-ID frame it sits out only when settled
        waits.append(wait)
        frame += wait
    assert waits == expected_waits


def test_track_reid_rejects_bad_samples() -> None:
    reid = TrackReid()
    reid.add(1, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="4-d samples, got 3-d"):
        reid.add(1, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="finite"):
        reid.add(2, np.array([1.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="must be >= 1"):
        TrackReid(every_n_frames=0)


# ------------------------------------------------------------------ link_tracks


def _vec(*xs: float) -> np.ndarray:
    return _unit(np.array(xs, np.float32))


def test_link_needs_the_threshold() -> None:
    earlier = {1: _vec(1, 0, 0), 2: _vec(0, 1, 0)}
    new = {3: _vec(1, 0.1, 0), 4: _vec(0.5, 0.5, 0.7)}  # 4 is nobody seen before (cosine 0.5 to both)
    links = link_tracks(new, earlier, threshold=0.9)
    assert links == {3: ReidLink(3, 1, pytest.approx(float(_vec(1, 0.1, 0) @ _vec(1, 0, 0))))}
    assert link_tracks(new, earlier, threshold=0.999) == {}
    assert link_tracks({}, earlier) == {} and link_tracks(new, {}) == {}


def test_exclusive_linking_is_one_to_one() -> None:
    """Two co-visible new tracks both closest to earlier track 1: only one gets it, the other its next best."""
    earlier = {1: _vec(1, 0, 0), 2: _vec(0.8, 0.6, 0)}
    new = {10: _vec(1, 0.05, 0), 11: _vec(0.95, 0.3, 0)}
    links = link_tracks(new, earlier, threshold=0.8)
    assert {t: link.earlier_id for t, link in links.items()} == {10: 1, 11: 2}
    shared = link_tracks(new, earlier, threshold=0.8, exclusive=False)
    assert {t: link.earlier_id for t, link in shared.items()} == {10: 1, 11: 1}


def test_a_track_is_never_linked_to_itself() -> None:
    means = {1: _vec(1, 0), 2: _vec(0.99, 0.1), 3: _vec(0, 1)}
    links = link_tracks(means, means, threshold=0.9, exclusive=False)
    assert {t: link.earlier_id for t, link in links.items()} == {1: 2, 2: 1}


def test_link_rejects_mixed_dimensions() -> None:
    with pytest.raises(ValueError, match="different Re-ID models"):
        link_tracks({1: np.ones(4)}, {2: np.ones(3)})
    with pytest.raises(ValueError, match="different lengths"):
        link_tracks({1: np.ones(4), 2: np.ones(3)}, {3: np.ones(4)})


@pytest.mark.parametrize("level, ort_level", [("all", "ORT_ENABLE_ALL"), ("extended", "ORT_ENABLE_EXTENDED"), ("basic", "ORT_ENABLE_BASIC")])
def test_graph_optimization_level_reaches_the_session_and_keeps_the_embeddings(models, level, ort_level):
    """``recognition.reid.graph_optimization`` (extended by default: OSNet's depthwise convolutions run slower
    under 'all''s NCHWc layout) sets the session's level; the embeddings are the same to float rounding."""
    import onnxruntime as ort

    from pipeline.config import OnnxReidConfig
    from stages.runtime import SessionOptions, for_model

    assert OnnxReidConfig(path=models / "osnet_x0_25_msmt17.onnx").graph_optimization == "extended"
    frame = np.random.default_rng(0).integers(0, 256, (360, 480, 3), dtype=np.uint8)
    boxes = np.array([[10, 20, 90, 300], [200, 40, 260, 200]], np.float32)
    base = ReidEmbedder(models / "osnet_x0_25_msmt17.onnx", SessionOptions(threads=1))
    emb = ReidEmbedder(models / "osnet_x0_25_msmt17.onnx", for_model(SessionOptions(threads=1), None, level))
    assert emb.session.get_session_options().graph_optimization_level == getattr(ort.GraphOptimizationLevel, ort_level)
    np.testing.assert_allclose(emb.embed(frame, boxes), base.embed(frame, boxes), atol=1e-4)
