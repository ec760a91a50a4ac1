"""Bad input is one clear line, the right exit code, and the stored data intact.

A table of inputs given to ``facepro run`` against a data dir that already
holds a run's events: for each, the exit code, the first line of the message,
and afterwards an intact database (``PRAGMA integrity_check``) that still holds
every event stored before.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.integration.conftest import pipeline_config, save_config, write_clip


@pytest.fixture(scope="module")
def box(videos: Path, models: Path) -> dict:
    """A data dir with the events of one clean run, a short clip and a truncated copy of vtest.avi."""
    root = Path(tempfile.mkdtemp(prefix="fpbad-", dir="/tmp"))
    data = root / "data"
    clip = write_clip(videos / "vtest.avi", root / "clip.avi", 60)
    cut = root / "cut.avi"
    cut.write_bytes((videos / "vtest.avi").read_bytes()[:100_000])
    good = save_config(pipeline_config(models, {"campus": clip}), root / "good.yaml")
    res = _run(good, data)
    assert res.returncode == 0, res.stderr[-2000:]
    yield {"root": root, "data": data, "clip": clip, "cut": cut, "models": models, "events": _event_ids(data)}
    shutil.rmtree(root, ignore_errors=True)


def _run(cfg: Path, data: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, FACEPRO_DATA_DIR=str(data)))


def _event_ids(data: Path) -> set[str]:
    with sqlite3.connect(data / "facepro.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return {row[0] for row in db.execute("SELECT id FROM events")}


def _tree(box: dict, **changes: object) -> dict:
    tree = pipeline_config(box["models"], {"campus": box["clip"]})
    for path, value in changes.items():
        node = tree
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[leaf] = value(box) if callable(value) else value
    return tree


CASES = [
    # (id, config changes, exit code, first line of stderr must contain)
    ("unknown key", {"detection.procesess": 2}, 2, "detection.procesess"),
    ("wrong type", {"ring.slots": "many"}, 2, "ring.slots"),
    ("out of bounds", {"ring.slots": 2}, 2, "ring.slots"),
    ("missing model", {"detection.detector.path": "/nonexistent/yolox.onnx"}, 2,
     "detection.detector.path: object detector model not found: /nonexistent/yolox.onnx"),
    ("not an onnx file", {"detection.detector.path": lambda b: str(b["clip"])}, 2,
     "detection.detector.path: object detector model"),
    ("wrong kind of model", {"recognition.face.detector.path": lambda b: str(b["models"] / "osnet_x0_25_msmt17.onnx")}, 2,
     "recognition.face: face detector model"),
    ("missing video", {"cameras.0.source": "/nonexistent/cam.avi"}, 2, "camera campus: source /nonexistent/cam.avi does not exist"),
    ("truncated video", {"cameras.0.source": lambda b: str(b["cut"])}, 3, "ended early"),
]


@pytest.mark.parametrize("changes, code, first_line", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_stored_data_intact(box: dict, changes: dict, code: int, first_line: str) -> None:
    cfg = save_config(_tree(box, **changes), box["root"] / "bad.yaml")
    res = _run(cfg, box["data"])
    assert res.returncode == code, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("facepro")]
    message = errors[-1] if errors else res.stdout
    assert first_line in message, res.stderr[-2000:]
    if code == 2:
        assert len(errors) == 1 and "Traceback" not in res.stderr  # one line, no traceback
    assert box["events"] <= _event_ids(box["data"])  # nothing stored before was lost


def test_an_unwritable_data_dir_is_one_line(box: dict) -> None:
    blocker = box["root"] / "a-file"
    blocker.write_text("not a folder")
    cfg = save_config(_tree(box), box["root"] / "good2.yaml")
    res = _run(cfg, blocker / "data")
    assert res.returncode == 2, res.stderr[-2000:]
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("facepro")]
    assert "data dir" in line and "a-file" in line and "FACEPRO_DATA_DIR" in line
