"""Crash recovery pieces without processes: record files, the frame journal, the outbox, stage resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import FaceConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig, OnnxReidConfig, TrackingConfig
from pipeline.journal import FrameJournal, Outbox, RecordLog, pack_parts, unpack_parts
from pipeline.messages import Detections, EmbeddingRecord, FrameRef, StorageItem, TrackUpdate, event_id_for
from stages.gallery import Gallery
from stages.identity import Named
from stages.recognition import RecognitionStage, ReidLinker


@pytest.mark.parametrize("parts", [[], [b""], [b"a", b"", b"xyz" * 1000], [memoryview(b"mv")]])
def test_packed_parts_round_trip(parts: list) -> None:
    assert unpack_parts(pack_parts(parts)) == [bytes(p) for p in parts]


@pytest.mark.parametrize("body, error", [(b"", "too short"), (b"\x02\x00\x01\x00\x00\x00", "truncated"),
                                         (pack_parts([b"abc"])[:-1], "do not match")])
def test_unpack_parts_rejects_bad_bodies(body: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        unpack_parts(body)


def test_record_log_reader_stops_at_a_torn_or_corrupt_record(tmp_path: Path) -> None:
    path = tmp_path / "j" / "log"
    log = RecordLog(path)
    log.append(1, b"first")
    log.append(2, b"second")
    log.close()
    assert (path.stat().st_mode & 0o777) == 0o600
    assert list(RecordLog.read(path)) == [(1, b"first"), (2, b"second")]
    whole = path.read_bytes()
    path.write_bytes(whole[:-3])  # killed in the middle of the last write
    assert list(RecordLog.read(path)) == [(1, b"first")]
    path.write_bytes(whole[:9] + b"X" + whole[10:])  # a flipped byte in the first body
    assert list(RecordLog.read(path)) == []
    assert list(RecordLog.read(tmp_path / "missing")) == []


def _ref(index: int, camera: str = "cam") -> FrameRef:
    return FrameRef(camera=camera, ring="facepro_r_cam_1_0", slot=index % 4, seq=index + 1, frame_index=index,
                    captured_at_ns=1_700_000_000_000_000_000 + index * 100_000_000, height=360, width=480)


def _det(index: int, boxes: list[list[float]]) -> Detections:
    xyxy = np.array(boxes, np.float32).reshape(-1, 4)
    return Detections(frame=_ref(index), xyxy=xyxy, confidence=np.full(len(xyxy), 0.9, np.float32),
                      class_id=np.zeros(len(xyxy), np.int32))


class _Recorder:
    def __init__(self) -> None:
        self.got: list[tuple[int, list[bytes]]] = []

    def restore(self, det: Detections, parts: list[bytes]) -> None:
        self.got.append((det.frame.frame_index, parts))


def test_frame_journal_replays_since_the_last_clean_finish(tmp_path: Path) -> None:
    j = FrameJournal(tmp_path, "cam")
    assert j.replay(_Recorder()) is None
    j.append(_det(0, [[1, 2, 3, 4]]), [b"zero"])
    j.finish()  # tracks closed after frame 0 (e.g. the cameras were repartitioned)
    j.append(_det(1, []), [b"one", b"\x00\x01"])
    j.append(_det(2, [[5, 6, 7, 8]]), [])
    j.close()
    rec = _Recorder()
    assert FrameJournal(tmp_path, "cam").replay(rec) == ("facepro_r_cam_1_0", 3)
    assert rec.got == [(1, [b"one", b"\x00\x01"]), (2, [])]
    only_finish = FrameJournal(tmp_path, "other")
    only_finish.append(_det(4, []), [])
    only_finish.finish()
    rec = _Recorder()
    assert only_finish.replay(rec) == ("facepro_r_cam_1_0", 5) and rec.got == []


def _item(producer: str, seq: int) -> StorageItem:
    emb = EmbeddingRecord(event_id="0" * 31 + "1", kind="face", model="m", vector=np.full(4, seq, np.float32), frame_index=seq)
    return StorageItem(producer=producer, seq=seq, embedding=emb)


def test_outbox_hands_a_successor_exactly_the_unacknowledged_items(tmp_path: Path) -> None:
    path = tmp_path / "outbox"
    box = Outbox(path)
    assert box.inherited == []
    for seq in (1, 2, 3, 4):
        box.sent(_item("rec-0-100", seq))
    box.acked("rec-0-100", np.array([1, 3], np.int64), pending=2)
    box.close()  # the process dies here
    heir = Outbox(path)
    assert [(i.producer, i.seq) for i in heir.inherited] == [("rec-0-100", 2), ("rec-0-100", 4)]
    assert heir.inherited[1].payload.frame_index == 4
    heir.rewrite([_item("rec-0-200", 1)])  # re-sent under the new producer
    heir.close()
    assert [(i.producer, i.seq) for i in Outbox(path).inherited] == [("rec-0-200", 1)]
    last = Outbox(path)
    last.acked("rec-0-200", np.array([1], np.int64), pending=0)  # nothing pending: the file is emptied
    assert path.stat().st_size == 0


# ------------------------------------------------------------------ stage resume


class _FakeReidEmbedder:
    """Deterministic 8-d embeddings from the boxes (stands in for OSNet; the linking logic is real)."""

    model_name = "fake-reid"

    def preprocess(self, frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        return np.asarray(boxes, np.float32)  # the "crops" are the boxes themselves

    def embed_batch(self, batch: np.ndarray) -> np.ndarray:
        v = np.concatenate([batch, batch[:, ::-1]], axis=1).astype(np.float32) + 1.0
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def embed(self, frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        return self.embed_batch(self.preprocess(frame, boxes))


def _stage(tmp_path: Path, snaps: list) -> RecognitionStage:
    face = FaceConfig(detector=OnnxFaceDetectorConfig(path=tmp_path / "f.onnx"),
                      embedder=OnnxFaceEmbedderConfig(path=tmp_path / "e.onnx"), every_n_frames=2)
    reid = ReidLinker(_FakeReidEmbedder(), OnnxReidConfig(path=tmp_path / "r.onnx", every_n_frames=3))  # type: ignore[arg-type]
    reid.remember(_FakeReidEmbedder().embed(None, np.array([[60, 100, 100, 200]], np.float32))[0],  # type: ignore[arg-type]
                  Named("Alice", "face", 0.9))

    def snapshot(event_id: str, camera: str, image: np.ndarray) -> str:
        snaps.append(event_id)
        return f"/snaps/{camera}/{event_id}.jpg"

    return RecognitionStage(TrackingConfig(), face, ("person",), None, Gallery([], np.empty((0, 4), np.float32), 0.4, model_name="m"),
                            snapshot, reid=reid, event_ids=lambda *key: event_id_for("run1", *key), journaling=True)


def _scene(n: int) -> list[Detections]:
    """Two people walking right at different speeds; the second leaves the view at frame 45."""
    out = []
    for i in range(n):
        boxes = [[20 + 4 * i, 100, 60 + 4 * i, 200]]
        if 5 <= i < 45:
            boxes.append([300 - 2 * i, 50, 340 - 2 * i, 180])
        out.append(_det(i, boxes))
    return out


def _key(msg: object) -> tuple:
    if isinstance(msg, TrackUpdate):
        return ("u", msg.event_id, msg.track_id, msg.first_frame, msg.last_frame, msg.identity, msg.method,
                msg.snapshot_path, msg.ended)
    assert isinstance(msg, EmbeddingRecord)
    return ("e", msg.event_id, msg.kind, msg.frame_index, tuple(np.round(msg.vector, 5)))


@pytest.mark.parametrize("kill_at", [3, 20, 44, 60])
def test_a_stage_rebuilt_from_the_journal_continues_exactly_like_the_one_that_died(tmp_path: Path, kill_at: int) -> None:
    frame = np.zeros((360, 480, 3), np.uint8)
    scene = _scene(90)
    snaps_a: list = []
    a = _stage(tmp_path, snaps_a)
    journal = FrameJournal(tmp_path / "journal", "cam")
    for det in scene[:kill_at]:
        a.process(frame, det)
        journal.append(det, a.checkpoint(det))
    journal.close()
    snaps_before_kill = len(snaps_a)
    snaps_b: list = []
    b = _stage(tmp_path, snaps_b)
    assert FrameJournal(tmp_path / "journal", "cam").replay(b) == ("facepro_r_cam_1_0", kill_at)
    rest_a, rest_b = [], []
    for det in scene[kill_at:]:
        rest_a += [_key(m) for m in a.process(frame, det)]
        rest_b += [_key(m) for m in b.process(frame, det)]
    rest_a += [_key(m) for m in a.finish()]
    rest_b += [_key(m) for m in b.finish()]
    assert rest_b == rest_a and any(k[0] == "e" for k in rest_a)  # Re-ID means, names, ends: identical
    assert snaps_b == snaps_a[snaps_before_kill:]  # no track is snapshotted twice
    fresh = _stage(tmp_path, [])  # without the journal: other track ids and events, or none at all
    unjournaled = [_key(m) for det in scene[kill_at:] for m in fresh.process(frame, det)] + [_key(m) for m in fresh.finish()]
    assert unjournaled != rest_a
    named = {k[1]: k[5] for k in rest_a if k[0] == "u"}
    assert "Alice" in named.values()  # the Re-ID link to the remembered track happened in the run


def test_event_ids_are_uuid7_shaped_time_ordered_and_unique_per_track_start() -> None:
    import uuid

    a = event_id_for("run1", "cam", 1, 10, 1_700_000_000_000_000_000)
    assert a == event_id_for("run1", "cam", 1, 10, 1_700_000_000_000_000_000)
    assert len({a, event_id_for("run2", "cam", 1, 10, 1_700_000_000_000_000_000),
                event_id_for("run1", "cam", 1, 11, 1_700_000_000_000_000_000)}) == 3
    u = uuid.UUID(hex=a)
    assert u.version == 7 and u.variant == uuid.RFC_4122
    assert event_id_for("run1", "cam", 9, 10, 1_700_000_001_000_000_000) > a  # later start, larger id
