"""Model backends: one explicit registry, ONNX Runtime sessions with clear errors.

Every model config names its backend with ``type`` (``Literal["onnx"]``);
:func:`open_session` looks it up in :data:`BACKENDS`. Optional packages are
imported lazily, so a missing one is a clear error naming the install profile.

The official download locations of the default models (documented in the
README; FacePro never downloads at run time):

- YOLOX-Nano: https://github.com/Megvii-BaseDetection/YOLOX/releases (``yolox_nano.onnx``)
- YOLOv8n: export with ``pip install -e .[export]`` and ``scripts/export_yolov8.py``
- SCRFD / MobileFaceNet / ArcFace: InsightFace model zoo, https://github.com/deepinsight/insightface/tree/master/model_zoo
- OSNet: torchreid model zoo, https://kaiyangzhou.github.io/deep-person-reid/MODEL_ZOO
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

MODEL_HELP = (
    "put the ONNX file there (facepro models fetch installs the manifest's models, facepro models list checks them) "
    "or change the path in the config; official download locations are listed in the README (section 'Models')"
)


class ModelError(RuntimeError):
    """A model file that is missing, unreadable or of the wrong kind; the message names the file."""


@dataclass(frozen=True)
class SessionOptions:
    """How to run a model.

    Attributes:
        threads: intra-op threads (the per-process thread budget, see
            :func:`pipeline.config.thread_budget`).
        providers: ONNX Runtime execution providers in order of preference;
            unavailable ones are skipped (check ``session.get_providers()``).
    """

    threads: int = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


def check_model_file(path: Path | str, what: str) -> Path:
    """Return ``path`` as a resolved Path if it is a readable, non-empty file.

    Raises:
        ModelError: naming ``what``, the path looked at, and what to do.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"{what} model not found: {p.resolve()} does not exist; {MODEL_HELP}")
    if p.stat().st_size == 0:
        raise ModelError(f"{what} model {p.resolve()} is empty; {MODEL_HELP}")
    return p.resolve()


def _onnx_session(path: Path, what: str, opts: SessionOptions) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as err:  # pragma: no cover - depends on install profile
        raise ModelError(f"onnxruntime is not installed ({err}); pip install onnxruntime (or the [gpu] extra)") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, opts.threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: SCRFD's declared output sizes warn on every other input size
    available = set(ort.get_available_providers())
    providers = [p for p in opts.providers if p in available] or ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelError(f"{what} model {path} could not be loaded by ONNX Runtime ({type(err).__name__}: {err}); {MODEL_HELP}") from None


#: Backend registry: config ``type`` → session factory ``(path, what, options) -> session``.
BACKENDS: dict[str, Callable[[Path, str, SessionOptions], Any]] = {"onnx": _onnx_session}


def open_session(backend: str, path: Path | str, what: str, opts: SessionOptions = SessionOptions()) -> Any:
    """Open an inference session for a model file.

    Args:
        backend: the model config's ``type`` (a key of :data:`BACKENDS`).
        path: model file.
        what: human name of the model for messages (``"object detector"``).
        opts: threads and providers.

    Raises:
        ModelError: unknown backend, missing/empty/invalid model file.
    """
    if backend not in BACKENDS:
        raise ModelError(f"{what}: unknown model backend {backend!r}; known: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[backend](check_model_file(path, what), what, opts)


def expect_input(session: Any, what: str, path: Path | str, rank: int, channels: int = 3) -> tuple[Any, ...]:
    """Check the model's first input is ``rank``-D with ``channels`` channels; return its shape.

    Raises:
        ModelError: the model has another input layout (wrong file for this role).
    """
    inp = session.get_inputs()[0]
    shape = tuple(inp.shape)
    if len(shape) != rank or (rank == 4 and shape[1] != channels):
        raise ModelError(f"{what} model {path}: input {inp.name} has shape {list(shape)}, expected [N, {channels}, H, W]; is this the right file?")
    return shape


def expect_embedding_output(session: Any, what: str, path: Path | str) -> Any:
    """Check the model has exactly one ``[B, d]`` output (an embedder); return ``d`` (int or a symbolic name).

    Raises:
        ModelError: another output layout (wrong file for this role).
    """
    outs = session.get_outputs()
    if len(outs) != 1 or len(outs[0].shape) != 2:
        raise ModelError(f"{what} model {path}: outputs {[(o.name, list(o.shape)) for o in outs]}, expected one [B, d] embedding output")
    return outs[0].shape[1]
