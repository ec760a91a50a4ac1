"""Gait: per-track silhouettes, Gait Energy Image (GEI) and a GEI embedding.

Method (Han & Bhanu 2006, "Individual recognition using gait energy image",
IEEE TPAMI 28(2)): a binary silhouette of the walking person is cut out of
every frame, size-normalised and centred, and the silhouettes of at least one
gait cycle are averaged into a grey-level template, the GEI, whose bright
pixels are the body parts that barely move and whose grey pixels trace the
swinging limbs.

- Silhouettes: one OpenCV MOG2 background model per camera
  (:class:`CameraSilhouettes`, Zivkovic 2004), fed every frame of the camera in
  order on a downscaled grey frame, shadows removed, opened and closed.
- Normalisation (:func:`normalise_silhouette`): crop the mask to its own
  foreground rows and columns, scale to ``GEI_HEIGHT`` keeping the aspect
  ratio, centre horizontally on the silhouette's column centroid in
  ``GEI_WIDTH`` columns.
- GEI (:class:`TrackGait`): mean of a track's normalised silhouettes once it has
  ``min_frames`` of them (default 20 frames = 2 s at 10 fps, one to two gait
  cycles of ~1 s).
- Embedding (:func:`gei_embedding`): the GEI downsampled 2x, flattened, mean
  removed, L2-normalised; tracks are compared by cosine similarity and linked
  with :func:`stages.reid.link_tracks`.

Measured with ``scripts/eval_gait.py`` on vtest.avi (795 frames, 23 person
tracks with 40+ usable silhouettes, people 40-80 px tall; 976 of 5246
silhouettes rejected as empty or too small): GEI of a track's first half vs
its second half, cosine similarity mean 0.914 (min 0.770, max 0.974); second
vs first halves of different tracks mean 0.851 (max 0.982); whole-track GEIs
of people in view at the same time mean 0.891 (max 0.9857); rank-1 of
half-track matching 5/23 (chance 1/23). So: better than chance, far from
face or Re-ID. At 0.97, 8 % of the co-visible pairs would link (and 4 % of
the genuine half pairs); the default ``recognition.gait.link_threshold`` is
0.986, just above every co-visible pair (the 1 % false-link quantile is
0.9853), at which gait links almost nothing on this footage. On one-by-one-person-detection.mp4
(six people one after another) it makes no link at 0.986, right or wrong.
MOG2 + normalisation cost about 2 ms per 480x360 frame.

What to expect: a GEI depends on the viewing angle, walking direction,
clothing and carried objects, and on clean silhouettes. It separates people
seen from the side by the same camera reasonably; it is weak for people seen
from behind or from the front (little limb motion visible), for small people
(the silhouette is a few dozen pixels tall) and across cameras. It is the last
resort after face and Re-ID, and its threshold must be calibrated per site.
A GEI-input ONNX gait model (e.g. GEINet, Shiraga et al. 2016, ICB) plugs in
by config (``recognition.gait.embedder``, :class:`OnnxGaitEmbedder`); no such
model ships with the assets, so its accuracy here is unmeasured and its
threshold must be calibrated with ``scripts/eval_gait.py --model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from pipeline.config import GaitConfig
from stages.runtime import ModelError, SessionOptions, expect_embedding_output, open_session, for_model

GEI_HEIGHT = 64
GEI_WIDTH = 44
#: Silhouettes with fewer foreground pixels than this fraction of the box are rejected as empty.
MIN_FOREGROUND = 0.05


class CameraSilhouettes:
    """Background subtraction for one camera (frames must be fed in order).

    Args:
        width_px: frames are downscaled to this width before MOG2 (cheaper, less noise).
        history: MOG2 history in frames.
    """

    def __init__(self, width_px: int = 640, history: int = 300) -> None:
        self.width_px = width_px
        self.mog = cv2.createBackgroundSubtractorMOG2(history=history, varThreshold=25, detectShadows=True)
        self.scale = 1.0
        self.mask: np.ndarray | None = None
        self._kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))

    def update(self, frame: np.ndarray) -> None:
        """Feed one ``(H, W, 3) uint8`` BGR frame; keeps its foreground mask (shadows removed)."""
        h, w = frame.shape[:2]
        self.scale = min(1.0, self.width_px / w)
        small = cv2.resize(frame, (max(1, int(w * self.scale)), max(1, int(h * self.scale))), interpolation=cv2.INTER_AREA)
        fg = self.mog.apply(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY))
        fg = np.where(fg == 255, 255, 0).astype(np.uint8)  # 127 = shadow
        fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, self._kernel)
        self.mask = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, self._kernel)

    def silhouette(self, xyxy: np.ndarray) -> np.ndarray | None:
        """The foreground mask inside box ``xyxy`` (x1, y1, x2, y2 frame pixels), ``(h, w) uint8`` 0/255, or None."""
        if self.mask is None:
            return None
        x1, y1, x2, y2 = (int(round(float(v) * self.scale)) for v in xyxy)
        mh, mw = self.mask.shape
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(mw, x2), min(mh, y2)
        if x2 - x1 < 4 or y2 - y1 < 8:
            return None
        return self.mask[y1:y2, x1:x2]


def normalise_silhouette(mask: np.ndarray) -> np.ndarray | None:
    """Size-normalise and centre a binary silhouette for a GEI.

    Args:
        mask: ``(h, w) uint8`` 0/255 (or bool) silhouette crop.

    Returns:
        ``(GEI_HEIGHT, GEI_WIDTH) float32`` in {0, 1}, or None when the mask is
        (nearly) empty: fewer than ``MIN_FOREGROUND`` of its pixels set.
    """
    fg = mask > 0
    if fg.sum() < MIN_FOREGROUND * fg.size or fg.sum() < 10:
        return None
    rows, cols = np.nonzero(fg.any(axis=1))[0], np.nonzero(fg.any(axis=0))[0]
    body = fg[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
    h, w = body.shape
    new_w = max(1, int(round(w * GEI_HEIGHT / h)))
    scaled = cv2.resize(body, (new_w, GEI_HEIGHT), interpolation=cv2.INTER_AREA)
    centre = int(round(float(np.average(np.arange(new_w), weights=scaled.sum(axis=0) + 1e-6))))
    out = np.zeros((GEI_HEIGHT, GEI_WIDTH), np.float32)
    left = GEI_WIDTH // 2 - centre  # column of `scaled` that lands at the output's left edge is -left
    src0, dst0 = max(0, -left), max(0, left)
    n = min(new_w - src0, GEI_WIDTH - dst0)
    if n > 0:
        out[:, dst0:dst0 + n] = scaled[:, src0:src0 + n]
    return (out >= 0.5).astype(np.float32)


@dataclass
class _Accumulator:
    total: np.ndarray
    count: int = 0


class TrackGait:
    """Normalised silhouettes per track and each track's GEI.

    Args:
        min_frames: silhouettes needed for a GEI (at least one gait cycle).
    """

    def __init__(self, min_frames: int = 20) -> None:
        if min_frames < 1:
            raise ValueError(f"TrackGait min_frames: must be >= 1, got {min_frames}")
        self.min_frames = min_frames
        self._acc: dict[int, _Accumulator] = {}
        self.rejected = 0

    def add(self, track_id: int, mask: np.ndarray | None) -> bool:
        """Add a silhouette crop of ``track_id``; False (and counted) when it is unusable."""
        norm = normalise_silhouette(mask) if mask is not None else None
        if norm is None:
            self.rejected += 1
            return False
        acc = self._acc.setdefault(track_id, _Accumulator(np.zeros((GEI_HEIGHT, GEI_WIDTH), np.float32)))
        acc.total += norm
        acc.count += 1
        return True

    def count(self, track_id: int) -> int:
        acc = self._acc.get(track_id)
        return 0 if acc is None else acc.count

    def gei(self, track_id: int) -> np.ndarray | None:
        """``(GEI_HEIGHT, GEI_WIDTH) float32`` in [0, 1], or None before ``min_frames`` silhouettes."""
        acc = self._acc.get(track_id)
        if acc is None or acc.count < self.min_frames:
            return None
        return acc.total / acc.count

    def pop(self, track_id: int) -> np.ndarray | None:
        """The track's GEI (None if too few frames), forgetting the track."""
        gei = self.gei(track_id)
        self._acc.pop(track_id, None)
        return gei


def gei_embedding(gei: np.ndarray) -> np.ndarray:
    """``(704,) float32`` L2-normalised embedding of a ``(64, 44)`` GEI: 2x downsampled, flattened, mean removed.

    Raises:
        ValueError: ``gei`` is not ``(GEI_HEIGHT, GEI_WIDTH)``.
    """
    if gei.shape != (GEI_HEIGHT, GEI_WIDTH):
        raise ValueError(f"gei_embedding: expected a ({GEI_HEIGHT}, {GEI_WIDTH}) GEI, got {gei.shape}")
    small = cv2.resize(gei.astype(np.float32), (GEI_WIDTH // 2, GEI_HEIGHT // 2), interpolation=cv2.INTER_AREA).ravel()
    small = small - small.mean()
    norm = float(np.linalg.norm(small))
    return (small / norm if norm > 0 else small).astype(np.float32)


class GaitEmbedder(Protocol):
    """Turns a GEI into an embedding compared by cosine similarity."""

    @property
    def model_name(self) -> str:
        """Stored with the embedding; embeddings of different models are not comparable."""
        ...

    def embed(self, gei: np.ndarray) -> np.ndarray:
        """``(GEI_HEIGHT, GEI_WIDTH) float32`` GEI in [0, 1] -> ``(d,) float32`` unit embedding."""
        ...


class GeiEmbedder:
    """The classical embedding: the GEI itself, through :func:`gei_embedding` (``d = 704``)."""

    model_name = f"gei-{GEI_HEIGHT}x{GEI_WIDTH}"

    def embed(self, gei: np.ndarray) -> np.ndarray:
        return gei_embedding(gei)


_WHAT = "gait embedder"


class OnnxGaitEmbedder:
    """A GEI-input gait model on ONNX Runtime (e.g. GEINet, Shiraga et al. 2016, ICB).

    Args:
        path: ONNX model with one input ``[B, 1, H, W]`` float32 (``H``, ``W``
            fixed; the batch may be dynamic or 1) and one ``[B, d]`` output.
            The GEI is resized to ``H x W`` (bilinear; GEINet's 128 x 88 has the
            GEI's 64:44 aspect ratio) with values in [0, 1], as the model was
            trained on.
        opts: ONNX Runtime threads and providers.

    Raises:
        ModelError: the file is missing, empty or not loadable, or its input
            or output is not of that layout (the message names the file).
    """

    def __init__(self, path: Path | str, opts: SessionOptions = SessionOptions()) -> None:
        self.path = Path(path)
        self.session = open_session("onnx", self.path, _WHAT, opts)
        inputs = self.session.get_inputs()
        shape = list(inputs[0].shape)
        hw = shape[2:]
        fixed_batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None  # None: dynamic
        if (len(inputs) != 1 or len(shape) != 4 or shape[1] != 1 or fixed_batch not in (None, 1)
                or not all(isinstance(v, int) and v > 0 for v in hw)):
            raise ModelError(f"{_WHAT} model {self.path}: inputs {[(i.name, list(i.shape)) for i in inputs]}, "
                             "expected one [B, 1, H, W] GEI input with fixed H and W; is this the right file?")
        expect_embedding_output(self.session, _WHAT, self.path)
        self._input_name = inputs[0].name
        self.input_hw: tuple[int, int] = (int(hw[0]), int(hw[1]))

    @property
    def model_name(self) -> str:
        """File stem of the model."""
        return self.path.stem

    def preprocess(self, gei: np.ndarray) -> np.ndarray:
        """``(GEI_HEIGHT, GEI_WIDTH)`` GEI -> ``(1, 1, H, W) float32`` model input, values in [0, 1].

        Raises:
            ValueError: ``gei`` is not ``(GEI_HEIGHT, GEI_WIDTH)``.
        """
        if gei.shape != (GEI_HEIGHT, GEI_WIDTH):
            raise ValueError(f"OnnxGaitEmbedder: expected a ({GEI_HEIGHT}, {GEI_WIDTH}) GEI, got {gei.shape}")
        h, w = self.input_hw
        resized = cv2.resize(gei.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        return np.clip(resized, 0.0, 1.0)[None, None]

    def embed(self, gei: np.ndarray) -> np.ndarray:
        """``(d,) float32`` L2-normalised model output for one GEI.

        Raises:
            ValueError: bad GEI shape; ModelError: the model's output is not finite.
        """
        out = np.asarray(self.session.run(None, {self._input_name: self.preprocess(gei)})[0], np.float32).reshape(-1)
        norm = float(np.linalg.norm(out))
        if not np.isfinite(norm):
            raise ModelError(f"{_WHAT} model {self.path}: non-finite output")
        return out / norm if norm > 0 else out


def gait_embedder(cfg: GaitConfig, opts: SessionOptions = SessionOptions()) -> GaitEmbedder:
    """The embedder ``cfg`` names: :class:`OnnxGaitEmbedder` with ``cfg.embedder``, else :class:`GeiEmbedder`.

    Raises:
        ModelError: the ONNX model is missing or of the wrong layout.
    """
    if cfg.embedder is None:
        return GeiEmbedder()
    return OnnxGaitEmbedder(cfg.embedder.path, for_model(opts, cfg.embedder.providers))
