"""Pipeline configuration: pydantic models, YAML loading and ``${VAR}`` expansion.

Every model forbids unknown keys (``extra="forbid"``) and bounds its numbers,
so a typo such as ``detection.detecter`` is an error that names the key path.
Strings may reference environment variables as ``${NAME}``; an unset
variable is an error naming the variable and the key that used it.

Environment variables:
    FACEPRO_ASSETS: folder holding ``models/`` and ``data/`` (sample videos,
        model files). Configs say e.g. ``${FACEPRO_ASSETS}/models/yolox_nano.onnx``.
    FACEPRO_DATA_DIR: database, snapshots and runtime sockets. Defaults to the
        per-user data directory (``platformdirs.user_data_dir("facepro")``).

Models by name: a model ``path`` may be ``model:NAME``, a name from FacePro's
model manifest (``pipeline/resources/models.yaml``, see ``facepro models
list``); it resolves to ``<models_dir>/<file>``, where ``models_dir`` is the
config's top-level key or else :func:`default_models_dir`. An unknown name is
a :class:`ConfigError` naming the key path and the known names.

Which config a command reads (:func:`default_config_path`): ``--config`` /
the positional argument, else the user config written by ``facepro init``
(:func:`user_config_path`) if it exists, else ``configs/demo.yaml`` in the
working directory (a source checkout).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal, Mapping

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.models import MODEL_REF, manifest

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _yaml_switch(value: object) -> object:
    """YAML 1.1 reads an unquoted ``on`` / ``off`` (and yes / no, true / false) as a boolean: take it as said."""
    return {True: "on", False: "off"}[value] if isinstance(value, bool) else value


#: ``auto`` / ``on`` / ``off``, written quoted or not.
AutoOnOff = Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_switch)]


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraConfig(_Strict):
    """One video source.

    ``source`` is a file path, an ``rtsp://``/``http://`` URL or a USB device
    index (``"0"``). ``mode`` ``file`` makes the capture wait for a free ring
    slot so every frame is processed; ``live`` never waits (the oldest slot is
    reused). ``auto`` picks ``file`` for files and ``live`` otherwise.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$", description="unique camera name")
    source: str = Field(min_length=1)
    mode: Literal["auto", "file", "live"] = "auto"
    max_fps: float | None = Field(None, gt=0, le=240, description="read at most this many frames/s (live pacing)")
    reconnect_s: float = Field(2.0, gt=0, le=300, description="wait before reopening a failed live source, seconds")

    def resolved_mode(self) -> Literal["file", "live"]:
        if self.mode != "auto":
            return self.mode
        return "live" if (self.source.isdigit() or "://" in self.source) else "file"


class RingConfig(_Strict):
    """Shared-memory ring per camera: ``slots`` frames of the camera's size."""

    slots: int = Field(24, ge=4, le=512)
    release_timeout_s: float = Field(10.0, gt=0, le=600, description="file mode: warn, this often, about a frame not released downstream (a slot is never taken back: a dead owner's frames are replayed)")


class OnnxDetectorConfig(_Strict):
    """Object detector running on ONNX Runtime (YOLOX or YOLOv8 output layout)."""

    type: Literal["onnx"] = "onnx"
    path: Path
    providers: tuple[str, ...] | None = Field(None, description="ONNX Runtime execution providers for this model, in order; overrides runtime.providers")
    layout: Literal["yolox", "yolov8"]
    confidence: float = Field(0.35, ge=0.0, le=1.0, description="minimum detection score")
    nms_iou: float = Field(0.45, gt=0.0, le=1.0, description="IoU above which NMS suppresses a box")
    classes: tuple[str, ...] = Field(("person",), min_length=1, description="COCO class names to keep")
    canvas: Literal["fit", "fixed"] = Field("fit", description="fit: letterbox each image only up to the next multiple of "
                                            "32 pixels (a 16:9 frame runs at 416x256, not 416x416; the model's input height "
                                            "and width are freed at load, and a model that cannot take it falls back to fixed "
                                            "with a log line); fixed: the model's declared input size")


class MotionConfig(_Strict):
    """Motion gate on a downscaled grey frame against a running-average background."""

    enabled: bool = True
    width_px: int = Field(160, ge=32, le=1280, description="width of the downscaled frame")
    pixel_threshold: int = Field(25, ge=1, le=255, description="grey-level difference that counts as changed")
    min_changed_fraction: float = Field(0.002, ge=0.0, le=1.0, description="changed-pixel fraction that counts as motion")
    background_alpha: float = Field(0.05, gt=0.0, le=1.0, description="running-average weight of a new frame")
    hold_frames: int = Field(30, ge=0, le=10_000, description="keep detecting this many frames after the last detection, motion or not (people standing still)")
    release_after_empty: int | None = Field(5, ge=1, le=10_000, description="end the hold early after this many still frames in a row in which the detector found nothing (the scene emptied); null: hold the full hold_frames")


class RegionConfig(_Strict):
    """Motion regions: the detector runs on crops around motion boxes and the camera's last objects (Frigate's
    regions), at the whole frame's scale, when they cost less than the whole frame (see :mod:`stages.regions`)."""

    enabled: bool = Field(True, description="detect on motion regions when cheaper; needs detection.detector.canvas: fit")
    margin: float = Field(0.25, ge=0.0, le=2.0, description="each box grows on every side by this fraction of its longer side")
    min_margin_px: int = Field(16, ge=0, le=1000, description="... and by at least this many frame pixels")
    max_area: float = Field(0.6, gt=0.0, le=1.0, description="use regions only while their canvases add up to at most this "
                            "fraction of the whole frame's canvas")
    max_regions: int = Field(4, ge=1, le=32, description="more regions than this in a frame: detect the whole frame")
    edge_tol_px: float = Field(4.0, ge=0.0, le=100.0, description="an object this close to a crop side inside the frame may "
                               "be cut: the whole frame is detected again")
    min_side: int = Field(160, ge=0, le=4096, description="regions grow to at least this many model-input pixels wide and "
                          "high (the detector needs context around small objects)")
    remember: int = Field(8, ge=1, le=1000, description="the objects of a camera's last this many detector frames stay in its "
                          "regions (someone standing still, or missed once)")
    whole_every: int = Field(10, ge=1, le=10_000, description="every this many detector frames of a camera one runs on the "
                             "whole frame, whatever moved (1: always whole)")


class DetectionConfig(_Strict):
    processes: int = Field(1, ge=1, le=64)
    threads: int | None = Field(None, ge=1, le=256, description="ONNX Runtime threads per detection process; default from the CPU budget")
    detector: OnnxDetectorConfig
    motion: MotionConfig = MotionConfig()
    batch: int = Field(1, ge=1, le=64, description="frames (of any cameras) run through the detector together, like "
                       "DeepStream's stream muxer; 1 = one frame at a time (the CPU default); a model with a fixed "
                       "batch dimension of 1 runs them one by one")
    batch_timeout_ms: float = Field(5.0, ge=0.0, le=1000.0, description="longest wait for a batch to fill, counted from "
                                    "its first frame, milliseconds; frames already received are batched without waiting")
    stable_skip: int = Field(1, ge=0, le=10, description="while a camera's last two detector frames found the same "
                             "objects in nearly the same places (stable_iou), skip the detector on up to this many frames "
                             "in a row; the tracker holds its tracks over them (DeepStream's nvinfer interval, made "
                             "adaptive); 0: detect every moving frame")
    stable_iou: float = Field(0.5, gt=0.0, le=1.0, description="IoU every box of a detector frame needs with its own box "
                              "in the camera's previous detector frame for the scene to count as stable")
    regions: RegionConfig = RegionConfig()


class TrackingConfig(_Strict):
    """ByteTrack parameters (roboflow ``trackers``) and event rules."""

    lost_track_buffer_frames: int = Field(30, ge=1, le=1000)
    track_activation_threshold: float = Field(0.5, ge=0.0, le=1.0)
    minimum_consecutive_frames: int = Field(3, ge=1, le=100)
    minimum_iou_threshold: float = Field(0.1, ge=0.0, le=1.0)
    high_conf_det_threshold: float = Field(0.5, ge=0.0, le=1.0)
    reorder_timeout_s: float = Field(5.0, gt=0, le=120, description="give up on a missing frame after this long")


class OnnxFaceDetectorConfig(_Strict):
    """SCRFD face detector (InsightFace) on ONNX Runtime."""

    type: Literal["onnx"] = "onnx"
    path: Path
    providers: tuple[str, ...] | None = Field(None, description="ONNX Runtime execution providers for this model, in order; overrides runtime.providers")
    input_size: int = Field(640, ge=64, le=1920, multiple_of=32)
    score_threshold: float = Field(0.5, ge=0.0, le=1.0)


class OnnxFaceEmbedderConfig(_Strict):
    """ArcFace-style 112x112 face embedder on ONNX Runtime."""

    type: Literal["onnx"] = "onnx"
    path: Path
    providers: tuple[str, ...] | None = Field(None, description="ONNX Runtime execution providers for this model, in order; overrides runtime.providers")


class FaceQualityConfig(_Strict):
    """Gate before a face counts for recognition (rejections are counted per reason).

    Defaults measured on the asset faces: aligned crops score 120-4500 in
    variance of the Laplacian, the same crops blurred (sigma 3) 3-6; frontal to
    three-quarter faces have |yaw| <= 0.5 (nose offset from the eye midpoint
    over the eye distance), profiles approach 1.
    """

    min_sharpness: float = Field(40.0, ge=0, le=1e6, description="variance of the Laplacian of the aligned grey crop")
    max_abs_yaw: float = Field(0.6, gt=0, le=10, description="|nose offset| / eye distance")


class UnknownFacesConfig(_Strict):
    """Anonymous identities ``unknown-<n>`` for faces nobody enrolled (the storage process clusters unnamed
    person tracks as they end; method and thresholds: ``storage/clustering.py``). Thresholds are cosine
    similarities in the gallery's space; by default both are ``match_threshold``: a track joins a cluster only at
    a similarity that would name it, as the cluster's tracks will be once named (never looser: one cluster
    holding two people is worse than one person in two clusters, which consolidation and ``facepro identities
    merge`` join). Measured in README "Unknown faces" (``scripts/eval_unknowns.py``)."""

    enabled: bool = True
    cluster_threshold: float | None = Field(None, ge=-1.0, le=1.0, description="similarity of a track's face vector to a cluster centroid needed to join it; null: recognition.face.match_threshold")
    merge_threshold: float | None = Field(None, ge=-1.0, le=1.0, description="average centroid similarity at which consolidation merges clusters; null: recognition.face.match_threshold")
    min_faces: int = Field(2, ge=1, le=1000, description="quality faces a track needs to be clustered")
    best_faces: int = Field(5, ge=1, le=1000, description="the track's best faces (detector score) averaged into its vector")
    min_consistency: float = Field(0.6, ge=0.0, le=1.0, description="norm of the mean of those unit vectors below which the track is noise (its faces disagree)")
    consolidate_interval_s: float = Field(60.0, ge=1, le=86400, description="how often the storage process merges clusters that came together")


class FaceConfig(_Strict):
    detector: OnnxFaceDetectorConfig
    embedder: OnnxFaceEmbedderConfig
    match_threshold: float = Field(0.50, ge=-1.0, le=1.0, description="cosine similarity needed to name a face (README 'Face calibration': no stranger named on 755 LFW photos)")
    min_face_px: int = Field(16, ge=4, le=1024, description="smaller faces (box width) are ignored")
    every_n_frames: int = Field(2, ge=1, le=1000, description="run face analysis on every n-th frame of a camera")
    settle_votes: int | None = Field(8, ge=1, le=10_000, description="a person track stops face work once one choice (a name or unknown) holds this many quality face votes and a strict majority; null: never")
    backoff_max_frames: int | None = Field(16, ge=1, le=10_000, description="a person track whose box showed no face "
                                           "is analysed after every_n_frames, then 2x, 4x ... that many frames, at most "
                                           "this many but never less than every_n_frames (a found face or a box grown 25 % resets it); null: every face frame")
    quality: FaceQualityConfig = FaceQualityConfig()
    unknowns: UnknownFacesConfig = UnknownFacesConfig()
    enroll_dominance: float = Field(1.5, ge=1.0, le=100.0, description="an enrollment photo with several faces enrolls the most prominent one (box area x centrality) only when it is at least this many times the next face's; else the user picks one (facepro enroll --face N)")


class OnnxReidConfig(_Strict):
    """Person Re-ID (OSNet, Zhou et al. 2019) on ONNX Runtime: names a track whose face was never seen.

    ``link_threshold`` is the cosine similarity of two tracks' mean embeddings
    needed to link them; calibrate it with ``scripts/eval_reid.py`` (0.935 on
    the asset videos, with little margin: see ``stages/reid.py``).
    """

    type: Literal["onnx"] = "onnx"
    path: Path
    providers: tuple[str, ...] | None = Field(None, description="ONNX Runtime execution providers for this model, in order; overrides runtime.providers")
    graph_optimization: Literal["all", "extended", "basic"] = Field("extended", description="ONNX Runtime graph "
        "optimisation level for this model: OSNet-x0.25 runs 8.1 ms a crop at extended and 13.0 at all (whose NCHWc "
        "layout transforms slow its depthwise convolutions) on one thread here")
    link_threshold: float = Field(0.935, ge=-1.0, le=1.0)
    every_n_frames: int = Field(5, ge=1, le=10_000, description="sample a person track's embedding every n frames")
    max_samples: int = Field(64, ge=1, le=100_000, description="samples kept per track for inspection (the mean uses all)")
    min_box_height_px: int = Field(0, ge=0, le=4096, description="lower person boxes are not embedded")
    min_samples: int = Field(3, ge=1, le=1000, description="samples a track needs before it is linked")
    settle_samples: int | None = Field(8, ge=1, le=100_000, description="after this many samples a track's mean has "
                                       "settled: the wait between its samples doubles (2x, 4x ... every_n_frames); null: "
                                       "sample every every_n_frames for the track's whole life")
    max_interval_frames: int = Field(40, ge=1, le=100_000, description="longest wait between two samples of a settled track, frames (never less than every_n_frames)")
    keep_tracks: int = Field(256, ge=1, le=100_000, description="ended tracks remembered for linking")


class OnnxGaitEmbedderConfig(_Strict):
    """A GEI-input gait model on ONNX Runtime (e.g. GEINet, Shiraga et al. 2016): one ``[B, 1, H, W]`` input,
    one ``[B, d]`` output. The track's GEI is resized to ``H x W``; its values stay in [0, 1]."""

    type: Literal["onnx"] = "onnx"
    path: Path
    providers: tuple[str, ...] | None = Field(None, description="ONNX Runtime execution providers for this model, in order; overrides runtime.providers")


class GaitConfig(_Strict):
    """Gait Energy Image (Han & Bhanu 2006) per person track: names a track neither face nor Re-ID could.

    Classical and weak (see ``stages/gait.py`` for measured numbers): keep the
    threshold high and calibrate it on the site's own footage
    (``scripts/eval_gait.py``, ``--model`` for an ONNX embedder). Without
    ``embedder`` the GEI itself, downsampled, is the embedding.
    """

    embedder: OnnxGaitEmbedderConfig | None = Field(None, description="ONNX gait model on GEIs; None: the classical GEI embedding")

    min_frames: int = Field(20, ge=2, le=10_000, description="silhouettes per GEI (>= one gait cycle, ~1 s)")
    width_px: int = Field(480, ge=64, le=4096, description="frames wider than this are downscaled for background subtraction "
                          "(MOG2's cost grows with the area: 7.4 ms a 768x432 frame at 640, 4.2 at 480 on one thread; "
                          "scripts/eval_gait.py gives the same numbers at 480 as at 640)")
    link_threshold: float = Field(0.986, ge=-1.0, le=1.0, description="cosine similarity of GEI embeddings needed to link (calibrate with scripts/eval_gait.py)")
    keep_tracks: int = Field(256, ge=1, le=100_000, description="ended named tracks remembered for linking")


class RecognitionConfig(_Strict):
    processes: int = Field(1, ge=1, le=64)
    threads: int | None = Field(None, ge=1, le=256, description="ONNX Runtime threads per recognition process; default from the CPU budget")
    face: FaceConfig
    reid: OnnxReidConfig | None = None
    gait: GaitConfig | None = None
    max_lag_ms: float = Field(2000, gt=0, le=600_000, description="skip face work on frames older than this (live mode)")
    batch: int = Field(1, ge=1, le=64, description="frames (of any cameras) handled together: the face chips and Re-ID "
                       "crops of one frame per camera run in one embedder batch each (a GPU gain); 1 = frame by frame")
    batch_timeout_ms: float = Field(5.0, ge=0.0, le=1000.0, description="longest wait for a batch to fill, counted from "
                                    "its first frame, milliseconds; frames already received are batched without waiting")


class StorageConfig(_Strict):
    url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data dir>/facepro.db")
    batch_rows: int = Field(500, ge=1, le=100_000)
    batch_ms: int = Field(200, ge=1, le=60_000)
    cache_mb: int = Field(32, ge=1, le=4096, description="SQLite page cache of the storage process's connection, MiB")
    snapshots: bool = True
    retention_days: float | None = Field(None, gt=0, le=36500, description="delete events (and snapshots) older than this")
    max_total_mb: float | None = Field(None, gt=0, le=10_000_000, description="keep database + snapshots under this size")
    retention_interval_s: float = Field(300, ge=1, le=86400, description="how often the storage process applies retention")
    resend_after_s: float = Field(5.0, gt=0, le=3600, description="re-send unacknowledged items after storage was quiet this long")
    exit_wait_s: float = Field(60.0, gt=0, le=3600, description="at shutdown, wait this long for storage to acknowledge everything")
    debug_commit_delay_ms: float = Field(0.0, ge=0, le=60_000, description="benchmarks only: sleep this long in every commit")


class AlertConfig(_Strict):
    """Thresholds of the alert states exported to Prometheus and logged as warnings."""

    min_rate_fps: float = Field(1.0, ge=0, le=10_000, description="a running stage passing fewer frames/s is 'low rate'")
    backlog_frames: int = Field(48, ge=1, le=1_000_000, description="a queue deeper than this that kept growing is 'backlog'")
    max_rss_mb: float = Field(2048, gt=0, le=1_000_000, description="a stage using more resident memory is 'high memory'")
    grace_s: float = Field(10.0, ge=0, le=3600, description="no alerts this long after start")


class RuntimeConfig(_Strict):
    stats_interval_s: float = Field(0.5, gt=0, le=60)
    metrics_port: int | None = Field(9108, ge=0, le=65535, description="Prometheus endpoint on 127.0.0.1 (0: any free port, null: off)")
    alerts: AlertConfig = AlertConfig()
    inference_threads: int | None = Field(None, ge=1, le=256, description="ONNX Runtime threads per process; default from CPU count")
    heartbeat_timeout_s: float = Field(30.0, gt=0, le=3600)
    providers: tuple[str, ...] = Field(("CPUExecutionProvider",), min_length=1,
                                       description="ONNX Runtime execution providers in order of preference, e.g. "
                                       "[TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider]; "
                                       "CPU is always the last resort")
    strict_providers: bool = Field(False, description="a requested provider that is not available is an error "
                                   "instead of a warning and the next one (CPU last)")
    static_shapes: AutoOnOff = Field(
        "auto", description="keep model inputs to a few fixed shapes (declared detector canvas, square SCRFD input, "
        "batches padded to powers of two, each run once at start); auto: on GPU providers, where every new shape "
        "costs about a second (measured on CUDA) or a TensorRT engine")
    io_binding: AutoOnOff = Field(
        "auto", description="run models through ONNX Runtime's IOBinding: each input copied to the device once "
        "into a buffer kept per shape, each output copied once into the array returned; auto: on GPU providers")


class MqttConfig(_Strict):
    """MQTT out: committed events, person counts, identities, stats and Home Assistant discovery.

    The ``mqtt`` process (:mod:`pipeline.mqtt`) publishes what the storage process committed to its outbox,
    each message at least once (QoS 1 or 2, marked sent on the broker's acknowledgement). Absent: no mqtt
    process and no outbox rows. Topics and payloads: README, "MQTT and Home Assistant".
    """

    url: str = Field("mqtt://127.0.0.1:1883", pattern=r"^mqtts?://[A-Za-z0-9._-]+(:[0-9]{1,5})?/?$",
                     description="broker: mqtt://HOST[:PORT] (default port 1883) or mqtts://HOST[:PORT] (TLS, 8883)")
    topic_prefix: str = Field("facepro", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$", max_length=128,
                              description="first topic levels of every message (<prefix>/events...)")
    client_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                                  description="MQTT client id; default facepro-<box_id>")
    username: str | None = Field(None, min_length=1, max_length=256)
    password: str | None = Field(None, max_length=1024, description="use ${VAR} to keep it out of the file")
    tls: bool = Field(False, description="connect with TLS (the system CAs or ca_certs); mqtts:// implies it")
    ca_certs: Path | None = Field(None, description="PEM CA bundle that signed the broker's certificate")
    qos: int = Field(1, ge=1, le=2, description="QoS of every publish: 1 or 2 (at-least-once needs the broker's ack)")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive, seconds (the Last Will fires after ~1.5x)")
    discovery: bool = Field(True, description="publish Home Assistant discovery configs (retained)")
    discovery_prefix: str = Field("homeassistant", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$", max_length=128,
                                  description="Home Assistant's discovery prefix")
    stats_interval_s: float = Field(60.0, ge=0.5, le=86400, description="publish <prefix>/stats this often, seconds")
    reconnect_min_s: float = Field(1.0, gt=0, le=60, description="first wait before reconnecting, seconds (doubles)")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="longest wait between reconnect attempts, seconds")
    drain_timeout_s: float = Field(10.0, ge=0, le=50, description="at a clean stop, wait this long for the broker "
                                   "to acknowledge what is left (the rest is sent by the next run); at most 50 s: "
                                   "the supervisor kills a stage that takes 60 s to stop")

    @model_validator(mode="after")
    def _backoff_order(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(f"reconnect_max_s ({self.reconnect_max_s}) must be >= reconnect_min_s ({self.reconnect_min_s})")
        return self


class FrigateConfig(_Strict):
    """Frigate companion mode: names the persons of a Frigate NVR's events (the ``frigate`` process).

    The process subscribes to ``<mqtt_prefix>/events`` on the broker of the ``mqtt`` section (required), fetches
    the snapshot of each person event (new, and updates with a better snapshot) from Frigate's HTTP API, matches
    its faces against FacePro's gallery behind the face quality gate, publishes the result on
    ``<mqtt.topic_prefix>/frigate/<camera>`` and POSTs a match back as the event's ``sub_label``. README:
    "Frigate companion mode".
    """

    url: str = Field(min_length=1, max_length=2048,
                     description="Frigate's HTTP API: http[s]://HOST[:PORT][/PATH], e.g. http://frigate:5000")
    mqtt_prefix: str = Field("frigate", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$", max_length=128,
                             description="Frigate's mqtt.topic_prefix: its events arrive on <mqtt_prefix>/events")
    cameras: tuple[str, ...] = Field((), max_length=256, description="Frigate camera names to serve; empty: all")
    timeout_s: float = Field(5.0, gt=0, le=60, description="longest wait for one HTTP request to Frigate, seconds")
    retries: int = Field(4, ge=0, le=20, description="retries of a failed request (unreachable, slow, 5xx, 404) "
                         "before the event is given up")
    retry_min_s: float = Field(1.0, gt=0, le=60, description="wait before the first retry, seconds (doubles)")
    retry_max_s: float = Field(30.0, gt=0, le=600, description="longest wait between retries, seconds")
    queue: int = Field(32, ge=1, le=10_000, description="requests waiting at most; beyond, the oldest is dropped "
                       "and counted (frigate_dropped)")

    @field_validator("cameras")
    @classmethod
    def _camera_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", n)]
        if bad:
            raise ValueError(f"camera names are Frigate's: letters, digits, _ and -, got {', '.join(map(repr, bad))}")
        return names

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as err:
            raise ValueError(f"not a URL ({err}): expected http[s]://HOST[:PORT][/PATH]") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r}: expected http[s]://HOST[:PORT][/PATH], e.g. http://frigate:5000")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(f"{url!r}: no credentials, query or fragment: http[s]://HOST[:PORT][/PATH]")
        if port == 0:
            raise ValueError(f"{url!r}: port 0")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _backoff_order(self) -> FrigateConfig:
        if self.retry_max_s < self.retry_min_s:
            raise ValueError(f"retry_max_s ({self.retry_max_s}) must be >= retry_min_s ({self.retry_min_s})")
        return self


def default_box_id() -> str:
    """This machine's name as a ``box_id``: the host name, characters outside ``[A-Za-z0-9_.-]`` as ``-``, 64 at most."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64]
    return name or "facepro"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``); False for any other name or address."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ApiConfig(_Strict):
    """The HTTP API process (``facepro run`` with ``enabled: true``, or ``facepro serve``).

    Private by default: it binds the loopback address; binding any other
    address requires a bearer ``token`` (every request must then carry
    ``Authorization: Bearer <token>``). Use ``${FACEPRO_API_TOKEN}`` to keep
    the token out of the file.
    """

    enabled: bool = Field(False, description="run the api process with the pipeline (facepro run)")
    host: str = Field("127.0.0.1", min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:\[\]_-]+$",
                      description="address to bind; anything but loopback requires api.token")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0: any free port, shown in facepro status as the api's port count)")
    token: str | None = Field(None, min_length=16, max_length=512, pattern=r"^[\x21-\x7e]+$",
                              description="bearer token required on every request when set (16 to 512 printable ASCII characters)")
    max_upload_mb: float = Field(50.0, gt=0, le=4096, description="largest request body (uploaded images), MiB; larger ones get 413")
    job_dirs: tuple[Path, ...] = Field((), max_length=64, description="folders analysis jobs may read clips from (reserved for jobs)")
    job_retention_days: float = Field(30.0, gt=0, le=3650, description="finished jobs (their rows, job folders and "
                                      "uploads) older than this many days are removed; their events follow storage.retention_days")
    stream_fps: float = Field(5.0, gt=0, le=30, description="live view: most frames a second a camera is rendered "
                              "(JPEG-encoded, shared by its viewers) and a viewer is sent")
    stream_max_width: int = Field(960, ge=160, le=7680, description="live view: wider frames are scaled down to this "
                                  "width before encoding, pixels")
    stream_quality: int = Field(75, ge=20, le=95, description="live view: JPEG quality (1-100 scale of libjpeg)")
    nice: int = Field(5, ge=0, le=19, description="OS niceness of the api process in facepro run (0: as the stages; "
                      "higher: the stages get the cores first when they are busy, requests wait)")

    @model_validator(mode="after")
    def _private_unless_token(self) -> ApiConfig:
        if self.token is None and not is_loopback(self.host):
            raise ValueError(f"api.host {self.host} is not a loopback address: binding it requires api.token "
                             "(a bearer token of 16+ characters, e.g. ${FACEPRO_API_TOKEN}); or bind 127.0.0.1")
        return self


class AppConfig(_Strict):
    """The whole pipeline config (``configs/*.yaml``)."""

    box_id: str = Field(default_factory=default_box_id, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                        description="names this box in every MQTT message (the fleet hub tells boxes apart by it); "
                        "default: the host name")

    cameras: tuple[CameraConfig, ...] = Field(description="the video sources; may be empty only with a frigate "
                                              "section (a companion-only box: no capture, detection, recognition "
                                              "or storage process runs)")
    data_dir: Path | None = Field(None, description="database, snapshots, backups, runtime files (FACEPRO_DATA_DIR wins; default: the per-user data dir)")
    models_dir: Path | None = Field(None, description="folder of the models named model:NAME (default: <data dir>/models)")
    ring: RingConfig = RingConfig()
    detection: DetectionConfig
    tracking: TrackingConfig = TrackingConfig()
    recognition: RecognitionConfig
    storage: StorageConfig = StorageConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    mqtt: MqttConfig | None = Field(None, description="MQTT out and Home Assistant discovery; off when absent")
    api: ApiConfig = ApiConfig()
    frigate: FrigateConfig | None = Field(None, description="Frigate companion mode (needs mqtt); off when absent")

    @model_validator(mode="after")
    def _sources_and_companion(self) -> AppConfig:
        if not self.cameras and self.frigate is None:
            raise ValueError("cameras: at least one camera is needed (or a frigate section: a companion-only box)")
        if self.frigate is not None and self.mqtt is None:
            raise ValueError("frigate: needs the mqtt section, the broker Frigate publishes its events on "
                             "(e.g. mqtt: {url: mqtt://HOST:1883})")
        if self.frigate is not None and self.mqtt is not None and self.frigate.mqtt_prefix == self.mqtt.topic_prefix:
            raise ValueError(f"frigate.mqtt_prefix and mqtt.topic_prefix are both {self.mqtt.topic_prefix!r}: FacePro's "
                             "own <prefix>/events would be read as Frigate's; give FacePro another topic_prefix")
        return self

    @field_validator("cameras")
    @classmethod
    def _unique_names(cls, cams: tuple[CameraConfig, ...]) -> tuple[CameraConfig, ...]:
        names = [c.name for c in cams]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"camera names must be unique, repeated: {', '.join(dup)}")
        return cams


def expand_vars(value: object, where: str = "") -> object:
    """Replace ``${NAME}`` in every string of a parsed YAML tree.

    Raises:
        ConfigError: a referenced variable is not set (names it and the key path).
    """
    if isinstance(value, dict):
        return {k: expand_vars(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_vars(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                hint = " (the folder holding models/ and data/, e.g. the assets folder beside your checkout)" if name == "FACEPRO_ASSETS" else ""
                raise ConfigError(f"{where}: environment variable {name} is not set; export {name}{hint}")
            return os.environ[name]
        return _VAR.sub(sub, value)
    return value


def resolve_model_refs(tree: object, source: str = "<config>") -> object:
    """Replace every ``path: model:NAME`` in a parsed config tree by ``<models dir>/<file of NAME>``.

    The models dir is the tree's ``models_dir`` key (``~`` expanded) or :func:`default_models_dir`.

    Raises:
        ConfigError: NAME is not in the model manifest (names the key path and the known names).
    """
    if not isinstance(tree, dict):
        return tree
    base = Path(str(tree["models_dir"])).expanduser() if tree.get("models_dir") else default_models_dir()
    models = manifest()

    def walk(value: object, where: str) -> object:
        if isinstance(value, dict):
            return {k: _ref(v, f"{where}.{k}" if where else str(k)) if k == "path" else walk(v, f"{where}.{k}" if where else str(k))
                    for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    def _ref(value: object, where: str) -> object:
        if not (isinstance(value, str) and value.startswith(MODEL_REF)):
            return value
        name = value[len(MODEL_REF):]
        if name not in models:
            raise ConfigError(f"{source}: {where}: unknown model {name!r}; {MODEL_REF}NAME takes a name of "
                              f"FacePro's model manifest: {', '.join(models)} (see facepro models list)")
        return str(base / models[name].file)

    return walk(tree, "")


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{path}: {e['msg']}")
    return "; ".join(lines)


def parse_config(data: object, source: str = "<config>") -> AppConfig:
    """Validate an already-parsed YAML tree.

    Raises:
        ConfigError: with ``source`` and every failing key path.
    """
    tree = resolve_model_refs(expand_vars(data), source)
    try:
        return AppConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format_errors(err)}") from None


def load_config(path: str | Path) -> AppConfig:
    """Read and validate a YAML config file.

    Raises:
        ConfigError: file missing or unreadable, YAML syntax error, unknown or
            invalid keys, unset ``${VAR}``.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"config {p}: cannot read ({err.strerror}); pass an existing YAML file (--config FILE) or write one with: facepro init") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config {p}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {p}: expected a mapping at the top level")
    return parse_config(data, str(p))


def with_sources(cfg: AppConfig, sources: list[str]) -> AppConfig:
    """Return ``cfg`` with its cameras replaced by one camera per source URI (``cam0``, ``cam1``...)."""
    cams = tuple(CameraConfig(name=f"cam{i}", source=s) for i, s in enumerate(sources))
    return cfg.model_copy(update={"cameras": cams})


def data_dir() -> Path:
    """Folder for the database, snapshots and runtime sockets (``FACEPRO_DATA_DIR`` or per-user default)."""
    env = os.environ.get("FACEPRO_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_data_dir("facepro")).resolve()


def default_models_dir() -> Path:
    """Where ``model:NAME`` paths point when a config has no ``models_dir``: ``<data dir>/models``."""
    return data_dir() / "models"


def models_dir(cfg: AppConfig) -> Path:
    """The config's models dir (``models_dir`` or :func:`default_models_dir`)."""
    return cfg.models_dir.expanduser() if cfg.models_dir else default_models_dir()


#: The source checkout's demo config, relative to the working directory.
DEMO_CONFIG = Path("configs/demo.yaml")


def user_config_path() -> Path:
    """The config ``facepro init`` writes: ``config.yaml`` in ``platformdirs.user_config_dir("facepro")``."""
    import platformdirs

    return Path(platformdirs.user_config_dir("facepro")) / "config.yaml"


def apply_data_dir(config_path: str | Path) -> Path | None:
    """Make the config's ``data_dir`` key the data dir of this process (and of the processes it starts) unless
    ``FACEPRO_DATA_DIR`` is set: every command, including those that do not load the whole config (``status``,
    ``backup``), then uses the same folder. Reads only that key (``${VAR}`` and ``~`` expanded); an unreadable
    or invalid file is left to the command's own config loading to report.

    Returns:
        The folder taken from the config, or None.
    """
    if os.environ.get("FACEPRO_DATA_DIR"):
        return None
    try:
        doc = yaml.safe_load(Path(config_path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    value = doc.get("data_dir") if isinstance(doc, dict) else None
    if not isinstance(value, str) or not value.strip():
        return None
    folder = Path(os.path.expandvars(value)).expanduser().resolve()
    os.environ["FACEPRO_DATA_DIR"] = str(folder)
    return folder


def default_config_path() -> Path:
    """The config a command reads without ``--config``: :func:`user_config_path` if it exists, else :data:`DEMO_CONFIG`."""
    user = user_config_path()
    return user if user.is_file() else DEMO_CONFIG


def database_url(cfg: AppConfig) -> str:
    """The storage URL: ``storage.url`` or SQLite in :func:`data_dir`."""
    if cfg.storage.url:
        return cfg.storage.url
    return f"sqlite:///{data_dir() / 'facepro.db'}"


def thread_budget(cfg: AppConfig, cpu_count: int | None = None, stage: str | None = None,
                  counts: Mapping[str, int] | None = None) -> int:
    """ONNX Runtime intra-op threads for one inference process of ``stage``.

    Splits the CPU cores over the inference processes (detection +
    recognition) so their total never exceeds the core count (oversubscription
    slows every process on small boxes). ``detection.threads`` /
    ``recognition.threads`` override per stage, ``runtime.inference_threads`` for all.

    Args:
        counts: live process counts per stage (the supervisor passes them to each
            process it spawns, so after ``facepro scale`` new processes are sized
            for the new count); the configured counts when None.
    """
    per_stage = {"detection": cfg.detection.threads, "recognition": cfg.recognition.threads}.get(stage or "")
    if per_stage:
        return per_stage
    if cfg.runtime.inference_threads:
        return cfg.runtime.inference_threads
    cores = cpu_count or os.cpu_count() or 1
    live = counts or {}
    procs = live.get("detection", cfg.detection.processes) + live.get("recognition", cfg.recognition.processes)
    return max(1, cores // max(1, procs))
