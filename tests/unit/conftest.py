"""Database fixtures shared by the storage unit tests: a SQLite file in the test's FACEPRO_DATA_DIR."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import Engine

from storage.db import open_engine, upgrade


@pytest.fixture()
def db_path(data_dir: Path) -> Path:
    return data_dir / "facepro.db"


@pytest.fixture()
def url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


@pytest.fixture()
def engine(url: str) -> Iterator[Engine]:
    """An engine on a new database migrated to head."""
    upgrade(url)
    eng = open_engine(url)
    yield eng
    eng.dispose()
