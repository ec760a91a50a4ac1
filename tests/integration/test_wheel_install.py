"""Install FacePro like a user: sdist → wheel → fresh venv, then init / models fetch / doctor / run from an empty folder.

The venv has ``--system-site-packages`` so the heavy dependencies are not
reinstalled; the wheel itself is installed with ``--no-deps``, and the test
asserts that the venv's ``facepro`` imports the wheel's code (inside the venv),
not the checkout's (the environment may hold an editable install of it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

from pipeline.api_page import WEB_FILES
from tests.integration.conftest import write_clip

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = sorted(p.name for p in (ROOT / "alembic" / "versions").glob("*.py"))
WEB = [f"pipeline/resources/web/{name}" for name in WEB_FILES]  # the page served at /


def _sh(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _build_wheel(tmp: Path) -> Path:
    """sdist from the checkout, then the wheel from the unpacked sdist (so the sdist must be complete)."""
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp)!r}))"
    sdist = tmp / _sh(sys.executable, "-c", code, cwd=ROOT).strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        tar.extractall(tmp / "src", filter="data")
    top = names[0].split("/")[0]
    for needed in ["alembic.ini", "configs/demo.yaml", "pipeline/resources/models.yaml", "pipeline/resources/config.yaml",
                   *WEB, *(f"alembic/versions/{m}" for m in MIGRATIONS)]:
        assert f"{top}/{needed}" in names, f"sdist lacks {needed}"
    _sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp / "dist", tmp / "src" / top, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("facepro-*.whl")
    listing = zipfile.ZipFile(wheel).namelist()
    for needed in ["storage/alembic/env.py", "storage/alembic/script.py.mako", "pipeline/resources/models.yaml",
                   "pipeline/resources/config.yaml", *WEB, *(f"storage/alembic/versions/{m}" for m in MIGRATIONS)]:
        assert needed in listing, f"wheel lacks {needed}"
    return wheel


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(assets: Path, videos: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fpw-", dir="/tmp"))  # short: ipc:// socket paths are limited to ~100 bytes
    try:
        _run_installed(tmp, _build_wheel(tmp), assets, videos)
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def _run_installed(tmp: Path, wheel: Path, assets: Path, videos: Path) -> None:
    venv = tmp / "venv"
    _sh(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp)
    _sh(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", wheel, cwd=tmp)
    empty = tmp / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FACEPRO_ASSETS", "VIRTUAL_ENV")}
    env.update(XDG_CONFIG_HOME=str(tmp / "xdg"), FACEPRO_DATA_DIR=str(tmp / "d"), PATH=f"{venv / 'bin'}:{env['PATH']}")
    where = _sh(venv / "bin" / "python", "-c", "import pipeline, stages, storage, storage.db as d; "
                "print(pipeline.__file__, stages.__file__, storage.__file__, d.script_location())", cwd=empty, env=env)
    for path in where.split():
        assert Path(path).resolve().is_relative_to(venv.resolve()), f"not the wheel's code: {where}"
    page = _sh(venv / "bin" / "python", "-c", "from pipeline.api_page import WEB_FILES, web_file; "
               "print(sum(len(web_file(n)) > 0 for n in WEB_FILES))", cwd=empty, env=env)
    assert int(page) == len(WEB_FILES)  # the page's files load from the installed package
    clip = write_clip(videos / "vtest.avi", tmp / "clip.avi", 150)

    def facepro(*args: str | Path) -> str:
        return _sh(venv / "bin" / "facepro", *args, cwd=empty, env=env)

    facepro("init", "--camera", f"clip={clip}", "--metrics-port", "0")
    assert (tmp / "xdg" / "facepro" / "config.yaml").is_file()
    assert "installed" in facepro("models", "fetch", "--from", assets / "models")
    assert "present" in facepro("models", "list")
    facepro("doctor")
    assert facepro("db", "upgrade").strip() == f"database at revision {MIGRATIONS[-1][:4]}"
    out = facepro("run")
    events = int(re.search(r"(\d+) events stored", out).group(1))
    assert events > 0, out
    assert json.loads(facepro("db", "stats"))["rows"]["events"] == events
    stored = [json.loads(line) for line in facepro("events", "--json", "--limit", "1000").splitlines()]
    assert len(stored) == events and {e["camera"] for e in stored} == {"clip"} and all(e["ended"] for e in stored)
