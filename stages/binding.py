"""ONNX Runtime IOBinding: a session's inputs and outputs copied once between host and device (issue 12).

``InferenceSession.run`` on a GPU provider copies each numpy input to memory the
provider allocates for that run, and each output twice: from the device into a
host buffer of ONNX Runtime, then into the numpy array it returns. With
IOBinding (ONNX Runtime's Python API, "IOBinding" in its documentation) the input
of each shape lives in one device ``OrtValue`` made once and refreshed by one
host-to-device copy a run (``OrtValue.update_inplace``), and each output is
copied from the device straight into a numpy array allocated for the caller.

:class:`BoundSession` wraps a session and keeps its interface (``run``,
``get_inputs``, ``get_providers``...), so the detector, SCRFD (through
InsightFace's model objects), the face and Re-ID embedders and the gait
embedder use it unchanged. ``runtime.io_binding: auto`` binds the sessions that
run on a GPU provider (with static shapes, a handful of input shapes); ``on``
binds CPU sessions too (inputs bound where they are, no copy), which the tests
use to hold the results equal to ``session.run`` on a machine without a GPU.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger("facepro.runtime")

#: Providers whose memory is the CUDA device's: inputs go to an ``OrtValue`` on ``cuda``, and the CUDA / cuDNN
#: libraries are preloaded for them (:func:`stages.runtime.preload_gpu_libraries`).
CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def binding_device(provider: str, setting: bool | None) -> str | None:
    """Where a session's bound inputs live, or None for no IOBinding.

    Args:
        provider: the provider the session really runs on (``session.get_providers()[0]``).
        setting: ``runtime.io_binding`` (``on``: True, ``off``: False, ``auto``: None, which binds GPU sessions only).

    Returns:
        ``"cuda"`` for :data:`CUDA_PROVIDERS`, ``"cpu"`` for another provider when ``setting`` is True, else None.
    """
    if setting is False or (setting is None and provider not in CUDA_PROVIDERS):
        return None
    return "cuda" if provider in CUDA_PROVIDERS else "cpu"


class _Plan:
    """One input signature's binding: the IOBinding, its device inputs (cuda) and the outputs' shapes and dtypes
    (None: the signature runs unbound, since ONNX Runtime checks bound outputs against the sizes the model
    declares, and this model declares others than it gives for this input)."""

    def __init__(self, binding: Any, inputs: dict[str, Any], outputs: list[tuple[tuple[int, ...], np.dtype]] | None) -> None:
        self.binding, self.inputs, self.outputs = binding, inputs, outputs


def _declared_as_given(declared: Sequence[Any], given: tuple[int, ...]) -> bool:
    """True when every fixed dimension of a declared output shape is the one a run gave (symbolic ones match any)."""
    return len(declared) == len(given) and all(not isinstance(d, int) or d == g for d, g in zip(declared, given))


class BoundSession:
    """An ONNX Runtime ``InferenceSession`` whose :meth:`run` goes through IOBinding; every other attribute is the
    session's own.

    The first run of each input signature (names, shapes, dtypes and the outputs asked for) is a plain
    ``session.run``, which gives the output shapes; later runs of that signature are bound, unless the model
    declares other output sizes than that run gave (SCRFD at inputs other than 640x640, which ONNX Runtime
    accepts unbound with a warning and refuses bound): that signature stays unbound. Output arrays are
    new for every run (a caller may keep them). A bound run that ONNX Runtime refuses (a model whose output
    shapes depend on the input's values) is logged once and the session runs unbound from then on. Threads may
    share it (the API's thread pool): bound runs take turns, as one binding serves each signature.

    Args:
        session: an ``onnxruntime.InferenceSession``.
        device: ``"cuda"`` or ``"cpu"`` (see :func:`binding_device`).
        what: the model's name for the log (``"object detector yolox_nano.onnx"``).
        device_id: the GPU's index (the CUDA provider's ``device_id``, 0 by default).
        own_inputs: copy inputs into ``OrtValue`` s of the session's own on ``device`` (default: when it is not the
            host; on the host, inputs are bound where they are); True on the host tests that path without a GPU.
    """

    def __init__(self, session: Any, device: str, what: str, device_id: int = 0, own_inputs: bool | None = None) -> None:
        self._session, self.device, self._what, self._device_id = session, device, what, device_id
        self._own_inputs = device != "cpu" if own_inputs is None else own_inputs
        self._names = [o.name for o in session.get_outputs()]
        self._plans: dict[tuple, _Plan] = {}
        self._lock = threading.Lock()  # a signature's binding and device input are shared: bound runs take turns
        self.bound_runs = 0
        self.failed: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    @property
    def session(self) -> Any:
        """The wrapped ``InferenceSession``."""
        return self._session

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any], run_options: Any = None) -> list[np.ndarray]:
        """``InferenceSession.run``'s contract: the outputs named (all when None) as numpy arrays, in order.

        Raises:
            What ``InferenceSession.run`` raises for these inputs (the first run of a signature is one).
        """
        names = list(output_names) if output_names else self._names
        feeds = {k: np.ascontiguousarray(v) for k, v in input_feed.items()}
        key = (tuple((k, v.shape, v.dtype.str) for k, v in feeds.items()), tuple(names))
        plan = self._plans.get(key)
        if plan is None or plan.outputs is None or self.failed is not None:
            outs = self._session.run(names, feeds, run_options)
            if plan is None and self.failed is None:
                with self._lock:
                    if key not in self._plans:
                        self._plans[key] = self._plan(feeds, names, outs)
            return outs
        try:
            with self._lock:
                return self._bound(plan, names, feeds, run_options)
        except Exception as err:  # noqa: BLE001 - onnxruntime's own error types; reported once, then unbound
            if self.failed is None:
                self.failed = f"{type(err).__name__}: {err}"
                log.warning("%s: IOBinding failed (%s); running without it", self._what, self.failed)
            return self._session.run(names, feeds, run_options)

    def _plan(self, feeds: dict[str, np.ndarray], names: list[str], outs: list[np.ndarray]) -> _Plan:
        """A binding for this signature: device inputs made (and bound) once when the device is not the host."""
        import onnxruntime as ort

        binding = self._session.io_binding()
        declared = {o.name: o.shape for o in self._session.get_outputs()}
        if not all(_declared_as_given(declared[n], o.shape) for n, o in zip(names, outs)):
            return _Plan(binding, {}, None)  # SCRFD declares its outputs at 640x640 and gives other sizes otherwise
        inputs = {}
        if self._own_inputs:
            for name, x in feeds.items():
                inputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(x.shape, x.dtype.type, self.device, self._device_id)
                binding.bind_ortvalue_input(name, inputs[name])
        return _Plan(binding, inputs, [(o.shape, o.dtype) for o in outs])

    def _bound(self, plan: _Plan, names: list[str], feeds: dict[str, np.ndarray], run_options: Any) -> list[np.ndarray]:
        """One bound run: inputs copied once to the device (or bound in place on the host), outputs into new arrays."""
        for name, x in feeds.items():
            if plan.inputs:
                plan.inputs[name].update_inplace(x)
            else:
                plan.binding.bind_cpu_input(name, x)
        outs = [np.empty(shape, dtype) for shape, dtype in plan.outputs]
        plan.binding.clear_binding_outputs()
        for name, out in zip(names, outs):
            plan.binding.bind_output(name, "cpu", 0, out.dtype, out.shape, out.ctypes.data)
        self._session.run_with_iobinding(plan.binding, run_options)
        self.bound_runs += 1
        return outs
