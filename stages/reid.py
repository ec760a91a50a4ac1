"""Person re-identification (Re-ID): OSNet embeddings of person boxes, per-track means, track linking.

Three pieces:

1. :class:`ReidEmbedder` turns person boxes of a frame into appearance
   embeddings with OSNet (Zhou et al., "Omni-Scale Feature Learning for Person
   Re-Identification", ICCV 2019), by default ``osnet_x0_25`` trained on
   MSMT17 from the torchreid model zoo. Preprocessing follows torchreid's test
   transform: crop the box, resize to 128x256 (W x H) pixels, BGR→RGB, scale
   to [0, 1], normalise with the ImageNet mean ``(0.485, 0.456, 0.406)`` and
   std ``(0.229, 0.224, 0.225)``. The output is L2-normalised, so the dot
   product of two embeddings is their cosine similarity.
2. :class:`TrackReid` accumulates sampled embeddings per track and gives
   each track's *mean embedding* (the L2-normalised mean of its unit
   samples, the usual track-level aggregation for video Re-ID: averaging
   frame features over a tracklet, e.g. Zheng et al. 2016, MARS).
3. :func:`link_tracks` links new tracks to earlier tracks (the *gallery* of
   tracks already seen) by cosine similarity of their mean embeddings: each
   new track (*probe*) gets at most one earlier track, only at or above the
   threshold, and by default no earlier track is given to two new tracks at
   once (a one-to-one assignment solved with the Hungarian algorithm,
   :func:`scipy.optimize.linear_sum_assignment`).

Threshold (``DEFAULT_LINK_THRESHOLD`` = 0.935), measured by
``scripts/eval_reid.py`` with ``osnet_x0_25_msmt17`` (YOLOX-Nano +
ByteTrack, every frame, a sample every 5 frames). Label-free calibration on
``vtest.avi``: two tracks visible in the same frame are different people;
their track means reach a cosine similarity of 0.934 (148 pairs; people
there are only 40-80 px tall), so at 0.935 no such pair is linked. On
``one-by-one-person-detection.mp4`` (six people, 210-410 px tall) the means of
different people reach 0.88 and the first and last third of one person's
track have a similarity >= 0.96, so 0.935 keeps the six apart and links
fragments; the margin is small on both sides, and on low-resolution crops
(vtest) most same-person fragments stay below it (TAR 0.13 there; with
``--stride 2`` the vtest calibration gives 0.97 instead). Mean
similarities of OSNet-x0.25 are high for everyone (0.5-0.9 between different
people), so recalibrate for another model or camera.

Conventions: frames are ``(H, W, 3) uint8`` BGR (OpenCV order); boxes are
``x1, y1, x2, y2`` float pixels of the frame. Everything except
:class:`ReidEmbedder` is pure numpy/scipy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import OnnxReidConfig  # noqa: F401  (re-exported: the Re-ID settings)
from stages.runtime import (ModelError, SessionOptions, bucket, buckets, expect_embedding_output, open_session, pad_rows,
                            static_shapes)

#: OSNet input size ``(height, width)`` in pixels (torchreid's default person crop).
INPUT_HW: tuple[int, int] = (256, 128)

#: ImageNet channel mean and std, RGB order, for inputs scaled to [0, 1] (torchreid's normalisation).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

#: Cosine similarity of two track means needed to link them (calibration in the module docstring).
DEFAULT_LINK_THRESHOLD = 0.935

#: Boxes are embedded in chunks of at most this many crops (bounds the input tensor to ~50 MB).
MAX_BATCH = 128
#: With static shapes, the batch sizes up to this many crops run once when the model opens; larger batches run in
#: chunks of this size, so no shape is new at run time.
WARM_CROPS = 16

_WHAT = "Re-ID embedder"


def _check_frame(frame: object) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        got = f"{frame.dtype} array of shape {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"ReidEmbedder.embed frame: expected an (H, W, 3) uint8 BGR image, got {got}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"ReidEmbedder.embed frame: image is empty (shape {frame.shape})")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def clip_boxes(boxes: np.ndarray, frame_hw: tuple[int, int]) -> np.ndarray:
    """Integer pixel crop windows of boxes, clipped to the frame.

    Args:
        boxes: ``(n, 4)`` boxes ``x1, y1, x2, y2`` in frame pixels.
        frame_hw: frame ``(height, width)``.

    Returns:
        ``(n, 4) int64`` windows ``x1, y1, x2, y2`` with ``0 <= x1 <= x2 <= width``
        (floor of the start, ceil of the end); an empty window has ``x1 == x2`` or ``y1 == y2``.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    h, w = frame_hw
    lo = np.floor(b[:, :2])
    hi = np.ceil(b[:, 2:])
    x1 = np.clip(lo[:, 0], 0, w)
    y1 = np.clip(lo[:, 1], 0, h)
    x2 = np.clip(hi[:, 0], x1, w)
    y2 = np.clip(hi[:, 1], y1, h)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.int64)


class ReidEmbedder:
    """OSNet person Re-ID embedder (Zhou et al. 2019, ICCV) on ONNX Runtime.

    Args:
        path: ONNX model with one input ``[B, 3, 256, 128]`` (N, C, H, W; the
            batch may be dynamic) and one ``[B, d]`` output, e.g.
            ``osnet_x0_25_msmt17.onnx`` (``d = 512``).
        opts: ONNX Runtime threads and providers.

    Raises:
        ModelError: the file is missing, empty or not loadable, or its input
            is not ``[B, 3, 256, 128]`` / it has not exactly one ``[B, d]``
            output (the message names the file).
    """

    def __init__(self, path: Path | str, opts: SessionOptions = SessionOptions()) -> None:
        self.path = Path(path)
        self.session = open_session("onnx", self.path, _WHAT, opts)
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        if len(self.session.get_inputs()) != 1 or len(shape) != 4 or shape[1:] != [3, *INPUT_HW]:
            raise ModelError(
                f"{_WHAT} model {self.path}: input {inp.name} has shape {shape}, expected [B, 3, {INPUT_HW[0]}, {INPUT_HW[1]}] "
                "(a 256x128 person crop, as OSNet/torchreid); is this the right file?"
            )
        d = expect_embedding_output(self.session, _WHAT, self.path)
        self._input_name = inp.name
        self._fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        if self._fixed_batch not in (None, 1):
            raise ModelError(
                f"{_WHAT} model {self.path}: fixed batch size {self._fixed_batch}; export it with a dynamic batch (or batch 1)"
            )
        self._static = self._fixed_batch is None and static_shapes(self.session, opts)
        self._dim = int(d) if isinstance(d, int) else int(self._run(np.zeros((1, 3, *INPUT_HW), np.float32)).shape[1])
        for n in buckets(WARM_CROPS) if self._static else ():  # each padded batch size runs once here
            self._run(np.zeros((n, 3, *INPUT_HW), np.float32))

    @property
    def dim(self) -> int:
        """Embedding length ``d`` (512 for OSNet)."""
        return self._dim

    @property
    def model_name(self) -> str:
        """File stem of the model (``osnet_x0_25_msmt17``); embeddings of different models are not comparable."""
        return self.path.stem

    def preprocess(self, frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Crop, resize and normalise person boxes into an OSNet input batch.

        Args:
            frame: ``(H, W, 3) uint8`` BGR.
            boxes: ``(n, 4)`` boxes ``x1, y1, x2, y2`` in frame pixels (clipped to the frame here).

        Returns:
            ``(n, 3, 256, 128) float32`` RGB, ``(x / 255 - mean) / std`` with the ImageNet mean/std.

        Raises:
            ValueError: bad frame, boxes not ``(n, 4)``/finite, or a box with
                no pixel inside the frame.
        """
        _check_frame(frame)
        b = np.asarray(boxes, dtype=np.float32)
        if b.ndim != 2 or b.shape[1] != 4 or not np.all(np.isfinite(b)):
            raise ValueError(f"ReidEmbedder boxes: expected an (n, 4) array of finite x1, y1, x2, y2 pixels, got shape {b.shape}")
        windows = clip_boxes(b, frame.shape[:2])
        empty = (windows[:, 2] <= windows[:, 0]) | (windows[:, 3] <= windows[:, 1])
        if np.any(empty):
            i = int(np.flatnonzero(empty)[0])
            raise ValueError(
                f"ReidEmbedder boxes: box {i} {b[i].tolist()} has no pixel inside the {frame.shape[1]}x{frame.shape[0]} frame; drop such boxes first"
            )
        out = np.empty((len(windows), INPUT_HW[0], INPUT_HW[1], 3), np.float32)
        for i, (x1, y1, x2, y2) in enumerate(windows):
            crop = cv2.resize(frame[y1:y2, x1:x2], (INPUT_HW[1], INPUT_HW[0]), interpolation=cv2.INTER_LINEAR)
            out[i] = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)
        out = (out / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2), dtype=np.float32)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self._fixed_batch == 1:
            return np.concatenate([self.session.run(None, {self._input_name: batch[i : i + 1]})[0] for i in range(len(batch))])
        if self._static:  # chunks of warmed sizes, padded to a bucket size: blank crops, their rows dropped
            return np.concatenate([
                np.asarray(self.session.run(None, {self._input_name: pad_rows(c, bucket(len(c)))})[0])[: len(c)]
                for c in (batch[i : i + WARM_CROPS] for i in range(0, len(batch), WARM_CROPS))])
        return np.asarray(self.session.run(None, {self._input_name: batch})[0])

    def embed(self, frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Embed the person in each box.

        Args:
            frame: ``(H, W, 3) uint8`` BGR.
            boxes: ``(n, 4)`` boxes ``x1, y1, x2, y2`` in frame pixels (``n`` may be 0).

        Returns:
            ``(n, d) float32`` unit-norm embeddings (dot product = cosine similarity).

        Raises:
            ValueError: see :meth:`preprocess`.
        """
        return self.embed_batch(self.preprocess(frame, boxes))

    def embed_batch(self, batch: np.ndarray) -> np.ndarray:
        """Embed preprocessed crops (of one frame or several: recognition batches crops across cameras).

        Args:
            batch: ``(n, 3, 256, 128) float32`` from :meth:`preprocess` (``n`` may be 0).

        Returns:
            ``(n, d) float32`` unit-norm embeddings, run in chunks of at most ``MAX_BATCH`` crops.

        Raises:
            ValueError: ``batch`` is not ``(n, 3, 256, 128) float32``.
        """
        if batch.dtype != np.float32 or batch.shape[1:] != (3, *INPUT_HW):
            raise ValueError(f"ReidEmbedder batch: expected an (n, 3, {INPUT_HW[0]}, {INPUT_HW[1]}) float32 array, "
                             f"got {batch.dtype} {batch.shape}")
        if len(batch) == 0:
            return np.zeros((0, self._dim), np.float32)
        emb = np.concatenate([self._run(batch[i : i + MAX_BATCH]) for i in range(0, len(batch), MAX_BATCH)])
        return _unit_rows(np.asarray(emb, dtype=np.float32))


class TrackReid:
    """Sampled Re-ID embeddings per track and each track's mean embedding.

    The mean is the L2-normalised sum of every unit sample added (all
    samples count, memory stays bounded); the last ``max_samples`` samples
    are kept for inspection. Sampling policy: :meth:`due` says whether a
    track should be sampled in a frame (its first sighting, then every
    ``every_n_frames`` frames; once it has ``settle_samples`` samples its
    mean has settled and the wait doubles with each further sample:
    ``2, 4, 8 ... x every_n_frames``, at most ``max_interval`` frames, so a
    long track keeps adding views, a new pose or lighting, at a falling rate).

    Args:
        every_n_frames: frames between samples of one track.
        max_samples: samples kept per track (:meth:`samples`).
        settle_samples: samples after which the wait grows; None: never (every ``every_n_frames``).
        max_interval: longest wait, frames (at least ``every_n_frames``; None: ``8 x every_n_frames``).

    Raises:
        ValueError: ``every_n_frames``, ``max_samples``, ``settle_samples`` or ``max_interval`` < 1.
    """

    def __init__(self, every_n_frames: int = 5, max_samples: int = 64, settle_samples: int | None = None,
                 max_interval: int | None = None) -> None:
        if min(every_n_frames, max_samples, settle_samples or 1, max_interval or 1) < 1:
            raise ValueError(f"TrackReid: every_n_frames ({every_n_frames}), max_samples ({max_samples}), settle_samples "
                             f"({settle_samples}) and max_interval ({max_interval}) must be >= 1")
        self.every_n_frames = every_n_frames
        self.max_samples = max_samples
        self.settle_samples = settle_samples
        self.max_interval = max(every_n_frames, max_interval if max_interval is not None else 8 * every_n_frames)
        self._sum: dict[int, np.ndarray] = {}
        self._count: dict[int, int] = {}
        self._samples: dict[int, deque[np.ndarray]] = {}
        self._last_frame: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._sum)

    def __contains__(self, track_id: object) -> bool:
        return track_id in self._sum

    @property
    def track_ids(self) -> tuple[int, ...]:
        """Tracks with at least one sample, in first-sampled order."""
        return tuple(self._sum)

    def interval(self, track_id: int) -> int:
        """Frames the track waits from its last sample to its next (see the class docstring)."""
        extra = self._count.get(track_id, 0) - (self.settle_samples or 0) + 1
        if self.settle_samples is None or extra <= 0:
            return self.every_n_frames
        return min(self.max_interval, self.every_n_frames << min(extra, 30))

    def due(self, track_id: int, frame_index: int) -> bool:
        """True if the track has no sample yet or its last one is ``>= interval(track_id)`` frames old."""
        last = self._last_frame.get(track_id)
        return last is None or frame_index - last >= self.interval(track_id)

    def settled_wait(self, track_id: int, frame_index: int) -> bool:
        """True if the track would be due at ``frame_index`` but for its settled, longer wait."""
        last = self._last_frame.get(track_id)
        return last is not None and self.every_n_frames <= frame_index - last < self.interval(track_id)

    def add(self, track_id: int, embeddings: np.ndarray, frame_index: int = -1) -> None:
        """Add samples of one track.

        Args:
            track_id: the track.
            embeddings: ``(d,)`` or ``(k, d)`` float embeddings (normalised here).
            frame_index: frame they come from (for :meth:`due`; -1 if unknown).

        Raises:
            ValueError: not 1-D/2-D, non-finite values, or ``d`` differs from
                earlier samples of this track.
        """
        e = np.asarray(embeddings, dtype=np.float32)
        e = e.reshape(1, -1) if e.ndim == 1 else e
        if e.ndim != 2 or e.shape[1] == 0 or not np.all(np.isfinite(e)):
            raise ValueError(f"TrackReid.add: expected finite (d,) or (k, d) embeddings, got shape {np.shape(embeddings)}")
        if e.shape[0] == 0:
            return
        e = _unit_rows(e)
        if track_id in self._sum and self._sum[track_id].shape[0] != e.shape[1]:
            raise ValueError(f"TrackReid.add: track {track_id} has {self._sum[track_id].shape[0]}-d samples, got {e.shape[1]}-d")
        self._sum[track_id] = self._sum.get(track_id, np.zeros(e.shape[1], np.float64)) + e.sum(axis=0, dtype=np.float64)
        self._count[track_id] = self._count.get(track_id, 0) + e.shape[0]
        self._samples.setdefault(track_id, deque(maxlen=self.max_samples)).extend(e)
        if frame_index >= 0:
            self._last_frame[track_id] = frame_index

    def count(self, track_id: int) -> int:
        """Number of samples added for the track (0 if none)."""
        return self._count.get(track_id, 0)

    def samples(self, track_id: int) -> np.ndarray:
        """``(k, d) float32`` the last ``max_samples`` unit samples of the track.

        Raises:
            KeyError: the track has no sample.
        """
        if track_id not in self._samples:
            raise KeyError(f"TrackReid: track {track_id} has no Re-ID sample")
        return np.stack(self._samples[track_id])

    def mean(self, track_id: int) -> np.ndarray:
        """``(d,) float32`` L2-normalised mean of all samples of the track.

        Raises:
            KeyError: the track has no sample.
        """
        if track_id not in self._sum:
            raise KeyError(f"TrackReid: track {track_id} has no Re-ID sample")
        return _unit_rows(self._sum[track_id][None, :])[0]

    def means(self) -> dict[int, np.ndarray]:
        """Mean embedding of every sampled track, ``{track_id: (d,) float32}``."""
        return {t: self.mean(t) for t in self._sum}

    def pop(self, track_id: int) -> np.ndarray | None:
        """Forget a track (e.g. when it ends); returns its mean, or None if it had no sample."""
        mean = self.mean(track_id) if track_id in self._sum else None
        for store in (self._sum, self._count, self._samples, self._last_frame):
            store.pop(track_id, None)
        return mean


@dataclass(frozen=True)
class ReidLink:
    """A new track linked to an earlier one.

    Attributes:
        track_id: the new track (probe).
        earlier_id: the earlier track it is the same person as.
        similarity: cosine similarity of the two track means, in [-1, 1].
    """

    track_id: int
    earlier_id: int
    similarity: float


def _as_matrix(means: Mapping[int, np.ndarray], what: str) -> tuple[list[int], np.ndarray]:
    ids = list(means)
    if not ids:
        return ids, np.zeros((0, 0), np.float32)
    rows = [np.asarray(means[i], dtype=np.float32).reshape(-1) for i in ids]
    if len({r.shape[0] for r in rows}) != 1:
        raise ValueError(f"link_tracks {what}: embeddings of different lengths {sorted({r.shape[0] for r in rows})}")
    m = np.stack(rows)
    if not np.all(np.isfinite(m)):
        raise ValueError(f"link_tracks {what}: non-finite values")
    return ids, _unit_rows(m)


def similarity_matrix(track_means: Mapping[int, np.ndarray], earlier_means: Mapping[int, np.ndarray]) -> np.ndarray:
    """Cosine similarities ``(n_new, n_earlier) float32`` in the mappings' key order.

    Raises:
        ValueError: embeddings of different lengths or non-finite values.
    """
    _, a = _as_matrix(track_means, "track_means")
    _, b = _as_matrix(earlier_means, "earlier_means")
    return _similarities(a, b)


def _similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros((a.shape[0], b.shape[0]), np.float32)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"link_tracks: track means are {a.shape[1]}-d but earlier means are {b.shape[1]}-d (different Re-ID models?)")
    return a @ b.T


def link_tracks(
    track_means: Mapping[int, np.ndarray],
    earlier_means: Mapping[int, np.ndarray],
    threshold: float = DEFAULT_LINK_THRESHOLD,
    exclusive: bool = True,
) -> dict[int, ReidLink]:
    """Link new tracks to earlier tracks by cosine similarity of their Re-ID means.

    Each new track (probe) gets at most one earlier track, and only one whose
    cosine similarity is ``>= threshold``. With ``exclusive=True`` (default)
    an earlier track is given to at most one new track: among the one-to-one
    assignments of above-threshold pairs, the one with the most links and,
    among those, the largest summed similarity (a gated maximum-weight
    bipartite matching, solved with the Hungarian algorithm,
    :func:`scipy.optimize.linear_sum_assignment`). Use it for new tracks that
    are visible at the same time (they cannot be the same person). With
    ``exclusive=False`` every new track independently takes its most similar
    earlier track.

    A track id present in both mappings is never linked to itself.

    Args:
        track_means: ``{track_id: (d,) embedding}`` of the new tracks (normalised here).
        earlier_means: ``{track_id: (d,) embedding}`` of the earlier tracks.
        threshold: cosine similarity needed to link, in [-1, 1].
        exclusive: one-to-one assignment (see above).

    Returns:
        ``{new track_id: ReidLink}`` for the linked new tracks only.

    Raises:
        ValueError: embeddings of different lengths or non-finite values.
    """
    new_ids, a = _as_matrix(track_means, "track_means")
    old_ids, b = _as_matrix(earlier_means, "earlier_means")
    sims = _similarities(a, b).astype(np.float64)
    if sims.size == 0:
        return {}
    column = {t: j for j, t in enumerate(old_ids)}
    for i, t in enumerate(new_ids):  # never link a track to itself
        if t in column:
            sims[i, column[t]] = -np.inf
    ok = sims >= threshold
    pairs: list[tuple[int, int]]
    if exclusive:
        from scipy.optimize import linear_sum_assignment

        # Each allowed link is worth more than any difference in summed
        # similarity (at most 2 per link), so the most links win first.
        bonus = 2.0 * min(sims.shape) + 1.0
        gain = np.where(ok, bonus + np.where(ok, sims, 0.0), 0.0)
        rows, cols = linear_sum_assignment(gain, maximize=True)
        pairs = [(int(r), int(c)) for r, c in zip(rows, cols) if ok[r, c]]
    else:
        best = np.argmax(sims, axis=1)
        pairs = [(i, int(j)) for i, j in enumerate(best) if ok[i, j]]
    return {new_ids[i]: ReidLink(new_ids[i], old_ids[j], float(sims[i, j])) for i, j in pairs}
