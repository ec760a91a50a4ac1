#!/usr/bin/env python3
"""End to end: FacePro's pipeline against a competent one-process loop on the same file and models.

The loop is the single "AI worker" design FacePro replaces: decode a frame,
YOLOX-Nano for persons, SCRFD on each person's upper body, 5-point alignment,
MobileFaceNet, open-set match against the gallery, and one ``INSERT`` +
``COMMIT`` per face into SQLite, ONNX Runtime on all cores. The pipeline is
``facepro run`` with the same config (its tracking, Re-ID, gait and snapshots
included). Both run on the same file, alternating, ``--rounds`` times, in one
invocation (the machine is noisy); frames/s excludes model loading: the loop's
time starts at its first frame, the pipeline's is ``active_s`` of its run
summary (first captured frame to every frame processed). The whole-run
ratio (model loading, start-up and drain included) is printed too.

``--cameras N``: the pipeline runs N file cameras (camera i plays VIDEO number
i modulo the videos named); the loop plays the same videos one after another,
so both frames/s count every frame of every camera. ``--resize WxH`` and
``--max-frames N`` first write a resized / clipped MJPG AVI copy of each video
into a temp dir, used by both sides. ``--providers`` sets ``runtime.providers``
of the pipeline and the loop's ONNX Runtime providers.

Per round it also prints:

- the **bare-inference bound** (:mod:`benchbound`): the same models on the
  pre-decoded frames (at most ~2 GB of them) at the schedule this round's
  pipeline chose (its run summary's counters), and the pipeline's share of it;
- **accuracy checks**: person events per camera; a camera playing the
  unmodified ``one-by-one-person-detection.mp4`` must store six, one playing
  the unmodified ``vtest.avi`` within 10 % of ``--baseline-events`` (27,
  measured before issue 12's speed work); copies made by ``--resize`` or
  ``--max-frames`` are reported, not checked;
- per stage p50 / p99 processing time (the run summary's last window).

``--variant LABEL:KEY=VALUE[,KEY=VALUE...]`` (repeatable) also runs the
pipeline with those config keys changed (dotted paths, YAML values, e.g.
``no-regions:detection.regions.enabled=false`` or
``fixed:detection.detector.canvas=fixed,detection.regions.enabled=false``)
in every round, right after the main pipeline run, and prints its frames/s,
its ratio to the loop and the main pipeline's ratio to it: what one setting
is worth, measured side by side. Each pipeline run also prints its detector
work: frames detected on motion regions and the canvas area the detector ran
on as a share of the model's declared input size on every detector frame.

In ``--json``, each round also has ``runs_on`` (what each model of the
pipeline ran on, e.g. ``face detector scrfd_500m.onnx on CUDA``) and the wall
clock windows (``time.time()``, s) of its loop and pipeline runs.

``--eval`` also runs ``scripts/eval_faces.py`` and ``scripts/eval_reid.py``
(``--json``) once and prints their headline numbers next to the ones in the
README (rank-1, genuine min / impostor max; Re-ID tracks, persons, wrong
links). Issue 12's target on a 2-core machine is a ratio >= 1.8 on both asset
videos. ``--json`` prints one document with all of it.

Usage: ``FACEPRO_ASSETS=../shared python scripts/bench_e2e.py [VIDEO ...] [--rounds 3] [--cameras 1]
[--resize 1920x1080] [--max-frames N] [--providers CUDAExecutionProvider,CPUExecutionProvider]
[--processes D,R] [--baseline-events 27] [--variant LABEL:KEY=VALUE,...] [--eval] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchbound import BoundModels, Schedule, bound, inference_parallelism, time_models  # noqa: E402
from benchlib import ROOT, child_env, decode_frames, parse_size, run_pipeline, write_copy  # noqa: E402
from pipeline.config import load_config, parse_config  # noqa: E402

#: Person events of the unmodified asset videos: one-by-one's six people; vtest's count before issue 12's work.
SIX_PEOPLE = "one-by-one-person-detection"
VTEST = "vtest"
#: The evaluations' numbers in the README before issue 12's work (what "unchanged" is checked against).
EVAL_REFERENCE = {"faces": {"rank1": "14/14", "genuine_min": 0.578, "impostor_max": 0.177},
                  "reid": {"person_tracks": 6, "distinct_persons": 6, "wrong_links": 0}}


@dataclass(frozen=True)
class Source:
    """One camera's file: ``path`` as played, ``video`` the asset's stem, ``modified`` if clipped or resized."""

    path: Path
    video: str
    modified: bool


def loop_fps(cfg_path: str, videos: list[Path], providers: tuple[str, ...] | None) -> tuple[float, float, int, int]:
    """Run the one-process loop on ``videos`` one after another; returns (frames/s from the first frame,
    frames/s of the whole run including model loading, frames, faces stored)."""
    start = time.perf_counter()
    from stages.detector import ObjectDetector
    from stages.face import FaceAnalyzer
    from stages.gallery import Gallery
    from stages.runtime import SessionOptions

    cfg = load_config(cfg_path)
    opts = SessionOptions(threads=os.cpu_count() or 1, providers=providers or cfg.runtime.providers)
    detector = ObjectDetector(cfg.detection.detector, opts)
    faces = FaceAnalyzer(cfg.recognition.face, opts)
    gallery = Gallery([], np.empty((0, 1), np.float32), threshold=cfg.recognition.face.match_threshold)
    frames = stored = 0
    t0 = None
    with tempfile.TemporaryDirectory() as tmp:
        db = _loop_db(Path(tmp) / "loop.db")
        for video in videos:
            cap = cv2.VideoCapture(str(video))
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                t0 = t0 or time.perf_counter()
                stored += _one_frame(frame, frames, detector, faces, gallery, db)
                frames += 1
            cap.release()
        db.close()
    end = time.perf_counter()
    return frames / (end - (t0 or end)), frames / (end - start), frames, stored


def _loop_db(path: Path):
    """The loop's SQLite database with its one table of faces."""
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("CREATE TABLE faces (frame INTEGER, x1 REAL, y1 REAL, x2 REAL, y2 REAL, identity TEXT, score REAL, embedding BLOB)")
    return db


def _one_frame(frame: np.ndarray, index: int, detector, faces, gallery, db) -> int:
    """The loop's work on one frame; returns the faces it stored (one INSERT + COMMIT each)."""
    boxes = detector.detect(frame).xyxy
    if not len(boxes):
        return 0
    # one SCRFD pass: on the person's upper body when there is one person, on the frame when several (what the
    # pipeline does too; one pass per person would make the loop needlessly slow)
    region = None if len(boxes) != 1 else np.array([boxes[0][0], boxes[0][1], boxes[0][2],
                                                     boxes[0][1] + (boxes[0][3] - boxes[0][1]) * 0.5], np.float32)
    stored = 0
    for face in (f for f in faces.analyze(frame, region_xyxy=region) if _inside_any(f.xyxy, boxes)):
        match = gallery.match(face.embedding[None, :])[0] if len(gallery) else None
        db.execute("INSERT INTO faces VALUES (?,?,?,?,?,?,?,?)", (index, *map(float, face.xyxy),
                   match.identity if match else None, float(match.similarity) if match else 0.0,
                   face.embedding.astype(np.float32).tobytes()))
        db.commit()
        stored += 1
    return stored


def _inside_any(face_xyxy: np.ndarray, boxes: np.ndarray) -> bool:
    """True if the face box's centre lies inside one of the person boxes (x1, y1, x2, y2 pixels)."""
    cx, cy = (face_xyxy[0] + face_xyxy[2]) / 2, (face_xyxy[1] + face_xyxy[3]) / 2
    return bool(np.any((boxes[:, 0] <= cx) & (cx <= boxes[:, 2]) & (boxes[:, 1] <= cy) & (cy <= boxes[:, 3])))


def pipeline_tree(args: argparse.Namespace, sources: list[Source]) -> dict:
    """``--config``'s tree with one file camera per source (``cam0``...), ``--providers``, ``--processes`` and
    ``--ring-slots`` applied, no metrics port, ``${VAR}`` expanded."""
    import yaml

    tree = yaml.safe_load(Path(args.config).read_text())
    tree["cameras"] = [{"name": f"cam{i}", "source": str(s.path), "mode": "file"} for i, s in enumerate(sources)]
    tree.setdefault("runtime", {})["metrics_port"] = None
    if args.providers:
        tree["runtime"]["providers"] = list(args.providers)
    if args.processes:
        tree["detection"]["processes"], tree["recognition"]["processes"] = args.processes
    if args.ring_slots:
        tree.setdefault("ring", {})["slots"] = args.ring_slots
    return json.loads(os.path.expandvars(json.dumps(tree)))


def person_events(data_dir: Path) -> dict[str, int]:
    """Person events per camera name in the run's SQLite database (``<data dir>/facepro.db``)."""
    import sqlite3

    db = sqlite3.connect(data_dir / "facepro.db")
    try:
        rows = db.execute("SELECT c.name, COUNT(*) FROM events e JOIN cameras c ON e.camera_id = c.id "
                          "WHERE e.label = 'person' GROUP BY c.name").fetchall()
    finally:
        db.close()
    return {name: int(n) for name, n in rows}


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """``"label:a.b=1,c=false"`` → ``("label", {"a.b": 1, "c": False})`` (values parsed as YAML).

    Raises:
        argparse.ArgumentTypeError: no label, or an item without ``=``.
    """
    import yaml

    label, sep, rest = text.partition(":")
    items = [i for i in rest.split(",") if i]
    if not sep or not label or not items or any("=" not in i for i in items):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected LABEL:KEY=VALUE[,KEY=VALUE...]")
    return label, {k.strip(): yaml.safe_load(v) for k, v in (i.split("=", 1) for i in items)}


def with_overrides(tree: dict, overrides: dict[str, object]) -> dict:
    """A deep copy of ``tree`` with each dotted key set (missing levels created)."""
    out = json.loads(json.dumps(tree))
    for dotted, value in overrides.items():
        node = out
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return out


def detector_work(summary: dict) -> dict:
    """The detection stage's region counters of a run: frames detected on regions, and the canvas area run as
    a share of the model's declared input on every detector frame (``area``; None when not counted)."""
    c = summary["stages"]["detection"].get("counts", {})
    fixed = int(c.get("detector_kpx_fixed", 0))
    return {"region_frames": int(c.get("region_frames", 0)), "region_retried": int(c.get("region_retried", 0)),
            "area": round(int(c.get("detector_kpx", 0)) / fixed, 3) if fixed else None}


def variant_round(label: str, tree: dict, sources: list[Source], args: argparse.Namespace, loop: float, main: float) -> dict:
    """One pipeline run of a ``--variant``: its frames/s, ratio to the loop, the main pipeline's ratio to it, checks."""
    summary, fps, _ = pipeline_round(tree)
    return {"label": label, "pipeline_fps": round(fps, 2), "ratio": round(fps / loop, 3), "main_over_variant": round(main / fps, 3),
            "detector": detector_work(summary), "checks": check_events(sources, summary["after"], args.baseline_events)}


def pipeline_round(tree: dict) -> tuple[dict, float, float]:
    """Run ``facepro run`` on ``tree``; returns (run summary with ``after`` = person events per camera,
    frames/s over the active period, frames/s of the whole run including start-up and drain)."""
    summary = run_pipeline(tree, after=person_events)
    frames = summary["stages"]["recognition"]["frames_out"]
    return summary, frames / summary["active_s"], frames / summary["wall_s"]


def check_events(sources: list[Source], events: dict[str, int], baseline: int) -> list[dict]:
    """Per camera: its person events and, for the unmodified asset videos, the issue's check
    (``ok`` None where there is none)."""
    out = []
    for i, s in enumerate(sources):
        n = events.get(f"cam{i}", 0)
        rule, ok = "-", None
        if not s.modified and s.video == SIX_PEOPLE:
            rule, ok = "six events", n == 6
        elif not s.modified and s.video == VTEST:
            rule, ok = f"within 10 % of {baseline}", abs(n - baseline) <= 0.1 * baseline
        out.append({"camera": f"cam{i}", "video": s.video, "person_events": n, "check": rule, "ok": ok})
    return out


def run_eval(name: str) -> dict:
    """Run ``scripts/<name> --json`` on this checkout; returns its report, or ``{"error": ...}``."""
    import subprocess

    res = subprocess.run([sys.executable, str(ROOT / "scripts" / name), "--json"], capture_output=True, text=True,
                         env=child_env(), cwd=ROOT, timeout=1800)
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError:
        return {"error": f"{name} exited {res.returncode}: {res.stderr[-500:]}"}


def eval_headlines() -> dict:
    """The evaluations' headline numbers (similarities to 4 decimals) and ``unchanged``: all equal to
    :data:`EVAL_REFERENCE` (similarities within 0.001)."""
    faces, reid = run_eval("eval_faces.py"), run_eval("eval_reid.py")
    out: dict = {}
    if "error" in faces:
        out["faces"] = faces
    else:
        out["faces"] = {"rank1": f"{faces['rank1']['correct']}/{faces['rank1']['probes']}",
                        "genuine_min": round(faces["genuine"]["min"], 4), "impostor_max": round(faces["impostor"]["max"], 4)}
    if "error" in reid:
        out["reid"] = reid
    else:
        t = reid["test"]
        out["reid"] = {"person_tracks": t["person_tracks"], "distinct_persons": t["distinct_persons"],
                       "wrong_links": len(t.get("check", {}).get("wrong_links", []))}
    for key, ref in EVAL_REFERENCE.items():
        out[key]["unchanged"] = all(_same(out[key].get(k), v) for k, v in ref.items())
    return out


def _same(value: object, reference: object) -> bool:
    """Equal, for numbers within 0.001 (the README's similarities are printed with 3 decimals)."""
    if isinstance(value, float) or isinstance(reference, float):
        return isinstance(value, (int, float)) and abs(value - reference) <= 0.001  # type: ignore[operator]
    return value == reference


def prepare_sources(args: argparse.Namespace, tmp: Path) -> list[Source]:
    """One :class:`Source` per camera: the named videos in turn, each written once as a clipped / resized
    copy into ``tmp`` when ``--max-frames`` / ``--resize`` ask for it."""
    assets = os.environ.get("FACEPRO_ASSETS")
    if not args.video and not assets:
        raise SystemExit("set FACEPRO_ASSETS or name a video")
    videos = [Path(v).resolve() for v in args.video] or [Path(assets, "data", "videos", "vtest.avi").resolve()]
    played = []
    for v in videos:
        if not v.is_file():
            raise SystemExit(f"video {v} does not exist")
        if args.resize is None and args.max_frames is None:
            played.append(Source(v, v.stem, False))
            continue
        size = parse_size(args.resize) if args.resize else None
        dst = tmp / f"{v.stem}-{args.resize or 'orig'}-{args.max_frames or 'all'}f.avi"
        write_copy(v, dst, args.max_frames, size)
        played.append(Source(dst, v.stem, True))
    return [played[i % len(played)] for i in range(args.cameras)]


def one_round(args: argparse.Namespace, sources: list[Source], tree: dict, models: BoundModels,
              frames: list[np.ndarray]) -> dict:
    """One loop run, one pipeline run and the bound at that run's schedule (keys: see the module docstring)."""
    t0 = time.time()
    loop, loop_whole, n, faces = loop_fps(args.config, [s.path for s in sources], args.providers)
    t1 = time.time()
    summary, pipe, pipe_whole = pipeline_round(tree)
    t2 = time.time()
    schedule = Schedule.from_summary(summary, inference_parallelism(parse_config(tree)))
    b = bound(schedule, time_models(models, frames, schedule, args.bound_calls), pipe)
    variants = [variant_round(label, with_overrides(tree, over), sources, args, loop, pipe) for label, over in args.variant]
    return {"variants": variants, "detector": detector_work(summary),"loop_fps": round(loop, 2), "pipeline_fps": round(pipe, 2), "ratio": round(pipe / loop, 3),
            "whole_run_ratio": round(pipe_whole / loop_whole, 3), "frames": n, "loop_faces": faces,
            "pipeline_frames": summary["stages"]["recognition"]["frames_out"], "complete": summary.get("complete"),
            "pipeline_events": int(summary.get("events", 0)), "checks": check_events(sources, summary["after"], args.baseline_events),
            "bound": b, "latency_ms": {st: {"p50": v.get("latency_p50_ms"), "p99": v.get("latency_p99_ms")}
                                       for st, v in summary["stages"].items()},
            "runs_on": sorted({k for v in summary["stages"].values() for k in v["counts"] if " on " in k}),
            "loop_window": [t0, t1], "pipeline_window": [t1, t2]}


def print_round(i: int, r: dict) -> None:
    """The round's lines: frames/s and ratios, the bound, the person events and checks, p50/p99 per stage."""
    print(f"round {i}: loop {r['loop_fps']:6.1f} fps, pipeline {r['pipeline_fps']:6.1f} fps, ratio {r['ratio']:.2f}; "
          f"whole-run ratio {r['whole_run_ratio']:.2f} ({r['frames']} frames; loop stored {r['loop_faces']} faces, "
          f"pipeline {r['pipeline_events']} events)", flush=True)
    b = r["bound"]
    models = ", ".join(f"{k} {m['calls']}x{m['ms_per_call']:.1f} ms" for k, m in b["models"].items() if m["calls"])
    share = f"{100 * b['share']:.0f} %" if b["share"] is not None else "-"
    print(f"  bare-inference bound {b['fps'] or float('nan'):.1f} fps ({b['model_s']:.1f} s of models / {b['parallel']:g}: "
          f"{models}); pipeline share {share}")
    checks = ", ".join(f"{c['camera']} {c['video']} {c['person_events']}"
                       + ("" if c["ok"] is None else f" ({c['check']}: {'PASS' if c['ok'] else 'FAIL'})") for c in r["checks"])
    print(f"  person events: {checks}")
    print("  p50/p99 ms per item: " + ", ".join(f"{st} {v['p50']}/{v['p99']}" for st, v in r["latency_ms"].items()))
    print(f"  detector: {_work(r['detector'])}")
    for v in r["variants"]:
        checks = ", ".join(f"{c['camera']} {c['person_events']}" + ("" if c["ok"] is None else f" {'PASS' if c['ok'] else 'FAIL'}")
                           for c in v["checks"])
        print(f"  variant {v['label']}: pipeline {v['pipeline_fps']:.1f} fps, ratio to loop {v['ratio']:.2f}; "
              f"main pipeline / variant {v['main_over_variant']:.2f}; {_work(v['detector'])}; person events {checks}")


def _work(d: dict) -> str:
    area = f"{100 * d['area']:.0f} %" if d["area"] is not None else "-"
    return f"{d['region_frames']} frames on motion regions ({d['region_retried']} retried whole), canvas area {area} of the fixed input"


def medians(rounds: list[dict]) -> dict:
    """Medians over the rounds, and ``checks_ok`` (every check of every round passed; None: nothing checked)."""
    med = lambda f: statistics.median(f(r) for r in rounds)  # noqa: E731
    shares = [r["bound"]["share"] for r in rounds if r["bound"]["share"] is not None]
    oks = [c["ok"] for r in rounds for c in r["checks"] if c["ok"] is not None]
    return {"median_loop_fps": med(lambda r: r["loop_fps"]), "median_pipeline_fps": med(lambda r: r["pipeline_fps"]),
            "median_ratio": med(lambda r: r["ratio"]), "median_whole_run_ratio": med(lambda r: r["whole_run_ratio"]),
            "median_bound_fps": statistics.median([r["bound"]["fps"] or 0.0 for r in rounds]),
            "median_share": statistics.median(shares) if shares else None,
            "target_ratio": 1.8, "checks_ok": all(oks) if oks else None, "variants": _variant_medians(rounds)}


def _variant_medians(rounds: list[dict]) -> dict:
    """Per ``--variant`` label: median frames/s, median main-pipeline / variant ratio, every check passed."""
    out = {}
    for label in [v["label"] for v in rounds[0]["variants"]] if rounds else []:
        runs = [v for r in rounds for v in r["variants"] if v["label"] == label]
        oks = [c["ok"] for v in runs for c in v["checks"] if c["ok"] is not None]
        out[label] = {"median_fps": statistics.median(v["pipeline_fps"] for v in runs),
                      "median_main_over_variant": statistics.median(v["main_over_variant"] for v in runs),
                      "checks_ok": all(oks) if oks else None}
    return out


def print_summary(doc: dict) -> None:
    """The closing lines: medians, the accuracy verdict, the evaluations."""
    share = f"{100 * doc['median_share']:.0f} %" if doc["median_share"] is not None else "-"
    verdict = {True: "PASS", False: "FAIL", None: "n/a (no unmodified asset video)"}[doc["checks_ok"]]
    print(f"median: loop {doc['median_loop_fps']:.1f} fps, pipeline {doc['median_pipeline_fps']:.1f} fps, "
          f"ratio {doc['median_ratio']:.2f}, whole runs {doc['median_whole_run_ratio']:.2f} (target >= 1.8); "
          f"bound {doc['median_bound_fps']:.1f} fps, pipeline share {share}; person-event checks {verdict}")
    for label, v in doc.get("variants", {}).items():
        print(f"variant {label}: median {v['median_fps']:.1f} fps; main pipeline / variant {v['median_main_over_variant']:.2f} "
              f"(checks {'PASS' if v['checks_ok'] else 'n/a' if v['checks_ok'] is None else 'FAIL'})")
    for key, ev in (doc.get("eval") or {}).items():
        print(f"eval {key}: " + ", ".join(f"{k} {v}" for k, v in ev.items() if k != "unchanged")
              + f" (README: {EVAL_REFERENCE[key]}; {'unchanged' if ev.get('unchanged') else 'CHANGED'})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("video", nargs="*", help="video file(s); camera i plays number i modulo their count "
                    "(default: FACEPRO_ASSETS/data/videos/vtest.avi)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="default: this checkout's configs/demo.yaml")
    ap.add_argument("--cameras", type=int, default=1, help="file cameras of the pipeline; the loop plays as many files in turn")
    ap.add_argument("--resize", metavar="WxH", help="play a copy resized to W x H pixels (MJPG AVI in a temp dir)")
    ap.add_argument("--max-frames", type=int, help="play a copy of each video's first N frames")
    ap.add_argument("--providers", type=lambda s: tuple(p for p in s.split(",") if p),
                    help="comma list of ONNX Runtime execution providers (runtime.providers and the loop's)")
    ap.add_argument("--processes", type=lambda s: tuple(int(x) for x in s.split(",")), metavar="D,R",
                    help="detection and recognition processes of the pipeline (default: the config's)")
    ap.add_argument("--ring-slots", type=int, help="ring slots per camera (default: the config's)")
    ap.add_argument("--baseline-events", type=int, default=27, help="vtest's person events before issue 12's work")
    ap.add_argument("--bound-calls", type=int, default=200, help="timed calls per model for the bound (the rest scaled)")
    ap.add_argument("--frames-budget-mb", type=int, default=2048, help="decoded frames kept for the bound, MiB")
    ap.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="LABEL:KEY=VALUE,...",
                    help="also run the pipeline with these config keys changed, every round (repeatable)")
    ap.add_argument("--eval", action="store_true", help="also run scripts/eval_faces.py and scripts/eval_reid.py")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the lines")
    args = ap.parse_args(argv)
    if args.cameras < 1 or args.rounds < 1 or (args.max_frames is not None and args.max_frames < 1):
        ap.error("--cameras, --rounds and --max-frames must be >= 1")
    if args.processes is not None and (len(args.processes) != 2 or min(args.processes) < 1):
        ap.error("--processes takes two counts >= 1: detection,recognition")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fpe2e-") as tmp:
        sources = prepare_sources(args, Path(tmp))
        tree = pipeline_tree(args, sources)
        cfg = parse_config(tree)
        models = BoundModels(cfg, cfg.runtime.providers)
        distinct = list(dict.fromkeys(s.path for s in sources))
        frames = decode_frames(distinct, args.frames_budget_mb * 2**20)
        rounds = []
        for i in range(args.rounds):
            rounds.append(one_round(args, sources, tree, models, frames))
            if not args.json:
                print_round(i + 1, rounds[-1])
    doc = {"videos": list(dict.fromkeys(s.video for s in sources)), "cameras": args.cameras, "resize": args.resize,
           "max_frames": args.max_frames, "providers": list(cfg.runtime.providers),
           "processes": [cfg.detection.processes, cfg.recognition.processes], "decoded_frames": len(frames),
           "rounds": rounds, **medians(rounds)}
    if args.eval:
        doc["eval"] = eval_headlines()
    if args.json:
        print(json.dumps(doc))
    else:
        print_summary(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
