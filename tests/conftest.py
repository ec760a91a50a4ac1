"""Shared fixtures: the asset folder (``FACEPRO_ASSETS``) and per-test data dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _assets_dir() -> Path:
    env = os.environ.get("FACEPRO_ASSETS")
    if not env:
        raise pytest.UsageError(
            "FACEPRO_ASSETS is not set: point it at the folder holding models/ and data/ "
            "(from the repo root: FACEPRO_ASSETS=../shared python -m pytest)"
        )
    path = Path(env).resolve()
    if not (path / "models").is_dir() or not (path / "data").is_dir():
        raise pytest.UsageError(f"FACEPRO_ASSETS={env} ({path}) has no models/ and data/ folders")
    return path


@pytest.fixture(scope="session")
def assets() -> Path:
    """The real test assets: ``models/``, ``data/videos``, ``data/faces``."""
    return _assets_dir()


@pytest.fixture(scope="session")
def models(assets: Path) -> Path:
    return assets / "models"


@pytest.fixture(scope="session")
def videos(assets: Path) -> Path:
    return assets / "data" / "videos"


@pytest.fixture(scope="session")
def faces(assets: Path) -> Path:
    return assets / "data" / "faces"


@pytest.fixture()
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``FACEPRO_DATA_DIR`` for one test."""
    d = tmp_path / "data"
    d.mkdir()
    monkeypatch.setenv("FACEPRO_DATA_DIR", str(d))
    return d
