"""Bare-inference bound of a pipeline run: the same models on pre-decoded frames, at the schedule the run chose.

The schedule is read from the run summary's counters (:meth:`Schedule.from_summary`): the object detector
ran on every frame the motion gate let through and the stable-scene skip did not hold (detection ``frames_out``
− ``motion_skipped`` − ``stable_skipped``) on canvases adding up to ``detector_kpx`` thousand pixels (motion
regions make them smaller than whole frames: the detector's time per whole-frame call, measured here, is scaled
by that area, its cost being linear in the canvas area on CPU), SCRFD on
``face_analyses`` images (``face_analyses_frame`` whole frames, the rest person boxes), the face embedder
``face_embed_runs`` times on ``face_embeddings`` aligned faces, OSNet ``reid_runs`` times on ``reid_crops``
person crops (counters of :class:`stages.recognition.RecognitionStage`).

Each model is timed here on the decoded frames with one ONNX Runtime thread (:func:`time_models`): at most
``calls`` timed calls per model, spread evenly over the frames, after two warm-up calls; the mean time per
call times the schedule's count is the model's time. Person boxes for the region SCRFD runs and the Re-ID
crops are the detector's own boxes on the timed frames. The bound (:func:`bound`) is
``frames / (sum of model times / cores)``, ``cores`` being the CPU threads of the pipeline's inference
processes (at most the machine's cores): perfect parallelism, and no decoding, motion gate, tracking,
transport or storage. With a GPU provider first the divisor is the number of inference processes instead
(each drives the GPU on its own), an approximation.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from pipeline.config import AppConfig, thread_budget

#: Counters of the recognition stage the schedule reads (absent = 0: a Counter key appears at its first use).
WORK_COUNTERS = ("face_analyses", "face_analyses_frame", "face_embeddings", "face_embed_runs", "reid_crops", "reid_runs")


@dataclass(frozen=True)
class Schedule:
    """Model calls of one pipeline run (counts) and what runs them in parallel.

    Attributes:
        frames: frames through recognition (every camera).
        detector_runs: object detector calls.
        face_frame_runs / face_region_runs: SCRFD calls on a whole frame / on a person box.
        face_embeddings / face_embed_runs: faces embedded, in this many batches.
        reid_crops / reid_runs: person crops embedded with OSNet, in this many batches.
        detector_kpx: thousands of canvas pixels the detector ran on (0: not counted, whole frames assumed).
        parallel: the divisor of the summed model times (CPU cores used, or GPU inference processes).
    """

    frames: int
    detector_runs: int
    face_frame_runs: int
    face_region_runs: int
    face_embeddings: int
    face_embed_runs: int
    reid_crops: int
    reid_runs: int
    parallel: float
    detector_kpx: int = 0

    @classmethod
    def from_summary(cls, summary: dict, parallel: float) -> Schedule:
        """The schedule of a run summary (``last_run.json``).

        Raises:
            SystemExit: the run did face work but counted no ``face_analyses`` (a pipeline older than
                these counters ran: check which tree ``python -m pipeline.cli`` imports).
        """
        det, rec = summary["stages"]["detection"], summary["stages"]["recognition"]
        c = {k: int(rec["counts"].get(k, 0)) for k in WORK_COUNTERS}
        face_work = any(k.startswith("face_rejected_") or k == "faces_used" for k in rec["counts"])
        if face_work and not c["face_analyses"]:
            raise SystemExit("the run summary has face counters but no face_analyses: the pipeline that ran is "
                             "older than the bound's counters (set PYTHONPATH to this checkout)")
        return cls(frames=int(rec["frames_out"]),
                   detector_runs=int(det["frames_out"]) - int(det["dropped"].get("motion_skipped", 0))
                   - int(det.get("counts", {}).get("stable_skipped", 0)),
                   face_frame_runs=c["face_analyses_frame"], face_region_runs=c["face_analyses"] - c["face_analyses_frame"],
                   face_embeddings=c["face_embeddings"], face_embed_runs=c["face_embed_runs"],
                   reid_crops=c["reid_crops"], reid_runs=c["reid_runs"], parallel=parallel,
                   detector_kpx=int(det.get("counts", {}).get("detector_kpx", 0)))


def inference_parallelism(cfg: AppConfig, cpu_count: int | None = None) -> float:
    """The divisor of the summed model times: CPU threads of the inference processes (detection +
    recognition, :func:`pipeline.config.thread_budget` each) capped at the cores; with a GPU provider first
    (anything but ``CPUExecutionProvider``), the number of inference processes."""
    procs = cfg.detection.processes + cfg.recognition.processes
    if cfg.runtime.providers[0] != "CPUExecutionProvider":
        return float(procs)
    cores = cpu_count or os.cpu_count() or 1
    threads = (cfg.detection.processes * thread_budget(cfg, cores, "detection")
               + cfg.recognition.processes * thread_budget(cfg, cores, "recognition"))
    return float(min(cores, threads))


@dataclass(frozen=True)
class ModelTime:
    """One model's share of the bound: ``calls`` in the schedule, ``timed`` of them measured, ms per call."""

    calls: int
    timed: int
    ms_per_call: float

    @property
    def total_s(self) -> float:
        """The schedule's calls at the measured mean, seconds."""
        return self.calls * self.ms_per_call / 1000.0


def spread(n_items: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(n_items)`` (repeating when ``n > n_items``)."""
    if n <= 0 or n_items <= 0:
        return []
    return [int(i) % n_items for i in np.linspace(0, max(n_items, n) - 1, n).round()]


def mean_ms(fn: Callable[..., object], args: list[tuple]) -> float:
    """Mean wall time of ``fn(*a)`` over ``args``, milliseconds, after two warm-up calls with ``args[0]``."""
    if not args:
        return 0.0
    for _ in range(2):
        fn(*args[0])
    t0 = time.perf_counter()
    for a in args:
        fn(*a)
    return (time.perf_counter() - t0) * 1000.0 / len(args)


class BoundModels:
    """The run's models, each with one ONNX Runtime thread and ``providers`` (a model's own ``providers``
    key still wins, as in the pipeline)."""

    def __init__(self, cfg: AppConfig, providers: tuple[str, ...]) -> None:
        from stages.detector import ObjectDetector
        from stages.face import FaceAnalyzer
        from stages.reid import ReidEmbedder
        from stages.runtime import SessionOptions, for_model

        opts = SessionOptions(threads=1, providers=providers)
        self.detector = ObjectDetector(cfg.detection.detector, opts)
        self.person = self.detector.class_names.index("person") if "person" in self.detector.class_names else -1
        self.faces = FaceAnalyzer(cfg.recognition.face, opts)
        reid = cfg.recognition.reid
        self.reid = ReidEmbedder(reid.path, for_model(opts, reid.providers, reid.graph_optimization)) if reid is not None else None


def _time_detector(models: BoundModels, frames: list[np.ndarray], calls: int, cap: int,
                   kpx: int = 0) -> tuple[ModelTime, list]:
    """Time the object detector on whole frames, scaled to ``kpx`` thousand canvas pixels in all when given;
    returns its time and ``(frame, (n, 4) person boxes)`` of the timed frames."""
    idx = spread(len(frames), min(calls, cap))
    found = []

    def run(i: int) -> None:
        r = models.detector.detect(frames[i])
        boxes = r.xyxy[r.class_id == models.person]
        if len(boxes) and len(found) < 4 * cap:
            found.append((frames[i], boxes))

    ms = mean_ms(run, [(i,) for i in idx])
    if kpx and calls and idx:
        whole_px = float(np.mean([np.prod(models.detector.canvas(frames[i].shape[:2])[0]) for i in idx]))
        ms *= kpx * 1000.0 / (calls * whole_px)  # the run's mean canvas area per call / a whole frame's
    return ModelTime(calls, len(idx), ms), found


def _time_face_detector(models: BoundModels, frames: list[np.ndarray], persons: list, s: Schedule,
                        cap: int) -> tuple[ModelTime, ModelTime, list]:
    """Time SCRFD on whole frames and on person boxes; returns both and up to 64 aligned faces it found."""
    from stages.face import align

    found: list[tuple[np.ndarray, np.ndarray]] = []  # (frame, (n, 5, 2) keypoints): aligned after the timing

    def run(frame: np.ndarray, region: np.ndarray | None) -> None:
        dets = models.faces.detector.detect(frame, region)
        if len(dets) and len(found) < 64:
            found.append((frame, dets.kps))

    whole = [(frames[i], None) for i in spread(len(frames), min(s.face_frame_runs, cap))]
    h, w = frames[0].shape[:2]
    boxes = [(f, b) for f, bs in persons for b in bs] or [(frames[0], np.array([w / 4, h / 4, 3 * w / 4, 3 * h / 4], np.float32))]
    regions = [boxes[i] for i in spread(len(boxes), min(s.face_region_runs, cap))]
    t_whole = ModelTime(s.face_frame_runs, len(whole), mean_ms(run, whole))
    t_region = ModelTime(s.face_region_runs, len(regions), mean_ms(run, regions))
    return t_whole, t_region, [align(frame, k) for frame, kps in found for k in kps][:64]


def _batch_size(items: int, batches: int) -> int:
    return max(1, round(items / batches)) if batches else 1


def _time_embedders(models: BoundModels, frames: list[np.ndarray], persons: list, aligned: list, s: Schedule,
                    cap: int) -> tuple[ModelTime, ModelTime]:
    """Time the face embedder on batches of aligned faces and OSNet on batches of person crops, each batch of
    the schedule's mean size."""
    b = _batch_size(s.face_embeddings, s.face_embed_runs)
    pool = aligned or [np.zeros((112, 112, 3), np.uint8)]
    batch = np.stack([pool[i % len(pool)] for i in range(b)])
    t_face = ModelTime(s.face_embed_runs, min(s.face_embed_runs, cap),
                       mean_ms(models.faces.embedder.embed, [(batch,)] * min(s.face_embed_runs, cap)))
    if models.reid is None or not s.reid_runs:
        return t_face, ModelTime(s.reid_runs, 0, 0.0)
    b = _batch_size(s.reid_crops, s.reid_runs)
    h, w = frames[0].shape[:2]
    pairs = persons or [(frames[0], np.array([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]], np.float32))]
    args = [(f, np.stack([boxes[j % len(boxes)] for j in range(b)])) for f, boxes in
            (pairs[i] for i in spread(len(pairs), min(s.reid_runs, cap)))]
    return t_face, ModelTime(s.reid_runs, len(args), mean_ms(models.reid.embed, args))


def time_models(models: BoundModels, frames: list[np.ndarray], s: Schedule, cap: int = 200) -> dict[str, ModelTime]:
    """Each model's time at the schedule ``s`` on the decoded ``frames`` (at most ``cap`` timed calls per
    model, the rest scaled)."""
    det, persons = _time_detector(models, frames, s.detector_runs, cap, s.detector_kpx)
    whole, region, aligned = _time_face_detector(models, frames, persons, s, cap)
    face, reid = _time_embedders(models, frames, persons, aligned, s, cap)
    return {"object_detector": det, "face_detector_frame": whole, "face_detector_box": region,
            "face_embedder": face, "reid_embedder": reid}


def bound(s: Schedule, times: dict[str, ModelTime], pipeline_fps: float) -> dict:
    """The bound as a JSON-able dict: ``fps`` (frames/s), ``share`` (pipeline fps / bound fps), ``model_s``
    (summed model time, s), ``parallel``, the schedule and each model's calls, timed calls and ms per call."""
    total_s = sum(t.total_s for t in times.values())
    fps = s.frames / (total_s / s.parallel) if total_s > 0 else None
    return {"fps": round(fps, 2) if fps else None, "share": round(pipeline_fps / fps, 3) if fps else None,
            "model_s": round(total_s, 3), "parallel": s.parallel, "schedule": asdict(s),
            "models": {k: {"calls": t.calls, "timed": t.timed, "ms_per_call": round(t.ms_per_call, 3),
                           "total_s": round(t.total_s, 3)} for k, t in times.items()}}
