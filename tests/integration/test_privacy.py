"""Private by default: everything FacePro creates is owner-only; a planted socket folder is refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.transport import TransportError, make_runtime_dir
from tests.integration.conftest import facepro, finish_run, pipeline_config, save_config, start_run, write_clip


def _modes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return out


def test_database_snapshots_backups_and_runtime_files_are_owner_only(videos: Path, models: Path, short_data_dir: Path) -> None:
    clip = write_clip(videos / "vtest.avi", short_data_dir / "clip.avi", 60)
    os.chmod(clip, 0o600)
    cfg = save_config(pipeline_config(models, {"campus": clip}, storage__snapshots=True), short_data_dir / "cfg.yaml")
    os.chmod(cfg, 0o600)
    finish_run(start_run(cfg), short_data_dir)
    made = facepro("backup", "create", "--config", str(cfg))
    assert made.returncode == 0, made.stderr
    modes = _modes(short_data_dir)
    assert any(p.endswith(".jpg") for p in modes) and any("backup" in p for p in modes)  # snapshots and a backup exist
    assert "facepro.db" in modes
    exposed = {p: oct(m) for p, m in modes.items() if m & 0o077}
    assert exposed == {}, exposed


def test_a_socket_folder_planted_by_someone_else_or_open_to_others_is_refused() -> None:
    import shutil
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="fpp-", dir="/tmp"))  # ipc:// paths must stay short
    try:
        _check_planted(short / "facepro-1234")
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _check_planted(parent: Path) -> None:
    parent.mkdir(mode=0o700)
    assert make_runtime_dir(parent / "run1").is_dir()
    os.chmod(parent, 0o777)
    with pytest.raises(TransportError, match="not private .*mode 777"):
        make_runtime_dir(parent / "run2")
    os.chmod(parent, 0o700)
    if os.getuid() == 0:  # root can hand the folder to another user (nobody) for the test
        os.chown(parent, 65534, 65534)
        with pytest.raises(TransportError, match="owner uid 65534"):
            make_runtime_dir(parent / "run3")
