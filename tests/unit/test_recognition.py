"""Track-level identity: face votes and Re-ID linking on real crops of the one-by-one video."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import OnnxDetectorConfig, OnnxReidConfig
from stages.detector import ObjectDetector
from stages.identity import Named, TrackVotes
from stages.recognition import ReidLinker
from stages.reid import ReidEmbedder
from stages.tracking import ActiveTrack


@pytest.mark.parametrize(
    "votes, expected",
    [
        ([], None),
        ([("A", 0.6)], "A"),
        ([("A", 0.6), (None, 0.1)], None),  # no strict majority
        ([("A", 0.6), ("A", 0.5), (None, 0.1)], "A"),
        ([(None, 0.1)] * 5 + [("A", 0.9)], None),  # one good frame among many unknown
        ([("A", 0.6), ("B", 0.7), ("B", 0.65)], "B"),
    ],
)
def test_track_votes_need_a_strict_majority(votes: list, expected: str | None) -> None:
    v = TrackVotes()
    for name, sim in votes:
        v.add(name, sim)
    identity, score = v.decision()
    assert identity == expected
    if expected:
        assert score == max(s for n, s in votes if n == expected)


@pytest.fixture(scope="module")
def person_crops(videos: Path, models: Path) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """(frame, largest person box) for frames of two different people of the one-by-one video."""
    det = ObjectDetector(OnnxDetectorConfig(path=models / "yolox_nano.onnx", layout="yolox"))
    ranges = {"woman_grey": range(120, 190, 5), "man_hoodie": range(300, 370, 5)}
    cap = cv2.VideoCapture(str(videos / "one-by-one-person-detection.mp4"))
    out: dict[str, list] = {k: [] for k in ranges}
    idx = 0
    while idx <= 370:
        ok, frame = cap.read()
        assert ok
        for name, r in ranges.items():
            if idx in r:
                res = det.detect(frame)
                if len(res):
                    areas = (res.xyxy[:, 2] - res.xyxy[:, 0]) * (res.xyxy[:, 3] - res.xyxy[:, 1])
                    out[name].append((frame, res.xyxy[int(np.argmax(areas))]))
        idx += 1
    assert all(len(v) >= 10 for v in out.values())
    return out


def _feed(linker: ReidLinker, track_id: int, samples: list, start: int) -> list[int]:
    got = []
    for i, (frame, box) in enumerate(samples):
        t = ActiveTrack(track_id=track_id, event_id=f"{track_id:032x}", xyxy=box.astype(np.float32), label="person")
        got += linker.sample("cam", [t], frame, start + i * linker.cfg.every_n_frames)
    return got


def test_reid_links_the_same_person_and_not_another(person_crops: dict, models: Path) -> None:
    cfg = OnnxReidConfig(path=models / "osnet_x0_25_msmt17.onnx")
    linker = ReidLinker(ReidEmbedder(cfg.path), cfg)
    woman = person_crops["woman_grey"]
    half = len(woman) // 2
    assert _feed(linker, 1, woman[:half], 0)
    assert linker.link("cam", 1) is None  # nobody named yet
    rec = linker.end("cam", 1, f"{1:032x}", Named("Alice", "face", 0.8))
    assert rec is not None and rec.kind == "reid" and rec.vector.shape == (512,)
    assert abs(float(np.linalg.norm(rec.vector)) - 1) < 1e-5

    _feed(linker, 2, woman[half:], 1000)  # the same woman later, face not seen
    linked = linker.link("cam", 2)
    assert linked is not None and linked.identity == "Alice" and linked.method == "reid"
    assert linked.score >= cfg.link_threshold

    _feed(linker, 3, person_crops["man_hoodie"], 2000)  # another person
    assert linker.link("cam", 3) is None


def test_reid_needs_min_samples(person_crops: dict, models: Path) -> None:
    cfg = OnnxReidConfig(path=models / "osnet_x0_25_msmt17.onnx", min_samples=50)
    linker = ReidLinker(ReidEmbedder(cfg.path), cfg)
    woman = person_crops["woman_grey"]
    _feed(linker, 1, woman, 0)
    linker.end("cam", 1, f"{1:032x}", Named("Alice", "face", 0.8))
    _feed(linker, 2, woman, 1000)
    assert linker.link("cam", 2) is None  # too few samples to decide


def _detections(camera: str, index: int, captured_at_ns: int):
    from pipeline.messages import Detections, FrameRef

    ref = FrameRef(camera=camera, ring="r", slot=0, seq=index + 1, frame_index=index, captured_at_ns=captured_at_ns,
                   height=100, width=100)
    return Detections(frame=ref, xyxy=np.array([[10, 10, 50, 90]], np.float32), confidence=np.array([0.9], np.float32),
                      class_id=np.zeros(1, np.int32))


@pytest.mark.parametrize(
    "camera, age_ms, wants, behind",
    [("live", 5000, False, 1), ("live", 10, True, 0), ("file", 5000, True, 0)],
)
def test_live_frames_too_far_behind_skip_face_work_and_are_counted(camera: str, age_ms: int, wants: bool, behind: int) -> None:
    import time

    from pipeline.config import FaceConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig, TrackingConfig
    from stages.gallery import Gallery
    from stages.recognition import RecognitionStage

    face = FaceConfig(detector=OnnxFaceDetectorConfig(path="s.onnx"), embedder=OnnxFaceEmbedderConfig(path="e.onnx"), every_n_frames=1)
    stage = RecognitionStage(TrackingConfig(), face, ("person",), analyzer=None, gallery=Gallery([], np.zeros((0, 4), np.float32)),
                             live_cameras=frozenset({"live"}), max_lag_ms=1000)
    det = _detections(camera, 0, time.time_ns() - age_ms * 1_000_000)
    assert stage.wants_frame(det) is wants
    assert stage.drops["behind"] == behind
    stage.process(None, det)  # the tracker still gets the detections (metadata), only pixel work is skipped
    assert stage.cameras[camera] is not None


@pytest.mark.parametrize(
    "votes, needed, settled",
    [
        ([], 3, False),
        ([("A", 0.6)] * 2, 3, False),               # not enough votes yet
        ([("A", 0.6)] * 3, 3, True),                # a name with 3 votes and the majority
        ([(None, 0.1)] * 3, 3, True),               # settled as unknown too: a stranger stops costing face work
        ([("A", 0.6)] * 3 + [(None, 0.1)] * 3, 3, False),  # no strict majority
        ([("A", 0.6)] * 4 + [("B", 0.7)] * 3, 3, True),
        ([("A", 0.6)] * 50, None, False),           # settle_votes null: never
    ],
)
def test_track_votes_settle_on_enough_votes_with_a_strict_majority(votes: list, needed: int | None, settled: bool) -> None:
    v = TrackVotes()
    for name, sim in votes:
        v.add(name, sim)
    assert v.settled(needed) is settled


def test_a_settled_track_stops_face_work_and_keeps_its_name(models: Path, faces: Path) -> None:
    """Real photo, real SCRFD + MobileFaceNet: a person track over Obama's portrait is named from the
    enrolled second photo; after ``settle_votes`` votes the stage runs no more face analysis for it."""
    from pipeline.config import FaceConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig, TrackingConfig
    from pipeline.messages import Detections, FrameRef, TrackUpdate
    from stages.face import FaceAnalyzer
    from stages.gallery import Gallery
    from stages.recognition import RecognitionStage

    face = FaceConfig(detector=OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"),
                      embedder=OnnxFaceEmbedderConfig(path=models / "mobilefacenet_128d.onnx"), every_n_frames=1,
                      settle_votes=3)
    analyzer = FaceAnalyzer(face)
    (enrolled,) = analyzer.analyze(cv2.imread(str(faces / "obama" / "obama2.jpg")))
    gallery = Gallery(["obama"], enrolled.embedding[None, :].astype(np.float32), 0.4, model_name=analyzer.model_name)
    calls = []
    real = analyzer.find_batch  # the SCRFD step of the stage's face work
    analyzer.find_batch = lambda *a, **k: calls.append(1) or real(*a, **k)  # type: ignore[method-assign]
    stage = RecognitionStage(TrackingConfig(), face, ("person",), analyzer, gallery)
    frame = cv2.imread(str(faces / "obama" / "obama.jpg"))
    h, w = frame.shape[:2]
    named = []
    for i in range(12):
        ref = FrameRef(camera="c", ring="r", slot=0, seq=i + 1, frame_index=i, captured_at_ns=i, height=h, width=w)
        det = Detections(frame=ref, xyxy=np.array([[2, 2, w - 2, h - 2]], np.float32),
                         confidence=np.array([0.9], np.float32), class_id=np.zeros(1, np.int32))
        out = stage.process(frame, det)
        named += [m.identity for m in out if isinstance(m, TrackUpdate) and m.identity]
    assert "obama" in named
    assert len(calls) == 3  # one analysis per vote until 3 votes settled the name
    assert stage.counts["face_skipped_settled"] == 12 - 3 - (TrackingConfig().minimum_consecutive_frames - 1)
    # the model work behind it, for scripts/bench_e2e.py's bare-inference bound: three SCRFD runs on the person
    # box (one person: no whole-frame run), each embedding the one face found
    assert (stage.counts["face_analyses"], stage.counts["face_analyses_frame"]) == (3, 0)
    assert (stage.counts["face_embeddings"], stage.counts["face_embed_runs"]) == (3, 3)


def test_a_box_without_a_face_is_analysed_less_and_less_often_and_held_frames_get_none(models: Path, faces: Path) -> None:
    """Real SCRFD on a real photo: a person box over the photo's lower half (no face in it) is analysed on face
    frame 2 (a miss), then waits 4, 8, 16, 16 frames (``face.backoff_max_frames``), the sat-out face frames counted
    as ``face_skipped_backoff``; a box over the face is analysed on every face frame; held frames (the detector
    skipped them: stale boxes) get no face work at all."""
    from pipeline.config import FaceConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig, TrackingConfig
    from pipeline.messages import Detections, FrameRef
    from stages.face import FaceAnalyzer
    from stages.gallery import Gallery
    from stages.recognition import RecognitionStage

    face = FaceConfig(detector=OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"),
                      embedder=OnnxFaceEmbedderConfig(path=models / "mobilefacenet_128d.onnx"), every_n_frames=2,
                      backoff_max_frames=16, settle_votes=None)
    analyzer = FaceAnalyzer(face)
    frame = cv2.imread(str(faces / "obama" / "obama.jpg"))
    h, w = frame.shape[:2]
    (portrait,) = analyzer.analyze(frame)
    below = [2, min(h - 3, portrait.xyxy[3] + 10), w - 2, h - 2]  # under the chin: never a face
    around = [max(2.0, portrait.xyxy[0] - 150), 2, min(w - 2.0, portrait.xyxy[2] + 150), h - 2]  # head and shoulders

    def run(box: list, held_every: int | None) -> tuple[list[int], RecognitionStage]:
        stage = RecognitionStage(TrackingConfig(), face, ("person",), analyzer, Gallery([], np.zeros((0, 128), np.float32), 0.4))
        tried = []
        real = analyzer.find_batch  # the SCRFD step of the stage's face work
        for i in range(60):
            ref = FrameRef(camera="c", ring="r", slot=0, seq=i + 1, frame_index=i, captured_at_ns=i, height=h, width=w)
            held = held_every is not None and i > 3 and i % held_every == 0
            det = Detections(frame=ref, xyxy=np.zeros((0, 4), np.float32) if held else np.array([box], np.float32),
                             confidence=np.full(0 if held else 1, 0.9, np.float32), class_id=np.zeros(0 if held else 1, np.int32),
                             held=held)
            analyzer.find_batch = lambda *a, _i=i, **k: tried.append(_i) or real(*a, **k)  # type: ignore[method-assign]
            stage.process(frame, det)
        analyzer.find_batch = real  # type: ignore[method-assign]
        return tried, stage

    tried, stage = run(below, None)
    assert tried == [2, 6, 14, 30, 46]  # confirmed at frame 2; misses double the wait up to 16 frames
    assert stage.counts["face_skipped_backoff"] == (59 - 2) // 2 + 1 - len(tried)
    tried, stage = run(around, None)
    assert tried == list(range(2, 60, 2)) and stage.counts["face_skipped_backoff"] == 0
    tried, stage = run(around, 2)  # every even frame from 4 on is held
    assert tried == [2] + list(range(5, 60, 2))  # the face frame 4 is held: it moves to the next detector frame, 5


def test_reid_work_is_counted_per_crop_and_per_batch(models: Path, faces: Path) -> None:
    """Two person tracks on a real photo, Re-ID every 2nd frame: each due frame is one OSNet batch of both
    crops (``reid_runs``, ``reid_crops``: scripts/bench_e2e.py's bare-inference bound reads them)."""
    from pipeline.config import FaceConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig, TrackingConfig
    from pipeline.messages import Detections, FrameRef
    from stages.gallery import Gallery
    from stages.recognition import RecognitionStage

    face = FaceConfig(detector=OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"),
                      embedder=OnnxFaceEmbedderConfig(path=models / "mobilefacenet_128d.onnx"))
    cfg = OnnxReidConfig(path=models / "osnet_x0_25_msmt17.onnx", every_n_frames=2)
    stage = RecognitionStage(TrackingConfig(), face, ("person",), None, Gallery([], np.empty((0, 1), np.float32), 0.4),
                             reid=ReidLinker(ReidEmbedder(cfg.path), cfg))
    frame = cv2.imread(str(faces / "obama" / "obama.jpg"))
    h, w = frame.shape[:2]
    boxes = np.array([[2, 2, w // 2 - 2, h - 2], [w // 2 + 2, 2, w - 2, h - 2]], np.float32)
    for i in range(12):
        ref = FrameRef(camera="c", ring="r", slot=0, seq=i + 1, frame_index=i, captured_at_ns=i, height=h, width=w)
        stage.process(frame, Detections(frame=ref, xyxy=boxes, confidence=np.array([0.9, 0.9], np.float32),
                                        class_id=np.zeros(2, np.int32)))
    active_from = TrackingConfig().minimum_consecutive_frames - 1  # frame index at which the tracks are active
    runs = len([i for i in range(active_from, 12) if i % 2 == 0])
    assert (stage.counts["reid_runs"], stage.counts["reid_crops"]) == (runs, 2 * runs)
    assert stage.counts["face_analyses"] == 0  # no face analyzer
