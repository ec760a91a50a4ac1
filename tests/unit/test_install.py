"""``facepro init``, default config resolution and ``model:NAME`` paths in configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import build_parser, main
from pipeline.config import ConfigError, default_config_path, load_config, parse_config, user_config_path


@pytest.fixture()
def user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """XDG config dir and data dir of a fresh user, and an empty working directory."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("FACEPRO_DATA_DIR", str(tmp_path / "data"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def _tree(**detector: object) -> dict:
    return {"cameras": [{"name": "c", "source": "0"}],
            "detection": {"detector": {"type": "onnx", "layout": "yolox", **detector}},
            "recognition": {"face": {"detector": {"path": "model:scrfd_500m"}, "embedder": {"path": "/x/emb.onnx"}}}}


def test_model_names_resolve_in_the_models_dir(user_dirs: Path) -> None:
    cfg = parse_config({**_tree(path="model:yolox_nano"), "models_dir": "/srv/models"})
    assert cfg.detection.detector.path == Path("/srv/models/yolox_nano.onnx")
    assert cfg.recognition.face.detector.path == Path("/srv/models/scrfd_500m.onnx")
    assert cfg.recognition.face.embedder.path == Path("/x/emb.onnx")  # plain paths stay
    default = parse_config(_tree(path="model:yolox_nano"))
    assert default.detection.detector.path == user_dirs / "data" / "models" / "yolox_nano.onnx"


def test_unknown_model_name_is_an_error_naming_the_key(user_dirs: Path) -> None:
    with pytest.raises(ConfigError, match=r"cfg\.yaml: detection\.detector\.path: unknown model 'yolox_nan'.*yolox_nano"):
        parse_config(_tree(path="model:yolox_nan"), "cfg.yaml")


def test_init_writes_a_private_config_that_run_reads_by_default(user_dirs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert default_config_path() == Path("configs/demo.yaml")
    assert main(["init", "--camera", "door=rtsp://10.0.0.5/stream", "--camera", "yard=/videos/y.mp4",
                 "--models", str(user_dirs / "m")]) == 0
    path = user_config_path()
    assert path == user_dirs / "xdg" / "facepro" / "config.yaml"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    cfg = load_config(path)
    assert [(c.name, c.source) for c in cfg.cameras] == [("door", "rtsp://10.0.0.5/stream"), ("yard", "/videos/y.mp4")]
    assert cfg.models_dir == user_dirs / "m"
    assert cfg.detection.detector.path == user_dirs / "m" / "yolox_nano.onnx"
    assert cfg.data_dir == user_dirs / "data"  # the data dir is a key of the written config
    assert default_config_path() == path
    args = build_parser().parse_args(["run"])
    assert args.config is None  # resolved in main(), at run time
    assert "non-commercial" in path.read_text()  # licences said where the models are chosen


def test_init_refuses_to_overwrite_without_force(user_dirs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init"]) == 0
    first = user_config_path().read_text()
    assert main(["init", "--camera", "a=0"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert user_config_path().read_text() == first
    assert main(["init", "--camera", "a=0", "--force"]) == 0
    assert load_config(user_config_path()).cameras[0].name == "a"


def test_init_with_config_writes_there_and_checks_cameras(user_dirs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = user_dirs / "elsewhere.yaml"
    assert main(["init", "--config", str(out), "--camera", "x=0", "--metrics-port", "0"]) == 0
    assert load_config(out).runtime.metrics_port == 0
    assert not user_config_path().exists()
    assert main(["init", "--camera", "no-uri"]) == 2
    assert "expected NAME=URI" in capsys.readouterr().err
    assert main(["init", "--camera", "bad name!=0"]) == 2
    assert "cameras.0.name" in capsys.readouterr().err
    assert not user_config_path().exists()


def test_starter_template_uses_only_manifest_models(user_dirs: Path) -> None:
    from importlib import resources

    from pipeline.models import manifest

    text = resources.files("pipeline").joinpath("resources/config.yaml").read_text()
    refs = {line.split("model:")[1].split()[0] for line in text.splitlines() if "path: model:" in line}
    assert refs == {s.name for s in manifest().values() if s.default}


def test_the_config_data_dir_applies_unless_facepro_data_dir_is_set(user_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from pipeline.config import apply_data_dir, data_dir

    cfg = user_dirs / "cfg.yaml"
    cfg.write_text("data_dir: ~/boxdata\ncameras: []\n")
    assert apply_data_dir(cfg) is None and data_dir() == user_dirs / "data"  # the environment wins
    monkeypatch.delenv("FACEPRO_DATA_DIR")
    monkeypatch.setenv("HOME", str(user_dirs / "home"))
    assert apply_data_dir(cfg) == user_dirs / "home" / "boxdata"
    assert data_dir() == user_dirs / "home" / "boxdata" and os.environ["FACEPRO_DATA_DIR"] == str(data_dir())
    monkeypatch.delenv("FACEPRO_DATA_DIR")
    assert apply_data_dir(user_dirs / "missing.yaml") is None and "FACEPRO_DATA_DIR" not in os.environ
