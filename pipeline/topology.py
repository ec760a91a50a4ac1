"""The stage table: which process kinds a pipeline runs, how many, and how they are connected.

Everything that needs to know the shape of the pipeline reads :data:`STAGES`:
the supervisor (what to spawn, in which order to drain, what a restart
means), the worker entry point (:mod:`pipeline.worker` dispatches by
``StageSpec.name``), ``facepro status`` (stage order) and the thread budget
(:attr:`StageSpec.inference`). A new process kind (an API server, an event
publisher) is a new row here plus an entry function in the worker.

Optional rows. A row with ``enabled`` runs only when the config turns it on
(the ``mqtt`` row: an ``mqtt`` section is present; the ``frigate`` row: a
``frigate`` section; the ``api`` row: ``api.enabled``); switched off it has 0
processes and is left out of status and the run summary (:func:`active_names`).
A config without cameras (a Frigate companion-only box) switches off every row
of the data path: only the rows off it run. A row off the data path
(``data_path=False``: the mqtt publisher reads the outbox storage commits, the
api reads status, rings and the database; neither carries frames) has no
upstream for queue depths (its depth is its own backlog, e.g. the outbox
rows not yet acknowledged by the broker, or the Frigate requests waiting), does
not hold the live cameras' start gate and gets no low-rate alert.

Endpoints. ZeroMQ endpoint names are built only by the functions of this
module (:func:`frames`, :func:`detections`, :func:`storage`,
:func:`storage_acks`, :func:`control`, :func:`live_tracks`); no other module spells an endpoint
name. Each row declares the endpoints its processes read (``inboxes``) and
write (``outboxes``) as functions of the config, the process index and the
live process counts (``counts``: stage name → processes now running, which
changes with ``facepro scale``).

Process counts (:class:`Count`): one per camera, a configured count
(``detection.processes``...), or exactly one (none while an optional row
is switched off).

Drain order is table order (pipeline order): the data path, then mqtt
(after storage, so the events of the last commits are still published),
then the frigate companion, then the api (last: it answers health and status
while the others drain).
Processes are started in the reverse order, so every bound endpoint exists
before its senders start.

Restart behaviour (:class:`Resume`) says what the successor of a killed
process gets (the capture side of ``AFTER_LAST_PUBLISHED`` is implemented by
the capture loop of the data path, issue 11).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Mapping

from pipeline.config import AppConfig

Counts = Mapping[str, int]
Endpoints = Callable[[AppConfig, int, Counts], tuple[str, ...]]


# ----------------------------------------------------------------- endpoints
def frames(camera: str) -> str:
    """Capture of ``camera`` → detection (ROUTER, credit based): ``frames-<camera>``."""
    return f"frames-{camera}"


def detections(index: int) -> str:
    """Detection → recognition process ``index`` (PUSH/PULL): ``detections-<index>``."""
    if index < 0:
        raise ValueError(f"detections: recognition index must be >= 0, got {index}")
    return f"detections-{index}"


def storage() -> str:
    """Recognition → storage (PUSH/PULL, numbered items): ``storage``."""
    return "storage"


def storage_acks() -> str:
    """Storage → recognition (PUB/SUB, commit acknowledgements): ``storage-acks``."""
    return "storage-acks"


def live_tracks() -> str:
    """Recognition → api (PUB connects, SUB binds; lossy): each frame's confirmed track boxes and names for the
    live view (:class:`pipeline.messages.LiveTracks`), only while ``api.enabled``: ``live-tracks``."""
    return "live-tracks"


def control() -> str:
    """CLI → supervisor requests (REQ/REP: status, scale): ``control``."""
    return "control"


# --------------------------------------------------------------------- enums
class Count(enum.Enum):
    """How a stage's process count is derived."""

    PER_CAMERA = "per_camera"  # one process per configured camera (process i serves camera i)
    CONFIGURED = "configured"  # ``<stage>.processes`` from the config, changeable with facepro scale
    ONE = "one"  # exactly one process (none while an optional row is switched off)


class Resume(enum.Enum):
    """What the successor of a killed process gets."""

    AFTER_LAST_PUBLISHED = "after_last_published"  # capture: continues after the predecessor's last published frame
    FRAMES_AGAIN = "frames_again"  # detection/recognition: frames the predecessor held are reclaimed (counted lost) and new ones flow
    UNACKED_RESENT = "unacked_resent"  # storage: producers re-send every item it had not acknowledged
    OUTBOX_REPLAYED = "outbox_replayed"  # mqtt: every outbox row the broker had not acknowledged is published again
    FRESH = "fresh"  # api, frigate: nothing carried over (frigate: requests queued in the killed process are lost,
    #                  the successor serves the events Frigate publishes from then on)


class Rescale(enum.Enum):
    """How ``facepro scale`` changes a stage's count while running."""

    FIXED = "fixed"  # not scalable at run time
    DIRECT = "direct"  # processes are added or removed one by one (credit-based input)
    REPARTITION = "repartition"  # the upstream stage drains, the stage restarts with a new camera map


# --------------------------------------------------------------------- table
@dataclass(frozen=True)
class StageSpec:
    """One process kind.

    Attributes:
        name: stage name (also the worker dispatch key and the status row).
        count: how the process count is derived.
        inboxes, outboxes: endpoint names a process ``(cfg, index, counts)`` reads / writes.
        resume: what a restarted process's successor gets.
        rescale: how the count changes while running.
        inference: True if its processes run ONNX inference (share the thread budget).
        ends_with_source: True if a process exiting 0 on its own is a finished
            file source, not a failure (capture).
        enabled: for an optional row, whether the config turns it on (None: always on).
        data_path: False for a row that carries no frames (module docstring); a row on the data path runs only
            when the config has cameras.
    """

    name: str
    count: Count
    inboxes: Endpoints
    outboxes: Endpoints
    resume: Resume
    rescale: Rescale = Rescale.FIXED
    inference: bool = False
    ends_with_source: bool = False
    enabled: Callable[[AppConfig], bool] | None = None
    data_path: bool = True

    def active(self, cfg: AppConfig) -> bool:
        """True unless the row is optional and ``cfg`` switches it off, or it is on the data path and ``cfg``
        has no cameras."""
        if self.data_path and not cfg.cameras:
            return False
        return self.enabled is None or bool(self.enabled(cfg))

    def processes(self, cfg: AppConfig) -> int:
        """The configured process count of this stage (0 for a switched-off optional row)."""
        if not self.active(cfg):
            return 0
        if self.count is Count.PER_CAMERA:
            return len(cfg.cameras)
        if self.count is Count.ONE:
            return 1
        return int(getattr(cfg, self.name).processes)


def recognition_index(cfg: AppConfig, camera: str, n_recognition: int) -> int:
    """The recognition process that owns ``camera``: camera ``k`` (config order) → ``k % n_recognition``."""
    names = [c.name for c in cfg.cameras]
    return (names.index(camera) if camera in names else 0) % n_recognition


def _none(cfg: AppConfig, index: int, counts: Counts) -> tuple[str, ...]:
    return ()


def _capture_out(cfg: AppConfig, index: int, counts: Counts) -> tuple[str, ...]:
    return (frames(cfg.cameras[index].name),)


def _detection_in(cfg: AppConfig, index: int, counts: Counts) -> tuple[str, ...]:
    return tuple(frames(c.name) for c in cfg.cameras)


def _detection_out(cfg: AppConfig, index: int, counts: Counts) -> tuple[str, ...]:
    return tuple(detections(i) for i in range(counts["recognition"]))


def _recognition_in(cfg: AppConfig, index: int, counts: Counts) -> tuple[str, ...]:
    return (detections(index), storage_acks())


def _recognition_out(cfg: AppConfig, index: int, counts: Counts) -> tuple[str, ...]:
    return (storage(),) + ((live_tracks(),) if cfg.api.enabled else ())


def _api_in(cfg: AppConfig, index: int, counts: Counts) -> tuple[str, ...]:
    return (live_tracks(),)


def _storage_in(cfg: AppConfig, index: int, counts: Counts) -> tuple[str, ...]:
    return (storage(),)


def _storage_out(cfg: AppConfig, index: int, counts: Counts) -> tuple[str, ...]:
    return (storage_acks(),)


def _mqtt_configured(cfg: AppConfig) -> bool:
    return cfg.mqtt is not None


STAGES: tuple[StageSpec, ...] = (
    StageSpec("capture", Count.PER_CAMERA, _none, _capture_out, Resume.AFTER_LAST_PUBLISHED, ends_with_source=True),
    StageSpec("detection", Count.CONFIGURED, _detection_in, _detection_out, Resume.FRAMES_AGAIN,
              rescale=Rescale.DIRECT, inference=True),
    StageSpec("recognition", Count.CONFIGURED, _recognition_in, _recognition_out, Resume.FRAMES_AGAIN,
              rescale=Rescale.REPARTITION, inference=True),
    StageSpec("storage", Count.ONE, _storage_in, _storage_out, Resume.UNACKED_RESENT),
    # publishes the outbox storage commits (reads the database; asks the supervisor's control endpoint for
    # stats); drained after storage, so the events of its last commits are still published
    StageSpec("mqtt", Count.ONE, _none, _none, Resume.OUTBOX_REPLAYED, enabled=_mqtt_configured, data_path=False),
    # the Frigate companion: frigate/events from the broker, snapshots and sub_labels over Frigate's HTTP API, the
    # gallery from the database; no endpoint of ours
    StageSpec("frigate", Count.ONE, _none, _none, Resume.FRESH, enabled=lambda cfg: cfg.frigate is not None,
              data_path=False),
    # the HTTP API: status over control(), frames read from the rings, the database, track boxes of the live
    # view from recognition (live_tracks, lossy); drained last (it answers health and status while the others drain)
    StageSpec("api", Count.ONE, _api_in, _none, Resume.FRESH, enabled=lambda cfg: cfg.api.enabled, data_path=False),
)

#: Stage names in pipeline (= drain) order.
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
#: The stages frames and their results travel through, in order (queue depths, start gate, rate alerts).
DATA_PATH: tuple[str, ...] = tuple(s.name for s in STAGES if s.data_path)


def active_names(cfg: AppConfig) -> tuple[str, ...]:
    """Names of the rows ``cfg`` runs, in table order (switched-off optional rows left out)."""
    return tuple(s.name for s in STAGES if s.active(cfg))


def spec(name: str) -> StageSpec:
    """The row of stage ``name``.

    Raises:
        KeyError: no such stage (the message lists the known ones).
    """
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGE_NAMES)}")


def initial_counts(cfg: AppConfig) -> dict[str, int]:
    """Process count per stage at start, from the config."""
    return {s.name: s.processes(cfg) for s in STAGES}


def upstream(name: str) -> str | None:
    """The stage before ``name`` on the data path, None for the first and for rows off the data path."""
    if name not in DATA_PATH:
        return None
    i = DATA_PATH.index(name)
    return DATA_PATH[i - 1] if i else None


def start_order() -> tuple[StageSpec, ...]:
    """Rows in start order: downstream first, so bound endpoints exist before their senders."""
    return tuple(reversed(STAGES))


def format_counts(counts: Counts) -> str:
    """``capture=1,detection=2,...`` (the worker's COUNTS argument)."""
    return ",".join(f"{name}={int(counts[name])}" for name in STAGE_NAMES)


def parse_counts(text: str) -> dict[str, int]:
    """Inverse of :func:`format_counts`.

    Raises:
        ValueError: malformed text, an unknown stage, a missing stage or a count < 0.
    """
    out: dict[str, int] = {}
    for part in text.split(","):
        name, sep, n = part.partition("=")
        if not sep or not n.isdigit():
            raise ValueError(f"counts: expected STAGE=N[,STAGE=N...], got {text!r}")
        if name not in STAGE_NAMES:
            raise ValueError(f"counts: unknown stage {name!r} in {text!r}")
        out[name] = int(n)
    missing = [n for n in STAGE_NAMES if n not in out]
    if missing:
        raise ValueError(f"counts: missing {', '.join(missing)} in {text!r}")
    return out
