"""One frame's recognition work, planned before the embedders run, so the face and Re-ID crops of several frames
(of different cameras) run in one embedder batch each.

:class:`~stages.recognition.RecognitionStage` handles frames in three steps:

1. **plan** (:class:`FrameWork`): step the camera's tracker, choose the tracks that get face work and the
   person boxes due for a Re-ID sample (cropped and normalised). Planning reads and changes only the
   frame's own camera's state. Then :func:`find_wave`: SCRFD for every frame of the wave that has wanted
   tracks (one batch on a GPU with static shapes), and per frame :func:`pick_faces`: the largest face in
   each person box, the quality gate, alignment.
2. **embed** (:func:`embed_wave`): one MobileFaceNet batch for every face chip of the wave and one OSNet
   batch for every person crop, as DeepStream's secondary inference batches objects across streams.
3. **apply**, frame by frame in order: face votes and names, Re-ID samples and links, gait, ended tracks.

A wave (:func:`waves`) holds at most one frame per camera, so a frame's plan never depends on the apply step
of an earlier frame of the same wave, and batched handling gives what frame-by-frame handling gives, up
to the float rounding of batched inference. Cross-camera Re-ID links read the other cameras' ended tracks
in step 3, in frame order, as before.

Only the faces that will be used are embedded (a track's largest face in its box that passes the quality
gate), not every face SCRFD found; the quality gate does not need the embedding
(:func:`~stages.quality.assess_aligned`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import json

import numpy as np

from pipeline.config import FaceQualityConfig
from pipeline.messages import Detections, EmbeddingRecord
from stages.face import FaceAnalyzer, FaceDetections, align
from stages.quality import FaceQuality, assess_aligned
from stages.identity import Named, TrackIdentity
from stages.reid import ReidEmbedder
from stages.tracking import ActiveTrack, CameraTracks, TrackState, Transition


class TrackEnder(Protocol):
    """A linker that keeps per-track state (Re-ID, gait): ``end`` forgets a track and returns what to store."""

    def end(self, camera: str, track_id: int, event_id: str, named: Named | None) -> EmbeddingRecord | None: ...


@dataclass
class FacePick:
    """One track's face work in a face frame.

    Attributes:
        track: the person track.
        xyxy: ``(4,) float32`` box ``x1, y1, x2, y2`` (frame pixels) of the track's largest face, or None when
            its box showed no face.
        score: that face's SCRFD score in [0, 1].
        quality: that face's quality verdict (None when there is no face).
        chip: ``(112, 112, 3) uint8`` BGR aligned crop to embed (only when the face passed the gate; tracks
            sharing one face share the chip object, embedded once).
        embedding: ``(d,) float32`` unit embedding of ``chip``, set by :func:`embed_wave`.
    """

    track: ActiveTrack
    xyxy: np.ndarray | None = None
    score: float = 0.0
    quality: FaceQuality | None = None
    chip: np.ndarray | None = None
    embedding: np.ndarray | None = None

    @property
    def found(self) -> bool:
        """True if the track's box showed a face (of at least ``min_face_px``)."""
        return self.xyxy is not None


@dataclass
class FrameWork:
    """The plan of one frame (step 1 of the module docstring), filled in by step 2, applied by step 3.

    Attributes:
        det: the frame's detections (its wire message, as received).
        frame: ``(H, W, 3) uint8`` BGR pixels, or None (not read: no face, Re-ID or gait work due; overwritten).
        tracks: the camera's tracker.
        transitions: what stepping the tracker with ``det`` changed.
        active: the camera's confirmed tracks matched in this frame (empty when no work is done on it).
        face_frame: a face frame of the camera: every active track gets a snapshot if it has none, ``wanted``
            face work.
        wanted: the tracks that get face work (their votes not settled, their face schedule due).
        picks: track id -> :class:`FacePick` of each wanted track, set by :func:`find_wave`.
        reid_frame: a Re-ID frame of the camera (``reid_due`` may still be empty: every mean settled).
        reid_due: the person tracks that get a Re-ID sample.
        reid_input: ``(len(reid_due), 3, 256, 128) float32`` their OSNet input, or None.
        reid_emb: ``(len(reid_due), d) float32`` their unit embeddings, set by :func:`embed_wave`.
    """

    det: Detections
    frame: np.ndarray | None
    tracks: CameraTracks
    transitions: list[Transition]
    active: list[ActiveTrack] = field(default_factory=list)
    face_frame: bool = False
    wanted: list[ActiveTrack] = field(default_factory=list)
    picks: dict[int, FacePick] = field(default_factory=dict)
    reid_frame: bool = False
    reid_due: list[ActiveTrack] = field(default_factory=list)
    reid_input: np.ndarray | None = None
    reid_emb: np.ndarray | None = None

    @property
    def persons(self) -> list[ActiveTrack]:
        """The active tracks labelled ``person``."""
        return [t for t in self.active if t.label == "person"]


class FrameJournal:
    """What applying each frame changed, kept per frame until the runner journals it (file mode: a restarted
    recognition process replays it, :class:`pipeline.journal.Resumable`); with batching, every frame of a
    batch is applied before the first is journaled.

    Args:
        on: record (off: :meth:`record` does nothing; :meth:`take` gives an empty change list).

    Attributes:
        changes: the JSON-able changes of the frame being applied, ``[op, track id or frame index, ...]``.
        samples: its Re-ID samples ``(track id, frame index, (d,) float32 embedding)``.
    """

    def __init__(self, on: bool) -> None:
        self.on = on
        self.changes: list[list] = []
        self.samples: list[tuple[int, int, np.ndarray]] = []
        self._kept: dict[tuple[str, int], tuple[list, list]] = {}  # (camera, frame index) -> both

    def record(self, *change: object) -> None:
        """Add one change of the frame being applied."""
        if self.on:
            self.changes.append(list(change))

    def keep(self, key: tuple[str, int]) -> None:
        """The frame ``key`` (camera, frame index) is applied: keep its changes for :meth:`take`, start afresh."""
        self._kept[key] = (self.changes, self.samples)
        self.changes, self.samples = [], []

    def take(self, key: tuple[str, int]) -> list[bytes]:
        """The kept changes of frame ``key``, then forgotten: one UTF-8 JSON list (each Re-ID sample as
        ``["reid", track id, frame index, k]``), then the ``k``-th sample's float32 bytes."""
        changes, samples = self._kept.pop(key, ([], []))
        changes = changes + [["reid", track_id, frame_index, i] for i, (track_id, frame_index, _) in enumerate(samples)]
        return [json.dumps(changes).encode(), *(np.ascontiguousarray(v, np.float32).tobytes() for _, _, v in samples)]

    def clear(self) -> None:
        """Forget kept frames that were never taken (a batch's frames dropped as duplicates)."""
        self._kept.clear()


def waves(cameras: Sequence[str]) -> list[list[int]]:
    """Split frames, in order, into consecutive waves holding at most one frame per camera.

    Args:
        cameras: the camera of each frame, in frame order.

    Returns:
        Lists of positions into ``cameras``, in order; their concatenation is ``0 .. len(cameras) - 1``.
    """
    out: list[list[int]] = []
    seen: set[str] = set()
    for i, cam in enumerate(cameras):
        if not out or cam in seen:
            out.append([])
            seen = set()
        out[-1].append(i)
        seen.add(cam)
    return out


def boxes_of(tracks: Sequence[ActiveTrack]) -> np.ndarray:
    """``(n, 4) float32`` boxes ``x1, y1, x2, y2`` (frame pixels) of ``tracks``."""
    return np.stack([t.xyxy for t in tracks]).astype(np.float32) if tracks else np.zeros((0, 4), np.float32)


def centre_inside(inner: np.ndarray, outer: np.ndarray) -> bool:
    """True if the centre of box ``inner`` lies in box ``outer`` (both x1, y1, x2, y2 pixels)."""
    cx, cy = (inner[0] + inner[2]) / 2, (inner[1] + inner[3]) / 2
    return bool(outer[0] <= cx <= outer[2] and outer[1] <= cy <= outer[3])


def find_wave(works: Sequence[FrameWork], analyzer: FaceAnalyzer | None, min_face_px: int,
              quality: FaceQualityConfig, counts: Counter) -> None:
    """Step 1's face search for a wave: SCRFD once per frame with wanted tracks (on the whole frame when two or
    more want a face, else on the one track's box), all in one :meth:`~stages.face.FaceAnalyzer.find_batch`
    (one model run on a GPU with static shapes), then :func:`pick_faces` per frame into
    :attr:`FrameWork.picks`. Counted for status and the benchmarks' bare-inference bound: ``face_analyses``
    (images searched), ``face_analyses_frame`` (of them whole frames), ``face_detector_runs`` (SCRFD runs),
    ``face_rejected_small`` (faces narrower than ``min_face_px``)."""
    todo = [w for w in works if w.wanted and w.frame is not None]
    if not todo:
        return
    assert analyzer is not None
    regions = [None if len(w.wanted) >= 2 else w.wanted[0].xyxy for w in todo]
    runs = analyzer.detector.session_runs
    found = analyzer.find_batch([w.frame for w in todo], regions, min_face_px)  # type: ignore[misc]
    counts["face_detector_runs"] += analyzer.detector.session_runs - runs
    counts["face_rejected_small"] += analyzer.last_small
    counts["face_analyses"] += len(todo)
    counts["face_analyses_frame"] += sum(r is None for r in regions)
    for w, dets in zip(todo, found):
        w.picks = pick_faces(w.frame, w.wanted, dets, quality)  # type: ignore[arg-type]


def pick_faces(frame: np.ndarray, wanted: Sequence[ActiveTrack], dets: FaceDetections,
               quality: FaceQualityConfig) -> dict[int, FacePick]:
    """Each wanted track's largest face and its quality verdict, aligned when it passes (not yet embedded).

    With two or more wanted tracks ``dets`` are the whole frame's faces and a track takes those whose centre lies
    in its box; with one they are the faces found in that track's box.

    Args:
        frame: ``(H, W, 3) uint8`` BGR.
        wanted: the tracks that get face work in this frame.
        dets: the faces SCRFD found (see :func:`find_wave`), at least ``min_face_px`` wide.
        quality: the quality gate.

    Returns:
        track id -> :class:`FacePick`, one per wanted track.
    """
    whole = len(wanted) >= 2
    widths = dets.xyxy[:, 2] - dets.xyxy[:, 0]
    chips: dict[int, tuple[np.ndarray, FaceQuality]] = {}  # face row -> its chip and verdict (a face in two boxes)
    picks: dict[int, FacePick] = {}
    for track in wanted:
        rows = [i for i in range(len(dets)) if not whole or centre_inside(dets.xyxy[i], track.xyxy)]
        pick = picks[track.track_id] = FacePick(track)
        if not rows:
            continue
        i = max(rows, key=lambda r: float(widths[r]))  # the first of equal widths, best score first
        if i not in chips:
            chip = align(frame, dets.kps[i])
            chips[i] = (chip, assess_aligned(chip, dets.kps[i], quality))
        chip, verdict = chips[i]
        pick.xyxy, pick.score, pick.quality = dets.xyxy[i].copy(), float(dets.score[i]), verdict
        pick.chip = chip if verdict.ok else None
    return picks


def embed_wave(works: Sequence[FrameWork], analyzer: FaceAnalyzer | None, reid: ReidEmbedder | None,
               counts: Counter) -> None:
    """Step 2: embed the face chips of all ``works`` in one face-embedder batch and their Re-ID crops in one
    OSNet batch; fills :attr:`FacePick.embedding` and :attr:`FrameWork.reid_emb` and counts the work
    (``face_embeddings`` in ``face_embed_runs`` batches, ``reid_crops`` in ``reid_runs``)."""
    picks = [p for w in works for p in w.picks.values() if p.chip is not None]
    unique = list({id(p.chip): p.chip for p in picks}.values())
    if unique:
        assert analyzer is not None
        emb = analyzer.embedder.embed(np.stack(unique))
        row = {id(c): k for k, c in enumerate(unique)}
        for p in picks:
            p.embedding = emb[row[id(p.chip)]]
        counts["face_embeddings"] += len(unique)
        counts["face_embed_runs"] += 1
    sampled = [w for w in works if w.reid_input is not None and len(w.reid_input)]
    if sampled:
        assert reid is not None
        emb = reid.embed_batch(np.concatenate([w.reid_input for w in sampled]))
        ends = np.cumsum([len(w.reid_input) for w in sampled])
        for w, a, b in zip(sampled, [0, *ends[:-1]], ends):
            w.reid_emb = emb[a:b]
        counts["reid_crops"] += int(ends[-1])
        counts["reid_runs"] += 1


def end_tracks(transitions: Sequence[Transition], identities: MutableMapping[tuple[str, int], TrackIdentity],
               linkers: Sequence[TrackEnder | None]) -> list[object]:
    """Drop the identity state (``identities``, keyed by camera and track id) of the tracks that ``transitions``
    removed, and end them in each linker; returns the linkers' track-level embeddings of ended person tracks."""
    extra: list[object] = []
    for t in transitions:
        if t.state is not TrackState.REMOVED:
            continue
        msg = t.message
        ident = identities.pop((msg.camera, msg.track_id), None)
        if msg.label != "person":
            continue
        named = ident.named if ident is not None else None
        for linker in linkers:
            rec = linker.end(msg.camera, msg.track_id, msg.event_id, named) if linker is not None else None
            if rec is not None:
                extra.append(rec)
    return extra
