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

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal

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
        providers: ONNX Runtime execution providers in order of preference
            (``runtime.providers``, or a model's own ``providers``); see :func:`choose_providers`.
        strict: a requested provider that is not available is a :class:`ModelError`.
        cache_dir: TensorRT engine cache (the data dir's ``trt-cache``): engines are
            built once per model and input shape, not at every start.
        graph_optimization: ONNX Runtime's graph optimisation level (``all`` adds the CPU's
            NCHWc layout transforms: 1.7-2.2x faster for YOLOX, SCRFD and MobileFaceNet here,
            1.6x slower for OSNet's depthwise convolutions; see ``recognition.reid.graph_optimization``).
        static_shapes: keep model inputs to a few fixed shapes (see :func:`static_shapes`); None: when the
            session runs on a GPU provider (``runtime.static_shapes: auto``).
        io_binding: run sessions through IOBinding (:class:`stages.binding.BoundSession`); None: when the
            session runs on a GPU provider (``runtime.io_binding: auto``).
    """

    threads: int = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    strict: bool = False
    cache_dir: Path | None = None
    graph_optimization: Literal["all", "extended", "basic"] = "all"
    static_shapes: bool | None = None
    io_binding: bool | None = None


#: What each model opened in this process really runs on: ``"<what> <file>" -> provider`` (for status and the log).
RUNNING_ON: dict[str, str] = {}

log = logging.getLogger("facepro.runtime")


def static_shapes(session: Any, opts: SessionOptions) -> bool:
    """True when a model's inputs should keep to a few fixed shapes: ``opts.static_shapes`` when set, else when
    ``session`` runs on a GPU provider (its first provider is not the CPU's).

    On ONNX Runtime's CUDA provider every new input shape costs about a second
    (measured with ``scripts/gpu_check.py`` on an H200: SCRFD-500M 942 ms a call
    on 10 person crops of new sizes, 2.6 ms on a repeated one; whether cuDNN's
    planning or lazy kernel loading is not pinned down yet, the script's shape
    probe tells them apart), and TensorRT builds an engine per shape. With static
    shapes the detector keeps its declared canvas, SCRFD a square input, and
    batches are padded to :func:`bucket` sizes, each run once at start.
    """
    if opts.static_shapes is not None:
        return opts.static_shapes
    return session.get_providers()[0] != "CPUExecutionProvider"


def bucket(n: int) -> int:
    """The batch size ``n`` items run at with static shapes: the next power of two (1, 2, 4, 8...)."""
    return 1 << max(0, n - 1).bit_length()


def buckets(largest: int) -> list[int]:
    """Every :func:`bucket` size a batch of 1 to ``largest`` items can run at (warm-up runs each once)."""
    return sorted({bucket(n) for n in range(1, max(1, largest) + 1)})


def pad_rows(x: Any, n: int) -> Any:
    """``x`` (an ``(m, ...)`` array, ``m <= n``) with zero rows of its dtype appended: ``(n, ...)``; ``x`` itself
    when ``m >= n``."""
    import numpy as np

    if len(x) >= n:
        return x
    return np.concatenate((x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)))


def for_model(opts: SessionOptions, providers: tuple[str, ...] | None,
              graph_optimization: Literal["all", "extended", "basic"] | None = None) -> SessionOptions:
    """``opts`` with a model's own provider list (its config's ``providers``) and graph optimisation level
    when it has them."""
    out = replace(opts, providers=tuple(providers)) if providers else opts
    return replace(out, graph_optimization=graph_optimization) if graph_optimization else out


def choose_providers(requested: tuple[str, ...], available: list[str] | tuple[str, ...], strict: bool,
                     what: str) -> tuple[list[str], list[str]]:
    """The providers to ask ONNX Runtime for, and the requested ones that are not available.

    Requested providers that this ONNX Runtime build has are kept in order;
    ``CPUExecutionProvider`` is always appended as the last resort.

    Raises:
        ModelError: ``strict`` and a requested provider is missing (names both lists and the fix).
    """
    missing = [p for p in requested if p not in available]
    if missing and strict:
        raise ModelError(f"{what}: execution provider(s) {', '.join(missing)} requested but this ONNX Runtime has only "
                         f"{', '.join(available)}; install the [gpu] profile (pip uninstall -y onnxruntime && "
                         "pip install onnxruntime-gpu), or set runtime.strict_providers: false to fall back")
    chosen = [p for p in requested if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen, missing


def onnxruntime_distributions(dists: object = None) -> list[str]:
    """Installed distributions that provide the ``onnxruntime`` module (``onnxruntime``, ``onnxruntime-gpu``...).

    Several at once overwrite each other's files (the last one installed wins,
    and a later upgrade of one can leave a broken mix): :func:`check_onnxruntime_install`
    warns about it.
    """
    from importlib import metadata

    names = {d.metadata["Name"].lower() for d in (dists if dists is not None else metadata.distributions())
             if d.metadata["Name"]}
    return sorted(n for n in names if n == "onnxruntime" or n.startswith("onnxruntime-") or n.startswith("onnxruntime_"))


def check_onnxruntime_install(dists: object = None) -> str:
    """A one-line warning when more than one ONNX Runtime distribution is installed, else ``""``."""
    found = onnxruntime_distributions(dists)
    if len(found) < 2:
        return ""
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in found else found[-1]
    return (f"{' and '.join(found)} are all installed; they provide the same onnxruntime module and the last one "
            f"installed wins: pip uninstall -y {' '.join(found)} && pip install {keep}")


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


def _onnx_session(path: Path, what: str, opts: SessionOptions, transform: Callable[[Path], bytes] | None = None) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as err:  # pragma: no cover - depends on install profile
        raise ModelError(f"onnxruntime is not installed ({err}); pip install onnxruntime (or the [gpu] extra)") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, opts.threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: SCRFD's declared output sizes warn on every other input size
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[opts.graph_optimization]
    chosen, missing = choose_providers(opts.providers, ort.get_available_providers(), opts.strict, what)
    preload_gpu_libraries(ort, chosen)
    try:
        model: str | bytes = str(path) if transform is None else transform(path)
        session = ort.InferenceSession(model, sess_options=so, providers=_with_options(chosen, opts))
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelError(f"{what} model {path} could not be loaded by ONNX Runtime ({type(err).__name__}: {err}); {MODEL_HELP}") from None
    ran = session.get_providers()[0]
    RUNNING_ON[f"{what} {path.name}"] = ran
    if ran != chosen[0]:
        failed = (f"{what} {path.name}: {chosen[0]} is in this ONNX Runtime but did not load (its libraries, CUDA / "
                  f"cuDNN / TensorRT, were not found: pip install 'onnxruntime-gpu[cuda,cudnn]', or put them on LD_LIBRARY_PATH); "
                  f"running on {ran}")
        if opts.strict:
            raise ModelError(failed + "; runtime.strict_providers is set")
        log.warning("%s", failed)
    elif missing:
        log.warning("%s %s: %s not available in this ONNX Runtime; running on %s", what, path.name, ", ".join(missing), ran)
    else:
        log.info("%s %s runs on %s", what, path.name, ran)
    from stages.binding import BoundSession, binding_device  # numpy: only where sessions open

    device = binding_device(ran, opts.io_binding)
    if device is None:
        return session
    log.info("%s %s: inputs and outputs bound (IOBinding, inputs on %s)", what, path.name, device)
    return BoundSession(session, device, f"{what} {path.name}")


_preloaded: list[bool] = []


def preload_gpu_libraries(ort: Any, providers: list[str]) -> None:
    """Load the CUDA and cuDNN libraries of the ``nvidia-*`` wheels once per process when a GPU provider is chosen.

    ``onnxruntime-gpu`` (1.21 and later) finds the libraries of ``pip install
    'onnxruntime-gpu[cuda,cudnn]'`` only through ``onnxruntime.preload_dlls()``
    (ONNX Runtime's CUDA EP documentation, "Preload DLLs"); system libraries on
    ``LD_LIBRARY_PATH`` need nothing. A failure is logged, not raised: the session
    then reports what really runs.
    """
    from stages.binding import CUDA_PROVIDERS

    if _preloaded or not any(p in CUDA_PROVIDERS for p in providers) or not hasattr(ort, "preload_dlls"):
        return
    _preloaded.append(True)
    try:
        ort.preload_dlls()
    except Exception as err:  # noqa: BLE001 - reported; what runs is checked after the session opens
        log.warning("onnxruntime.preload_dlls() failed (%s); CUDA / cuDNN must then be on LD_LIBRARY_PATH", err)


#: CUDA provider options: cuDNN's heuristic picks a convolution algorithm at once. The default exhaustive search
#: benchmarks every algorithm at each new input shape, and the pipeline's shapes vary (fitted detector canvases,
#: SCRFD's per-person input sizes, face / Re-ID batch sizes).
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


def _with_options(providers: list[str], opts: SessionOptions) -> list[Any]:
    """Provider entries for ONNX Runtime: CUDA gets :data:`CUDA_OPTIONS`, TensorRT its engine cache in
    ``opts.cache_dir`` (when set)."""
    out: list[Any] = []
    for p in providers:
        if p == "CUDAExecutionProvider":
            out.append((p, dict(CUDA_OPTIONS)))
        elif p == "TensorrtExecutionProvider" and opts.cache_dir is not None:
            out.append((p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(opts.cache_dir),
                            "trt_fp16_enable": True}))
        else:
            out.append(p)
    return out


#: Backend registry: config ``type`` → session factory ``(path, what, options, transform) -> session``.
BACKENDS: dict[str, Callable[..., Any]] = {"onnx": _onnx_session}


def open_session(backend: str, path: Path | str, what: str, opts: SessionOptions = SessionOptions(),
                 transform: Callable[[Path], bytes] | None = None) -> Any:
    """Open an inference session for a model file.

    Args:
        backend: the model config's ``type`` (a key of :data:`BACKENDS`).
        path: model file.
        what: human name of the model for messages (``"object detector"``).
        opts: threads and providers.
        transform: builds the model bytes to load from the file (e.g. with free input sizes); None loads the file.

    Raises:
        ModelError: unknown backend, missing/empty/invalid model file.
    """
    if backend not in BACKENDS:
        raise ModelError(f"{what}: unknown model backend {backend!r}; known: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[backend](check_model_file(path, what), what, opts, transform)


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
