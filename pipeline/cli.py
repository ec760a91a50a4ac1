"""The ``facepro`` command line. Each command is a plain function the parser dispatches to.

Errors that a user can fix (bad config, missing model or video, no pipeline
running...) become one line on stderr and exit code 2. ``run`` exits 0 when
it finished (every file source processed completely), 1 when the pipeline
had to stop because a stage kept failing, 3 when a file-mode run lost frames
(``lost``/``overwritten``/``queue_full`` drops, or a capture that reported
it ended early), 130 on a forced stop (second signal).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import cv2

from pipeline import identities, topology
from pipeline.config import (AppConfig, ConfigError, apply_data_dir, data_dir, database_url, default_config_path, load_config,
                             with_sources)
from pipeline.messages import DROP_REASONS, StatusReply, StatusRequest, ScaleRequest, Ack
from pipeline.status import batch_summary, status_json  # noqa: F401  (status_json: facepro status --json, also the api's)
from pipeline.transport import PRIVATE_UMASK, TransportError, request

#: Help text of the config argument; the path itself is resolved when a command runs (pipeline.config.default_config_path).
DEFAULT_CONFIG_HELP = "YAML config (default: the user config written by 'facepro init' if it exists, else configs/demo.yaml)"


class CliError(RuntimeError):
    """A user-facing error: printed as one line, exit code 2."""


def _config(args: argparse.Namespace) -> AppConfig:
    cfg = load_config(args.config)
    if getattr(args, "source", None):
        cfg = with_sources(cfg, args.source)
    return cfg


def _engine(cfg: AppConfig):
    from storage.db import open_engine, upgrade

    url = database_url(cfg)
    upgrade(url)
    return open_engine(url)


def _check_assets(cfg: AppConfig) -> None:
    """Fail before any process starts when a model is missing or wrong, or a file source is missing.

    Every configured model is opened with ONNX Runtime and its inputs and
    outputs checked by the class that will use it (the same checks the stage
    processes make), so a wrong file is one line naming its config key instead
    of a stage that fails at start until the restart budget is spent.

    Raises:
        ModelError: ``<config key>: <what is wrong>``.
        SourceError: a file source that does not exist or does not decode.
        CliError: ``/dev/shm`` cannot hold the cameras' rings, or the data dir is not writable.
    """
    from stages.capture import open_source
    from stages.runtime import ModelError, check_onnxruntime_install

    mixed = check_onnxruntime_install()
    if mixed:
        logging.getLogger("facepro.cli").warning("%s", mixed)
    for key, check in _model_checks(cfg):
        try:
            check()
        except ModelError as err:
            raise ModelError(f"{key}: {err}") from None
    for cam in cfg.cameras:
        if cam.resolved_mode() == "file":
            open_source(cam).close()
    from pipeline.doctor import check_data_dir, check_shm

    for check in (check_shm(cfg), check_data_dir()):  # the same checks as facepro doctor
        if check.state == "fail":
            raise CliError(f"{check.name}: {check.detail}; {check.fix}")


def _model_checks(cfg: AppConfig) -> list[tuple[str, Callable[[], object]]]:
    """``(config key, loader)`` for every configured model; each loader opens and checks its model."""
    from stages.detector import ObjectDetector
    from stages.face import FaceAnalyzer
    from stages.runtime import SessionOptions, check_model_file

    opts = SessionOptions(threads=1, providers=cfg.runtime.providers, strict=cfg.runtime.strict_providers)
    rec = cfg.recognition
    checks: list[tuple[str, Callable[[], object]]] = [
        ("detection.detector.path", lambda: ObjectDetector(cfg.detection.detector, opts)),
        ("recognition.face", lambda: (check_model_file(rec.face.detector.path, "face detector"),
                                      check_model_file(rec.face.embedder.path, "face embedder"),
                                      FaceAnalyzer(rec.face, opts))),
    ]
    if not cfg.cameras:  # a Frigate companion-only box: only the face models run
        return checks[1:]
    if rec.reid is not None:
        from stages.reid import ReidEmbedder

        from stages.runtime import for_model

        checks.append(("recognition.reid.path", lambda: ReidEmbedder(rec.reid.path, for_model(opts, rec.reid.providers, rec.reid.graph_optimization))))  # type: ignore[union-attr]
    if rec.gait is not None and rec.gait.embedder is not None:
        from stages.gait import gait_embedder

        checks.append(("recognition.gait.embedder.path", lambda: gait_embedder(rec.gait, opts)))  # type: ignore[arg-type]
    return checks


# ------------------------------------------------------------------ commands
def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.supervisor import Supervisor
    from storage.db import upgrade

    cfg = _config(args)
    _check_api_port(cfg)
    _check_assets(cfg)
    url = database_url(cfg)
    sup = Supervisor(cfg, data_dir(), prepare_database=lambda: upgrade(url), config_path=Path(args.config))
    code = sup.run()
    summary = sup.summary()
    summary["events"] = _count_events(cfg)
    out = data_dir() / "last_run.json"
    out.write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    if sup.failure:
        print(f"facepro: pipeline stopped: {sup.failure}", file=sys.stderr)
    elif summary.get("incomplete"):
        print(f"facepro run: not every frame was processed ({'; '.join(summary['incomplete'])}); "
              f"see {out} and the log above", file=sys.stderr)
    return code


def _count_events(cfg: AppConfig) -> int:
    from storage.db import open_engine
    from storage.queries import count_rows

    return count_rows(open_engine(database_url(cfg))).get("events", 0)


def _print_summary(s: dict) -> None:
    print(f"run {s['run_id']}: {s['wall_s']:.1f} s wall, {s['events']} events stored")
    print(f"{'stage':<12}{'in':>8}{'out':>8}{'fps':>8}  dropped / peak RSS MiB")
    for stage, st in s["stages"].items():
        rss = ", ".join(f"{k}: {v}" for k, v in st["peak_rss_mb"].items())
        print(f"{stage:<12}{st['frames_in']:>8}{st['frames_out']:>8}{st['rate_fps']:>8.1f}  {st['dropped'] or '-'} / {rss}")
    restarts = ", ".join(f"{stage} {n}" for stage, n in s.get("restarts", {}).items() if n)
    if restarts:
        print(f"restarts: {restarts}")
    if s.get("incomplete"):
        print(f"INCOMPLETE: frames were lost: {'; '.join(s['incomplete'])}")


def _runtime_dir() -> Path:
    from pipeline.supervisor import read_current_run

    info = read_current_run(data_dir())
    if info is None:
        raise CliError(f"no pipeline is running (data dir {data_dir()}); start one with: facepro run CONFIG")
    return Path(info["socket_dir"])


def _status_table(reply: StatusReply) -> str:
    head = f"{'stage':<12}{'procs':>6}{'state':>9}{'rate/s':>8}{'queue':>7}{'oldest ms':>10}{'dropped':>9}{'p50 ms':>8}{'p99 ms':>8}{'cpu %':>7}{'rss MiB':>9}{'restarts':>9}"
    lines = [f"run {reply.run_id}, up {reply.uptime_s:.0f} s", head]
    for s in reply.stages:
        lines.append(f"{s.stage:<12}{s.processes:>6}{s.state:>9}{s.rate_fps:>8.1f}{s.queue_depth:>7}{s.oldest_wait_ms:>10.0f}"
                     f"{s.dropped:>9}{s.latency_p50_ms:>8.1f}{s.latency_p99_ms:>8.1f}{s.cpu_percent:>7.0f}{s.rss_mb:>9.0f}{s.restarts:>9}")
        reasons = ", ".join(f"{r}={int(n)}" for r, n in zip(DROP_REASONS, s.drop_counts) if n)
        if reasons:
            lines.append(f"{'':<12}drops: {reasons}")
        counts = ", ".join(f"{n}={int(v)}" for n, v in zip(s.count_names, s.counts))
        if counts:
            lines.append(f"{'':<12}counts: {counts}")
        batching = batch_summary(dict(zip(s.count_names, (int(v) for v in s.counts))))
        if batching:
            lines.append(f"{'':<12}{batching}")
        if s.last_error:
            lines.append(f"{'':<12}last error: {s.last_error}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    while True:
        reply = request(_runtime_dir(), topology.control(), StatusRequest(), timeout_ms=int(args.timeout_s * 1000))
        if not isinstance(reply, StatusReply):
            raise CliError(f"unexpected answer from the supervisor: {reply}")
        print(json.dumps(status_json(reply)) if args.json else _status_table(reply), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def cmd_scale(args: argparse.Namespace) -> int:
    for spec in args.specs:
        stage, _, n = spec.partition("=")
        if not n.isdigit():
            raise CliError(f"scale: expected STAGE=N (e.g. detection=2), got {spec!r}")
        reply = request(_runtime_dir(), topology.control(), ScaleRequest(stage=stage, processes=int(n)))
        assert isinstance(reply, Ack)
        print(reply.message)
        if not reply.ok:
            return 2
    return 0


def _analyzer(cfg: AppConfig):
    from pipeline.services import face_analyzer

    return face_analyzer(cfg, os.cpu_count() or 1)


def _read_image(path: str):
    img = cv2.imread(path)
    if img is None:
        raise CliError(f"cannot read image {path}: missing or not an image file")
    return img


def _enroll_one(analyzer, path: str, face: int | None):
    """``(image, the face to enroll)`` of one image, printed; user errors as :class:`CliError`."""
    from stages.enrollment import NoDominantFace, format_box
    from stages.gallery import EnrollmentError, enrollment_face

    image = _read_image(path)
    try:
        got = enrollment_face(analyzer, image, path, face=face)
    except NoDominantFace as err:
        raise CliError("\n".join((f"{err.summary}; choose one with --face N:", *err.face_lines))) from None
    except EnrollmentError as err:
        raise CliError(str(err)) from None
    if got.n_faces > 1:
        how = f"chosen with --face {got.index}" if face is not None else f"{got.ratio:.1f}x the next face's size x centrality"
        print(f"{path}: face {got.index} of {got.n_faces}, box {format_box(got.face.xyxy)} ({how})")
    return image, got.face


def cmd_enroll(args: argparse.Namespace) -> int:
    from pipeline.services import store_enrollment

    if args.face is not None and len(args.images) > 1:
        raise CliError("--face N chooses a face in one image: enroll that image alone with --face, "
                       "then the others in another call (they add to the same identity)")
    cfg = _config(args)
    analyzer = _analyzer(cfg)
    faces = [_enroll_one(analyzer, path, args.face) for path in args.images]
    shas = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in args.images]
    store_enrollment(_engine(cfg), args.name, analyzer.model_name, faces, [str(Path(p).resolve()) for p in args.images], shas)
    print(f"enrolled {args.name}: {len(faces)} image(s) with {analyzer.model_name}")
    return 0


def cmd_identities(args: argparse.Namespace) -> int:
    from storage.queries import delete_identity, list_identities

    cfg = _config(args)
    engine = _engine(cfg)
    if args.action == "list":
        if args.unknown:
            return identities.print_unknowns(engine, args.json)
        for name, n in list_identities(engine):
            print(f"{name:<32} {n} embedding(s)")
        return 0
    if args.action in ("merge", "name"):
        if not args.name or not args.other:
            raise CliError('identities merge needs two names: facepro identities merge KEEP OTHER ("OTHER" goes into "KEEP")'
                           if args.action == "merge" else 'identities name needs a cluster and a name: facepro identities name unknown-17 "Alice"')
        if args.action == "name":
            return identities.print_named(engine, args.name, args.other)
        print(identities.merge_any(engine, args.name, args.other))
        if not args.other.startswith("unknown-"):  # an anonymous cluster has no Home Assistant entity
            _remove_entity(cfg, args.other)
        return 0
    if args.other:
        raise CliError(f"identities delete takes one NAME, got {args.name!r} and {args.other!r} (quote names with spaces)")
    if not args.name:
        raise CliError("identities delete needs a NAME")
    if not delete_identity(engine, args.name):
        raise CliError(f"no identity named {args.name!r}; see facepro identities list")
    print(f"deleted {args.name} and its embeddings (the enrolled image files themselves are yours and stay)")
    _remove_entity(cfg, args.name)
    return 0


def _remove_entity(cfg: AppConfig, name: str) -> None:
    """With MQTT discovery: remove the Home Assistant entity of the deleted (or merged away) identity ``name`` now."""
    if cfg.mqtt is None or not cfg.mqtt.discovery:
        return
    from pipeline.mqtt import remove_identity_entity

    why = remove_identity_entity(cfg, name)
    if why is None:
        print(f"removed the Home Assistant entity of {name}")
    else:
        print(f"facepro identities: the Home Assistant entity of {name} stays for now ({why}); the mqtt "
              "process of the next run removes it", file=sys.stderr)


def cmd_identify(args: argparse.Namespace) -> int:
    from pipeline.services import identify_doc

    cfg = _config(args)
    doc = identify_doc(_engine(cfg), _analyzer(cfg), cfg.recognition.face.match_threshold, _read_image(args.image))
    if args.json:
        print(json.dumps(doc))
    else:
        for f in doc["faces"]:
            print(f"{f['identity'] or 'unknown':<24} similarity {f['similarity']:.3f}  bbox {f['bbox']}")
        if not doc["faces"]:
            print("no face found")
    return 0


def _when(text: str | None, flag: str) -> datetime | None:
    """An ISO-8601 time of a command-line flag as aware UTC (no offset: UTC)."""
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"{flag}: expected an ISO-8601 time such as 2024-05-01T08:00:00+00:00, got {text!r}") from None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def cmd_events(args: argparse.Namespace) -> int:
    from pipeline.services import event_docs

    if args.action == "relabel":
        return _relabel_event(args)
    engine = _db_engine(args.db) if args.db else _engine(_config(args))
    docs = event_docs(engine, args.limit, camera=args.camera, identity=args.identity, label=args.label,
                      method=args.method, since=_when(args.since, "--since"), until=_when(args.until, "--until"),
                      unknown=args.unknown, box=args.box)
    for doc in docs:
        if args.json:
            print(json.dumps(doc))
        else:
            print(f"{doc['started_at']}  {(doc['box_id'] + '/' if doc['box_id'] else '') + doc['camera']:<10} "
                  f"track {doc['track_id']:<5} {doc['label']:<8} "
                  f"{doc['identity'] or doc['unknown'] or 'unknown':<20} frames {doc['first_frame']}-{doc['last_frame']}")
    return 0


def _relabel_event(args: argparse.Namespace) -> int:
    """``facepro events relabel EVENT --not NAME [--as NAME]`` on the config's database (the box's own)."""
    from pipeline.identities import print_relabelled

    if not args.event or (args.not_name is None and args.as_name is None):
        raise CliError("events relabel needs an event id and --not NAME and/or --as NAME: "
                       'facepro events relabel EVENT --not "Bob" [--as "Carol"]')
    if args.db or args.box:
        raise CliError("events relabel corrects the box's own database (its config); --db and --box only list "
                       "events: run the relabel on the box that stored the event")
    cfg = _config(args)
    return print_relabelled(_engine(cfg), cfg, args.event, args.not_name, args.as_name)


def _db_engine(url: str):
    """An engine on the database ``url`` (``--db``), migrated to the current schema first."""
    from storage.db import open_engine, upgrade

    upgrade(url)
    return open_engine(url)


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.api import bind, create_app, serve
    from pipeline.runner import StopFlag
    from pipeline.services import api_context
    from storage.db import upgrade

    cfg = _config(args)
    if args.host is not None or args.port is not None:
        cfg = _with_api(cfg, host=args.host, port=args.port)
    upgrade(database_url(cfg))
    try:
        sock = bind(cfg.api.host, cfg.api.port)
    except OSError as err:
        raise CliError(str(err)) from None
    stop = StopFlag().install()
    app = create_app(api_context(cfg, alone=True, config_path=Path(args.config), threads=os.cpu_count() or 1))
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    sys.stdout.write(f"serving the FacePro API on http://{host}:{port} over {data_dir()} (Ctrl-C stops)\n")  # one write
    sys.stdout.flush()
    serve(app, sock, stop)
    return 0


def _with_api(cfg: AppConfig, **changes: object) -> AppConfig:
    """``cfg`` with its ``api`` section changed (the None values left out), validated like the config file."""
    from pydantic import ValidationError

    from pipeline.config import ApiConfig

    tree = cfg.api.model_dump()
    tree.update({k: v for k, v in changes.items() if v is not None})
    try:
        return cfg.model_copy(update={"api": ApiConfig.model_validate(tree)})
    except ValidationError as err:
        raise CliError("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in err.errors())) from None


def _check_api_port(cfg: AppConfig) -> None:
    """``facepro run`` with ``api.enabled``: fail before any process starts when ``api.host:api.port`` cannot be bound."""
    if not cfg.api.enabled or cfg.api.port == 0:
        return
    from pipeline.api import bind

    try:
        bind(cfg.api.host, cfg.api.port).close()
    except OSError as err:
        raise CliError(str(err)) from None


def cmd_db(args: argparse.Namespace) -> int:
    from storage import db

    cfg = _config(args)
    url = database_url(cfg)
    if args.action in ("upgrade", "downgrade") and _running():
        raise CliError(f"a pipeline is running with data dir {data_dir()}; stop it before changing the schema")
    if args.action == "upgrade":
        print(f"database at revision {db.upgrade(url)}")
    elif args.action == "downgrade":
        if not args.revision:
            raise CliError("db downgrade needs a revision, e.g. facepro db downgrade 0001 (or base)")
        print(f"database at revision {db.downgrade(url, args.revision) or 'base (empty)'}")
    elif args.action == "current":
        print(db.current_revision(url) or "empty (no revision)")
    elif args.action == "history":
        for rev in db.history():
            print(f"{rev.revision:<6} <- {rev.down_revision or 'base':<6} {'(head) ' if rev.is_head else ''}{rev.message}")
    elif args.action == "stats":
        from storage.retention import db_stats

        print(json.dumps(db_stats(db.open_engine(url), data_dir() / "snapshots"), indent=2, default=str))
    return 0


def _running() -> bool:
    from pipeline.supervisor import read_current_run

    return read_current_run(data_dir()) is not None


def _backup_dir(args: argparse.Namespace) -> Path:
    return Path(args.dir) if args.dir else data_dir() / "backups"


def cmd_backup(args: argparse.Namespace) -> int:
    from storage import backup
    from storage.db import upgrade

    url = database_url(_config(args))
    if args.action == "create":
        print(backup.create_backup(url, data_dir(), Path(args.config), _backup_dir(args)))
    elif args.action == "list":
        for info in backup.list_backups(_backup_dir(args)):
            when = info.created_at.isoformat() if info.created_at else "?"
            print(f"{info.path}  {when}  schema {info.schema_revision}  {info.files} files  {info.size} bytes"
                  + (f"  UNREADABLE: {info.error}" if info.error else ""))
    elif args.action == "restore":
        if not args.file:
            raise CliError("backup restore needs the archive: facepro backup restore FILE")
        res = backup.restore_backup(Path(args.file), url, data_dir(), running=_running())
        print(f"restored {res.database} (schema {res.schema_revision}), {len(res.faces)} face image(s); "
              f"previous database kept as {res.previous}")
        print(f"database at revision {upgrade(url)}")
    elif args.action == "prune":
        for path in backup.prune_backups(_backup_dir(args), args.keep):
            print(f"removed {path}")
    return 0


# -------------------------------------------------------------------- parser
def _add_events(add: Callable[..., argparse.ArgumentParser]) -> None:
    ev = add("events", cmd_events, "list stored events, newest first | relabel EVENT --not NAME [--as NAME]")
    identities.events_arguments(ev)
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--camera")
    ev.add_argument("--identity")
    ev.add_argument("--limit", type=int, default=100)
    ev.add_argument("--label", help="only this class (person...)")
    ev.add_argument("--method", choices=["face", "reid", "gait"], help="only events named by this method")
    ev.add_argument("--since", metavar="TIME", help="only events started at or after this ISO-8601 time (no offset: UTC)")
    ev.add_argument("--until", metavar="TIME", help="only events started before this ISO-8601 time")
    ev.add_argument("--box", help="only the events a fleet hub received from this box (its box_id)")
    ev.add_argument("--db", metavar="URL", help="read this database (e.g. a fleet hub's postgresql://...) instead of "
                    "the config's")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facepro", description="FacePro edge video analytics")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str, config_positional: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        if config_positional:
            sp.add_argument("config", nargs="?", default=None, help=DEFAULT_CONFIG_HELP)
        else:
            sp.add_argument("--config", default=None, help=DEFAULT_CONFIG_HELP)
        sp.set_defaults(func=func)
        return sp

    run = add("run", cmd_run, "start the pipeline (exits at the end of file sources; exit code 0 done, "
              "1 a stage kept failing, 2 user error, 3 a file-mode run lost frames, 130 forced stop)", config_positional=True)
    run.add_argument("--source", action="append", metavar="URI", help="replace the configured cameras (repeatable)")
    st = add("status", cmd_status, "show per-stage rates, queue depths and drops of the running pipeline")
    st.add_argument("--json", action="store_true")
    st.add_argument("--watch", type=float, metavar="S", help="refresh every S seconds")
    st.add_argument("--timeout-s", type=float, default=3.0)
    sc = add("scale", cmd_scale, "change a stage's process count, e.g. detection=2")
    sc.add_argument("specs", nargs="+", metavar="STAGE=N")
    en = add("enroll", cmd_enroll, "add an identity (or more images of it) to the gallery")
    en.add_argument("name")
    en.add_argument("images", nargs="+")
    en.add_argument("--face", type=int, metavar="N", help="with several faces in the image, enroll face N (0-based, "
                    "numbered left to right as a refusal lists them); only with one image")
    ids = add("identities", cmd_identities, identities.IDENTITIES_HELP)
    identities.identities_arguments(ids)
    idf = add("identify", cmd_identify, "name every face in an image")
    idf.add_argument("image")
    idf.add_argument("--json", action="store_true")
    _add_events(add)
    sv = add("serve", cmd_serve, "run the HTTP API alone over the database (no pipeline needed; README 'HTTP API')")
    sv.add_argument("--host", help="address to bind (default: api.host; anything but loopback requires api.token)")
    sv.add_argument("--port", type=int, help="TCP port (default: api.port; 0: any free port)")
    dbp = add("db", cmd_db, "database schema and size: upgrade | downgrade REV | current | history | stats")
    dbp.add_argument("action", choices=["upgrade", "downgrade", "current", "history", "stats"])
    dbp.add_argument("revision", nargs="?", help="target revision for downgrade (e.g. 0001 or base)")
    bk = add("backup", cmd_backup, "backups of database, enrolled faces and config: create | list | restore FILE | prune --keep N")
    bk.add_argument("action", choices=["create", "list", "restore", "prune"])
    bk.add_argument("file", nargs="?", help="archive to restore")
    bk.add_argument("--dir", help="backup folder (default: <data dir>/backups)")
    bk.add_argument("--keep", type=int, default=5, help="prune: archives to keep (default: %(default)s)")
    from pipeline import doctor, hubrun, install

    install.register(add)
    doctor.register(add)
    hubrun.register(add)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.ring import RingError
    from pipeline.supervisor import SupervisorError
    from stages.capture import SourceError
    from pipeline.models import ModelFetchError
    from stages.runtime import ModelError
    from storage.db import StorageError

    return (CliError, ModelFetchError, ConfigError, TransportError, SupervisorError, RingError, SourceError, ModelError, StorageError, ValueError)


def main(argv: list[str] | None = None) -> int:
    os.umask(PRIVATE_UMASK)  # the database, snapshots (faces), backups and sockets: owner-only
    args = build_parser().parse_args(argv)
    if hasattr(args, "config"):
        args.config_given = args.config is not None
        args.config = args.config or str(default_config_path())
        apply_data_dir(args.config)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"facepro {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
