"""Config validation: unknown keys, bounds, ${VAR} expansion, file errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import AppConfig, ConfigError, load_config, parse_config, thread_budget, with_sources

BASE = {
    "cameras": [{"name": "cam0", "source": "video.avi"}],
    "detection": {"detector": {"path": "m.onnx", "layout": "yolox"}},
    "recognition": {"face": {"detector": {"path": "s.onnx"}, "embedder": {"path": "e.onnx"}}},
}


def _with(path: str, value: object) -> dict:
    tree = yaml.safe_load(yaml.safe_dump(BASE))
    node = tree
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
    node[keys[-1]] = value
    return tree


def test_minimal_config_gets_defaults() -> None:
    cfg = parse_config(BASE)
    assert cfg.detection.processes == 1 and cfg.recognition.processes == 1
    assert cfg.recognition.gait is None
    assert parse_config(_with("recognition.gait", {})).recognition.gait.embedder is None  # the classical GEI embedding
    gait = parse_config(_with("recognition.gait", {"embedder": {"path": "g.onnx"}})).recognition.gait
    assert gait.embedder.type == "onnx" and gait.embedder.path == Path("g.onnx")
    assert cfg.detection.detector.classes == ("person",)
    assert cfg.detection.batch == 1 and cfg.detection.batch_timeout_ms == 5.0  # one frame at a time unless asked
    assert cfg.cameras[0].resolved_mode() == "file"


@pytest.mark.parametrize(
    "path, value, error",
    [
        ("detection.detecter", {}, r"detection\.detecter: Extra inputs are not permitted"),
        ("cameras.0.sorce", "x", r"cameras\.0\.sorce: Extra inputs"),
        ("detection.processes", 0, r"detection\.processes: Input should be greater than or equal to 1"),
        ("detection.batch", 0, r"detection\.batch: Input should be greater than or equal to 1"),
        ("detection.batch", 65, r"detection\.batch: Input should be less than or equal to 64"),
        ("detection.batch", 2.5, r"detection\.batch: Input should be a valid integer"),
        ("detection.batch_timeout_ms", -1, r"detection\.batch_timeout_ms: Input should be greater than or equal to 0"),
        ("detection.batch_timeout_ms", 1001, r"detection\.batch_timeout_ms: Input should be less than or equal to 1000"),
        ("detection.detector.layout", "ssd", r"detection\.detector\.layout"),
        ("detection.detector.type", "tensorrt", r"detection\.detector\.type"),
        ("ring.slots", 2, r"ring\.slots"),
        ("runtime.io_binding", "fast", r"runtime\.io_binding: Input should be 'auto', 'on' or 'off'"),
        ("storage.cache_mb", 0, r"storage\.cache_mb: Input should be greater than or equal to 1"),
        ("recognition.face.match_threshold", 1.5, r"recognition\.face\.match_threshold"),
        ("recognition.face.unknowns.cluster_threshold", 1.5, r"recognition\.face\.unknowns\.cluster_threshold"),
        ("recognition.face.detector.input_size", 100, r"multiple of 32"),
        ("recognition.gait", {"embedder": {"type": "torch", "path": "g.pt"}}, r"recognition\.gait\.embedder\.type"),
        ("recognition.gait", {"embedder": {}}, r"recognition\.gait\.embedder\.path: Field required"),
        ("recognition.gait", {"embeder": {"path": "g.onnx"}}, r"recognition\.gait\.embeder: Extra inputs"),
        ("cameras.0.name", "bad name!", r"cameras\.0\.name"),
        ("cameras", [], r"cameras"),
        ("cameras", [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}], r"repeated: a"),
    ],
)
def test_invalid_configs_name_the_key(path: str, value: object, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config(_with(path, value), "test.yaml")


@pytest.mark.parametrize("key, value", [("detection.batch", 1), ("detection.batch", 64),
                                        ("detection.batch_timeout_ms", 0), ("detection.batch_timeout_ms", 1000)])
def test_detection_batch_limits_are_accepted(key: str, value: float) -> None:
    cfg = parse_config(_with(key, value))
    assert getattr(cfg.detection, key.split(".")[1]) == value


@pytest.mark.parametrize("text, expected", [("on", "on"), ("off", "off"), ("'on'", "on"), ("auto", "auto"),
                                           ("yes", "on"), ("false", "off")])
@pytest.mark.parametrize("key", ["static_shapes", "io_binding"])
def test_on_off_switches_read_unquoted_yaml(key: str, text: str, expected: str) -> None:
    """YAML 1.1 reads an unquoted on / off as a boolean; the switch takes what was written."""
    tree = yaml.safe_load(yaml.safe_dump(BASE) + f"runtime:\n  {key}: {text}\n")
    assert getattr(parse_config(tree).runtime, key) == expected


@pytest.mark.parametrize(
    "source, mode, expected",
    [("a.mp4", "auto", "file"), ("rtsp://h/s", "auto", "live"), ("0", "auto", "live"), ("rtsp://h/s", "file", "file")],
)
def test_source_mode(source: str, mode: str, expected: str) -> None:
    cfg = parse_config(_with("cameras", [{"name": "c", "source": source, "mode": mode}]))
    assert cfg.cameras[0].resolved_mode() == expected


def test_env_vars_are_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEPRO_ASSETS", "/assets")
    cfg = parse_config(_with("detection.detector.path", "${FACEPRO_ASSETS}/models/yolox_nano.onnx"))
    assert str(cfg.detection.detector.path) == "/assets/models/yolox_nano.onnx"


def test_unset_env_var_names_variable_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACEPRO_ASSETS", raising=False)
    with pytest.raises(ConfigError, match=r"detection\.detector\.path: environment variable FACEPRO_ASSETS is not set"):
        parse_config(_with("detection.detector.path", "${FACEPRO_ASSETS}/m.onnx"))


@pytest.mark.parametrize(
    "text, error",
    [(None, "cannot read"), ("cameras: [", "invalid YAML"), ("- a\n- b\n", "mapping at the top level")],
)
def test_file_errors(tmp_path: Path, text: str | None, error: str) -> None:
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=error):
        load_config(path)


def test_bundled_configs_validate(monkeypatch: pytest.MonkeyPatch, assets: Path) -> None:
    monkeypatch.setenv("FACEPRO_ASSETS", str(assets))
    for path in Path("configs").glob("*.yaml"):
        cfg = load_config(path)
        assert isinstance(cfg, AppConfig)
        assert Path(cfg.detection.detector.path).is_file(), path


def test_with_sources_replaces_cameras() -> None:
    cfg = with_sources(parse_config(BASE), ["rtsp://a/1", "0"])
    assert [(c.name, c.source, c.resolved_mode()) for c in cfg.cameras] == [("cam0", "rtsp://a/1", "live"), ("cam1", "0", "live")]


@pytest.mark.parametrize("cores, det, rec, expected", [(2, 1, 1, 1), (8, 1, 1, 4), (8, 3, 1, 2), (2, 4, 4, 1)])
def test_thread_budget_never_oversubscribes(cores: int, det: int, rec: int, expected: int) -> None:
    cfg = parse_config(_with("detection.processes", det))
    cfg = cfg.model_copy(update={"recognition": cfg.recognition.model_copy(update={"processes": rec})})
    assert thread_budget(cfg, cpu_count=cores) == expected


def test_mqtt_is_off_unless_configured_and_box_id_defaults_to_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setattr(socket, "gethostname", lambda: "edge box/7")
    cfg = parse_config(BASE)
    assert cfg.mqtt is None and cfg.box_id == "edge-box-7"
    mqtt = parse_config(_with("mqtt", {})).mqtt
    assert (mqtt.url, mqtt.topic_prefix, mqtt.qos, mqtt.discovery, mqtt.discovery_prefix) == (
        "mqtt://127.0.0.1:1883", "facepro", 1, True, "homeassistant")
    assert mqtt.client_id is None and mqtt.username is None and mqtt.password is None and mqtt.tls is False
    again = AppConfig.model_validate_json(parse_config(_with("box_id", "shed")).model_dump_json())
    assert again.box_id == "shed"  # the workers read config.json: the box id travels with it


@pytest.mark.parametrize(
    "path, value, error",
    [
        ("mqtt.url", "tcp://broker:1883", r"mqtt\.url: String should match pattern"),
        ("mqtt.url", "mqtt://broker:1883/x", r"mqtt\.url: String should match pattern"),
        ("mqtt.qos", 0, r"mqtt\.qos: Input should be greater than or equal to 1"),
        ("mqtt.qos", 3, r"mqtt\.qos: Input should be less than or equal to 2"),
        ("mqtt.topic_prefix", "a/#", r"mqtt\.topic_prefix: String should match pattern"),
        ("mqtt.topic_prefix", "/lead", r"mqtt\.topic_prefix: String should match pattern"),
        ("mqtt.discovery_prefix", "home assistant", r"mqtt\.discovery_prefix: String should match pattern"),
        ("mqtt.stats_interval_s", 0.1, r"mqtt\.stats_interval_s: Input should be greater than or equal to 0\.5"),
        ("mqtt.reconnect_max_s", 0.5, r"mqtt: Value error, reconnect_max_s \(0\.5\) must be >= reconnect_min_s"),
        ("mqtt.passwd", "x", r"mqtt\.passwd: Extra inputs are not permitted"),
        ("box_id", "a/b", r"box_id: String should match pattern"),
        ("box_id", "", r"box_id: String should match pattern"),
    ],
)
def test_invalid_mqtt_configs_name_the_key(path: str, value: object, error: str) -> None:
    tree = _with(path, value) if not path.startswith("mqtt.") else _with("mqtt", {path.split(".", 1)[1]: value})
    with pytest.raises(ConfigError, match=error):
        parse_config(tree)


def test_api_section_defaults_to_off_and_private() -> None:
    api = parse_config(BASE).api
    assert (api.enabled, api.host, api.port, api.token, api.max_upload_mb, api.job_dirs) == (False, "127.0.0.1", 8080, None, 50.0, ())
    assert (api.job_retention_days, api.stream_fps, api.stream_max_width, api.stream_quality, api.nice) == (30.0, 5.0, 960, 75, 5)


@pytest.mark.parametrize("api, ok", [
    ({"host": "127.0.0.1"}, True), ({"host": "localhost"}, True), ({"host": "::1"}, True), ({"host": "127.0.0.2"}, True),
    ({"host": "0.0.0.0"}, False), ({"host": "192.168.1.5"}, False), ({"host": "::"}, False), ({"host": "box.local"}, False),
    ({"host": "0.0.0.0", "token": "s3cret-token-0123"}, True), ({"host": "box.local", "token": "s3cret-token-0123"}, True),
])
def test_api_binding_anything_but_loopback_requires_a_token(api: dict, ok: bool) -> None:
    tree = _with("api", api)
    if ok:
        assert parse_config(tree).api.host == api["host"]
    else:
        with pytest.raises(ConfigError, match=r"api: .*api\.host .* requires api\.token"):
            parse_config(tree)


@pytest.mark.parametrize("path, value, error", [
    ("api.port", 65536, r"api\.port: Input should be less than or equal to 65535"),
    ("api.port", -1, r"api\.port: Input should be greater than or equal to 0"),
    ("api.token", "short", r"api\.token: String should have at least 16 characters"),
    ("api.token", "has a space in it!!", r"api\.token: String should match pattern"),
    ("api.max_upload_mb", 0, r"api\.max_upload_mb: Input should be greater than 0"),
    ("api.max_upload_mb", 5000, r"api\.max_upload_mb: Input should be less than or equal to 4096"),
    ("api.hots", "127.0.0.1", r"api\.hots: Extra inputs are not permitted"),
    ("api.job_retention_days", 0, r"api\.job_retention_days: Input should be greater than 0"),
    ("api.job_retention_days", 4000, r"api\.job_retention_days: Input should be less than or equal to 3650"),
    ("api.stream_fps", 0, r"api\.stream_fps: Input should be greater than 0"),
    ("api.stream_fps", 31, r"api\.stream_fps: Input should be less than or equal to 30"),
    ("api.stream_max_width", 100, r"api\.stream_max_width: Input should be greater than or equal to 160"),
    ("api.stream_quality", 99, r"api\.stream_quality: Input should be less than or equal to 95"),
    ("api.nice", 20, r"api\.nice: Input should be less than or equal to 19"),
    ("api.nice", -1, r"api\.nice: Input should be greater than or equal to 0"),
    ("api.host", "a b", r"api\.host: String should match pattern"),
])
def test_api_bounds(path: str, value: object, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config(_with(path, value))
