"""``facepro init`` (a starter config in the user config dir) and ``facepro models list | fetch``.

The starter config comes from ``pipeline/resources/config.yaml`` (package
data) with the given cameras, models dir and metrics port filled in; it is
validated before it is written, owner-only (0600, its folder 0700).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Callable

import yaml

from pipeline import models as mm
from pipeline.config import default_models_dir, load_config, models_dir, parse_config, user_config_path


class InstallError(ValueError):
    """A user-fixable problem with ``init`` or ``models`` (existing config, bad --camera, failed fetch)."""


def parse_camera(spec: str) -> tuple[str, str]:
    """``NAME=URI`` → ``(NAME, URI)``.

    Raises:
        InstallError: no ``=`` or an empty side.
    """
    name, sep, uri = spec.partition("=")
    if not sep or not name or not uri:
        raise InstallError(f"--camera {spec!r}: expected NAME=URI, e.g. door=rtsp://192.168.1.20/stream or usb=0")
    return name, uri


def render_config(cameras: list[tuple[str, str]], models: Path, data: Path, metrics_port: int | None) -> str:
    """The starter config text for these cameras (``[("cam0", "0")]`` when empty), models dir and data dir.

    Raises:
        ConfigError: the rendered config does not validate (e.g. a bad camera name), naming the key.
    """
    def scalar(value: object) -> str:
        return json.dumps(value if not isinstance(value, Path) else str(value))  # JSON strings are YAML scalars

    cams = cameras or [("cam0", "0")]
    lines = [f"  - name: {scalar(n)}\n    source: {scalar(u)}" for n, u in cams]
    if not cameras:
        lines[0] += "          # USB camera 0: replace with your camera (rtsp://..., a video file...)"
    text = (resources.files("pipeline").joinpath("resources/config.yaml").read_text(encoding="utf-8")
            .replace("@@DATE@@", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
            .replace("@@CAMERAS@@", "\n".join(lines))
            .replace("@@MODELS_DIR@@", scalar(models))
            .replace("@@DATA_DIR@@", str(data))
            .replace("@@METRICS_PORT@@", "null" if metrics_port is None else str(metrics_port)))
    parse_config(yaml.safe_load(text), "facepro init")
    return text


def write_private(path: Path, text: str, force: bool) -> None:
    """Write ``text`` to ``path`` with mode 0600 (parent folders created 0700).

    Raises:
        InstallError: ``path`` exists and ``force`` is false.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise InstallError(f"{path} exists; pass --force to overwrite it (or --config FILE to write another file)") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)


def cmd_init(args: argparse.Namespace) -> int:
    """``facepro init``: write the starter config; prints its path and the next steps."""
    from pipeline.config import data_dir

    target = Path(args.config) if args.config_given else user_config_path()
    models = Path(args.models).expanduser().resolve() if args.models else default_models_dir()
    text = render_config([parse_camera(c) for c in args.camera or []], models, data_dir(), args.metrics_port)
    write_private(target, text, args.force)
    print(f"wrote {target}")
    print("next: facepro models fetch   (or: facepro models fetch --from DIR)   then: facepro doctor, facepro run")
    return 0


def _models_dir(args: argparse.Namespace) -> Path:
    if args.models_dir:
        return Path(args.models_dir).expanduser()
    if not Path(args.config).is_file() and not args.config_given:
        return default_models_dir()
    return models_dir(load_config(args.config))


def cmd_models(args: argparse.Namespace) -> int:
    """``facepro models list | fetch``."""
    target = _models_dir(args)
    if args.action == "list":
        return _list(target, args.json)
    specs = [mm.get_spec(n) for n in args.names] or [s for s in mm.manifest().values() if s.default]
    failed = []
    for spec in specs:
        try:
            changed = mm.import_file(spec, target, Path(args.from_dir)) if args.from_dir else mm.fetch(spec, target, args.base_url)
        except mm.ModelFetchError as err:
            print(f"facepro models: {err}", file=sys.stderr)
            failed.append(spec.name)
            continue
        note = f"  (licence: {spec.licence})" if spec.non_commercial else ""
        print(f"{spec.name:<22} {'installed' if changed else 'already present, verified'}: {target / spec.file}{note}")
    if failed:
        raise InstallError(f"{len(failed)} model(s) not installed: {', '.join(failed)}; nothing partial was left in {target}")
    return 0


def _list(target: Path, as_json: bool) -> int:
    rows = [{"name": s.name, "file": s.file, "status": mm.status(s, target), "default": s.default, "role": s.role,
             "licence": s.licence, "commercial_use": s.commercial_use, "path": str(target / s.file)}
            for s in mm.manifest().values()]
    if as_json:
        print(json.dumps({"models_dir": str(target), "models": rows}))
        return 0
    print(f"models dir {target}")
    for r in rows:
        flag = "" if r["commercial_use"] == "yes" else f"  [commercial use: {r['commercial_use']}]"
        print(f"{r['name']:<22} {r['status']:<15} {'default' if r['default'] else '':<8} {r['licence']}{flag}")
    return 0


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``init`` and ``models`` to the ``facepro`` parser (``add`` is cli.build_parser's helper)."""
    ini = add("init", cmd_init, f"write a starter config to {user_config_path()} (or --config FILE)")
    ini.add_argument("--camera", action="append", metavar="NAME=URI", help="a camera (repeatable); default: USB camera 0")
    ini.add_argument("--models", metavar="DIR", help="models dir written into the config (default: <data dir>/models)")
    ini.add_argument("--metrics-port", type=int, default=9108, help="Prometheus port (0: any free port; default: %(default)s)")
    ini.add_argument("--force", action="store_true", help="overwrite an existing config")
    mo = add("models", cmd_models, "model files: list (present / missing / wrong-checksum) | fetch [NAME...]")
    mo.add_argument("action", choices=["list", "fetch"])
    mo.add_argument("names", nargs="*", metavar="NAME", help="fetch: manifest names (default: the default models)")
    mo.add_argument("--from", dest="from_dir", metavar="DIR", help="fetch: copy from this local folder instead of downloading")
    mo.add_argument("--base-url", metavar="URL", help=f"fetch: mirror serving URL/<file> (or set {mm.MIRROR_ENV})")
    mo.add_argument("--models-dir", metavar="DIR", help="instead of the config's models_dir")
    mo.add_argument("--json", action="store_true", help="list: one JSON document")
