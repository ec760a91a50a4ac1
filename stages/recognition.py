"""The recognition stage: per-camera tracking, face recognition per person track, snapshots.

``process(frame, Detections)`` receives every frame of the cameras this
process owns, in frame order (the runner's reorder buffer guarantees it), so
the ByteTrack state of a camera lives in exactly one place; ``process_batch``
takes several frames at once (``recognition.batch``) and runs their face
chips and Re-ID crops in one embedder batch each, answering what ``process``
answers frame by frame (:mod:`stages.recognition_work`). On a camera's
face frames (every ``face.every_n_frames`` frames) it looks for a face inside
each person box that still needs one (SCRFD; one run on the whole frame when
several do), aligns and embeds it, and matches it against the enrolled
gallery (open-set, cosine similarity ≥ ``face.match_threshold``). A track
stops getting face work once its votes are settled (``face.settle_votes``),
and a box that shows no face is looked at less and less often
(:class:`~stages.identity.FaceSchedule`, ``face.backoff_max_frames``).
A track is named by the votes of all its face observations
(:class:`~stages.identity.TrackVotes`), so one bad frame does not name a person;
each open track's votes and decision live in one :class:`~stages.identity.TrackIdentity`.
Only a track's largest face that passes the quality gate is embedded.

With ``recognition.reid`` configured, person tracks are also sampled with
OSNet every few frames, less often once a track's mean has settled
(:class:`ReidLinker`, ``reid.settle_samples``); a track that has no face
identity is linked to an earlier, named track of any camera of this process
whose mean Re-ID embedding is similar enough, and inherits its identity with
method ``reid``. Every ended person track's mean Re-ID embedding is stored.
With ``recognition.gait``, every frame also feeds a per-camera background
model; person silhouettes build a Gait Energy Image per track
(:class:`GaitLinker`), which names a track neither face nor Re-ID named
(method ``gait``) and is stored when the track ends.

A frame the detector skipped because the scene was stable
(``Detections.held``) holds the tracks (:meth:`CameraTracks.hold`); its boxes
are a frame old, so it gets no face, Re-ID or gait work: gait's background
model sees the detector frames only, like a camera at a lower frame rate.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from typing import Callable

import numpy as np

from collections import OrderedDict

from pipeline.config import FaceConfig, GaitConfig, OnnxReidConfig, TrackingConfig
from pipeline.messages import Detections, EmbeddingRecord
from stages.detector import DetectionResult
from stages.face import FaceAnalyzer
from stages.gait import CameraSilhouettes, GaitEmbedder, GeiEmbedder, TrackGait
from stages.gallery import Gallery
from stages.identity import Named, TrackIdentity
from stages.recognition_work import FacePick, FrameJournal, FrameWork, boxes_of, embed_wave, end_tracks, find_wave, waves
from stages.reid import ReidEmbedder, TrackReid, link_tracks
from stages.tracking import ActiveTrack, CameraTracks, Transition

#: ``(event_id, camera, image (h, w, 3) uint8 BGR) -> path or None``: stores a JPEG snapshot.
SnapshotSink = Callable[[str, str, np.ndarray], "str | None"]


class EarlierTracks:
    """Ended named tracks remembered for linking: ``(d,) float32`` unit embedding and who it was.

    Args:
        keep: at most this many; the oldest is forgotten first.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._items: OrderedDict[int, tuple[np.ndarray, Named]] = OrderedDict()
        self._next = 0

    def add(self, vector: np.ndarray, named: Named) -> None:
        self._items[self._next] = (vector, named)
        self._next += 1
        while len(self._items) > self.keep:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def vectors(self) -> dict[int, np.ndarray]:
        return {k: v for k, (v, _) in self._items.items()}

    def named(self, key: int) -> Named:
        return self._items[key][1]


class ReidLinker:
    """Person Re-ID per track: sampling, linking to earlier named tracks, the stored mean.

    Args:
        embedder: OSNet embedder.
        cfg: sampling and linking settings.
    """

    def __init__(self, embedder: ReidEmbedder, cfg: OnnxReidConfig) -> None:
        self.embedder = embedder
        self.cfg = cfg
        self.tracks: dict[str, TrackReid] = {}
        self.earlier = EarlierTracks(cfg.keep_tracks)
        self.links = 0
        self.settled_waits = 0  # person boxes not embedded at a Re-ID frame because their track's mean has settled
        self._last_frame: dict[str, int] = {}  # camera -> its last Re-ID frame

    def remember(self, vector: np.ndarray, named: Named) -> None:
        """Remember a named track ended elsewhere (another recognition process) for linking; ``(d,) float32`` mean."""
        self.earlier.add(vector, named)

    def due(self, camera: str, frame_index: int) -> bool:
        """True if ``frame_index`` is a Re-ID frame of ``camera``: ``every_n_frames`` after its last one (so the
        tracks due at once share one embedder batch; a held frame only delays it to the next detector frame)."""
        last = self._last_frame.get(camera)
        return last is None or frame_index - last >= self.cfg.every_n_frames

    def mark(self, camera: str, frame_index: int) -> None:
        """Record ``frame_index`` as ``camera``'s last Re-ID frame (a restarted process replaying its journal)."""
        self._last_frame[camera] = frame_index

    def _camera(self, camera: str) -> TrackReid:
        if camera not in self.tracks:
            self.tracks[camera] = TrackReid(self.cfg.every_n_frames, self.cfg.max_samples, self.cfg.settle_samples,
                                            self.cfg.max_interval_frames)
        return self.tracks[camera]

    def sample(self, camera: str, persons: list[ActiveTrack], frame: np.ndarray, frame_index: int,
               log: list | None = None) -> list[int]:
        """Embed the due person boxes of a frame; returns the track ids that got a sample.

        ``log`` (optional) receives ``(track_id, frame_index, (d,) float32 embedding)`` per sample, to journal them."""
        due = self.due_tracks(camera, persons, frame_index)
        if not due:
            return []
        return self.add(camera, due, self.embedder.embed(frame, boxes_of(due)), frame_index, log)

    def due_tracks(self, camera: str, persons: list[ActiveTrack], frame_index: int) -> list[ActiveTrack]:
        """Mark ``frame_index`` as ``camera``'s Re-ID frame and return its person tracks due for a sample (tall
        enough, their :class:`~stages.reid.TrackReid` interval passed); the rest are counted in ``settled_waits``."""
        reid = self._camera(camera)
        self._last_frame[camera] = frame_index
        tall = [t for t in persons if t.xyxy[3] - t.xyxy[1] >= self.cfg.min_box_height_px]
        self.settled_waits += sum(reid.settled_wait(t.track_id, frame_index) for t in tall)
        return [t for t in tall if reid.due(t.track_id, frame_index)]

    def add(self, camera: str, due: list[ActiveTrack], emb: np.ndarray, frame_index: int, log: list | None = None) -> list[int]:
        """Add one ``(d,) float32`` unit embedding per track of ``due`` (rows of ``emb``, ``(len(due), d)``) as its
        sample at ``frame_index``; returns their track ids. ``log``: as :meth:`sample`."""
        reid = self._camera(camera)
        for t, e in zip(due, emb):
            reid.add(t.track_id, e, frame_index)
            if log is not None:
                log.append((t.track_id, frame_index, e))
        return [t.track_id for t in due]

    def restore_sample(self, camera: str, track_id: int, frame_index: int, vector: np.ndarray) -> None:
        """Re-add a journaled sample (a restarted process rebuilding its tracks)."""
        self._camera(camera).add(track_id, vector, frame_index)

    def link(self, camera: str, track_id: int) -> Named | None:
        """The identity of the most similar earlier named track above the threshold, if any."""
        reid = self.tracks.get(camera)
        if reid is None or reid.count(track_id) < self.cfg.min_samples or not self.earlier:
            return None
        found = link_tracks({track_id: reid.mean(track_id)}, self.earlier.vectors(), self.cfg.link_threshold, exclusive=False)
        if track_id not in found:
            return None
        self.links += 1
        named = self.earlier.named(found[track_id].earlier_id)
        return Named(named.identity, "reid", float(found[track_id].similarity))

    def end(self, camera: str, track_id: int, event_id: str, named: Named | None) -> EmbeddingRecord | None:
        """Forget a track; remember it for linking if named; return its mean embedding to store."""
        reid = self.tracks.get(camera)
        mean = reid.pop(track_id) if reid is not None and track_id in reid else None
        if mean is None:
            return None
        if named is not None and named.identity is not None:
            self.earlier.add(mean, named)
        return EmbeddingRecord(event_id=event_id, kind="reid", model=self.embedder.model_name,
                               vector=mean.astype(np.float32), frame_index=-1)


class GaitLinker:
    """Gait per person track: silhouettes every frame, GEI, linking unnamed tracks to earlier named ones.

    Needs the detector frames of its cameras in order (the background model; held frames are left out).

    Args:
        cfg: thresholds and sizes.
        embedder: GEI -> embedding (:func:`stages.gait.gait_embedder`); the
            classical :class:`~stages.gait.GeiEmbedder` by default.
    """

    def __init__(self, cfg: GaitConfig, embedder: GaitEmbedder | None = None) -> None:
        self.cfg = cfg
        self.embedder: GaitEmbedder = embedder if embedder is not None else GeiEmbedder()
        self.silhouettes: dict[str, CameraSilhouettes] = {}
        self.tracks: dict[str, TrackGait] = {}
        self.earlier = EarlierTracks(cfg.keep_tracks)
        self.still_skipped = 0  # still frames without persons that did not update a background

    def remember(self, vector: np.ndarray, named: Named) -> None:
        """Remember a named track ended elsewhere (another recognition process) for linking; ``(d,) float32`` GEI embedding."""
        self.earlier.add(vector, named)

    def observe(self, camera: str, persons: list[ActiveTrack], frame: np.ndarray, still: bool = False) -> list[int]:
        """Update the camera's background; add each person's silhouette; returns tracks whose GEI just became ready.

        A ``still`` frame (the motion gate found no change) without persons leaves the background as it is:
        it would only confirm it (counted in :attr:`still_skipped`)."""
        sil = self.silhouettes.setdefault(camera, CameraSilhouettes(self.cfg.width_px))
        if still and not persons:
            self.still_skipped += 1
            return []
        sil.update(frame)
        gait = self.tracks.setdefault(camera, TrackGait(self.cfg.min_frames))
        ready = []
        for t in persons:
            if gait.add(t.track_id, sil.silhouette(t.xyxy)) and gait.count(t.track_id) % self.cfg.min_frames == 0:
                ready.append(t.track_id)
        return ready

    def link(self, camera: str, track_id: int) -> Named | None:
        gei = self.tracks[camera].gei(track_id)
        if gei is None or not self.earlier:
            return None
        found = link_tracks({track_id: self.embedder.embed(gei)}, self.earlier.vectors(), self.cfg.link_threshold, exclusive=False)
        if track_id not in found:
            return None
        named = self.earlier.named(found[track_id].earlier_id)
        return Named(named.identity, "gait", float(found[track_id].similarity))

    def end(self, camera: str, track_id: int, event_id: str, named: Named | None) -> EmbeddingRecord | None:
        gait = self.tracks.get(camera)
        gei = gait.pop(track_id) if gait is not None else None
        if gei is None:
            return None
        emb = self.embedder.embed(gei)
        if named is not None and named.identity is not None:
            self.earlier.add(emb, named)
        return EmbeddingRecord(event_id=event_id, kind="gait", model=self.embedder.model_name, vector=emb, frame_index=-1)

    @property
    def rejected(self) -> int:
        return sum(g.rejected for g in self.tracks.values())


def _height(track: ActiveTrack) -> float:
    return float(track.xyxy[3] - track.xyxy[1])


class RecognitionStage:
    """Tracks, events, face recognition and snapshots for the cameras of one recognition process.

    Args:
        tracking: ByteTrack and event settings.
        face: face settings (``every_n_frames``, ``min_face_px``, threshold).
        class_names: detector class names (index = class id).
        analyzer: face pipeline, or None to disable face recognition.
        gallery: enrolled identities (may be empty).
        snapshot: stores a JPEG for an event; None disables snapshots.
        live_cameras: cameras in live mode, whose frames older than ``max_lag_ms``
            skip face work (counted as ``behind``).
        max_lag_ms: see ``live_cameras``.
        reid: person Re-ID linker, or None.
        gait: gait linker, or None (it needs every detector frame, so those are all copied then).
        event_ids: ``(camera, track_id, first_frame, first_seen_ns) -> event id`` for
            :class:`~stages.tracking.CameraTracks` (None: random time-ordered ids).
        journaling: record what each frame changes for :meth:`checkpoint`
            (file mode: a restarted process rebuilds its tracks with :meth:`restore`).

    Attributes:
        drops: cumulative ``{"behind": n}``.
        counts: cumulative counters: ``faces_used``, ``face_rejected_<reason>``, the tracks left out of a face
            frame's work (``face_skipped_settled``: votes settled; ``face_skipped_backoff``: no face in the box
            lately) and of a Re-ID frame's (``reid_skipped_settled``: the track's mean has settled); the
            model work done, for the benchmarks' bare-inference bound: ``face_analyses`` (images SCRFD searched;
            of them ``face_analyses_frame`` whole frames, the rest person boxes) in ``face_detector_runs`` runs,
            ``face_embeddings`` (faces embedded) in ``face_embed_runs`` batches, ``reid_crops`` (person crops
            embedded with OSNet) in ``reid_runs`` batches.

    Resuming (:class:`pipeline.journal.Resumable`): :meth:`checkpoint` returns,
    after each frame, the face votes, identity decisions, snapshot paths and
    Re-ID samples that frame added; :meth:`restore` feeds a journaled frame's
    detections to the tracker (no pixels) and re-applies those changes, so the
    tracks, their ids, event ids, votes, names and Re-ID means are what they
    were. Gait is not journaled (its silhouettes need the pixels): a resumed
    track's Gait Energy Image holds only the frames seen after the restart,
    and the camera's background model learns again.
    """

    def __init__(self, tracking: TrackingConfig, face: FaceConfig, class_names: tuple[str, ...],
                 analyzer: FaceAnalyzer | None, gallery: Gallery, snapshot: SnapshotSink | None = None,
                 live_cameras: frozenset[str] = frozenset(), max_lag_ms: float = 2000.0,
                 reid: ReidLinker | None = None, gait: GaitLinker | None = None,
                 event_ids: Callable[[str, int, int, int], str] | None = None, journaling: bool = False) -> None:
        self.tracking = tracking
        self.face = face
        self.class_names = class_names
        self.analyzer = analyzer
        self.gallery = gallery
        self.snapshot = snapshot
        self.live_cameras = live_cameras
        self.max_lag_ms = max_lag_ms
        self.cameras: dict[str, CameraTracks] = {}
        self.identities: dict[tuple[str, int], TrackIdentity] = {}  # (camera, track id) -> its one identity state
        self.counts: Counter = Counter()  # face_rejected_<reason>, faces_used, model work (see _analyze, _reid)
        self.reid = reid
        self.gait = gait
        self.drops = {"behind": 0}
        self.event_ids = event_ids
        self.journal = FrameJournal(journaling)
        self._face_frames: dict[str, int] = {}  # camera -> its last face frame

    def _tracks(self, camera: str) -> CameraTracks:
        if camera not in self.cameras:
            self.cameras[camera] = CameraTracks(camera, self.tracking, self.class_names, event_ids=self.event_ids)
        return self.cameras[camera]

    def _identity(self, camera: str, track_id: int) -> TrackIdentity:
        return self.identities.setdefault((camera, track_id), TrackIdentity())

    # ------------------------------------------------------------- resuming
    def checkpoint(self, det: Detections) -> list[bytes]:
        """The changes handling ``det`` made (JSON list, then one float32 buffer per Re-ID sample); then forgotten."""
        return self.journal.take((det.frame.camera, det.frame.frame_index))

    def restore(self, det: Detections, parts: list[bytes]) -> None:
        """Re-apply a journaled frame (see the class docstring); the messages it would send are not sent again."""
        tracks = self._tracks(det.frame.camera)
        transitions = feed_tracker(tracks, det)
        for change in json.loads(parts[0]):
            self._apply(tracks, change, parts[1:])
        end_tracks(transitions, self.identities, (self.reid, self.gait))

    def _apply(self, tracks: CameraTracks, change: list, vectors: list[bytes]) -> None:
        op, track_id = change[0], int(change[1])
        if op == "fframe":
            self._face_frames[tracks.camera] = track_id  # camera-level: the frame index in the id's place
            return
        if op == "rframe" and self.reid is not None:
            self.reid.mark(tracks.camera, track_id)
            return
        ident = self._identity(tracks.camera, track_id)
        if op == "tried":
            ident.face_schedule(self.face.every_n_frames, self.face.backoff_max_frames).tried(
                int(change[2]), bool(change[3]), float(change[4]))
        elif op == "snap":
            ident.snapped = True
            if change[3]:
                tracks.set_snapshot(track_id, change[3])
        elif op == "vote":
            ident.votes.add(change[2], float(change[3]))
            ident.votes.current = ident.votes.decision()[0]
        elif op == "name":
            ident.decide(Named(change[2], change[3], float(change[4])))
            tracks.set_identity(track_id, change[2], change[3], float(change[4]))
        elif op == "reid" and self.reid is not None:
            self.reid.restore_sample(tracks.camera, track_id, int(change[2]), np.frombuffer(vectors[int(change[3])], np.float32))

    def _face_frame(self, camera: str, frame_index: int) -> bool:
        """True if ``frame_index`` is a face frame of ``camera``: ``face.every_n_frames`` after its last one."""
        last = self._face_frames.get(camera)
        return last is None or frame_index - last >= self.face.every_n_frames

    def _due(self, det: Detections) -> bool:
        if not det.valid or det.held:
            return False  # a held frame's boxes are a frame old: no face, Re-ID or gait work on it
        if self.gait is not None:
            return True  # the background model needs every detector frame
        if len(det) == 0:
            return False
        cam, idx = det.frame.camera, det.frame.frame_index
        return self._face_frame(cam, idx) or (self.reid is not None and self.reid.due(cam, idx))

    def _behind(self, det: Detections) -> bool:
        if det.frame.camera not in self.live_cameras:
            return False
        return (time.time_ns() - det.frame.captured_at_ns) / 1e6 > self.max_lag_ms

    def warmup(self) -> None:
        """Run the face models once on a blank image (ONNX Runtime's first run is several times slower)."""
        if self.analyzer is not None:
            self.analyzer.analyze(np.zeros((480, 640, 3), np.uint8))

    def wants_frame(self, meta: object) -> bool:
        assert isinstance(meta, Detections)
        if not self._due(meta):
            return False
        if self._behind(meta):
            self.drops["behind"] += 1
            return False
        return True

    def process(self, frame: np.ndarray | None, meta: object) -> list[object]:
        """Handle one frame (``meta``: its :class:`Detections`); returns the messages to send."""
        return self.process_batch([frame], [meta])[0]

    def process_batch(self, frames: Sequence[np.ndarray | None], metas: Sequence[object]) -> list[list[object]]:
        """:meth:`process` for several frames in frame order (``recognition.batch``): in waves of at most one frame
        per camera, each wave's face chips and Re-ID crops run in one embedder batch each
        (:mod:`stages.recognition_work`); the messages equal those of :meth:`process` frame by frame up to the
        float rounding of batched inference.

        Args:
            frames: per frame ``(H, W, 3) uint8`` BGR, or None where it was not read.
            metas: the frames' :class:`Detections`, in order.

        Returns:
            The messages of each frame, in order.

        Raises:
            ValueError: ``frames`` and ``metas`` differ in length.
        """
        if len(frames) != len(metas):
            raise ValueError(f"process_batch: {len(frames)} frames for {len(metas)} messages")
        assert all(isinstance(m, Detections) for m in metas)
        self.journal.clear()  # frames of an earlier batch that were never checkpointed (discarded duplicates)
        out: list[list[object]] = []
        for wave in waves([m.frame.camera for m in metas]):  # type: ignore[attr-defined]
            works = [self._plan(frames[i], metas[i]) for i in wave]  # type: ignore[arg-type]
            find_wave(works, self.analyzer, self.face.min_face_px, self.face.quality, self.counts)
            embed_wave(works, self.analyzer, self.reid.embedder if self.reid is not None else None, self.counts)
            out.extend(self._apply_work(w) for w in works)
        return out

    def _plan(self, frame: np.ndarray | None, det: Detections) -> FrameWork:
        """Step 1 (:mod:`stages.recognition_work`): the tracker, then the face and Re-ID work the frame gets."""
        tracks = self._tracks(det.frame.camera)
        work = FrameWork(det, frame, tracks, feed_tracker(tracks, det))
        if frame is None or det.held:
            return work  # a held frame's boxes are a frame old: no face, Re-ID or gait work on it
        cam, idx = tracks.camera, det.frame.frame_index
        work.active = tracks.active()
        if work.active and self._face_frame(cam, idx):
            work.face_frame = True
            work.wanted = [t for t in work.active if self._wants_face(cam, t, idx)]
        persons = work.persons
        if self.reid is not None and persons and self.reid.due(cam, idx):
            work.reid_frame = True
            work.reid_due = self.reid.due_tracks(cam, persons, idx)
            if work.reid_due:
                work.reid_input = self.reid.embedder.preprocess(frame, boxes_of(work.reid_due))
        return work

    def _apply_work(self, work: FrameWork) -> list[object]:
        """Step 3: votes, names, snapshots, Re-ID samples and links, gait and ended tracks of one planned frame;
        its journal changes are kept for :meth:`checkpoint`."""
        tracks, det = work.tracks, work.det
        cam, idx = tracks.camera, det.frame.frame_index
        out: list[object] = [t.message for t in work.transitions]
        if work.face_frame:
            self._face_frames[cam] = idx
            self.journal.record("fframe", idx)
            for track in work.active:
                out.extend(self._observe(tracks, track, work.frame, idx, work.picks.get(track.track_id)))
        if work.reid_frame:
            self._reid(tracks, work, idx)
        if self.gait is not None and work.frame is not None and not det.held:
            self._gait(tracks, work.persons, work.frame, still=not det.motion)
        out.extend(end_tracks(work.transitions, self.identities, (self.reid, self.gait)))
        self.journal.keep((cam, idx))
        return out

    def active(self, camera: str) -> list[ActiveTrack]:
        """The confirmed tracks of ``camera`` matched in its latest frame, with their identities (empty for a
        camera this process has not seen)."""
        tracks = self.cameras.get(camera)
        return tracks.active() if tracks is not None else []

    def _name(self, tracks: CameraTracks, track_id: int, named: Named) -> None:
        if self._identity(tracks.camera, track_id).decide(named):
            tracks.set_identity(track_id, named.identity, named.method, named.score)
            self.journal.record("name", track_id, named.identity, named.method, named.score)

    def _gait(self, tracks: CameraTracks, persons: list[ActiveTrack], frame: np.ndarray, still: bool) -> None:
        for track_id in self.gait.observe(tracks.camera, persons, frame, still):
            if not self._identity(tracks.camera, track_id).accepts("gait"):
                continue  # face or Re-ID already decided
            linked = self.gait.link(tracks.camera, track_id)
            if linked is not None:
                self._name(tracks, track_id, linked)
        self.counts["gait_silhouettes_rejected"], self.counts["gait_still_skipped"] = self.gait.rejected, self.gait.still_skipped

    def _reid(self, tracks: CameraTracks, work: FrameWork, idx: int) -> None:
        sampled = self.reid.add(tracks.camera, work.reid_due, work.reid_emb, idx, self.journal.samples if self.journal.on else None) \
            if work.reid_due else []
        self.journal.record("rframe", idx)
        self.counts["reid_skipped_settled"] = self.reid.settled_waits
        for track_id in sampled:
            if not self._identity(tracks.camera, track_id).accepts("reid"):
                continue  # a face decision is never overridden by Re-ID
            linked = self.reid.link(tracks.camera, track_id)
            if linked is not None:
                self._name(tracks, track_id, linked)

    def _wants_face(self, camera: str, track: ActiveTrack, frame_index: int) -> bool:
        """A person track gets face analysis in this face frame unless its votes are settled or its
        :class:`~stages.identity.FaceSchedule` waits (``face_skipped_settled``, ``face_skipped_backoff``)."""
        if self.analyzer is None or track.label != "person":
            return False
        ident = self._identity(camera, track.track_id)
        if not ident.needs_face(self.face.settle_votes):
            self.counts["face_skipped_settled"] += 1  # its name (or unknown) is decided: no SCRFD, no embedding
            return False
        if not ident.face_schedule(self.face.every_n_frames, self.face.backoff_max_frames).due(frame_index, _height(track)):
            self.counts["face_skipped_backoff"] += 1  # its box showed no face lately: looked at less often
            return False
        return True

    def _observe(self, tracks: CameraTracks, track: ActiveTrack, frame: np.ndarray, frame_index: int,
                 pick: FacePick | None) -> list[object]:
        """Snapshot a new track; then, with a ``pick`` (the track got face work in this frame), put the try into
        its face schedule and, when its face passed the quality gate, vote with the face's gallery match."""
        ident = self._identity(tracks.camera, track.track_id)
        if self.snapshot is not None and not ident.snapped:
            path = self.snapshot(track.event_id, tracks.camera, _crop(frame, track.xyxy))
            ident.snapped = True
            self.journal.record("snap", track.track_id, track.event_id, path or "")
            if path:
                tracks.set_snapshot(track.track_id, path)
        if pick is None:
            return []
        ident.face_schedule(self.face.every_n_frames, self.face.backoff_max_frames).tried(
            frame_index, pick.found, _height(track))
        self.journal.record("tried", track.track_id, frame_index, pick.found, _height(track))
        if pick.quality is None or pick.embedding is None:
            if pick.quality is not None:
                self.counts[f"face_rejected_{pick.quality.reason}"] += 1
            return []
        self.counts["faces_used"] += 1
        match = self.gallery.match(pick.embedding[None, :])[0]
        decided = ident.face_vote(match.identity, float(match.similarity))
        self.journal.record("vote", track.track_id, match.identity, float(match.similarity))
        if decided is not None:  # re-send only when the decision changes
            self._name(tracks, track.track_id, decided)
        return [EmbeddingRecord(event_id=track.event_id, kind="face", model=self.analyzer.model_name,
                                vector=pick.embedding.astype(np.float32), frame_index=frame_index, quality=pick.score)]

    def tick(self, now_ns: int) -> list[object]:
        return []

    def finish(self) -> list[object]:
        transitions = [t for tracks in self.cameras.values() for t in tracks.finish()]
        return [t.message for t in transitions] + end_tracks(transitions, self.identities, (self.reid, self.gait))


def feed_tracker(tracks: CameraTracks, det: Detections) -> list[Transition]:
    """Step the camera's tracker with one frame's detections (a held frame holds the tracks: see
    :meth:`CameraTracks.hold`); returns its transitions."""
    if det.held:
        return tracks.hold(det.frame.frame_index, det.frame.captured_at_ns)
    return tracks.update(det.frame.frame_index, det.frame.captured_at_ns, objects_of(det))


def objects_of(det: Detections) -> DetectionResult:
    """The process edge: the tracker's input from a wire message (empty for a skipped or unreadable frame)."""
    if not (det.motion and det.valid and len(det)):
        return DetectionResult.empty()
    return DetectionResult(det.xyxy, det.confidence, det.class_id)


def _crop(frame: np.ndarray, xyxy: np.ndarray, pad: float = 0.1) -> np.ndarray:
    """A copy of ``frame`` inside ``xyxy`` (x1, y1, x2, y2 pixels) grown by ``pad`` of its size, clipped."""
    h, w = frame.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    px, py = (x2 - x1) * pad, (y2 - y1) * pad
    a, b = int(max(0, x1 - px)), int(max(0, y1 - py))
    c, d = int(min(w, x2 + px)), int(min(h, y2 + py))
    return frame[b:max(d, b + 1), a:max(c, a + 1)].copy()
