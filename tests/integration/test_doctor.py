"""``facepro doctor`` on real configs: the asset models and video, a real database, real sockets."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from pipeline import doctor
from pipeline.cli import main
from pipeline.config import parse_config
from tests.integration.conftest import pipeline_config, save_config


def _cfg(models: Path, videos: Path, **overrides: object) -> dict:
    return pipeline_config(models, {"campus": videos / "vtest.avi"}, **overrides)


def _rows(capsys: pytest.CaptureFixture[str]) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(capsys.readouterr().out)["checks"]}


def test_good_config_passes(models: Path, videos: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = save_config(_cfg(models, videos), data_dir / "cfg.yaml")
    assert main(["doctor", "--config", str(path), "--json"]) == 0
    rows = _rows(capsys)
    assert {r["state"] for r in rows.values()} <= {"ok", "warn"}
    assert "verified (sha256)" in rows["model: object detector"]["detail"]
    assert "480x360" in rows["camera campus"]["detail"] and "480x360 (read)" in rows["shared memory"]["detail"]
    assert "CPUExecutionProvider" in rows["onnxruntime"]["detail"]
    assert main(["doctor", "--config", str(path)]) == 0  # the table
    assert "shared memory" in capsys.readouterr().out


def test_missing_and_wrong_models_fail_with_the_fix(models: Path, videos: Path, data_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    own = tmp_path / "m"
    own.mkdir()
    body = bytearray((models / "scrfd_500m.onnx").read_bytes())
    body[100] ^= 1
    (own / "scrfd_500m.onnx").write_bytes(body)
    tree = _cfg(models, videos)
    tree["detection"]["detector"]["path"] = str(own / "yolox_nano.onnx")
    tree["recognition"]["face"]["detector"]["path"] = str(own / "scrfd_500m.onnx")
    path = save_config(tree, data_dir / "cfg.yaml")
    assert main(["doctor", "--config", str(path), "--json"]) == 2
    rows = _rows(capsys)
    assert rows["model: object detector"]["state"] == "fail" and "missing" in rows["model: object detector"]["detail"]
    assert rows["model: object detector"]["fix"].startswith("facepro models fetch yolox_nano")
    assert rows["model: face detector"]["state"] == "fail" and "wrong-checksum" in rows["model: face detector"]["detail"]
    assert rows["model: face embedder"]["state"] == "ok"


def test_rings_that_do_not_fit_in_shm_fail(models: Path, videos: Path, data_dir: Path) -> None:
    cfg = parse_config(_cfg(models, videos, ring__slots=16))
    need = 16 * 480 * 360 * 3  # the frames alone; headers add a little
    assert doctor.check_shm(cfg, free_bytes=need - 1).state == "fail"
    assert doctor.check_shm(cfg, free_bytes=need + 2**20).state == "ok"
    live = parse_config({**_cfg(models, videos, ring__slots=512), "cameras": [{"name": "door", "source": "rtsp://127.0.0.1:9/x"}]})
    row = doctor.check_shm(live, free_bytes=2**30)  # 512 slots of 1080p: 3 GiB
    assert row.state == "fail" and "assumed 1080p" in row.detail and "ring.slots" in row.fix
    rows = {r.name: r for r in doctor.run_checks(cfg, shm_free_bytes=need - 1)}
    assert rows["shared memory"].state == "fail"


def test_unwritable_data_dir_fails(models: Path, videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Root ignores permission bits, so the honest unwritable cases are a data dir that is, or lies under, a regular file.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = save_config(_cfg(models, videos), tmp_path / "cfg.yaml")
    for where in (blocker, blocker / "data"):
        monkeypatch.setenv("FACEPRO_DATA_DIR", str(where))
        assert main(["doctor", "--config", str(path), "--json"]) == 2
        row = _rows(capsys)["data dir"]
        assert row["state"] == "fail" and "is not a directory" in row["detail"]
    assert doctor.check_data_dir(tmp_path / "new" / "data").state == "ok"


def test_busy_metrics_port_and_unreachable_cameras_fail(models: Path, videos: Path, data_dir: Path) -> None:
    with socket.socket() as busy, socket.socket() as listening:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        cfg = parse_config(_cfg(models, videos, runtime__metrics_port=busy.getsockname()[1]))
        assert doctor.check_metrics_port(cfg).state == "fail"
        cams = parse_config({**_cfg(models, videos), "cameras": [
            {"name": "up", "source": f"rtsp://127.0.0.1:{listening.getsockname()[1]}/s"},
            {"name": "gone", "source": str(videos / "missing.mp4")}, {"name": "usb", "source": "57"}]}).cameras
        states = {c.name: doctor.check_camera(c, timeout_s=2).state for c in cams}
    assert states == {"up": "ok", "gone": "fail", "usb": "fail"}
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        cam = parse_config({**_cfg(models, videos), "cameras": [{"name": "x", "source": f"rtsp://127.0.0.1:{port}/s"}]}).cameras[0]
        assert doctor.check_camera(cam).state == "fail"


def test_database_newer_than_the_code_fails(models: Path, videos: Path, data_dir: Path) -> None:
    import sqlite3

    con = sqlite3.connect(data_dir / "facepro.db")
    con.execute("create table alembic_version (version_num varchar(32) primary key)")
    con.execute("insert into alembic_version values ('9999')")
    con.commit()
    con.close()
    row = doctor.check_database(parse_config(_cfg(models, videos)))
    assert row.state == "fail" and "9999" in row.detail
