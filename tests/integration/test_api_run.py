"""The api process of a real ``facepro run`` (api.enabled) on a short vtest clip, then ``facepro serve`` over its database."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.integration.conftest import facepro, finish_run, pipeline_config, save_config, start_run, wait_status, write_clip

FRAMES = 150


def _get(base: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(base + path, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _stage(doc: dict, name: str) -> dict | None:
    return next((s for s in doc["stages"] if s["stage"] == name), None)


def _api_ready(doc: dict) -> bool:
    api = _stage(doc, "api")
    return bool(api and api["counts"].get("ready") and all(s["processes"] >= 1 for s in doc["stages"]))


@pytest.fixture(scope="module")
def clip(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(videos / "vtest.avi", tmp_path_factory.mktemp("clip") / "vtest150.avi", FRAMES)


def test_api_process_of_a_run_then_serve_over_its_database(clip: Path, models: Path, short_data_dir: Path) -> None:
    tree = pipeline_config(models, {"campus": clip}, api__enabled=True, api__port=0)
    tree["cameras"][0]["max_fps"] = 10  # ~15 s of frames: the checks below happen while it runs
    cfg = save_config(tree, short_data_dir / "cfg.yaml")
    proc = start_run(cfg)
    try:
        doc = wait_status(proc, timeout_s=120, until=_api_ready)
        base = f"http://127.0.0.1:{_stage(doc, 'api')['counts']['port']}"
        status, body = _get(base, "/api/health")
        assert status == 200 and json.loads(body)["mode"] == "pipeline", body
        assert set(json.loads(body)["stages"]) == {"capture", "detection", "recognition", "storage", "api"}
        status, body = _get(base, "/api/status")
        cli = json.loads(facepro("status", "--json", check=True).stdout)
        pick = lambda d: [(s["stage"], s["processes"], s["pids"]) for s in d["stages"]]  # noqa: E731 (rates move)
        assert status == 200 and pick(json.loads(body)) == pick(cli) and json.loads(body)["run_id"] == cli["run_id"]
        deadline = time.monotonic() + 30  # the camera delivers once the start gate opens, just after the api is ready
        while (got := _get(base, "/api/cameras/campus/latest.jpg"))[0] == 503 and time.monotonic() < deadline:
            time.sleep(0.2)  # 503 "no frame available ... try again" until the first frame
        status, body = got
        assert status == 200, body
        frame = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        assert frame.shape == (360, 480, 3)  # the camera's frame size
        status, body = _get(base, "/metrics")
        assert status == 200 and b'facepro_stage_processes{stage="api"} 1.0' in body
        assert finish_run(proc, short_data_dir)["stages"]["api"]["frames_in"] >= 4  # our requests, counted
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    cli_events = [json.loads(line) for line in
                  facepro("events", "--config", str(cfg), "--json", "--limit", "1000", check=True).stdout.splitlines()]
    assert cli_events and all(e["has_snapshot"] for e in cli_events)
    serve = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--config", str(cfg), "--port", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        line = serve.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        base = f"http://127.0.0.1:{match.group(1)}"
        status, body = _get(base, "/api/events?limit=1000")
        assert status == 200 and json.loads(body) == {"events": cli_events, "next": None}
        status, body = _get(base, f"/api/events/{cli_events[0]['event_id']}/snapshot.jpg")
        assert status == 200 and body == Path(cli_events[0]["snapshot_path"]).read_bytes()
        assert _get(base, "/api/health")[0] == 200 and _get(base, "/api/status")[0] == 503  # alone: no pipeline
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=30) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
