"""What crash recovery costs per frame: the recognition journal and the storage outbox, side by side.

Recognition in file mode appends every handled frame to its camera's journal
(:class:`pipeline.journal.FrameJournal`: the frame's detections plus the
stage's changes) and every storage item to its outbox
(:class:`pipeline.journal.Outbox`) before releasing the frame. This script
times, in one run and interleaved over ``--rounds`` rounds (the machine is
noisy; medians are printed):

- ``journal``: :meth:`RecognitionStage.checkpoint` + :meth:`FrameJournal.append`
  for frames with 0, 5 and 20 detections and a few recorded changes;
- ``outbox``: :meth:`Outbox.sent` for a track update and a 128-float face embedding;
- ``tracking``: the same frames through the stage itself (ByteTrack only, no
  pixels; the cheapest thing recognition does per frame), as the yardstick;
- ``replay``: rebuilding a stage from a 1394-frame journal (what a successor
  pays once, before it takes over).

Usage: ``python scripts/bench_recovery.py [--rounds 5] [--frames 400]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import FaceConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig, TrackingConfig  # noqa: E402
from pipeline.journal import FrameJournal, Outbox  # noqa: E402
from pipeline.messages import Detections, EmbeddingRecord, FrameRef, StorageItem, TrackUpdate, event_id_for  # noqa: E402
from stages.gallery import Gallery  # noqa: E402
from stages.recognition import RecognitionStage  # noqa: E402


def _stage(tmp: Path) -> RecognitionStage:
    face = FaceConfig(detector=OnnxFaceDetectorConfig(path=tmp / "f.onnx"), embedder=OnnxFaceEmbedderConfig(path=tmp / "e.onnx"))
    return RecognitionStage(TrackingConfig(), face, ("person",), None, Gallery([], np.empty((0, 4), np.float32), model_name="m"),
                            event_ids=lambda *k: event_id_for("bench", *k), journaling=True)


def _frames(n: int, people: int) -> list[Detections]:
    out = []
    for i in range(n):
        xyxy = np.array([[10 + 3 * i % 400 + 20 * p, 20 * p, 60 + 3 * i % 400 + 20 * p, 100 + 20 * p] for p in range(people)],
                        np.float32).reshape(-1, 4)
        ref = FrameRef(camera="cam", ring="facepro_bench_cam_1_0", slot=i % 24, seq=i + 1, frame_index=i,
                       captured_at_ns=1_700_000_000_000_000_000 + i * 100_000_000, height=432, width=768)
        out.append(Detections(frame=ref, xyxy=xyxy, confidence=np.full(people, 0.9, np.float32),
                              class_id=np.zeros(people, np.int32)))
    return out


def _time_tracking(tmp: Path, frames: list[Detections]) -> float:
    stage = _stage(tmp)
    t0 = time.perf_counter()
    for det in frames:
        stage.process(None, det)
    return (time.perf_counter() - t0) / len(frames) * 1e6


def _time_journal(tmp: Path, frames: list[Detections], k: int) -> float:
    stage = _stage(tmp)
    journal = FrameJournal(tmp / f"j{k}", "cam")
    spent = 0.0
    for det in frames:
        stage.process(None, det)
        stage._record("vote", 1, "Alice", 0.61)  # what a face frame adds
        t0 = time.perf_counter()
        journal.append(det, stage.checkpoint(det))
        spent += time.perf_counter() - t0
    journal.close()
    return spent / len(frames) * 1e6


def _time_outbox(tmp: Path, n: int, k: int) -> float:
    box = Outbox(tmp / f"outbox{k}")
    update = TrackUpdate(event_id="0" * 31 + "1", camera="cam", track_id=1, label="person", first_seen_ns=1, last_seen_ns=2,
                         first_frame=0, last_frame=1, best_score=0.9, xyxy=np.zeros(4, np.float32))
    emb = EmbeddingRecord(event_id="0" * 31 + "1", kind="face", model="m", vector=np.ones(128, np.float32), frame_index=1)
    items = [StorageItem(producer="p", seq=i, update=update) if i % 2 else StorageItem(producer="p", seq=i, embedding=emb)
             for i in range(1, n + 1)]
    t0 = time.perf_counter()
    for item in items:
        box.sent(item)
    spent = time.perf_counter() - t0
    box.close()
    return spent / n * 1e6


def _time_replay(tmp: Path, n: int) -> float:
    stage = _stage(tmp)
    journal = FrameJournal(tmp / "replay", "cam")
    for det in _frames(n, 5):
        stage.process(None, det)
        journal.append(det, stage.checkpoint(det))
    journal.close()
    t0 = time.perf_counter()
    FrameJournal(tmp / "replay", "cam").replay(_stage(tmp))
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--frames", type=int, default=400)
    args = ap.parse_args()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for r in range(args.rounds):
            for people in (0, 5, 20):
                frames = _frames(args.frames, people)
                results.setdefault(f"tracking {people:2d} det", []).append(_time_tracking(tmp, frames))
                results.setdefault(f"journal  {people:2d} det", []).append(_time_journal(tmp, frames, r * 100 + people))
            results.setdefault("outbox   / item", []).append(_time_outbox(tmp, 2000, r))
            results.setdefault("replay 1394 frames (s)", []).append(_time_replay(tmp / f"r{r}", 1394))
    med = {k: statistics.median(v) for k, v in results.items()}
    for k, v in med.items():
        print(f"{k:24s} {v:10.1f} {'s' if '(s)' in k else 'us'}")
    for people in (0, 5, 20):
        ratio = med[f"journal  {people:2d} det"] / med[f"tracking {people:2d} det"]
        print(f"journal / tracking alone, {people:2d} detections: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
