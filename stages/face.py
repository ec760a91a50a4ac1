"""Face detection, alignment and embedding on ONNX Runtime.

Three steps turn an image into one embedding per face:

1. **Face detection** with SCRFD (Guo et al. 2021, "Sample and Computation
   Redistribution for Efficient Face Detection"), decoded by InsightFace's
   :class:`insightface.model_zoo.SCRFD` (letterboxing, anchor decoding, NMS).
   It returns boxes and five keypoints per face.
2. **Alignment**: a similarity transform maps the five keypoints onto the
   ArcFace template (Deng et al. 2019, "ArcFace: Additive Angular Margin Loss
   for Deep Face Recognition") and warps a 112x112 crop
   (:func:`insightface.utils.face_align.norm_crop`).
3. **Embedding** with an ArcFace-style network, by default MobileFaceNet
   (Chen et al. 2018, "MobileFaceNets: Efficient CNNs for Accurate Real-Time
   Face Verification on Mobile Devices"), through InsightFace's
   :class:`insightface.model_zoo.ArcFaceONNX` preprocessing; the output is
   L2-normalised so that a dot product is the cosine similarity.

The ONNX Runtime sessions are created by :func:`stages.runtime.open_session`
(threads, providers and error messages are FacePro's) and handed to the
InsightFace classes, which never open a model themselves here.

Conventions: images are ``(H, W, 3) uint8`` BGR (OpenCV order); boxes are
``x1, y1, x2, y2`` float pixels of the full image; keypoints are ``(5, 2)``
``x, y`` pixels in the order left eye, right eye, nose, left mouth corner,
right mouth corner, "left" meaning the image's left (the ArcFace template
order).

These classes are pure computation: no sockets, no files other than the model.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.config import FaceConfig, OnnxFaceDetectorConfig, OnnxFaceEmbedderConfig
from stages.runtime import (ModelError, SessionOptions, bucket, buckets, expect_embedding_output, expect_input, for_model,
                            open_session, pad_rows, static_shapes)

#: Side of the aligned face crop in pixels (ArcFace convention).
ALIGNED_SIZE = 112
#: With static shapes, the face batch sizes up to this many faces run once when the embedder opens; larger batches
#: run in chunks of this size, so no shape is new at run time.
WARM_FACES = 8

#: With static shapes and a free batch dimension, SCRFD batches of up to this many images run once when the
#: detector opens; larger batches run in chunks of this size.
WARM_IMAGES = 8

#: SCRFD ONNX exports with keypoints have 9 (3 strides) or 15 (5 strides) outputs.
_SCRFD_KPS_OUTPUTS = (9, 15)

log = logging.getLogger(__name__)


def _check_image(image: np.ndarray, what: str = "image") -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{what}: expected an (H, W, 3) uint8 BGR array, got {desc}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{what}: empty image of shape {image.shape}")


@dataclass(frozen=True)
class FaceDetections:
    """Faces found in one image, best score first.

    Attributes:
        xyxy: ``(n, 4) float32`` boxes ``x1, y1, x2, y2``, pixels of the full image
            (not clipped: a box may reach slightly outside the image).
        score: ``(n,) float32`` SCRFD face scores in [0, 1].
        kps: ``(n, 5, 2) float32`` keypoints ``x, y`` in pixels of the full image,
            order left eye, right eye, nose, left mouth, right mouth.
    """

    xyxy: np.ndarray
    score: np.ndarray
    kps: np.ndarray

    def __post_init__(self) -> None:
        n = self.xyxy.shape[0]
        if self.xyxy.shape != (n, 4) or self.score.shape != (n,) or self.kps.shape != (n, 5, 2):
            raise ValueError(
                f"FaceDetections: inconsistent shapes xyxy {self.xyxy.shape}, score {self.score.shape}, kps {self.kps.shape}"
            )
        for name in ("xyxy", "score", "kps"):
            if getattr(self, name).dtype != np.float32:
                raise ValueError(f"FaceDetections.{name}: expected float32, got {getattr(self, name).dtype}")

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    @staticmethod
    def empty() -> FaceDetections:
        return FaceDetections(
            np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32)
        )


class FaceDetector:
    """SCRFD face detector (Guo et al. 2021) with five keypoints.

    Decoding (anchor centres, distance-to-box, keypoints, NMS at IoU 0.4) is
    InsightFace's :class:`~insightface.model_zoo.SCRFD`; the ONNX Runtime
    session is ours. InsightFace letterboxes the image (or region) so that
    its long side is ``cfg.input_size`` pixels (see :meth:`input_size_for`);
    faces from about 10 px at that scale up to the whole input are found.

    Args:
        cfg: model path, ``input_size`` (pixels, multiple of 32) and
            ``score_threshold``.
        opts: ONNX Runtime threads and providers.

    Attributes:
        session_runs: model runs so far (a batch of :meth:`detect_batch` is one).

    Raises:
        ModelError: the file is missing, empty, not loadable, or not an SCRFD
            model with keypoints (wrong input rank/channels or output count), or
            the model has a fixed input size different from ``cfg.input_size``.
    """

    def __init__(self, cfg: OnnxFaceDetectorConfig, opts: SessionOptions = SessionOptions()) -> None:
        from insightface.model_zoo import SCRFD

        what = "face detector"
        self.cfg = cfg
        self.session = open_session(cfg.type, cfg.path, what, for_model(opts, cfg.providers))
        shape = expect_input(self.session, what, cfg.path, rank=4)
        n_out = len(self.session.get_outputs())
        if n_out not in _SCRFD_KPS_OUTPUTS:
            raise ModelError(
                f"{what} model {cfg.path}: {n_out} outputs, expected an SCRFD model with keypoints "
                f"({' or '.join(map(str, _SCRFD_KPS_OUTPUTS))} outputs: scores, boxes and keypoints per stride); "
                "is this the right file?"
            )
        fixed = [d for d in shape[2:] if isinstance(d, int)]
        if len(fixed) == 2 and tuple(fixed) != (cfg.input_size, cfg.input_size):
            raise ModelError(
                f"{what} model {cfg.path} has a fixed input of {fixed[1]}x{fixed[0]} pixels but "
                f"face.detector.input_size is {cfg.input_size}; set input_size to {fixed[1]} or use a model with dynamic input size"
            )
        static = static_shapes(self.session, opts)
        self._fixed_input = len(fixed) == 2 or static
        # model_file=None: InsightFace then uses this very session for every
        # input size instead of opening extra sessions of its own.
        self._scrfd = SCRFD(model_file=None, session=self.session)
        if not self._scrfd.use_kps:  # pragma: no cover - guarded by the output count above
            raise ModelError(f"{what} model {cfg.path} predicts no keypoints; alignment needs SCRFD with keypoints (*_kps/_bnkps)")
        self.session_runs = 0  # model runs (a batch is one)
        self._batch = self._open_batch(opts) if static else None
        if static:  # the one square input (and each padded batch size) runs once here, not on a camera's first face
            blank = np.zeros((cfg.input_size, cfg.input_size, 3), np.uint8)
            self.detect(blank)
            for n in buckets(WARM_IMAGES) if self._batch is not None else ():  # the batch session, 1 image too
                self._batch.run([blank] * n)

    def _open_batch(self, opts: SessionOptions) -> ScrfdBatch | None:
        """With static shapes, a second session whose batch dimension is free, kept when two images in one run give
        each one's own outputs (probed once on random images); None (one log line) when the graph cannot."""
        from stages.detector import free_input_hw

        size = (self.cfg.input_size,) * 2
        blob = np.random.default_rng(0).uniform(-1, 1, (2, 3, *size)).astype(np.float32)
        name = self.session.get_inputs()[0].name
        try:
            session = open_session(self.cfg.type, self.cfg.path, "face detector", opts,
                                   transform=lambda p: free_input_hw(p, 0, hw=False, batch=True, what="face detector"))
            both = session.run(None, {name: blob})
            apart = [self.session.run(None, {name: blob[i : i + 1]}) for i in range(2)]
            layout = next((lay for lay in ScrfdBatch.LAYOUTS if all(
                _close(ScrfdBatch.rows(out, b, 2, self._scrfd._num_anchors, lay), apart[b][k])
                for k, out in enumerate(both) for b in range(2))), None)
            if layout is None:
                raise ValueError("two images at once do not give each one's own outputs")
            batch = ScrfdBatch(self._scrfd, session, self.cfg.input_size, self.cfg.score_threshold, layout)
            batch.run([np.zeros((*size, 3), np.uint8)] * 2)  # decodes with this InsightFace version's SCRFD
        except Exception as err:  # ModelError, onnxruntime's own Fail types, the ValueError above, InsightFace's
            log.warning("face detector %s: no free batch dimension (%s); face crops run one at a time",
                        Path(self.cfg.path).name, str(err).splitlines()[0][:160])
            return None
        return batch

    def input_size_for(self, height: int, width: int) -> tuple[int, int]:
        """Network input ``(width, height)`` in pixels used for an image of this size.

        The image's long side is scaled to ``cfg.input_size`` (the same scale
        as a square letterbox); for models with dynamic input the short side
        is then rounded up to a multiple of 32 instead of padded to a square,
        which skips inference on padding (measured with SCRFD-500M on one
        thread: 1.3x faster on a 1280x886 image, 2.5x on a 200x500 person box). Fixed-size models, and every
        model with static shapes (:func:`stages.runtime.static_shapes`, on GPUs), always get the square.
        """
        s = self.cfg.input_size
        if self._fixed_input or height <= 0 or width <= 0:
            return (s, s)
        short = -(-int(np.ceil(s * min(height, width) / max(height, width))) // 32) * 32
        short = min(s, max(32, short))
        return (s, short) if width >= height else (short, s)

    @property
    def model_name(self) -> str:
        """File stem of the model (``scrfd_500m``)."""
        return Path(self.cfg.path).stem

    def detect(self, image: np.ndarray, region_xyxy: np.ndarray | None = None) -> FaceDetections:
        """Find faces in an image, or in one region of it.

        Args:
            image: ``(H, W, 3) uint8`` BGR.
            region_xyxy: optional ``(4,)`` box ``x1, y1, x2, y2`` in image
                pixels (e.g. a person box, padded by the caller if wanted).
                It is clipped to the image; only that crop is searched and
                results are mapped back to full-image coordinates. An empty
                region gives no faces.

        Returns:
            :class:`FaceDetections` with scores >= ``cfg.score_threshold``,
            boxes and keypoints in full-image pixels.

        Raises:
            ValueError: ``image`` is not ``(H, W, 3) uint8`` or ``region_xyxy``
                does not have 4 values.
        """
        crop, offset = _region(image, region_xyxy)
        if crop is None:
            return FaceDetections.empty()
        det, kps = self._scrfd.detect(crop, input_size=self.input_size_for(*crop.shape[:2]), det_thresh=self.cfg.score_threshold)
        self.session_runs += 1
        return _detections(det, kps, offset)

    def detect_batch(self, images: Sequence[np.ndarray], regions: Sequence[np.ndarray | None]) -> list[FaceDetections]:
        """:meth:`detect` for several images (of any cameras), each with its own region or None.

        With static shapes and a free batch dimension (:class:`ScrfdBatch`, on GPUs) the crops run together, in
        chunks of up to ``WARM_IMAGES`` padded to a power of two; otherwise one by one. Either way each result
        is what :meth:`detect` gives for that image and region, up to the float rounding of batched inference.

        Args:
            images: ``(H_i, W_i, 3) uint8`` BGR.
            regions: per image, a ``(4,)`` search box or None (see :meth:`detect`).

        Returns:
            One :class:`FaceDetections` per image, in order.

        Raises:
            ValueError: a wrong image or region, or ``regions`` of another length.
        """
        if len(images) != len(regions):
            raise ValueError(f"FaceDetector.detect_batch: {len(regions)} regions for {len(images)} images")
        if self._batch is None:
            return [self.detect(image, region) for image, region in zip(images, regions)]
        crops = [_region(image, region) for image, region in zip(images, regions)]
        out = [FaceDetections.empty()] * len(crops)
        todo = [k for k, (crop, _) in enumerate(crops) if crop is not None]
        for start in range(0, len(todo), WARM_IMAGES):
            chunk = todo[start : start + WARM_IMAGES]
            for k, (det, kps) in zip(chunk, self._batch.run([crops[k][0] for k in chunk])):
                out[k] = _detections(det, kps, crops[k][1])
            self.session_runs += 1
        return out


def _region(image: np.ndarray, region_xyxy: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
    """``image`` (checked) inside ``region_xyxy`` (clipped; None: the whole image) and the crop's ``(2,) float32``
    offset ``x, y`` in the image; the crop is None when the region holds less than 2x2 pixels."""
    _check_image(image)
    if region_xyxy is None:
        return image, np.zeros(2, np.float32)
    r = np.asarray(region_xyxy, dtype=np.float64).reshape(-1)
    if r.shape != (4,) or not np.all(np.isfinite(r)):
        raise ValueError(f"region_xyxy: expected 4 finite values x1, y1, x2, y2, got {region_xyxy!r}")
    h, w = image.shape[:2]
    x1, y1 = int(max(0, np.floor(r[0]))), int(max(0, np.floor(r[1])))
    x2, y2 = int(min(w, np.ceil(r[2]))), int(min(h, np.ceil(r[3])))
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None, np.zeros(2, np.float32)
    return image[y1:y2, x1:x2], np.array([x1, y1], np.float32)


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    """Same shape and values within 1e-3 of the largest magnitude (batched inference rounds differently)."""
    return got.shape == want.shape and float(np.abs(got - want).max(initial=0.0)) <= 1e-3 * max(1.0, float(np.abs(want).max(initial=0.0)))


def _detections(det: np.ndarray, kps: np.ndarray, offset: np.ndarray) -> FaceDetections:
    """SCRFD's ``(n, 5)`` boxes + scores and ``(n, 5, 2)`` keypoints of a crop, moved by its ``offset`` into image pixels."""
    if det.shape[0] == 0:
        return FaceDetections.empty()
    xyxy = det[:, :4].astype(np.float32) + np.tile(offset, 2)
    kps = kps.astype(np.float32).reshape(-1, 5, 2) + offset
    return FaceDetections(xyxy=np.ascontiguousarray(xyxy), score=det[:, 4].astype(np.float32), kps=np.ascontiguousarray(kps))


class ScrfdBatch:
    """SCRFD on several images in one run: each letterboxed into the same square input, the outputs split per image.

    Preprocessing and decoding follow InsightFace's ``SCRFD.detect`` step by step (top-left letterbox, ``cv2.dnn``
    blob with mean 127.5 / std 128 in RGB, per-stride anchor centres, ``distance2bbox`` / ``distance2kps`` of
    :mod:`insightface.model_zoo.scrfd`, score order, its ``nms``), reading the stride layout from the
    InsightFace object; ``tests/unit/test_static_shapes.py`` holds the results equal to ``SCRFD.detect`` image
    by image. Each output flattens the batch into its rows (Reshape ``[-1, k]``); where an image's rows lie
    depends on the export (:data:`LAYOUTS`, :meth:`rows`), which the detector probes.

    Args:
        scrfd: the detector's :class:`insightface.model_zoo.SCRFD` (strides, anchors, output names, ``nms``).
        session: an ONNX Runtime session of the model with a free batch dimension.
        size: the square input side, pixels.
        threshold: score threshold.
        layout: one of :data:`LAYOUTS`.
    """

    #: Row orders of a batched output: ``"cells"`` (the asset ``scrfd_500m``: Transpose ``[2, 3, 0, 1]``, rows by
    #: cell, then image, then anchor) or ``"images"`` (Transpose ``[0, 2, 3, 1]``: all rows of image 0 first).
    LAYOUTS = ("cells", "images")

    def __init__(self, scrfd: Any, session: Any, size: int, threshold: float, layout: str = "cells") -> None:
        self.scrfd, self.session, self.size, self.threshold, self.layout = scrfd, session, size, threshold, layout
        self._centres: dict[int, np.ndarray] = {}

    @staticmethod
    def rows(out: np.ndarray, b: int, n: int, anchors: int, layout: str) -> np.ndarray:
        """Image ``b``'s ``(rows, k)`` part of a batched output ``out`` (``(n * rows, k)``, ``n`` images, ``anchors``
        anchors per cell) under ``layout``."""
        if layout == "images":
            per = len(out) // n
            return out[b * per : (b + 1) * per]
        return out.reshape(-1, n, anchors, out.shape[-1])[:, b].reshape(-1, out.shape[-1])

    def _letterbox(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        s = self.size
        h, w = image.shape[:2]
        new_h, new_w = (s, int(s / (h / w))) if h / w > 1.0 else (int(s * (h / w)), s)
        canvas = np.zeros((s, s, 3), np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
        return canvas, new_h / h

    def _anchor_centres(self, stride: int) -> np.ndarray:
        if stride not in self._centres:
            side = self.size // stride
            centres = (np.stack(np.mgrid[:side, :side][::-1], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
            self._centres[stride] = np.repeat(centres, self.scrfd._num_anchors, axis=0)
        return self._centres[stride]

    def run(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image ``(m, 5) float32`` boxes ``x1, y1, x2, y2`` + score and ``(m, 5, 2) float32`` keypoints, in
        that image's pixels, best first after NMS; one model run, padded with blank images to a power of two."""
        boxes = [self._letterbox(image) for image in images]
        canvases = [c for c, _ in boxes] + [np.zeros_like(boxes[0][0])] * (bucket(len(boxes)) - len(boxes))
        mean, std = self.scrfd.input_mean, self.scrfd.input_std
        blob = cv2.dnn.blobFromImages(canvases, 1.0 / std, (self.size, self.size), (mean, mean, mean), swapRB=True)
        outs = self.session.run(self.scrfd.output_names, {self.scrfd.input_name: blob})
        n = len(canvases)
        return [self._decode([self.rows(o, b, n, self.scrfd._num_anchors, self.layout) for o in outs], scale)
                for b, (_, scale) in enumerate(boxes)]

    def _decode(self, outs: list[np.ndarray], scale: float) -> tuple[np.ndarray, np.ndarray]:
        """One image's outputs (its rows of each) decoded as InsightFace's ``SCRFD.detect`` does."""
        from insightface.model_zoo.scrfd import distance2bbox, distance2kps

        fmc, found = self.scrfd.fmc, []
        for idx, stride in enumerate(self.scrfd._feat_stride_fpn):
            centres = self._anchor_centres(stride)
            scores = outs[idx]
            pos = np.where(scores >= self.threshold)[0]
            bboxes = distance2bbox(centres, outs[idx + fmc] * stride)
            kpss = distance2kps(centres, outs[idx + 2 * fmc] * stride).reshape(-1, 5, 2)
            found.append((scores[pos], bboxes[pos], kpss[pos]))
        scores = np.vstack([f[0] for f in found])
        if scores.size == 0:
            return np.empty((0, 5), np.float32), np.empty((0, 5, 2), np.float32)
        order = np.argsort(-scores.ravel(), kind="stable")
        det = np.hstack((np.vstack([f[1] for f in found]) / scale, scores)).astype(np.float32, copy=False)[order]
        kps = (np.vstack([f[2] for f in found]) / scale)[order]
        keep = self.scrfd.nms(det)
        return det[keep], kps[keep]


def align(image: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """Warp a face to the 112x112 ArcFace template (Deng et al. 2019).

    A least-squares similarity transform (rotation, uniform scale,
    translation) maps the five keypoints onto the ArcFace 5-point template;
    this is InsightFace's :func:`~insightface.utils.face_align.norm_crop`.

    Args:
        image: ``(H, W, 3) uint8`` BGR.
        kps: ``(5, 2)`` keypoints ``x, y`` in image pixels, order left eye,
            right eye, nose, left mouth, right mouth.

    Returns:
        ``(112, 112, 3) uint8`` BGR aligned crop (black outside the image).

    Raises:
        ValueError: wrong image or keypoint shape.
    """
    from insightface.utils import face_align

    _check_image(image)
    k = np.asarray(kps, dtype=np.float32)
    if k.shape != (5, 2):
        raise ValueError(f"kps: expected shape (5, 2), got {k.shape}")
    with warnings.catch_warnings():
        # scikit-image >= 0.26 deprecates SimilarityTransform.estimate, which
        # face_align calls once per face: silence exactly that warning.
        warnings.filterwarnings("ignore", message=r".*`estimate` is deprecated", category=FutureWarning)
        return face_align.norm_crop(image, k, image_size=ALIGNED_SIZE)


class FaceEmbedder:
    """ArcFace-style face embedder: aligned 112x112 crop → unit vector.

    The default model is MobileFaceNet (Chen et al. 2018) trained with an
    ArcFace loss (Deng et al. 2019); any ONNX model with input
    ``[B, 3, 112, 112]`` and one ``[B, d]`` output works by config alone.
    Preprocessing is InsightFace's :class:`~insightface.model_zoo.ArcFaceONNX`
    (BGR→RGB, ``(x - 127.5) / 127.5``, or raw pixels for MXNet exports that
    normalise inside the graph).

    Args:
        cfg: model path.
        opts: ONNX Runtime threads and providers.

    Raises:
        ModelError: the file is missing, empty, not loadable, or its input is
            not ``[B, 3, 112, 112]`` / it has more than one output.
    """

    def __init__(self, cfg: OnnxFaceEmbedderConfig, opts: SessionOptions = SessionOptions()) -> None:
        from insightface.model_zoo import ArcFaceONNX

        what = "face embedder"
        self.cfg = cfg
        self.session = open_session(cfg.type, cfg.path, what, for_model(opts, cfg.providers))
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4 or shape[1] != 3 or shape[2] != ALIGNED_SIZE or shape[3] != ALIGNED_SIZE:
            raise ModelError(
                f"{what} model {cfg.path}: input {inp.name} has shape {shape}, expected [B, 3, 112, 112] "
                "(an aligned face crop); is this the right file? Any ArcFace-style 112x112 model works by config alone"
            )
        d = expect_embedding_output(self.session, what, cfg.path)
        self._arcface = ArcFaceONNX(model_file=str(cfg.path), session=self.session)
        self._batched = not (isinstance(shape[0], int) and shape[0] == 1)
        self._static = self._batched and static_shapes(self.session, opts)
        self._dim = int(d) if isinstance(d, int) else int(self._run(np.zeros((1, 112, 112, 3), np.uint8)).shape[1])
        for n in buckets(WARM_FACES) if self._static else ():  # each padded batch size runs once here
            self._run(np.zeros((n, ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8))

    @property
    def dim(self) -> int:
        """Embedding length ``d`` (128 for MobileFaceNet)."""
        return self._dim

    @property
    def model_name(self) -> str:
        """File stem of the model (``mobilefacenet_128d``); galleries record it."""
        return Path(self.cfg.path).stem

    def _run(self, aligned: np.ndarray) -> np.ndarray:
        if self._static:  # chunks of warmed sizes, padded to a bucket size: blank crops, their rows dropped
            return np.concatenate([
                np.asarray(self._arcface.get_feat(list(pad_rows(c, bucket(len(c))))), np.float32)[: len(c)]
                for c in (aligned[i : i + WARM_FACES] for i in range(0, len(aligned), WARM_FACES))])
        if self._batched:
            return np.asarray(self._arcface.get_feat(list(aligned)), dtype=np.float32)
        return np.concatenate([np.asarray(self._arcface.get_feat([a]), dtype=np.float32) for a in aligned])

    def embed(self, aligned: np.ndarray) -> np.ndarray:
        """Embed aligned face crops in one batch.

        Args:
            aligned: ``(B, 112, 112, 3) uint8`` BGR crops from :func:`align`
                (``B`` may be 0).

        Returns:
            ``(B, d) float32`` embeddings with unit L2 norm (dot product =
            cosine similarity).

        Raises:
            ValueError: wrong shape or dtype.
        """
        a = np.asarray(aligned)
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[1:] != (ALIGNED_SIZE, ALIGNED_SIZE, 3):
            raise ValueError(f"aligned: expected a (B, 112, 112, 3) uint8 array, got {a.dtype} {a.shape}")
        if a.shape[0] == 0:
            return np.zeros((0, self._dim), np.float32)
        emb = self._run(a)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return (emb / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Face:
    """One detected and embedded face.

    Attributes:
        xyxy: ``(4,) float32`` box ``x1, y1, x2, y2``, full-image pixels.
        score: SCRFD detection score in [0, 1].
        kps: ``(5, 2) float32`` keypoints ``x, y`` (left eye, right eye, nose,
            left mouth, right mouth), full-image pixels.
        embedding: ``(d,) float32`` unit-norm embedding.
    """

    xyxy: np.ndarray
    score: float
    kps: np.ndarray
    embedding: np.ndarray

    @property
    def width(self) -> float:
        """Box width in pixels."""
        return float(self.xyxy[2] - self.xyxy[0])


class FaceAnalyzer:
    """Detect → align → embed, the whole face pipeline for one image.

    Args:
        face_cfg: detector and embedder configs, ``min_face_px`` default.
        opts: ONNX Runtime threads and providers (shared by both models).

    Raises:
        ModelError: from :class:`FaceDetector` or :class:`FaceEmbedder`.
    """

    def __init__(self, face_cfg: FaceConfig, opts: SessionOptions = SessionOptions()) -> None:
        self.cfg = face_cfg
        self.detector = FaceDetector(face_cfg.detector, opts)
        self.embedder = FaceEmbedder(face_cfg.embedder, opts)
        self.last_small = 0

    @property
    def dim(self) -> int:
        """Embedding length of the embedder."""
        return self.embedder.dim

    @property
    def model_name(self) -> str:
        """Embedder model name (embeddings of different models are not comparable)."""
        return self.embedder.model_name

    def analyze(self, image: np.ndarray, region_xyxy: np.ndarray | None = None, min_face_px: int | None = None) -> list[Face]:
        """Detect, align and embed every face in an image (or a region of it).

        Args:
            image: ``(H, W, 3) uint8`` BGR.
            region_xyxy: optional ``(4,)`` search box in image pixels, see
                :meth:`FaceDetector.detect`.
            min_face_px: skip faces whose box is narrower than this many
                pixels (too small to recognise); default ``face_cfg.min_face_px``.

        Returns:
            One :class:`Face` per kept face, best detection score first; all
            embeddings are computed in one batch.

        Raises:
            ValueError: wrong image or region.
        """
        dets = self.find(image, region_xyxy, min_face_px)
        if not len(dets):
            return []
        emb = self.embedder.embed(np.stack([align(image, k) for k in dets.kps]))
        return [
            Face(xyxy=dets.xyxy[i].copy(), score=float(dets.score[i]), kps=dets.kps[i].copy(), embedding=emb[i])
            for i in range(len(dets))
        ]

    def find(self, image: np.ndarray, region_xyxy: np.ndarray | None = None, min_face_px: int | None = None) -> FaceDetections:
        """Detect the faces :meth:`analyze` would embed, without embedding them (a caller that embeds only the
        faces it uses, or the faces of several images in one batch, aligns with :func:`align` and embeds with
        :attr:`embedder`).

        Args: as :meth:`analyze`.

        Returns:
            :class:`FaceDetections` of the faces at least ``min_face_px`` wide, best score first; the number
            left out as too small is :attr:`last_small`.

        Raises:
            ValueError: wrong image or region.
        """
        return self.find_batch([image], [region_xyxy], min_face_px)[0]

    def find_batch(self, images: Sequence[np.ndarray], regions: Sequence[np.ndarray | None],
                   min_face_px: int | None = None) -> list[FaceDetections]:
        """:meth:`find` for several images, each with its own region or None, through
        :meth:`FaceDetector.detect_batch` (one run for all of them on a GPU with static shapes);
        :attr:`last_small` counts the faces left out as too small over all of them.

        Args:
            images: ``(H_i, W_i, 3) uint8`` BGR.
            regions: per image, a ``(4,)`` search box ``x1, y1, x2, y2`` in its pixels, or None (the whole image).
            min_face_px: as :meth:`analyze`.

        Returns:
            One :class:`FaceDetections` per image, in order (faces at least ``min_face_px`` wide).

        Raises:
            ValueError: a wrong image or region, or ``regions`` of another length.
        """
        min_w = self.cfg.min_face_px if min_face_px is None else min_face_px
        out, small = [], 0
        for dets in self.detector.detect_batch(images, regions):
            keep = dets.xyxy[:, 2] - dets.xyxy[:, 0] >= min_w
            small += int(len(dets) - keep.sum())
            out.append(FaceDetections(dets.xyxy[keep], dets.score[keep], dets.kps[keep]))
        self.last_small = small  # faces skipped as too small by the last call
        return out
