"""Execution providers from the config: what is requested, what this ONNX Runtime has, what really runs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline.config import OnnxDetectorConfig, RuntimeConfig
from stages import runtime as rt
from stages.detector import ObjectDetector

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.mark.parametrize("requested, available, strict, chosen, missing, error", [
    ((CPU,), [CPU], False, [CPU], [], None),
    ((TRT, CUDA, CPU), [CPU], False, [CPU], [TRT, CUDA], None),               # a CPU-only box: warn, fall back
    ((TRT, CUDA, CPU), [TRT, CUDA, CPU], False, [TRT, CUDA, CPU], [], None),  # a GPU box with TensorRT
    ((CUDA,), [CUDA, CPU], False, [CUDA, CPU], [], None),                     # CPU is always the last resort
    ((CUDA, CPU), [CPU], True, None, None, "CUDAExecutionProvider requested but this ONNX Runtime has only CPUExecutionProvider"),
])
def test_choose_providers(requested, available, strict, chosen, missing, error) -> None:
    if error:
        with pytest.raises(rt.ModelError, match=error):
            rt.choose_providers(requested, available, strict, "object detector")
        return
    assert rt.choose_providers(requested, available, strict, "object detector") == (chosen, missing)


def test_a_requested_gpu_provider_falls_back_to_cpu_with_a_warning_and_what_runs_is_recorded(
        models: Path, caplog: pytest.LogCaptureFixture) -> None:
    opts = rt.SessionOptions(providers=(CUDA, CPU))
    with caplog.at_level(logging.WARNING, logger="facepro.runtime"):
        det = ObjectDetector(OnnxDetectorConfig(path=models / "yolox_nano.onnx", layout="yolox"), opts)
    assert det._session.get_providers() == [CPU]
    assert rt.RUNNING_ON["object detector yolox_nano.onnx"] == CPU
    assert "CUDAExecutionProvider not available" in caplog.text and "running on CPUExecutionProvider" in caplog.text


def test_strict_providers_refuse_and_a_per_model_list_overrides_the_runtime_one(models: Path) -> None:
    strict = rt.SessionOptions(providers=(CUDA,), strict=True)
    with pytest.raises(rt.ModelError, match="object detector: execution provider"):
        ObjectDetector(OnnxDetectorConfig(path=models / "yolox_nano.onnx", layout="yolox"), strict)
    own = OnnxDetectorConfig(path=models / "yolox_nano.onnx", layout="yolox", providers=(CPU,))
    assert ObjectDetector(own, strict)._session.get_providers() == [CPU]
    assert RuntimeConfig().providers == (CPU,)  # the CPU default


def test_tensorrt_gets_its_engine_cache_in_the_data_dir(tmp_path: Path) -> None:
    got = rt._with_options([TRT, CUDA, CPU], rt.SessionOptions(cache_dir=tmp_path / "trt-cache"))
    assert got[0][0] == TRT and got[0][1]["trt_engine_cache_path"] == str(tmp_path / "trt-cache")
    assert got[1:] == [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), CPU]
    assert rt._with_options([TRT, CPU], rt.SessionOptions()) == [TRT, CPU]  # no cache dir: ONNX Runtime's defaults


class _Dist:
    def __init__(self, name: str) -> None:
        self.metadata = {"Name": name}


@pytest.mark.parametrize("installed, warns", [
    (["onnxruntime", "numpy"], False),
    (["onnxruntime-gpu"], False),
    (["onnxruntime", "onnxruntime-gpu"], True),  # the two packages overwrite each other's module
])
def test_two_onnxruntime_packages_are_detected(installed: list[str], warns: bool) -> None:
    msg = rt.check_onnxruntime_install([_Dist(n) for n in installed])
    assert bool(msg) is warns
    if warns:
        assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in msg


class _FakeSession:
    """An InferenceSession whose GPU provider failed to load (ONNX Runtime then silently runs on the CPU)."""

    def __init__(self, model: str, sess_options: object = None, providers: list | None = None) -> None:
        self.requested = providers

    def get_providers(self) -> list[str]:
        return [CPU]


class _FakeOrt:
    """The parts of the ``onnxruntime`` module ``_onnx_session`` uses, on a GPU build without CUDA libraries."""

    GraphOptimizationLevel = type("L", (), {"ORT_ENABLE_ALL": 99, "ORT_ENABLE_EXTENDED": 2, "ORT_ENABLE_BASIC": 1})
    SessionOptions = type("SO", (), {})
    InferenceSession = _FakeSession

    def __init__(self) -> None:
        self.preloads = 0

    def get_available_providers(self) -> list[str]:
        return [CUDA, CPU]

    def preload_dlls(self) -> None:
        self.preloads += 1


@pytest.mark.parametrize("strict, error", [(False, None), (True, "runtime.strict_providers is set")])
def test_an_available_gpu_provider_that_does_not_load_is_reported_and_refused_when_strict(
        models: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, strict: bool, error: str | None) -> None:
    fake = _FakeOrt()
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", fake)
    monkeypatch.setattr(rt, "_preloaded", [])
    opts = rt.SessionOptions(providers=(CUDA, CPU), strict=strict)
    with caplog.at_level(logging.WARNING, logger="facepro.runtime"):
        if error:
            with pytest.raises(rt.ModelError, match=error):
                rt.open_session("onnx", models / "osnet_x0_25_msmt17.onnx", "re-id", opts)
        else:
            rt.open_session("onnx", models / "osnet_x0_25_msmt17.onnx", "re-id", opts)
            rt.open_session("onnx", models / "osnet_x0_25_msmt17.onnx", "re-id", opts)
            assert "CUDAExecutionProvider is in this ONNX Runtime but did not load" in caplog.text
            assert rt.RUNNING_ON["re-id osnet_x0_25_msmt17.onnx"] == CPU
    assert fake.preloads == 1  # once per process, before the first GPU session


def test_cpu_sessions_never_preload_gpu_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeOrt()
    monkeypatch.setattr(rt, "_preloaded", [])
    rt.preload_gpu_libraries(fake, [CPU])
    assert fake.preloads == 0
    rt.preload_gpu_libraries(fake, [TRT, CUDA, CPU])
    rt.preload_gpu_libraries(fake, [CUDA, CPU])
    assert fake.preloads == 1
