"""Object detection with YOLOX or YOLOv8 ONNX models: letterbox, decode, class-aware NMS.

Two output layouts are supported (``detection.detector.layout`` in the config):

- ``yolox``: YOLOX (Ge et al., "YOLOX: Exceeding YOLO Series in 2021",
  arXiv:2107.08430; Megvii-BaseDetection/YOLOX ``demo/ONNXRuntime``). Input
  ``[1, 3, H, W]`` BGR 0–255 float, no normalisation, image letterboxed at the
  top-left corner with pad value 114. Output ``[1, N, 5 + C]``, one row per
  grid cell of strides 8, 16, 32: ``dx, dy, log w, log h, objectness, C class
  scores`` (already sigmoid-activated).
- ``yolov8``: Ultralytics YOLOv8 detection head export. Input ``[1, 3, H, W]``
  RGB scaled to [0, 1], image letterboxed in the centre with pad value 114
  (Ultralytics ``LetterBox(center=True)``). Output ``[1, 4 + C, N]``:
  ``cx, cy, w, h`` in input pixels and C class scores, no objectness. Class
  names come from the model metadata ``names``.

All boxes are ``xyxy`` = ``x1, y1, x2, y2`` in pixels, float32.

Canvas size (``detection.detector.canvas``): ``fixed`` letterboxes every image
into the model's declared input (416x416 for the asset YOLOX-Nano); ``fit``
pads it only up to the next multiple of the head's largest stride (32), as
Ultralytics' ``LetterBox(auto=True)`` and YOLOv5's rectangular inference do,
so a 16:9 frame costs a 416x256 run instead of 416x416. A model exported with
a fixed input size has its height and width made symbolic in memory at load
(the file is not changed); :class:`ObjectDetector` then runs one probe on a
non-square input and falls back to ``fixed`` (with a log line) when the graph
cannot take it (e.g. a YOLOv8 export whose head reshapes to its 8400 anchors).
Crops (motion regions) run at a given scale on canvases fitted the same way.

Batches (:meth:`ObjectDetector.detect_batch`): a model whose input batch
dimension is dynamic (``[N, 3, H, W]``, e.g. YOLOX ``export_onnx.py --dynamic``)
runs a ``[B, 3, H, W]`` input once; one with a fixed batch size ``k`` (the asset
YOLOX-Nano: 1) runs in chunks of ``k``. Output ``[B, ...]`` as above, per image.
"""

from __future__ import annotations

import ast
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from pipeline.config import OnnxDetectorConfig
from pipeline.messages import check_array, check_rows
from stages.runtime import ModelError, SessionOptions, bucket, expect_input, for_model, open_session, static_shapes

#: The 80 COCO class names in the order used by YOLOX and YOLOv8 (index = class id).
COCO80: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)  # fmt: skip

#: Output strides of the YOLOX / YOLOv8 detection heads, pixels.
STRIDES: tuple[int, ...] = (8, 16, 32)

_WHAT = "object detector"

log = logging.getLogger("facepro.detector")


# --------------------------------------------------------------------------- letterbox


@dataclass(frozen=True)
class Letterbox:
    """A frame resized into a model's input canvas, keeping its aspect ratio.

    Attributes:
        image: ``(h, w, 3) uint8`` canvas of the model input size; the resized
            frame is pasted at ``(pad_x, pad_y)``, the rest is the pad value.
        scale: input pixels per frame pixel (``<= 1`` when shrinking).
        pad_x, pad_y: offset of the resized frame in the canvas, pixels.
    """

    image: np.ndarray
    scale: float
    pad_x: int
    pad_y: int


def letterbox(image: np.ndarray, size_hw: tuple[int, int], pad_value: int = 114, *, center: bool = False,
              scale: float | None = None) -> Letterbox:
    """Resize ``image`` to fit ``size_hw`` keeping the aspect ratio, padding the rest.

    The image is placed at the top-left corner (YOLOX's official
    preprocessing, ``center=False``) or in the centre (Ultralytics
    ``LetterBox``, ``center=True``). Resizing uses ``cv2.INTER_LINEAR``.

    Args:
        image: ``(H, W, 3) uint8`` frame (any channel order; it is not changed).
        size_hw: canvas ``(height, width)`` in pixels.
        pad_value: grey level of the padding, 0–255.
        center: centre the image instead of the top-left placement.
        scale: input pixels per image pixel to use instead of the largest that
            fits (a crop runs at its whole frame's scale); the resized image
            must fit the canvas.

    Returns:
        The :class:`Letterbox` canvas with its scale and offsets.

    Raises:
        ValueError: ``image`` is not an ``(H, W, 3) uint8`` array or ``size_hw`` is not positive.
    """
    _check_frame(image, "letterbox image")
    out_h, out_w = (int(v) for v in size_hw)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"letterbox size_hw: expected positive (height, width), got {size_hw}")
    h, w = image.shape[:2]
    if scale is None:
        scale = min(out_h / h, out_w / w)
    elif not scale > 0 or round(w * scale) > out_w or round(h * scale) > out_h:
        raise ValueError(f"letterbox scale: {scale} does not fit a {w}x{h} image into a {out_w}x{out_h} canvas")
    new_w, new_h = min(out_w, max(1, round(w * scale))), min(out_h, max(1, round(h * scale)))
    pad_x, pad_y = ((out_w - new_w) // 2, (out_h - new_h) // 2) if center else (0, 0)
    canvas = np.full((out_h, out_w, 3), pad_value, dtype=np.uint8)
    resized = image if (new_w, new_h) == (w, h) else cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
    return Letterbox(image=canvas, scale=float(scale), pad_x=pad_x, pad_y=pad_y)


def fit_canvas(image_hw: tuple[int, int], max_hw: tuple[int, int], scale: float | None = None,
               stride: int = STRIDES[-1]) -> tuple[tuple[int, int], float]:
    """The smallest stride-aligned canvas for an image at a scale (Ultralytics ``LetterBox(auto=True)``).

    Args:
        image_hw: the image's ``(height, width)``, pixels.
        max_hw: the model's declared input ``(height, width)``: the default scale
            fits the image into it, and no canvas is larger.
        scale: canvas pixels per image pixel; None: ``min(max_h / h, max_w / w)``.
        stride: the head's largest stride; canvas sides are multiples of it.

    Returns:
        ``((canvas_h, canvas_w), scale)``.

    Raises:
        ValueError: a non-positive size or scale.
    """
    h, w = image_hw
    if h <= 0 or w <= 0 or max_hw[0] <= 0 or max_hw[1] <= 0:
        raise ValueError(f"fit_canvas: expected positive sizes, got image {image_hw} and input {max_hw}")
    s = min(max_hw[0] / h, max_hw[1] / w) if scale is None else scale
    if not s > 0:
        raise ValueError(f"fit_canvas scale: expected a positive number, got {scale}")
    side = [min(m, max(stride, math.ceil(round(v * s) / stride) * stride)) for v, m in zip((h, w), max_hw)]
    return (side[0], side[1]), float(s)


def boxes_to_frame(xyxy: np.ndarray, lb: Letterbox, frame_hw: tuple[int, int]) -> np.ndarray:
    """Map boxes from letterbox-canvas pixels back to source-frame pixels, clipped to the frame.

    Args:
        xyxy: ``(n, 4)`` boxes ``x1, y1, x2, y2`` in canvas pixels.
        lb: the :class:`Letterbox` the canvas came from.
        frame_hw: source frame ``(height, width)``; coordinates are clipped to
            ``[0, width]`` and ``[0, height]``.

    Returns:
        ``(n, 4) float32`` boxes in frame pixels.
    """
    offset = np.array([lb.pad_x, lb.pad_y, lb.pad_x, lb.pad_y], dtype=np.float32)
    out = (np.asarray(xyxy, dtype=np.float32).reshape(-1, 4) - offset) / np.float32(lb.scale)
    h, w = frame_hw
    np.clip(out[:, 0::2], 0, w, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, h, out=out[:, 1::2])
    return out


# --------------------------------------------------------------------------- decoding


@lru_cache(maxsize=8)
def yolo_grid(input_hw: tuple[int, int], strides: tuple[int, ...] = STRIDES) -> tuple[np.ndarray, np.ndarray]:
    """Grid-cell coordinates and strides of a YOLO head, in output-row order.

    Rows go stride by stride; within a stride row-major (``x`` fastest), as in
    YOLOX's ``demo_postprocess`` and Ultralytics' ``make_anchors``.

    Returns:
        ``(N, 2) float32`` cell ``(x, y)`` indices and ``(N, 1) float32`` stride of each row
        (cached per argument pair, so both are read-only).
    """
    grids, steps = [], []
    for s in strides:
        gh, gw = input_hw[0] // s, input_hw[1] // s
        xv, yv = np.meshgrid(np.arange(gw), np.arange(gh))
        grids.append(np.stack((xv, yv), axis=2).reshape(-1, 2))
        steps.append(np.full((gh * gw, 1), s))
    grid, stride = np.concatenate(grids).astype(np.float32), np.concatenate(steps).astype(np.float32)
    grid.setflags(write=False)
    stride.setflags(write=False)
    return grid, stride


def _one_image(output: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(output)
    if arr.ndim == 3:
        if arr.shape[0] != 1:
            raise ValueError(f"{what}: expected one image (batch 1), got shape {arr.shape}")
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D or batch-1 3-D array, got shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


def _best_class(class_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    class_ids = np.argmax(class_scores, axis=1).astype(np.int32)
    return np.take_along_axis(class_scores, class_ids[:, None].astype(np.intp), axis=1)[:, 0], class_ids


def decode_yolox(
    output: np.ndarray, input_hw: tuple[int, int], strides: tuple[int, ...] = STRIDES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a YOLOX head output for one image (YOLOX ``demo_postprocess``).

    For the row of grid cell ``(gx, gy)`` at stride ``s``:
    ``cx = (dx + gx)·s``, ``cy = (dy + gy)·s``, ``w = exp(log w)·s``,
    ``h = exp(log h)·s``; score = objectness × best class score.

    Args:
        output: ``(1, N, 5 + C)`` or ``(N, 5 + C)`` float array.
        input_hw: model input ``(height, width)`` in pixels.
        strides: head strides, in the order of the output rows.

    Returns:
        ``xyxy (N, 4) float32`` input-canvas pixels, ``scores (N,) float32``,
        ``class_ids (N,) int32`` (argmax over the C classes).

    Raises:
        ValueError: wrong rank, batch > 1, fewer than 6 columns, or N not
            matching the grid of ``input_hw`` and ``strides``.
    """
    rows = _one_image(output, "decode_yolox output")
    grid, stride = yolo_grid(tuple(input_hw), tuple(strides))
    if rows.shape[1] < 6 or rows.shape[0] != grid.shape[0]:
        raise ValueError(
            f"decode_yolox output: expected (N, 5 + classes) with N = {grid.shape[0]} rows for input "
            f"{tuple(input_hw)} and strides {tuple(strides)}, got shape {rows.shape}"
        )
    centre = (rows[:, 0:2] + grid) * stride
    size = np.exp(rows[:, 2:4]) * stride
    xyxy = np.concatenate((centre - size / 2, centre + size / 2), axis=1).astype(np.float32)
    best, class_ids = _best_class(rows[:, 5:])
    return xyxy, (rows[:, 4] * best).astype(np.float32), class_ids


def decode_yolov8(output: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode an Ultralytics YOLOv8 detection output for one image.

    Args:
        output: ``(1, 4 + C, N)`` or ``(4 + C, N)`` float array; rows 0–3 are
            ``cx, cy, w, h`` in input pixels, the rest class scores in [0, 1].

    Returns:
        ``xyxy (N, 4) float32`` input-canvas pixels, ``scores (N,) float32``
        (best class score, no objectness), ``class_ids (N,) int32``.

    Raises:
        ValueError: wrong rank, batch > 1, or fewer than 5 channels.
    """
    chans = _one_image(output, "decode_yolov8 output")
    if chans.shape[0] < 5:
        raise ValueError(f"decode_yolov8 output: expected (4 + classes, N), got shape {chans.shape}")
    rows = chans.T
    half = rows[:, 2:4] / 2
    xyxy = np.concatenate((rows[:, 0:2] - half, rows[:, 0:2] + half), axis=1).astype(np.float32)
    scores, class_ids = _best_class(rows[:, 4:])
    return xyxy, scores.astype(np.float32), class_ids


def nms_per_class(xyxy: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Class-aware non-maximum suppression (``cv2.dnn.NMSBoxesBatched``).

    A box is suppressed by a higher-scoring box of the same class whose IoU
    with it is above ``iou_threshold``; boxes of different classes never
    suppress each other.

    Args:
        xyxy: ``(n, 4)`` boxes, pixels.
        scores: ``(n,)`` confidences.
        class_ids: ``(n,)`` integer class ids.
        iou_threshold: IoU in (0, 1].

    Returns:
        ``(k,) int64`` indices of the kept boxes, highest score first within a class.
    """
    if len(scores) == 0:
        return np.empty(0, dtype=np.int64)
    xyxy = np.asarray(xyxy, dtype=np.float64)
    xywh = np.concatenate((xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]), axis=1)
    keep = cv2.dnn.NMSBoxesBatched(xywh, np.asarray(scores, np.float64), np.asarray(class_ids, np.int32), -1.0, float(iou_threshold))
    return np.asarray(keep, dtype=np.int64).reshape(-1)


# --------------------------------------------------------------------------- detector


@dataclass(frozen=True)
class DetectionResult:
    """Objects found in one frame: the detections container of the stages (the detector's output and the
    tracker's input; the wire message :class:`pipeline.messages.Detections` carries the same arrays).

    Attributes:
        xyxy: ``(n, 4) float32`` boxes ``x1, y1, x2, y2`` in frame pixels.
        confidence: ``(n,) float32`` detection scores in [0, 1].
        class_id: ``(n,) int32`` class ids (index into ``ObjectDetector.class_names``).

    Raises:
        ValueError: (at construction) an array of another dtype or shape, or arrays of different lengths.
    """

    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray

    def __post_init__(self) -> None:
        check_array("DetectionResult.xyxy", self.xyxy, np.float32, 2, 4)
        check_array("DetectionResult.confidence", self.confidence, np.float32, 1)
        check_array("DetectionResult.class_id", self.class_id, np.int32, 1)
        check_rows("DetectionResult", self.xyxy.shape[0], confidence=self.confidence, class_id=self.class_id)

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    @classmethod
    def empty(cls) -> DetectionResult:
        """No objects (a frame the motion gate skipped, or one that could not be read)."""
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))


def _check_frame(frame: Any, what: str) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        got = f"{frame.dtype} array of shape {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"{what}: expected an (H, W, 3) uint8 BGR image, got {got}; decode frames with cv2 (BGR, uint8)")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"{what}: image is empty (shape {frame.shape})")


def _pad_to(image: np.ndarray, hw: tuple[int, int], pad_value: int = 114) -> np.ndarray:
    """``image`` padded at the bottom and right to ``hw`` (unchanged when it has that size)."""
    h, w = image.shape[:2]
    if (h, w) == tuple(hw):
        return image
    return cv2.copyMakeBorder(image, 0, hw[0] - h, 0, hw[1] - w, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)


def free_input_hw(path: Path, grid_rows: int, *, hw: bool = True, batch: bool = False, what: str = _WHAT) -> bytes:
    """The model at ``path`` as ONNX bytes whose input height and width (and output dims equal to ``grid_rows``,
    the anchor count of the declared input) are symbolic, so ONNX Runtime accepts other canvas sizes; with
    ``batch`` (and ``hw`` False: only the batch) the batch dimension of the input and outputs instead.

    Only the declared shapes change (the ONNX graph's ``value_info`` shape hints are dropped and re-inferred),
    and for ``batch`` the target shapes of Reshape nodes that start with a literal 1 (YOLOX's ``[1, 85, -1]``)
    start with 0, which ONNX Reshape reads as "the input's own dimension" (``allowzero`` 0, ONNX operator
    spec). Whether the graph really computes on another size is for the caller to probe.

    Raises:
        ModelError: the file is not a readable ONNX model (the message names it as ``what``).
    """
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as err:  # onnx raises DecodeError and others
        raise ModelError(f"{what} model {path} could not be read as ONNX ({type(err).__name__}: {err})") from None
    names = ("batch" if batch else None, None) + (("height", "width") if hw else (None, None))  # N, C, H, W
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim, names):
        if name:
            dim.ClearField("dim_value")
            dim.dim_param = name
    for output in model.graph.output:
        for i, dim in enumerate(output.type.tensor_type.shape.dim):
            if (hw and dim.dim_value == grid_rows) or (batch and i == 0):
                dim.ClearField("dim_value")
                dim.dim_param = "anchors" if i else "batch"
    if batch:
        shapes = {n.input[1] for n in model.graph.node if n.op_type == "Reshape" and len(n.input) > 1
                  and not any(a.name == "allowzero" and a.i for a in n.attribute)}
        for init in model.graph.initializer:
            value = numpy_helper.to_array(init)
            if init.name in shapes and value.ndim == 1 and len(value) > 1 and value[0] == 1:
                init.CopyFrom(numpy_helper.from_array(np.concatenate(([0], value[1:])).astype(value.dtype), init.name))
    del model.graph.value_info[:]
    return model.SerializeToString()


def _metadata_names(session: Any, path: Path) -> tuple[str, ...] | None:
    raw = session.get_modelmeta().custom_metadata_map.get("names")
    if raw is None:
        return None
    try:
        names = ast.literal_eval(raw)
        return tuple(str(names[i]) for i in range(len(names)))
    except (ValueError, SyntaxError, KeyError, TypeError):
        raise ModelError(f"{_WHAT} model {path}: metadata 'names' is not a class-name dict ({raw[:80]!r}...)") from None


def _static_dim(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def _check_output(session: Any, path: Path, layout: str, input_hw: tuple[int, int], n_classes: int,
                  batch: int | None = 1) -> None:
    """Raise ModelError when the first output does not have the configured layout (``batch``: the input's
    fixed batch size, None for a dynamic one, shown as ``N``)."""
    out = session.get_outputs()[0]
    shape = [_static_dim(v) for v in out.shape]
    cells = len(yolo_grid(tuple(input_hw))[0])
    b: int | str = batch or "N"
    shapes = {"yolox": [b, cells, 5 + n_classes], "yolov8": [b, 4 + n_classes, cells]}
    expected = shapes[layout]
    if not _fits(shape, expected):
        other = "yolov8" if layout == "yolox" else "yolox"
        hint = f" to {other!r}" if _fits(shape, shapes[other]) else ""
        raise ModelError(
            f"{_WHAT} model {path}: configured layout {layout!r} expects output {expected}, "
            f"found {out.name} with shape {list(out.shape)}; set detection.detector.layout{hint} "
            f"or point detection.detector.path at a {layout} model"
        )


def _fits(shape: list[int | None], expected: list[int | str]) -> bool:
    return len(shape) == len(expected) and all(s is None or isinstance(e, str) or s == e for s, e in zip(shape, expected))


def _class_ids(wanted: tuple[str, ...], names: tuple[str, ...]) -> np.ndarray:
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise ValueError(
            f"detection.detector.classes: unknown class name(s) {unknown}; valid names: {', '.join(names)}"
        )
    return np.array(sorted({names.index(c) for c in wanted}), dtype=np.int32)


def class_names_of(cfg: OnnxDetectorConfig, opts: SessionOptions = SessionOptions()) -> tuple[str, ...]:
    """The class names (index = class id) the detector of ``cfg`` reports: COCO-80 for a YOLOX model, without
    opening it; a YOLOv8 model's own metadata (the model is opened and checked).

    Raises:
        ModelError, ValueError: as :class:`ObjectDetector` (YOLOv8 only).
    """
    if cfg.layout != "yolov8":
        return COCO80
    return ObjectDetector(cfg, opts).class_names


class ObjectDetector:
    """YOLOX / YOLOv8 object detector on ONNX Runtime: one frame (:meth:`detect`) or a batch (:meth:`detect_batch`).

    Pure stage: it holds an inference session and no other resources.

    Args:
        cfg: detector config (model file, layout, confidence, NMS IoU, classes).
        opts: inference threads and execution providers.

    Raises:
        ModelError: the model file is missing, unreadable, or its input/output
            shapes do not match ``cfg.layout`` (the message names the file).
        ValueError: a name in ``cfg.classes`` is not a class of the model.

    Attributes:
        session_runs: inference session runs so far (one per :meth:`detect`, one
            per model batch in :meth:`detect_batch`).
        fits: True when canvases fit each image (``cfg.canvas == "fit"`` and the
            model took a free input height and width, see the module docstring).
        static: inputs keep to a few shapes (:func:`stages.runtime.static_shapes`, on GPUs):
            the declared canvas, and a model declared with batch 1 gets a free batch
            dimension (when probed equal) with batches padded to :func:`~stages.runtime.bucket` sizes.
    """

    def __init__(self, cfg: OnnxDetectorConfig, opts: SessionOptions = SessionOptions()) -> None:
        self._cfg = cfg
        opts = for_model(opts, cfg.providers)
        self._session = open_session(cfg.type, cfg.path, _WHAT, opts)
        path = Path(cfg.path)
        shape = expect_input(self._session, _WHAT, path, rank=4)
        if _static_dim(shape[2]) is None or _static_dim(shape[3]) is None:
            raise ModelError(f"{_WHAT} model {path}: input shape {list(shape)} has no fixed height/width; export it with a fixed input size")
        self._input_hw = (int(shape[2]), int(shape[3]))
        self._batch_dim = _static_dim(shape[0])  # None: dynamic batch dimension
        self._input_name = self._session.get_inputs()[0].name
        self.session_runs = 0
        names = _metadata_names(self._session, path) if cfg.layout == "yolov8" else None
        self._names = names or COCO80
        _check_output(self._session, path, cfg.layout, self._input_hw, len(self._names), self._batch_dim)
        self._wanted = _class_ids(cfg.classes, self._names)
        self.static = static_shapes(self._session, opts)
        self.fits = not self.static and cfg.canvas == "fit" and self._open_fitting(path, opts)
        if self.static and self._batch_dim == 1:
            self._open_free_batch(path, opts)

    def _open_free_batch(self, path: Path, opts: SessionOptions) -> None:
        """With static shapes, replace a batch-1 session by one with a free batch dimension if two images at once
        give each one's own output (probed once on random images); else batches stay one image a run (one log line)."""
        blob = np.random.default_rng(0).uniform(0, 255, (2, 3, *self._input_hw)).astype(np.float32)
        cells = len(yolo_grid(self._input_hw)[0])
        try:
            session = open_session(self._cfg.type, path, _WHAT, opts, transform=lambda p: free_input_hw(p, cells, hw=False, batch=True))
            both = session.run(None, {self._input_name: blob})[0]
            apart = np.concatenate([self._session.run(None, {self._input_name: blob[i : i + 1]})[0] for i in range(2)])
            if both.shape != apart.shape or np.abs(both - apart).max() > 1e-2 * max(1.0, float(np.abs(apart).max())):
                raise ValueError("two images at once do not give each one's own output")
        except Exception as err:  # ModelError, onnxruntime's own Fail types, the ValueError above
            log.warning("%s %s: no free batch dimension (%s); batches run one image at a time", _WHAT, path.name,
                        str(err).splitlines()[0][:160])
            return
        self._session, self._batch_dim = session, None
        log.info("%s %s: static shapes, the declared %dx%d canvas, batches padded to powers of two", _WHAT, path.name,
                 self._input_hw[1], self._input_hw[0])

    def _open_fitting(self, path: Path, opts: SessionOptions) -> bool:
        """Replace the session by one whose input height and width are free, if the graph runs on a non-square
        canvas (probed once); False (the fixed session kept, one log line) when it cannot or on TensorRT."""
        if self._session.get_providers()[0] == "TensorrtExecutionProvider":
            log.info("%s %s: canvas fit off on TensorRT (an engine per input shape); fixed %s", _WHAT, path.name, self._input_hw)
            return False
        import onnxruntime as ort

        cells = len(yolo_grid(self._input_hw)[0])
        half = max(STRIDES[-1], self._input_hw[0] // 2 // STRIDES[-1] * STRIDES[-1])
        probe_hw = (half if half != self._input_hw[0] else half + STRIDES[-1], self._input_hw[1])  # another height
        blob = np.zeros((self._batch_dim or 1, 3, *probe_hw), np.float32)
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # the failure is reported below, in one line
        try:
            session = open_session(self._cfg.type, path, _WHAT, opts, transform=lambda p: free_input_hw(p, cells))
            out = session.run(None, {self._input_name: blob}, quiet)[0]
            if out.ndim != 3 or out.shape[1 if self._yolox else 2] != len(yolo_grid(probe_hw)[0]):
                raise ValueError(f"output shape {list(out.shape)}")
        except Exception as err:  # ModelError, onnxruntime's own Fail types; a wrong output size is a ValueError
            log.warning("%s %s: the model does not run on a %dx%d canvas (%s); detection.detector.canvas fit falls back "
                        "to the fixed %dx%d input", _WHAT, path.name, probe_hw[1], probe_hw[0], str(err).splitlines()[0][:160],
                        self._input_hw[1], self._input_hw[0])
            return False
        self._session = session
        log.info("%s %s: canvas fit (the declared %dx%d input at most)", _WHAT, path.name, self._input_hw[1], self._input_hw[0])
        return True

    @property
    def class_names(self) -> tuple[str, ...]:
        """All class names of the model; index = class id."""
        return self._names

    @property
    def input_hw(self) -> tuple[int, int]:
        """Model input ``(height, width)``, pixels."""
        return self._input_hw

    @property
    def batch_dim(self) -> int | None:
        """The model input's fixed batch size (1 for the asset YOLOX-Nano), or None when it is dynamic."""
        return self._batch_dim

    @property
    def crops_pay(self) -> bool:
        """True if crops of any size are cheap to run: the canvas fits and the model runs on the CPU (on a GPU each
        new input shape may be tuned or compiled anew: cuDNN's algorithm search, a TensorRT engine)."""
        return self.fits and self._session.get_providers()[0] == "CPUExecutionProvider"

    def canvas(self, image_hw: tuple[int, int], scale: float | None = None) -> tuple[tuple[int, int], float]:
        """The model input ``((height, width), scale)`` an image of ``image_hw`` pixels runs on: the declared input
        size, or with :attr:`fits` the stride-aligned fit (:func:`fit_canvas`); ``scale`` as there."""
        if self.fits:
            return fit_canvas(image_hw, self._input_hw, scale)
        return self._input_hw, (min(self._input_hw[0] / image_hw[0], self._input_hw[1] / image_hw[1]) if scale is None else scale)

    def detect(self, frame: np.ndarray) -> DetectionResult:
        """Detect the configured classes in one frame.

        Args:
            frame: ``(H, W, 3) uint8`` BGR image.

        Returns:
            Boxes in frame pixels (clipped to the frame) of the configured
            classes with score >= ``cfg.confidence``, after class-aware NMS at
            ``cfg.nms_iou``; highest score first.

        Raises:
            ValueError: ``frame`` is not an ``(H, W, 3) uint8`` array.
            ModelError: the model answered with another number of images than its batch size.
        """
        _check_frame(frame, "ObjectDetector.detect frame")
        return self.detect_batch([frame])[0]

    def detect_batch(self, frames: Sequence[np.ndarray], scales: Sequence[float | None] | None = None) -> list[DetectionResult]:
        """Detect the configured classes in several frames or crops (of any sizes and cameras) at once.

        Each image is letterboxed on its own (its :meth:`canvas`); canvases of
        one model run are padded to the largest of them (bottom and right, pad
        value 114) and stacked into one ``(B, 3, H, W) float32`` input, and
        decoding and NMS run per image. With a dynamic batch dimension the
        model runs once for all ``B`` images; with a fixed one of size ``k`` it
        runs ``ceil(B / k)`` times (for ``k = 1``, like the asset YOLOX-Nano,
        once per image), the last run padded with blank images whose outputs are discarded.

        Args:
            frames: ``(H_i, W_i, 3) uint8`` BGR images; may be empty.
            scales: per image, canvas pixels per image pixel, or None for the
                largest that fits the model input (a crop passes its frame's scale
                so objects keep the size they have in the whole frame).

        Returns:
            One :class:`DetectionResult` per image, in order, each exactly what
            :meth:`detect` returns for that image (up to float rounding of the
            batched inference): ``xyxy`` boxes in that image's pixels.

        Raises:
            ValueError: an image is not an ``(H, W, 3) uint8`` array (the message gives its position),
                or ``scales`` has another length.
            ModelError: the model answered a batch with another number of images.
        """
        for i, frame in enumerate(frames):
            _check_frame(frame, f"ObjectDetector.detect_batch frame {i}")
        if scales is not None and len(scales) != len(frames):
            raise ValueError(f"ObjectDetector.detect_batch: {len(scales)} scales for {len(frames)} images")
        boxes = []
        for frame, scale in zip(frames, scales or [None] * len(frames)):
            canvas_hw, s = self.canvas(frame.shape[:2], scale)
            boxes.append(letterbox(frame, canvas_hw, center=not self._yolox, scale=s))
        out: list[DetectionResult] = []
        step = self._batch_dim or max(1, len(boxes))
        for start in range(0, len(boxes), step):
            chunk = boxes[start : start + step]
            hw = (max(lb.image.shape[0] for lb in chunk), max(lb.image.shape[1] for lb in chunk))
            images = [_pad_to(lb.image, hw) for lb in chunk]
            raw = self._run_batch(cv2.dnn.blobFromImages(images, self._scale, swapRB=self._swap_rb))
            out += [self._result(raw[i : i + 1], lb, frames[start + i].shape[:2], hw) for i, lb in enumerate(chunk)]
        return out

    @property
    def _yolox(self) -> bool:
        return self._cfg.layout == "yolox"

    @property
    def _scale(self) -> float:
        return 1.0 if self._yolox else 1.0 / 255.0  # YOLOX: BGR 0-255; YOLOv8: RGB / 255

    @property
    def _swap_rb(self) -> bool:
        return not self._yolox

    def _run_batch(self, blob: np.ndarray) -> np.ndarray:
        """Model outputs for a ``(B, 3, H, W)`` input, in chunks of the model's fixed batch size (padded)."""
        step = self._batch_dim or (bucket(len(blob)) if self.static else len(blob))
        outs = []
        for start in range(0, len(blob), step):
            chunk = blob[start : start + step]
            n = len(chunk)
            if n < step:
                chunk = np.concatenate((chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)))
            out = self._session.run(None, {self._input_name: chunk})[0]
            self.session_runs += 1
            if out.shape[0] != step:
                raise ModelError(f"{_WHAT} model {self._cfg.path}: a batch of {step} images gave outputs of shape {list(out.shape)}")
            outs.append(out[:n])
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _result(self, raw: np.ndarray, lb: Letterbox, frame_hw: tuple[int, int], input_hw: tuple[int, int]) -> DetectionResult:
        """Decode, filter and NMS one image's ``(1, ...)`` model output; boxes mapped back to frame pixels."""
        xyxy, scores, class_ids = decode_yolox(raw, input_hw) if self._yolox else decode_yolov8(raw)
        mask = (scores >= self._cfg.confidence) & np.isin(class_ids, self._wanted)
        xyxy, scores, class_ids = xyxy[mask], scores[mask], class_ids[mask]
        keep = nms_per_class(xyxy, scores, class_ids, self._cfg.nms_iou)
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        return DetectionResult(
            xyxy=boxes_to_frame(xyxy[keep], lb, frame_hw),
            confidence=scores[keep].astype(np.float32),
            class_id=class_ids[keep].astype(np.int32),
        )
