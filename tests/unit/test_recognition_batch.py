"""Recognition batching (``recognition.batch``): the face chips and Re-ID crops of several cameras' frames run in
one embedder batch each, and the stage answers exactly what it answers frame by frame.

Real SCRFD, MobileFaceNet and OSNet on real photos: each "camera" shows one photo with person boxes that drift a
little every frame, so ByteTrack keeps its tracks; faces are enrolled, one track ends and another camera's
faceless track can be linked to it by Re-ID.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import (FaceConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig, OnnxReidConfig,
                             TrackingConfig)
from pipeline.messages import Detections, EmbeddingRecord, FrameRef, TrackUpdate, event_id_for
from stages.face import FaceAnalyzer
from stages.gallery import Gallery
from stages.recognition import RecognitionStage, ReidLinker
from stages.recognition_work import waves
from stages.reid import ReidEmbedder
from stages.runtime import SessionOptions

FRAMES = 30


@pytest.mark.parametrize("cameras, expected", [
    ([], []),
    (["a"], [[0]]),
    (["a", "b", "c"], [[0, 1, 2]]),
    (["a", "a", "a"], [[0], [1], [2]]),
    (["a", "b", "a", "b", "c"], [[0, 1], [2, 3, 4]]),
    (["a", "b", "c", "a", "c", "b"], [[0, 1, 2], [3, 4, 5]]),
    (["a", "b", "b", "a"], [[0, 1], [2, 3]]),
])
def test_waves_hold_at_most_one_frame_per_camera_in_order(cameras: list[str], expected: list[list[int]]) -> None:
    assert waves(cameras) == expected


def _face_cfg(models: Path) -> FaceConfig:
    return FaceConfig(detector=OnnxFaceDetectorConfig(path=models / "scrfd_500m.onnx"),
                      embedder=OnnxFaceEmbedderConfig(path=models / "mobilefacenet_128d.onnx"),
                      every_n_frames=1, settle_votes=None)


@pytest.fixture(scope="module")
def analyzer(models: Path) -> FaceAnalyzer:
    return FaceAnalyzer(_face_cfg(models))


@pytest.fixture(scope="module")
def scenes(faces: Path, analyzer: FaceAnalyzer) -> dict[str, tuple[np.ndarray, list[list[float]], int]]:
    """camera -> (photo, person boxes around its faces, the frame its people leave the view)."""
    out = {}
    for cam, rel, leaves in (("pair", "_multi/obama_and_biden.jpg", FRAMES), ("obama", "obama/obama.jpg", 12),
                             ("six", "_multi/t1.jpg", FRAMES), ("faceless", "obama/obama.jpg", FRAMES)):
        img = cv2.imread(str(faces / rel))
        h, w = img.shape[:2]
        boxes = []
        for f in analyzer.analyze(img)[:2]:  # person boxes around the two best faces: head and shoulders
            x1, y1, x2, y2 = f.xyxy
            fw, fh = x2 - x1, y2 - y1
            boxes.append([max(2.0, x1 - fw), max(2.0, y1 - fh), min(w - 8.0, x2 + fw), min(h - 8.0, y2 + 3 * fh)])
        if cam == "faceless":  # only the body under the chin: no face, Re-ID only
            boxes = [[boxes[0][0], min(h - 60.0, boxes[0][1] + (boxes[0][3] - boxes[0][1]) * 0.55), boxes[0][2], h - 8.0]]
        out[cam] = (img, boxes, leaves)
    return out


def _frames(scenes: dict) -> list[tuple[np.ndarray, Detections]]:
    """The cameras' frames interleaved by frame index; boxes drift by a pixel a frame."""
    out = []
    for i in range(FRAMES):
        for cam, (img, boxes, leaves) in scenes.items():
            h, w = img.shape[:2]
            b = [] if i >= leaves else [[x1 + i % 4, y1, x2 + i % 4, y2] for x1, y1, x2, y2 in boxes]
            ref = FrameRef(camera=cam, ring="r", slot=0, seq=i + 1, frame_index=i, captured_at_ns=1000 * i, height=h, width=w)
            out.append((img, Detections(frame=ref, xyxy=np.array(b, np.float32).reshape(-1, 4),
                                        confidence=np.full(len(b), 0.9, np.float32), class_id=np.zeros(len(b), np.int32))))
    return out


def _stage(models: Path, faces: Path, analyzer: FaceAnalyzer, reid: ReidEmbedder) -> RecognitionStage:
    enrolled = []
    for rel in ("obama/obama2.jpg", "biden/biden2.jpg"):
        (f,) = analyzer.analyze(cv2.imread(str(faces / rel)))[:1]
        enrolled.append(f.embedding)
    gallery = Gallery(["obama", "biden"], np.stack(enrolled).astype(np.float32), 0.4, model_name=analyzer.model_name)
    cfg = OnnxReidConfig(path=models / "osnet_x0_25_msmt17.onnx", every_n_frames=2, min_samples=2, link_threshold=0.5,
                         min_box_height_px=20)
    tracking = TrackingConfig(lost_track_buffer_frames=3)  # the obama camera's track ends a few frames after it leaves
    return RecognitionStage(tracking, _face_cfg(models), ("person",), analyzer, gallery,
                            reid=ReidLinker(reid, cfg), event_ids=lambda *key: event_id_for("run1", *key), journaling=True)


def _same(a: object, b: object) -> bool:
    """Equal, floats within 1e-4 (batched inference rounds differently), recursively through JSON values."""
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= 1e-4  # type: ignore[arg-type]
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _check_same_message(a: object, b: object) -> None:
    assert type(a) is type(b)
    if isinstance(a, TrackUpdate):
        assert isinstance(b, TrackUpdate)
        keys = ("event_id", "camera", "track_id", "first_frame", "last_frame", "identity", "method", "snapshot_path", "ended")
        assert [getattr(a, k) for k in keys] == [getattr(b, k) for k in keys]
        assert abs(a.identity_score - b.identity_score) <= 1e-4
    elif isinstance(a, EmbeddingRecord):
        assert isinstance(b, EmbeddingRecord)
        assert (a.event_id, a.kind, a.frame_index, a.quality) == (b.event_id, b.kind, b.frame_index, b.quality)
        np.testing.assert_allclose(a.vector, b.vector, atol=1e-4)


def _run(stage: RecognitionStage, frames: list, batch: int) -> tuple[list[list[object]], list[list]]:
    """Messages and journal entries per frame, frames handed over ``batch`` at a time."""
    out, journal = [], []
    for k in range(0, len(frames), batch):
        chunk = frames[k : k + batch]
        answers = stage.process_batch([f for f, _ in chunk], [d for _, d in chunk]) if batch > 1 else \
            [stage.process(chunk[0][0], chunk[0][1])]
        assert len(answers) == len(chunk)  # every frame answered once
        out += answers
        for _, det in chunk:
            parts = stage.checkpoint(det)
            journal.append([json.loads(parts[0]), [np.frombuffer(p, np.float32) for p in parts[1:]]])
    return out + [stage.finish()], journal


@pytest.mark.parametrize("batch, static", [(3, False), (4, False), (7, False), (4, True)])
def test_batched_recognition_answers_what_frame_by_frame_answers(models: Path, faces: Path, analyzer: FaceAnalyzer,
                                                                  scenes: dict, batch: int, static: bool) -> None:
    """4 cameras; batches of 3, 4 (one frame per camera) and 7 (a camera twice: two waves). Same tracks, names,
    methods, votes, embeddings (within 1e-4), journal and work done, in fewer embedder runs. With static shapes
    (the GPU path, forced on here) SCRFD also runs the wave's crops in one batch."""
    opts = SessionOptions(threads=1, static_shapes=True)
    if static:
        analyzer = FaceAnalyzer(_face_cfg(models), opts)
    reid = ReidEmbedder(models / "osnet_x0_25_msmt17.onnx", opts if static else SessionOptions())
    frames = _frames(scenes)
    one, two = _stage(models, faces, analyzer, reid), _stage(models, faces, analyzer, reid)
    out_one, journal_one = _run(one, frames, 1)
    out_two, journal_two = _run(two, frames, batch)
    assert len(out_one) == len(out_two) == len(frames) + 1
    for a, b in zip(out_one, out_two):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _check_same_message(x, y)
    for (changes_a, vec_a), (changes_b, vec_b) in zip(journal_one, journal_two):
        assert _same(changes_a, changes_b)
        assert len(vec_a) == len(vec_b) and all(np.allclose(u, v, atol=1e-4) for u, v in zip(vec_a, vec_b))
    # the scenario exercises every path: face names, a Re-ID link, face and Re-ID embeddings, unknown faces
    methods = {m.method for frame in out_one for m in frame if isinstance(m, TrackUpdate) and m.identity}
    assert methods == {"face", "reid"}
    kinds = {m.kind for frame in out_one for m in frame if isinstance(m, EmbeddingRecord)}
    assert kinds == {"face", "reid"}
    for key in ("face_analyses", "face_analyses_frame", "face_embeddings", "faces_used", "reid_crops",
                "face_skipped_settled", "face_skipped_backoff", "reid_skipped_settled"):
        assert one.counts[key] == two.counts[key], key
    for runs in ("face_embed_runs", "reid_runs"):  # the point: fewer, larger embedder runs
        assert two.counts[runs] < one.counts[runs], runs
    assert one.counts["face_detector_runs"] == one.counts["face_analyses"]  # frame by frame: one SCRFD run an image
    if static:  # and SCRFD batched too
        assert two.counts["face_detector_runs"] < two.counts["face_analyses"]
    else:
        assert two.counts["face_detector_runs"] == two.counts["face_analyses"]


def test_only_the_faces_used_are_embedded(models: Path, faces: Path, analyzer: FaceAnalyzer, scenes: dict) -> None:
    """Six faces in the photo, two person tracks: SCRFD runs once on the whole frame, but only each track's face
    is embedded, and its embedding is the one the whole-photo analysis gives (within 1e-5)."""
    img, boxes, _ = scenes["six"]
    stage = RecognitionStage(TrackingConfig(), _face_cfg(models), ("person",), analyzer,
                             Gallery([], np.zeros((0, 128), np.float32), 0.4, model_name=analyzer.model_name))
    h, w = img.shape[:2]
    records = []
    for i in range(3):
        ref = FrameRef(camera="c", ring="r", slot=0, seq=i + 1, frame_index=i, captured_at_ns=i, height=h, width=w)
        records += [m for m in stage.process(img, Detections(frame=ref, xyxy=np.array(boxes, np.float32),
                                                             confidence=np.full(2, 0.9, np.float32),
                                                             class_id=np.zeros(2, np.int32)))
                    if isinstance(m, EmbeddingRecord)]
    whole = analyzer.analyze(img)
    assert len(whole) == 6
    assert stage.counts["face_analyses_frame"] == stage.counts["face_analyses"] > 0  # whole-frame SCRFD runs
    assert stage.counts["face_embeddings"] == stage.counts["faces_used"] == len(records) == 2 * stage.counts["face_analyses"]
    for rec in records:
        assert max(float(rec.vector @ f.embedding) for f in whole) > 1 - 1e-5


def test_process_batch_needs_one_message_per_frame(models: Path, analyzer: FaceAnalyzer) -> None:
    stage = RecognitionStage(TrackingConfig(), _face_cfg(models), ("person",), analyzer,
                             Gallery([], np.zeros((0, 128), np.float32), 0.4))
    with pytest.raises(ValueError, match="2 frames for 1 messages"):
        stage.process_batch([None, None], [object()])
