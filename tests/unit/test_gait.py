"""Gait Energy Image: silhouette normalisation, GEI averaging, embedding, linking, and real silhouettes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import GaitConfig, OnnxDetectorConfig, OnnxGaitEmbedderConfig
from stages.detector import ObjectDetector
from stages.gait import (
    GEI_HEIGHT,
    GEI_WIDTH,
    CameraSilhouettes,
    GeiEmbedder,
    OnnxGaitEmbedder,
    TrackGait,
    gait_embedder,
    gei_embedding,
    normalise_silhouette,
)
from stages.identity import Named
from stages.recognition import GaitLinker
from stages.runtime import ModelError
from stages.tracking import ActiveTrack


def _mask(h: int = 120, w: int = 80, box: tuple[int, int, int, int] = (30, 10, 50, 110)) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return m


@pytest.mark.parametrize("box", [(30, 10, 50, 110), (0, 40, 20, 100), (55, 0, 80, 60)])
def test_silhouette_is_scaled_to_full_height_and_centred(box: tuple[int, int, int, int]) -> None:
    out = normalise_silhouette(_mask(box=box))
    assert out is not None and out.shape == (GEI_HEIGHT, GEI_WIDTH) and out.dtype == np.float32
    assert out[0].any() and out[-1].any()  # the body spans the full height wherever it was in the crop
    cols = np.nonzero(out.any(axis=0))[0]
    assert abs((cols[0] + cols[-1]) / 2 - GEI_WIDTH / 2) <= 1.5  # centred on its column centroid


@pytest.mark.parametrize("mask", [np.zeros((100, 50), np.uint8), _mask(box=(10, 10, 12, 13))])
def test_empty_or_tiny_silhouettes_are_rejected(mask: np.ndarray) -> None:
    assert normalise_silhouette(mask) is None
    g = TrackGait(min_frames=1)
    assert not g.add(1, mask) and g.rejected == 1 and g.gei(1) is None


def test_gei_is_the_mean_of_the_silhouettes() -> None:
    g = TrackGait(min_frames=4)
    a, b = _mask(box=(30, 10, 50, 110)), _mask(box=(20, 10, 60, 110))  # legs together / apart
    for m in (a, b, a):
        g.add(7, m)
    assert g.gei(7) is None  # fewer than min_frames
    g.add(7, b)
    gei = g.gei(7)
    na, nb = normalise_silhouette(a), normalise_silhouette(b)
    assert np.allclose(gei, (na + nb) / 2)
    assert set(np.unique(gei).round(2)) <= {0.0, 0.5, 1.0}
    assert g.pop(7) is not None and g.gei(7) is None


def test_embedding_is_unit_norm_and_checks_shape() -> None:
    gei = normalise_silhouette(_mask())
    e = gei_embedding(gei)
    assert e.shape == (GEI_HEIGHT * GEI_WIDTH // 4,) and abs(float(np.linalg.norm(e)) - 1) < 1e-5
    assert float(e @ gei_embedding(gei)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="expected a"):
        gei_embedding(np.zeros((10, 10), np.float32))


class _FixedSilhouettes(CameraSilhouettes):
    def __init__(self, mask: np.ndarray) -> None:
        super().__init__()
        self.fixed = mask

    def update(self, frame: np.ndarray) -> None:
        pass

    def silhouette(self, xyxy: np.ndarray) -> np.ndarray:
        return self.fixed


def test_gait_linker_names_an_unnamed_track_like_an_earlier_named_one() -> None:
    cfg = GaitConfig(min_frames=3, link_threshold=0.99)
    linker = GaitLinker(cfg)
    walker, other = _mask(box=(30, 10, 50, 110)), _mask(h=60, w=120, box=(10, 20, 110, 40))  # upright vs lying
    frame = np.zeros((4, 4, 3), np.uint8)
    track = lambda i: ActiveTrack(track_id=i, event_id=f"{i:032x}", xyxy=np.zeros(4, np.float32), label="person")  # noqa: E731
    linker.silhouettes["cam"] = _FixedSilhouettes(walker)
    for _ in range(3):
        linker.observe("cam", [track(1)], frame)
    rec = linker.end("cam", 1, f"{1:032x}", Named("Alice", "face", 0.8))
    assert rec is not None and rec.kind == "gait" and rec.model == "gei-64x44" and rec.vector.shape == (GEI_HEIGHT * GEI_WIDTH // 4,)
    ready = [linker.observe("cam", [track(2)], frame) for _ in range(3)][-1]
    assert ready == [2]
    named = linker.link("cam", 2)
    assert named is not None and named.identity == "Alice" and named.method == "gait"
    linker.silhouettes["cam"] = _FixedSilhouettes(other)
    for _ in range(3):
        linker.observe("cam", [track(3)], frame)
    assert linker.link("cam", 3) is None  # a different shape stays unknown


def test_real_walkers_give_silhouettes_and_a_gei(videos: Path, models: Path) -> None:
    det = ObjectDetector(OnnxDetectorConfig(path=models / "yolox_nano.onnx", layout="yolox"))
    sil, gait = CameraSilhouettes(), TrackGait(min_frames=20)
    cap = cv2.VideoCapture(str(videos / "vtest.avi"))
    fractions = []
    for _ in range(80):
        ok, frame = cap.read()
        assert ok
        sil.update(frame)
        r = det.detect(frame)
        if len(r):
            i = int(np.argmax((r.xyxy[:, 3] - r.xyxy[:, 1])))  # the tallest person: one walker, mostly
            m = sil.silhouette(r.xyxy[i])
            fractions.append(0.0 if m is None else float((m > 0).mean()))
            gait.add(1, m)
    assert np.median(fractions[20:]) > 0.1  # after the background settles, people are foreground
    gei = gait.gei(1)
    assert gei is not None and 0.05 < float(gei.mean()) < 0.9


# ----------------------------------------------------------- ONNX gait embedder

def _linear_gait_model(path: Path, input_shape: list, out_dim: int = 16, seed: int = 0, out_rank: int = 2) -> np.ndarray:
    """Write an ONNX model ``y = flatten(x) @ W`` (a stand-in for a GEI-input CNN such as GEINet); returns ``W``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h, w = (input_shape[2], input_shape[3]) if all(isinstance(v, int) for v in input_shape[2:]) else (GEI_HEIGHT, GEI_WIDTH)
    weights = np.random.default_rng(seed).standard_normal((input_shape[1] * h * w, out_dim)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["gei"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["y"])]
    out_shape = ["N", out_dim]
    if out_rank == 3:
        nodes.append(helper.make_node("Unsqueeze", ["y", "axes"], ["emb"]))
        out_shape = ["N", out_dim, 1]
    else:
        nodes.append(helper.make_node("Identity", ["y"], ["emb"]))
    inits = [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(np.array([2], np.int64), "axes")]
    graph = helper.make_graph(nodes, "gait", [helper.make_tensor_value_info("gei", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return weights


def test_onnx_gait_embedder_resizes_the_gei_to_the_model_input_and_normalises(tmp_path: Path) -> None:
    path = tmp_path / "geinet_test.onnx"
    weights = _linear_gait_model(path, ["N", 1, 128, 88])
    emb = OnnxGaitEmbedder(path)
    assert emb.input_hw == (128, 88) and emb.model_name == "geinet_test"
    gei = TrackGait(min_frames=1)
    gei.add(1, _mask())
    g = gei.gei(1)
    x = emb.preprocess(g)
    assert x.shape == (1, 1, 128, 88) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert np.allclose(x[0, 0], cv2.resize(g, (88, 128), interpolation=cv2.INTER_LINEAR), atol=1e-6)
    expected = x.reshape(-1) @ weights
    out = emb.embed(g)
    assert out.shape == (16,) and out.dtype == np.float32
    assert np.allclose(out, expected / np.linalg.norm(expected), atol=1e-4)
    with pytest.raises(ValueError, match="expected a"):
        emb.embed(np.zeros((10, 10), np.float32))


@pytest.mark.parametrize(
    "input_shape, out_rank, error",
    [
        (["N", 3, 128, 88], 2, r"expected one \[B, 1, H, W\] GEI input"),  # an RGB model (Re-ID, faces): wrong file
        (["N", 1, "H", "W"], 2, r"with fixed H and W"),
        ([4, 1, 128, 88], 2, r"\[4, 1, 128, 88\]"),  # fixed batch of 4
        (["N", 1, 128, 88], 3, r"expected one \[B, d\] embedding output"),
    ],
)
def test_onnx_gait_embedder_refuses_other_layouts(tmp_path: Path, input_shape: list, out_rank: int, error: str) -> None:
    path = tmp_path / "wrong.onnx"
    _linear_gait_model(path, input_shape, out_rank=out_rank)
    with pytest.raises(ModelError, match=error) as info:
        OnnxGaitEmbedder(path)
    assert str(path) in str(info.value)


def test_gait_embedder_follows_the_config(tmp_path: Path) -> None:
    assert isinstance(gait_embedder(GaitConfig()), GeiEmbedder)
    path = tmp_path / "g.onnx"
    _linear_gait_model(path, [1, 1, 64, 44])
    assert isinstance(gait_embedder(GaitConfig(embedder=OnnxGaitEmbedderConfig(path=path))), OnnxGaitEmbedder)
    with pytest.raises(ModelError, match="gait embedder model not found"):
        gait_embedder(GaitConfig(embedder=OnnxGaitEmbedderConfig(path=tmp_path / "missing.onnx")))


def test_gait_linker_stores_and_links_with_the_configured_embedder(tmp_path: Path) -> None:
    path = tmp_path / "geinet_test.onnx"
    _linear_gait_model(path, ["N", 1, 128, 88], out_dim=32)
    linker = GaitLinker(GaitConfig(min_frames=3, link_threshold=0.99), OnnxGaitEmbedder(path))
    frame = np.zeros((4, 4, 3), np.uint8)
    track = lambda i: ActiveTrack(track_id=i, event_id=f"{i:032x}", xyxy=np.zeros(4, np.float32), label="person")  # noqa: E731
    linker.silhouettes["cam"] = _FixedSilhouettes(_mask())
    for _ in range(3):
        linker.observe("cam", [track(1)], frame)
    rec = linker.end("cam", 1, f"{1:032x}", Named("Alice", "face", 0.8))
    assert rec is not None and rec.model == "geinet_test" and rec.vector.shape == (32,)
    for _ in range(3):
        linker.observe("cam", [track(2)], frame)
    named = linker.link("cam", 2)
    assert named is not None and named.identity == "Alice" and named.method == "gait"


def test_a_still_frame_without_persons_leaves_the_background_alone():
    """The motion gate found no change and nobody is tracked: MOG2 is not fed (it would only confirm the
    background); with a person, or with motion, it is."""
    linker = GaitLinker(GaitConfig(width_px=64))
    frame = np.full((48, 64, 3), 90, np.uint8)
    linker.observe("cam", [], frame)
    sil = linker.silhouettes["cam"]
    calls = []
    feed = sil.update
    sil.update = lambda f: (calls.append(1), feed(f))  # type: ignore[method-assign]
    assert linker.observe("cam", [], frame, still=True) == [] and calls == [] and linker.still_skipped == 1
    linker.observe("cam", [], frame, still=False)
    person = ActiveTrack(track_id=1, event_id=f"{1:032x}", xyxy=np.array([10, 5, 30, 45], np.float32), label="person")
    linker.observe("cam", [person], frame, still=True)
    assert len(calls) == 2 and linker.still_skipped == 1
