"""scripts/gpu_carry.py: a wheel packed and cut into carry-sized parts comes back whole on the other side, and the
first part leaves room for what rides with it."""

from __future__ import annotations

import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from scripts.gpu_carry import MIB, calls, first_part_bytes, pack, split, tree_bytes


def _wheel(path: Path) -> dict[str, bytes]:
    """A wheel-shaped zip with incompressible contents (so the parts really are cut)."""
    files = {"onnxruntime/capi/lib.so": os.urandom(300_000), "onnxruntime/__init__.py": b"__version__ = '9.9'\n",
             "onnxruntime_gpu-9.9.dist-info/METADATA": b"Name: onnxruntime-gpu\nVersion: 9.9\n"}
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return files


@pytest.mark.parametrize("first, rest, parts, tools", [(100_000, 120_000, 3, True), (50_000, 1_000_000, 2, True),
                                                       (10_000_000, 1, 1, True), (100_000, 120_000, 3, False)])
def test_parts_joined_and_unpacked_give_the_wheels_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: int,
                                                        rest: int, parts: int, tools: bool) -> None:
    """With the tar and xz commands, and without them (Python's tarfile packs)."""
    if not tools:
        monkeypatch.setattr("scripts.gpu_carry.shutil.which", lambda name: None)
    files = _wheel(tmp_path / "onnxruntime_gpu-9.9-cp312-cp312-manylinux_2_28_x86_64.whl")
    packed = pack(tmp_path / "onnxruntime_gpu-9.9-cp312-cp312-manylinux_2_28_x86_64.whl", tmp_path / "ort.tar.xz")
    cut = split(packed, first, rest, tmp_path / "carry")
    assert [p.relative_to(tmp_path / "carry").as_posix() for p in cut] == [f"c{k}/ort.{k}" for k in range(1, parts + 1)]
    assert cut[0].stat().st_size == min(first, packed.stat().st_size)
    assert all(p.stat().st_size <= rest for p in cut[1:])
    joined = tmp_path / "joined.tar.xz"
    joined.write_bytes(b"".join(p.read_bytes() for p in cut))  # the device's `cat /tmp/gx/ort.*`
    site = tmp_path / "site"
    site.mkdir()
    with tarfile.open(joined, "r:xz") as t:  # `xz -d | tar x -C PURELIB`
        t.extractall(site, filter="data")
    assert {p.relative_to(site).as_posix(): p.read_bytes() for p in site.rglob("*") if p.is_file()} == files


def test_part_sizes_are_checked(tmp_path: Path) -> None:
    packed = tmp_path / "x"
    packed.write_bytes(b"0" * 1000)
    with pytest.raises(ValueError, match="positive"):
        split(packed, 0, 10, tmp_path)
    with pytest.raises(ValueError, match="at most 9"):
        split(packed, 10, 10, tmp_path)


def test_the_first_part_gets_what_the_riders_and_margin_leave(tmp_path: Path) -> None:
    riders = [tmp_path / "w.whl", tmp_path / "m.onnx"]
    riders[0].write_bytes(b"1" * 3 * MIB)
    riders[1].write_bytes(b"2" * 5 * MIB)
    assert first_part_bytes(64 * MIB, 2 * MIB, riders) == 54 * MIB
    with pytest.raises(SystemExit, match="carry fewer videos"):
        first_part_bytes(9 * MIB, 1 * MIB, riders)


def test_calls_copy_each_part_and_the_last_installs_and_checks(tmp_path: Path) -> None:
    steps = calls(tmp_path / "carry", 3, "--only gpu --cameras 4,16")
    assert [path for path, _ in steps] == [f"{tmp_path}/carry/c{k}" for k in (1, 2, 3)]
    assert all(cmd.startswith(f"mkdir -p /tmp/gx && cp -r {tmp_path}/carry/c{k}/. /tmp/gx/") for k, (_, cmd) in enumerate(steps, 1))
    assert "gpu_check.py" not in steps[1][1] and "uninstall -y -q onnxruntime" in steps[2][1]
    assert steps[2][1].endswith("--only gpu --cameras 4,16 2>&1 | grep -v 'is ignored' | tee $OUT/log")
    assert all(len(cmd) <= 2000 for _, cmd in steps)  # the device tool's command limit


def test_the_working_tree_size_counts_tracked_and_untracked_files(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("big/\n")
    (tmp_path / "a.py").write_bytes(b"x" * 100)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "w.whl").write_bytes(b"y" * 10_000)  # ignored: travels only when carried
    assert tree_bytes(tmp_path) == 100 + len("big/\n")
