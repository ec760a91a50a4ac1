"""Codec round trips and malformed input, without sockets."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from pipeline import messages as m
from pipeline.codec import VERSION, MalformedMessage, decode, encode

REF = m.FrameRef(camera="cam0", ring="facepro_ab_cam0_1_0", slot=3, seq=17, frame_index=16,
                 captured_at_ns=1_700_000_000_000_000_000, height=360, width=480)


def _det(n: int) -> m.Detections:
    rng = np.random.default_rng(n)
    return m.Detections(frame=REF, xyxy=rng.random((n, 4), dtype=np.float32) * 100,
                        confidence=rng.random(n, dtype=np.float32), class_id=np.arange(n, dtype=np.int32),
                        motion=n > 0, detect_ms=12.5)


MESSAGES = [
    REF,
    _det(0),
    _det(5),
    m.TrackUpdate(event_id="a" * 32, camera="cam0", track_id=4, label="person", first_seen_ns=1, last_seen_ns=2,
                  first_frame=0, last_frame=9, best_score=0.9, xyxy=np.array([1, 2, 3, 4], np.float32),
                  identity="Barack Obama", method="face", identity_score=0.71, snapshot_path="/x/y.jpg", ended=True),
    m.EmbeddingRecord(event_id="b" * 32, kind="reid", model="osnet", vector=np.linspace(0, 1, 512, dtype=np.float32)),
    m.StageStats(stage="detection", index=1, pid=42, sent_at_ns=5, frames_in=10, frames_out=9,
                 drop_counts=np.arange(len(m.DROP_REASONS), dtype=np.int64), last_error="boom"),
    m.StatusReply(run_id="r1", uptime_s=3.5, stages=(
        m.StageStatus(stage="capture", processes=2, pids=np.array([1, 2], np.int64), rate_fps=10.0, queue_depth=0,
                      oldest_wait_ms=0.0, drop_counts=np.zeros(len(m.DROP_REASONS), np.int64), latency_p50_ms=1.0,
                      latency_p99_ms=2.0, cpu_percent=5.0, rss_mb=60.0, restarts=0, state="running"),
    )),
    m.StatusRequest(),
    m.ScaleRequest(stage="detection", processes=2),
    m.Ack(ok=True, message="done"),
    m.LiveTracks(camera="cam0", frame_index=16, captured_at_ns=5, ring="facepro_ab_cam0_1_0", slot=3, seq=17,
                 track_ids=np.array([4, 9], np.int64), xyxy=np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32),
                 labels=("person", "car"), names=("Barack Obama", None)),
    m.LiveTracks(camera="cam0", frame_index=17, captured_at_ns=6, ring="r", slot=0, seq=18,
                 track_ids=np.zeros(0, np.int64), xyxy=np.zeros((0, 4), np.float32)),
]


def _equal(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda x: type(x).__name__)
def test_round_trip_is_exact(msg: object) -> None:
    frames = [bytes(f) for f in encode(msg)]
    assert frames[0][0] == VERSION
    assert _equal(decode(frames), msg)


def test_arrays_travel_as_raw_buffers_not_in_the_header() -> None:
    det = _det(1000)
    frames = encode(det)
    assert len(frames[0]) < 1000  # header holds scalars and array specs only
    assert sum(len(bytes(f)) for f in frames[1:]) == 1000 * (16 + 4 + 4)


def _frame_ref(*fields: int) -> bytes:
    """FrameRef's fixed layout: slot, seq, frame_index, captured_at_ns, height, width, len(camera), len(ring), flags."""
    return bytes((VERSION, 1)) + struct.pack("<qqqqiiHHB", *fields, 0)


def _header(type_id: int, body: object) -> bytes:
    return bytes((VERSION, type_id)) + json.dumps(body).encode()


@pytest.mark.parametrize(
    "frames, error",
    [
        ([], "empty"),
        ([b"\x01"], "too short"),
        ([bytes((99, 1)) + b"{}"], "version 99"),
        ([bytes((VERSION, 200)) + b"{}"], "unknown message type"),
        ([bytes((VERSION, 1)) + b"{not json"], "FrameRef: 9 bytes"),  # FrameRef: fixed layout, too short
        ([_frame_ref(1, 2, 0, 0, 1, 1, 1, 5) + b"cring"], "FrameRef: .* match name lengths"),
        ([_frame_ref(1, 2, 0, 0, 1, 1, 1, 1) + b"\xffr"], "FrameRef: .*utf-8"),
        ([_frame_ref(-1, 1, 0, 0, 1, 1, 1, 1) + b"cr"], "out of range"),
        ([_header(3, {"$m": 2})], "does not match"),
        ([_header(3, {"$m": 3, "camera": "c"})], "TrackUpdate"),  # missing fields
        ([bytes((VERSION, 3)) + b"{not json"], "TrackUpdate"),
        ([_header(4, {"$m": 4, "event_id": "e", "kind": "face", "model": "m",
                      "vector": {"$a": 0, "dtype": "<f4", "shape": [4]}}), b"\x00" * 15], "does not match shape"),
        ([_header(4, {"$m": 4, "event_id": "e", "kind": "face", "model": "m",
                      "vector": {"$a": 0, "dtype": "|O", "shape": [1]}}), b"\x00" * 8], "not allowed"),
        ([_header(4, {"$m": 4, "event_id": "e", "kind": "face", "model": "m",
                      "vector": {"$a": 3, "dtype": "<f4", "shape": [1]}}), b"\x00" * 4], "EmbeddingRecord"),
    ],
)
def test_malformed_messages_raise_malformed(frames: list[bytes], error: str) -> None:
    with pytest.raises(MalformedMessage, match=error):
        decode(frames)


def test_encode_rejects_unregistered_types() -> None:
    with pytest.raises(TypeError, match="not a registered"):
        encode({"a": 1})


@pytest.mark.parametrize(
    "build, error",
    [
        (lambda: m.Detections(frame=REF, xyxy=np.zeros((2, 4), np.float64), confidence=np.zeros(2, np.float32),
                              class_id=np.zeros(2, np.int32)), "dtype float32"),
        (lambda: m.Detections(frame=REF, xyxy=np.zeros((2, 4), np.float32), confidence=np.zeros(3, np.float32),
                              class_id=np.zeros(2, np.int32)), "expected 2 rows"),
        (lambda: m.TrackUpdate(event_id="short", camera="c", track_id=1, label="person", first_seen_ns=0,
                               last_seen_ns=0, first_frame=0, last_frame=0, best_score=0,
                               xyxy=np.zeros(4, np.float32)), "32 hex"),
        (lambda: m.TrackUpdate(event_id="a" * 32, camera="c", track_id=1, label="person", first_seen_ns=0,
                               last_seen_ns=0, first_frame=0, last_frame=0, best_score=0,
                               xyxy=np.zeros(4, np.float32), method="magic"), "method"),
        (lambda: m.ScaleRequest(stage="detection", processes=0), ">= 1"),
    ],
)
def test_messages_validate_fields(build, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        build()


def test_live_tracks_need_one_label_and_name_per_box() -> None:
    with pytest.raises(ValueError, match="2 tracks but 1 labels and 2 names"):
        m.LiveTracks(camera="c", frame_index=0, captured_at_ns=0, ring="r", slot=0, seq=1,
                     track_ids=np.array([1, 2], np.int64), xyxy=np.zeros((2, 4), np.float32),
                     labels=("person",), names=(None, None))
