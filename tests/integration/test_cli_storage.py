"""``facepro db`` and ``facepro backup`` through the CLI on a real database with enrolled faces."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.integration.conftest import pipeline_config, save_config


@pytest.fixture()
def cfg(models: Path, videos: Path, data_dir: Path, faces: Path) -> str:
    path = str(save_config(pipeline_config(models, {"campus": videos / "vtest.avi"}), data_dir / "cfg.yaml"))
    assert main(["enroll", "--config", path, "Barack Obama", str(faces / "obama/obama.jpg")]) == 0
    return path


def _rows(db: Path) -> dict[str, list]:
    con = sqlite3.connect(db)
    try:
        return {t: sorted(con.execute(f"select * from {t}").fetchall(), key=repr)
                for t in ("identities", "face_embeddings", "events")}
    finally:
        con.close()


def test_backup_wipe_restore_gives_identical_rows(cfg: str, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = data_dir / "facepro.db"
    before = _rows(db)
    assert main(["backup", "create", "--config", cfg]) == 0
    archive = Path(capsys.readouterr().out.strip())
    assert archive.is_file()
    assert main(["backup", "list", "--config", cfg]) == 0
    assert str(archive) in capsys.readouterr().out
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    assert main(["backup", "restore", str(archive), "--config", cfg]) == 0
    assert _rows(db) == before
    assert main(["identify", "--config", cfg, "--json", str(Path(cfg).parent / "missing.jpg")]) == 2  # still a clear error


def test_restore_refuses_a_tampered_archive(cfg: str, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import tarfile

    assert main(["backup", "create", "--config", cfg]) == 0
    archive = Path(capsys.readouterr().out.strip())
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(evil, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("manifest.json"):
                dst.addfile(member, __import__("io").BytesIO(data))
            elif data is not None:
                member.name = "../" + member.name
                dst.addfile(member, __import__("io").BytesIO(data))
    assert main(["backup", "restore", str(evil), "--config", cfg]) == 2
    assert ".." in capsys.readouterr().err
    assert not (tmp_path.parent / "facepro.db").exists()


def test_db_downgrade_history_upgrade_and_stats(cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "history", "--config", cfg]) == 0
    hist = capsys.readouterr().out
    assert "0001" in hist and "(head)" in hist
    assert main(["db", "downgrade", "0001", "--config", cfg]) == 0
    assert main(["db", "current", "--config", cfg]) == 0
    assert capsys.readouterr().out.strip().endswith("0001")
    assert main(["db", "upgrade", "--config", cfg]) == 0
    assert main(["db", "stats", "--config", cfg]) == 0
    stats = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert stats["rows"]["identities"] == 1 and stats["rows"]["face_embeddings"] == 1
    assert main(["db", "downgrade", "--config", cfg]) == 2


def test_run_refuses_a_newer_schema_and_leaves_it_untouched(cfg: str, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = data_dir / "facepro.db"
    con = sqlite3.connect(db)
    con.execute("update alembic_version set version_num = '9999'")
    con.commit()
    con.execute("pragma wal_checkpoint(TRUNCATE)")  # the update into the main file, so the bytes below are final
    con.close()
    before = db.read_bytes()
    assert main(["run", cfg]) == 2
    err = capsys.readouterr().err
    assert "9999" in err and "newer" in err.lower()
    assert db.read_bytes() == before
