#!/usr/bin/env python3
"""Pack what ``scripts/gpu_check.py`` needs on a GPU device machine into parts that fit the device tool's carry.

The device tool (a GPU machine lent to some tasks) carries ignored paths of at most 64 MiB a call, and has no
package index. The ``onnxruntime-gpu`` wheel is 256 MB (1.31.1, CUDA 13 build), so it travels unpacked, as
``tar | xz -9`` (about 203 MB), split into parts carried by consecutive calls of one warm lease. The first part
also carries the wheels the machine lacks (``--no-deps``, pinned to the versions installed here) and the
demo models and videos from ``FACEPRO_ASSETS``. This script makes those parts and prints each call.

Steps:

1. ``pip download --no-deps --only-binary=:all:`` for the target Python (``--python``, default 3.12) and
   manylinux x86_64: ``--ort`` (default ``onnxruntime-gpu==1.31.1``) and :data:`DEVICE_WHEELS`, pinned to
   the versions installed in this environment. ``--wheels DIR`` takes already downloaded wheels instead.
2. Pack the ONNX Runtime wheel: unzip it, ``tar`` its top-level entries, compress with ``xz -9``
   (:func:`pack`).
3. Split the packed file (:func:`split`): the first part gets what ``--limit-mib`` leaves after the wheels and
   assets (:func:`first_part_bytes`), every later part up to the limit; both less the working tree, which
   travels with every call (:func:`tree_bytes`), and ``--margin-mib`` spare.
4. Write under ``--out`` (default ``.whl/carry``, ignored by git): ``c1/ort.1``, ``c1/w/*.whl``,
   ``c1/assets/models/*.onnx``, ``c1/assets/data/videos/*``; ``c2/ort.2`` ... ``cN/ort.N``; and
   ``calls.txt``: per call, the path to carry and the command. Calls 1 to N-1 copy their part to ``/tmp/gx``;
   call N also uninstalls ``onnxruntime``, untars the joined parts into the machine's ``purelib`` and runs
   ``gpu_check.py --only gpu`` (its flags from ``--check-args``).

Usage, from the checkout (measured in session 8: four parts, about 40 s of device time for all four calls)::

    FACEPRO_ASSETS=../shared python3 scripts/gpu_carry.py
    cat .whl/carry/calls.txt   # then one device call per part, within one warm lease
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
#: Distributions the device machine's Python (the torch image, session 8) lacked, carried as wheels without
#: their dependencies (the image's own numpy, opencv-python-headless, scipy... satisfy the rest).
DEVICE_WHEELS = ("alembic", "annotated-types", "defusedxml", "insightface", "mako", "paho-mqtt", "platformdirs",
                 "pydantic", "pydantic-core", "pyDeprecate", "pyzmq", "SQLAlchemy", "supervision", "trackers",
                 "typing-inspection", "uuid6")
#: The demo config's models and the asset videos (paths under ``FACEPRO_ASSETS``).
ASSETS = ("models/yolox_nano.onnx", "models/scrfd_500m.onnx", "models/mobilefacenet_128d.onnx",
          "models/osnet_x0_25_msmt17.onnx", "data/videos/vtest.avi", "data/videos/one-by-one-person-detection.mp4")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def pinned(names: tuple[str, ...] = DEVICE_WHEELS) -> list[str]:
    """``name==version`` of each distribution as installed here (so the device runs what the tests ran).

    Raises:
        SystemExit: a distribution is not installed here (install the project's ``[test]`` extra first).
    """
    out = []
    for name in names:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed here; pip install -e '.[test]' first (its version is pinned)") from None
    return out


def download(specs: list[str], dest: Path, python: str) -> list[Path]:
    """``pip download`` of ``specs`` for CPython ``python`` on manylinux x86_64 into ``dest``; the wheels.

    Raises:
        SystemExit: pip failed (its last lines in the message).
    """
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(dest), *specs]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit("pip download failed:\n" + "\n".join((res.stdout + res.stderr).splitlines()[-8:]))
    return sorted(dest.glob("*.whl"))


def pack(wheel: Path, dest: Path) -> Path:
    """Unzip ``wheel`` and write its top-level entries as one ``.tar.xz`` (xz preset 9) at ``dest``.

    Uses the ``tar`` and ``xz`` commands when present (multi-threaded), else Python's :mod:`tarfile`; either way
    ``xz -d | tar x -C PURELIB`` restores the installed tree.

    Raises:
        zipfile.BadZipFile: ``wheel`` is not a wheel.
    """
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        entries = sorted(os.listdir(tmp))
        if shutil.which("tar") and shutil.which("xz"):
            with open(dest, "wb") as f:
                tar = subprocess.Popen(["tar", "cf", "-", "-C", tmp, *entries], stdout=subprocess.PIPE)
                subprocess.run(["xz", "-T0", "-9", "-c"], stdin=tar.stdout, stdout=f, check=True)
                tar.stdout.close()  # type: ignore[union-attr]
                if tar.wait():
                    raise RuntimeError(f"tar failed packing {wheel}")
        else:
            with tarfile.open(dest, "w:xz", preset=9) as t:
                for e in entries:
                    t.add(Path(tmp) / e, arcname=e)
    return dest


def split(packed: Path, first: int, rest: int, out: Path) -> list[Path]:
    """Cut ``packed`` into a first part of ``first`` bytes and parts of at most ``rest`` bytes: ``out/c{k}/ort.{k}``.

    Args:
        packed: the file to cut.
        first, rest: part sizes in bytes, > 0.
        out: the folder holding the ``c{k}`` folders.

    Returns:
        The parts, in order; ``cat`` of them gives ``packed`` back.

    Raises:
        ValueError: a size <= 0, or more than 9 parts (``ort.*`` would not sort in order).
    """
    if first <= 0 or rest <= 0:
        raise ValueError(f"part sizes must be positive, got first {first}, rest {rest}")
    size = packed.stat().st_size
    n = 1 + max(0, -(-(size - first) // rest))
    if n > 9:
        raise ValueError(f"{size} bytes make {n} parts of {rest} (at most 9); raise --limit-mib")
    parts = []
    with open(packed, "rb") as f:
        for k in range(1, n + 1):
            part = out / f"c{k}" / f"ort.{k}"
            part.parent.mkdir(parents=True, exist_ok=True)
            part.write_bytes(f.read(first if k == 1 else rest))
            parts.append(part)
    return parts


def first_part_bytes(limit: int, margin: int, riders: list[Path]) -> int:
    """Bytes left for ONNX Runtime's first part in a call of ``limit`` bytes (less ``margin``) that also carries the
    files ``riders`` (wheels, assets).

    Raises:
        SystemExit: the riders alone do not fit.
    """
    room = limit - margin - sum(p.stat().st_size for p in riders)
    if room <= MIB:
        raise SystemExit(f"the wheels and assets take {(limit - margin - room) / MIB:.1f} MiB of a {limit / MIB:.0f} MiB call: "
                         "carry fewer videos or raise --limit-mib")
    return room


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of the working tree that travels with every device call: tracked and untracked-not-ignored files."""
    res = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True)
    files = (root / name for name in res.stdout.decode().split("\0") if name)
    return sum(f.stat().st_size for f in files if f.is_file())


def calls(out: Path, n: int, check_args: str) -> list[tuple[str, str]]:
    """``(path to carry, command)`` per device call for ``n`` parts under ``out`` (relative to the checkout)."""
    rel = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    steps = [(f"{rel}/c{k}", f"mkdir -p /tmp/gx && cp -r {rel}/c{k}/. /tmp/gx/") for k in range(1, n + 1)]
    install = ("set -o pipefail; S=$(python3 -c \"import sysconfig;print(sysconfig.get_paths()['purelib'])\") && "
               "python3 -m pip uninstall -y -q onnxruntime; cat /tmp/gx/ort.* | xz -d | tar x -C \"$S\" && "
               "FACEPRO_ASSETS=/tmp/gx/assets PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --wheels /tmp/gx/w "
               f"{check_args} 2>&1 | grep -v 'is ignored' | tee $OUT/log")
    last_path, last_cmd = steps[-1]
    steps[-1] = (last_path, f"{last_cmd} && {install}")
    return steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / ".whl" / "carry"), help="folder for the parts (keep it ignored by git)")
    ap.add_argument("--python", default="3.12", help="the device machine's Python version")
    ap.add_argument("--ort", default="onnxruntime-gpu==1.31.1", help="the ONNX Runtime GPU wheel to carry")
    ap.add_argument("--wheels", help="already downloaded wheels (the ONNX Runtime one among them) instead of pip download")
    ap.add_argument("--limit-mib", type=float, default=64.0, help="the most one device call carries")
    ap.add_argument("--margin-mib", type=float, default=2.0, help="kept free in every call besides the working tree "
                    "(which travels with every call and counts towards the limit)")
    ap.add_argument("--check-args", default="--only gpu --cameras 1,4,16 --max-frames 150 --budget-s 420 --grace-s 60",
                    help="gpu_check.py's flags in the last call (fit --budget-s to the device time left)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    assets = Path(os.environ.get("FACEPRO_ASSETS") or ROOT.parent / "shared")
    missing = [a for a in ASSETS if not (assets / a).is_file()]
    if missing:
        print(f"FACEPRO_ASSETS={assets} lacks {', '.join(missing)}; set FACEPRO_ASSETS to the shared asset folder")
        return 2
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "c1" / "w").mkdir(parents=True)
    wheels_dir = Path(args.wheels) if args.wheels else out / "download"
    if not args.wheels:
        wheels_dir.mkdir()
        download([args.ort, *pinned()], wheels_dir, args.python)
    ort = [w for w in sorted(wheels_dir.glob("*.whl")) if w.name.startswith("onnxruntime_gpu")]
    if len(ort) != 1:
        print(f"expected one onnxruntime_gpu wheel in {wheels_dir}, found {len(ort)}")
        return 2
    for w in sorted(wheels_dir.glob("*.whl")):
        if w != ort[0]:
            shutil.copy2(w, out / "c1" / "w" / w.name)
    for a in ASSETS:
        (out / "c1" / "assets" / a).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(assets / a, out / "c1" / "assets" / a)
    packed = pack(ort[0], out / "ort.tar.xz")
    limit, margin = int(args.limit_mib * MIB), int(args.margin_mib * MIB) + tree_bytes()
    riders = [p for p in (out / "c1").rglob("*") if p.is_file()]
    parts = split(packed, first_part_bytes(limit, margin, riders), limit - margin, out)
    packed.unlink()
    if not args.wheels:
        shutil.rmtree(wheels_dir)
    steps = calls(out, len(parts), args.check_args)
    text = "\n\n".join(f"call {k}: carry [{path!r}]\n  {cmd}" for k, (path, cmd) in enumerate(steps, 1))
    (out / "calls.txt").write_text(text + "\n")
    sizes = ", ".join(f"c{k} {sum(p.stat().st_size for p in (out / f'c{k}').rglob('*') if p.is_file()) / MIB:.1f} MiB"
                      for k in range(1, len(parts) + 1))
    print(f"{ort[0].name}: {len(parts)} parts ({sizes}) under {out}\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
