"""``facepro doctor``: what this box has, what FacePro will use, and whether the config can run.

Each check is one :class:`Check` row: ``ok``, ``warn`` (works, but worth
knowing) or ``fail`` (``facepro run`` would fail; ``fix`` says what to do).
Wiring module (like cli.py): it reads the database revision through
``storage.db`` and probes sources with OpenCV.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Literal
from urllib.parse import urlsplit

from pipeline import models as mm
from pipeline.config import AppConfig, CameraConfig, data_dir, database_url, load_config
from pipeline.ring import SHM_DIR, RingLayout

#: Frame size assumed for a live source whose size is not known without opening it: 1080p, (height, width).
LIVE_FRAME_HW = (1080, 1920)
PACKAGES = ("facepro", "numpy", "opencv-python-headless", "onnxruntime", "onnxruntime-gpu", "SQLAlchemy", "alembic",
            "pydantic", "pyzmq", "trackers", "insightface")
_DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443, "rtmp": 1935}


@dataclass(frozen=True)
class Check:
    """One row of the report: ``name``, ``state``, what was found (``detail``) and, unless ok, ``fix``."""

    name: str
    state: Literal["ok", "warn", "fail"]
    detail: str
    fix: str = ""


def check_python() -> list[Check]:
    """Python, installed package versions, and where FacePro's three top-level packages are imported from."""
    rows = [Check("python", "ok", f"{sys.version.split()[0]} ({sys.executable})")]
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    rows.append(Check("packages", "ok", ", ".join(versions)))
    import pipeline
    import stages
    import storage

    homes = {Path(m.__file__).resolve().parent.parent for m in (pipeline, stages, storage)}
    state = "ok" if len(homes) == 1 else "fail"
    rows.append(Check("code", state, f"pipeline, stages, storage from {', '.join(map(str, sorted(homes)))}",
                      "" if state == "ok" else "another distribution shadows a FacePro package: install FacePro in its own venv"))
    return rows


def check_onnxruntime() -> Check:
    """ONNX Runtime's available execution providers (FacePro uses CPUExecutionProvider unless configured otherwise)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        return Check("onnxruntime", "fail", f"not importable: {err}", "pip install onnxruntime (or the [gpu] extra)")
    providers = ort.get_available_providers()
    state = "ok" if "CPUExecutionProvider" in providers else "warn"
    return Check("onnxruntime", state, f"{ort.__version__}, providers: {', '.join(providers)}")


def frame_hw(cam: CameraConfig) -> tuple[tuple[int, int], str]:
    """A camera's frame (height, width) and how it was known: read with OpenCV for a file, else :data:`LIVE_FRAME_HW`."""
    if cam.resolved_mode() == "file" and Path(cam.source).is_file():
        import cv2

        cap = cv2.VideoCapture(cam.source)
        try:
            ok, frame = cap.read()
        finally:
            cap.release()
        if ok:
            return (frame.shape[0], frame.shape[1]), "read"
    return LIVE_FRAME_HW, "assumed 1080p"


def check_shm(cfg: AppConfig, free_bytes: int | None = None) -> Check:
    """Free space of /dev/shm (or ``free_bytes``) against the rings: cameras x ring.slots x frame size, bytes."""
    need, parts = 0, []
    for cam in cfg.cameras:
        (h, w), how = frame_hw(cam)
        need += RingLayout(slots=cfg.ring.slots, height=h, width=w).total_bytes
        parts.append(f"{cam.name} {w}x{h} ({how})")
    if free_bytes is None:
        try:
            free_bytes = shutil.disk_usage(SHM_DIR).free
        except OSError:
            return Check("shared memory", "warn", f"{SHM_DIR} cannot be inspected; rings need {need / 2**20:.0f} MiB")
    detail = f"{free_bytes / 2**20:.0f} MiB free, rings need {need / 2**20:.0f} MiB ({cfg.ring.slots} slots x {', '.join(parts)})"
    if free_bytes >= need:
        return Check("shared memory", "ok", detail)
    return Check("shared memory", "fail", detail,
                 "lower ring.slots (or the camera resolution), or enlarge /dev/shm (docker: --shm-size)")


def check_data_dir(path: Path | None = None) -> Check:
    """The data dir (or its nearest existing parent, where it will be created) accepts a new file."""
    path = path or data_dir()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    fix = "set FACEPRO_DATA_DIR to a writable folder"
    if not probe.is_dir():
        return Check("data dir", "fail", f"{path}: {probe} is not a directory", fix)
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        return Check("data dir", "fail", f"{path}: cannot create a file in {probe} ({err.strerror})", fix)
    return Check("data dir", "ok", f"{path}" + ("" if probe == path else " (will be created)"))


def model_paths(cfg: AppConfig) -> list[tuple[str, Path]]:
    """The config's model files with their roles."""
    rec = cfg.recognition
    out = [("object detector", cfg.detection.detector.path), ("face detector", rec.face.detector.path),
           ("face embedder", rec.face.embedder.path)]
    if rec.reid is not None:
        out.append(("Re-ID embedder", rec.reid.path))
    if rec.gait is not None and rec.gait.embedder is not None:
        out.append(("gait embedder", rec.gait.embedder.path))
    return out


def check_models(cfg: AppConfig) -> list[Check]:
    """Each model file: present and matching the manifest's sha256 (or present, unverified, if not a manifest file)."""
    rows = []
    for role, path in model_paths(cfg):
        path = Path(path).expanduser()
        spec = mm.spec_for_file(path)
        name = f"model: {role}"
        if spec is None:
            ok = path.is_file() and path.stat().st_size > 0
            rows.append(Check(name, "warn" if ok else "fail", f"{path} {'present (not in the manifest: unverified)' if ok else 'missing'}",
                              "" if ok else "put the ONNX file there or change the path in the config"))
            continue
        st = mm.file_status(spec, path)
        licence = "" if not spec.non_commercial else f"; licence: {spec.licence}"
        fix = {"missing": f"facepro models fetch {spec.name} (or --from DIR)",
               "wrong-checksum": f"the file is not the manifest's {spec.name}: facepro models fetch {spec.name} replaces it"}.get(st, "")
        rows.append(Check(name, "ok" if st == "present" else "fail",
                          f"{spec.name} {path} {'verified (sha256)' if st == 'present' else st}{licence}", fix))
    return rows


def check_database(cfg: AppConfig) -> Check:
    """The database's schema revision against this code's head (an empty or older one is migrated by ``run``)."""
    from storage.db import StorageError, check_known, current_revision, describe, head_revision

    url = database_url(cfg)
    try:
        head = head_revision()
        rev = current_revision(url)
        check_known(url, rev)
    except StorageError as err:
        return Check("database", "fail", str(err), "see the message; facepro db current / facepro backup restore")
    where = describe(url)
    if rev == head:
        return Check("database", "ok", f"{where} at {rev} (code head {head})")
    if rev is None:
        return Check("database", "ok", f"{where}: no schema yet; facepro run creates it at {head}")
    return Check("database", "ok", f"{where} at {rev}, code head {head}: facepro run migrates it (after a backup copy)")


def check_metrics_port(cfg: AppConfig) -> Check:
    """``runtime.metrics_port`` can be bound on 127.0.0.1."""
    port = cfg.runtime.metrics_port
    if port is None:
        return Check("metrics port", "ok", "off (runtime.metrics_port: null)")
    if port == 0:
        return Check("metrics port", "ok", "any free port (runtime.metrics_port: 0)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as err:
            return Check("metrics port", "fail", f"127.0.0.1:{port} not free ({err.strerror})",
                         "stop what uses it, or change runtime.metrics_port (0: any free port, null: off)")
    return Check("metrics port", "ok", f"127.0.0.1:{port} free")


def check_camera(cam: CameraConfig, timeout_s: float = 2.0) -> Check:
    """A file decodes a frame; a URL's host accepts a TCP connection within ``timeout_s``; a device index exists."""
    name, src = f"camera {cam.name}", cam.source
    if src.isdigit():
        dev = Path(f"/dev/video{src}")
        return Check(name, "ok", f"{dev} present") if dev.exists() else Check(name, "fail", f"{dev} does not exist", "connect the camera or fix its index")
    if "://" in src:
        parts = urlsplit(src)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
        shown = f"{parts.scheme}://{parts.hostname}:{port}"
        try:
            socket.create_connection((parts.hostname or "", port), timeout=timeout_s).close()
        except (OSError, ValueError) as err:
            return Check(name, "fail", f"{shown} unreachable ({err})", "check the URI, the network and that the camera is on")
        return Check(name, "ok", f"{shown} reachable (TCP)")
    (h, w), how = frame_hw(cam)
    if how != "read":
        return Check(name, "fail", f"{src}: missing or no decodable frame", "check the path in the config or --source")
    return Check(name, "ok", f"{src}: {w}x{h}")


def run_checks(cfg: AppConfig, *, shm_free_bytes: int | None = None, timeout_s: float = 2.0) -> list[Check]:
    """Every check for ``cfg``; ``shm_free_bytes`` replaces the measured free space of /dev/shm (tests)."""
    return [*check_python(), check_onnxruntime(), check_shm(cfg, shm_free_bytes), check_data_dir(),
            *check_models(cfg), check_database(cfg), check_metrics_port(cfg),
            *(check_camera(c, timeout_s) for c in cfg.cameras)]


def cmd_doctor(args: argparse.Namespace) -> int:
    """``facepro doctor [--json]``: the report; exit 0 when the config can run, else 2 (fixes on stderr)."""
    from pipeline.config import with_sources

    cfg = load_config(args.config)
    if args.source:
        cfg = with_sources(cfg, args.source)
    rows = run_checks(cfg, timeout_s=args.timeout_s)
    failed = [r for r in rows if r.state == "fail"]
    if args.json:
        print(json.dumps({"config": str(Path(args.config).resolve()), "ok": not failed, "checks": [asdict(r) for r in rows]}))
    else:
        print(f"config {Path(args.config).resolve()}")
        for r in rows:
            print(f"{r.name:<24} {r.state:<5} {r.detail}" + (f"\n{'':<24} fix: {r.fix}" if r.fix else ""))
    if failed:
        print(f"facepro doctor: {len(failed)} problem(s): " + "; ".join(f"{r.name}: {r.fix}" for r in failed), file=sys.stderr)
        return 2
    return 0


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``doctor`` to the ``facepro`` parser (``add`` is cli.build_parser's helper)."""
    doc = add("doctor", cmd_doctor, "check this box and the config: versions, providers, /dev/shm, data dir, models, database, port, cameras")
    doc.add_argument("--json", action="store_true", help="one JSON document")
    doc.add_argument("--source", action="append", metavar="URI", help="check these cameras instead (as run --source)")
    doc.add_argument("--timeout-s", type=float, default=2.0, help="per camera connection, seconds (default: %(default)s)")
