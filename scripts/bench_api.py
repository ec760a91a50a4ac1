#!/usr/bin/env python3
"""The HTTP API under load, against the pipeline it serves: does the api slow capture?

Runs ``facepro run`` (api enabled, any free port) on one file camera (a copy of VIDEO repeated until it lasts
the whole benchmark, file mode: capture waits for the pipeline, so unpaced, frames/s is the pipeline's
throughput and any CPU the api and the clients take shows; with ``--max-fps`` below that throughput the
question is whether capture keeps its pace, as a live camera would), then, in the same run, phases of ``--seconds`` each:

- **baseline**: no client;
- **load**: ``--clients`` (50) clients polling ``GET /api/status`` (each every ``--interval`` s from a random
  start, like pages open in 50 browsers with their 1.5 s poll; 0: back to back) plus ``--viewers`` (3) MJPEG viewers of the camera's
  ``/api/cameras/{name}/stream.mjpeg`` (read as fast as it comes);

``--rounds`` times baseline then load, and a last baseline (a shared machine's load drifts: the load phases
are compared with the mean of all baselines, and each with the mean of the baselines around it).

Per phase: capture frames/s (the newest frame index in the camera's ring, read here as a checked reader,
at the start and end of the phase: exact), recognition frames/s (mean of the supervisor's ``rate_fps``
sampled every second over the control socket), the CPU % of the api process, of the supervisor (it answers
the api's status requests) and of this process (the clients), and the load average. For the load phase: ``/api/status``
latency p50 / p99 (ms, measured by the clients: request sent → JSON read), requests and errors, and the MJPEG
parts/s each viewer got. It prints the load phase's frames/s against the baselines' (issue 15's target: within
5 %). The clients run in this process (threads), on the same cores as the pipeline.

Usage: ``FACEPRO_ASSETS=../shared python scripts/bench_api.py [VIDEO] [--seconds 60] [--clients 50]
[--viewers 3] [--interval 1.0] [--rounds 1] [--max-fps F] [--est-fps 60] [--warmup 10] [--json]``
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import ROOT, assets_dir, child_env, pipeline_tree  # noqa: E402

from pipeline.api import ApiError, PipelineLink  # noqa: E402

CAMERA = "campus"


def long_clip(src: Path, dst: Path, frames: int) -> int:
    """Write ``src`` to ``dst`` (MJPG AVI) again and again until ``frames`` frames; returns the frames written."""
    cap = cv2.VideoCapture(str(src))
    fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    out, n = None, 0
    while n < frames:
        ok, frame = cap.read()
        if not ok:
            cap.release()
            cap = cv2.VideoCapture(str(src))
            ok, frame = cap.read()
            if not ok:
                raise SystemExit(f"cannot read a frame of {src}")
        if out is None:
            out = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"MJPG"), fps, (frame.shape[1], frame.shape[0]))
        out.write(frame)
        n += 1
    cap.release()
    out.release()
    return n


class Pipeline:
    """``facepro run`` of the benchmark's config in ``data``, and what the bench reads of it in-process."""

    def __init__(self, tree: dict, data: Path) -> None:
        cfg = data / "cfg.yaml"
        import yaml

        cfg.write_text(yaml.safe_dump(tree))
        self.data = data
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], cwd=ROOT,
                                     env=child_env(FACEPRO_DATA_DIR=str(data)), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.link = PipelineLink(data)

    def status(self) -> dict | None:
        if self.proc.poll() is not None:
            raise SystemExit(f"the pipeline exited ({self.proc.returncode}): {self.proc.stderr.read()[-2000:]}")
        try:
            reply = self.link.status()
        except ApiError:
            return None
        return {s.stage: s for s in reply.stages}

    def wait_api(self, timeout_s: float = 300) -> int:
        """The api's port once it accepts requests and every stage runs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self.status()
            api = st.get("api") if st else None
            if api is not None and dict(zip(api.count_names, api.counts)).get("ready") and \
                    all(s.state == "running" for s in st.values()):
                return int(dict(zip(api.count_names, api.counts))["port"])
            time.sleep(0.5)
        raise SystemExit("the api did not come up")

    def frame_index(self) -> int:
        latest, _ = self.link.latest(CAMERA, copy=False)
        return latest.frame_index if latest is not None else -1

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def measure(pipe: Pipeline, seconds: float, stop: threading.Event | None = None) -> dict:
    """One phase: capture frames/s from the ring's frame index, recognition and api means of 1 s samples, and
    the CPU % (100 = one core) of the supervisor and of this process (the clients)."""
    start, t0 = pipe.frame_index(), time.monotonic()
    sup0, me0 = _cpu_s(pipe.proc.pid), _cpu_s(os.getpid())
    rec, cpu = [], []
    while time.monotonic() - t0 < seconds:
        time.sleep(1.0)
        st = pipe.status()
        if st:
            rec.append(st["recognition"].rate_fps)
            cpu.append(st["api"].cpu_percent)
    end, dt = pipe.frame_index(), time.monotonic() - t0
    sup, me = _cpu_s(pipe.proc.pid) - sup0, _cpu_s(os.getpid()) - me0
    if stop is not None:
        stop.set()
    return {"capture_fps": (end - start) / dt, "recognition_fps": statistics.fmean(rec) if rec else 0.0,
            "api_cpu_percent": statistics.fmean(cpu) if cpu else 0.0, "supervisor_cpu_percent": 100 * sup / dt,
            "clients_cpu_percent": 100 * me / dt, "seconds": dt, "frames": end - start, "load_average": os.getloadavg()[0]}


def poller(port: int, interval: float, stop: threading.Event, lat: list[float], errors: list[str]) -> None:
    """One client: ``GET /api/status`` on a kept-alive connection every ``interval`` s until ``stop``, starting
    at a random point of the first interval (independent browsers do not poll in step)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    stop.wait(random.uniform(0.0, interval))
    while not stop.is_set():
        t = time.perf_counter()
        try:
            conn.request("GET", "/api/status")
            res = conn.getresponse()
            body = res.read()
            if res.status != 200:
                errors.append(f"{res.status} {body[:80]!r}")
            else:
                json.loads(body)
                lat.append((time.perf_counter() - t) * 1000.0)
        except (OSError, http.client.HTTPException, ValueError) as err:
            errors.append(f"{type(err).__name__}: {err}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        if interval:
            stop.wait(max(0.0, interval - (time.perf_counter() - t)))
    conn.close()


def viewer(port: int, stop: threading.Event, parts: list[int], index: int, errors: list[str]) -> None:
    """One MJPEG viewer: reads the camera's stream (parts counted) until ``stop``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", f"/api/cameras/{CAMERA}/stream.mjpeg")
        res = conn.getresponse()
        if res.status != 200:
            errors.append(f"stream {res.status}")
            return
        while not stop.is_set():
            line = res.fp.readline()
            if not line:
                break
            if line.startswith(b"Content-Length: "):
                parts[index] += 1
    except (OSError, http.client.HTTPException) as err:
        errors.append(f"stream {type(err).__name__}: {err}")
    finally:
        conn.close()


def load_phase(pipe: Pipeline, port: int, args: argparse.Namespace) -> dict:
    stop = threading.Event()
    lat: list[float] = []
    errors: list[str] = []
    parts = [0] * args.viewers
    threads = [threading.Thread(target=poller, args=(port, args.interval, stop, lat, errors), daemon=True)
               for _ in range(args.clients)]
    threads += [threading.Thread(target=viewer, args=(port, stop, parts, i, errors), daemon=True) for i in range(args.viewers)]
    for t in threads:
        t.start()
    res = measure(pipe, args.seconds, stop)
    for t in threads:
        t.join(timeout=5)
    lat.sort()
    res.update(requests=len(lat), errors=len(errors), first_errors=errors[:3],
               p50_ms=lat[len(lat) // 2] if lat else math.nan,
               p99_ms=lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)] if lat else math.nan,
               mjpeg_parts_per_s=[round(p / res["seconds"], 2) for p in parts])
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("video", nargs="?", default="vtest.avi", help="a video of the assets (data/videos)")
    ap.add_argument("--assets", help="default: FACEPRO_ASSETS")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each phase, s")
    ap.add_argument("--clients", type=int, default=50, help="clients polling /api/status")
    ap.add_argument("--viewers", type=int, default=3, help="MJPEG viewers")
    ap.add_argument("--interval", type=float, default=1.0, help="each client's poll period, s (0: back to back)")
    ap.add_argument("--rounds", type=int, default=1, help="baseline + load pairs (then a last baseline)")
    ap.add_argument("--warmup", type=float, default=10.0, help="wait after the api is up before measuring, s")
    ap.add_argument("--max-fps", type=float, help="pace the camera at this many frames/s (default: unpaced, the "
                    "pipeline's throughput; paced below it, the question is whether capture keeps its pace)")
    ap.add_argument("--est-fps", type=float, default=60.0, help="frames/s the clip is sized for (longer is safe)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    assets = assets_dir(args.assets)
    with tempfile.TemporaryDirectory(prefix="fpa-", dir="/tmp") as d:
        data = Path(d)
        frames = long_clip(assets / "data" / "videos" / args.video, data / "clip.avi",
                           int(min(args.est_fps, args.max_fps or args.est_fps)
                               * (args.warmup + (2 * args.rounds + 1) * args.seconds + 60)))
        tree = pipeline_tree(assets)
        tree["cameras"][0]["source"] = str(data / "clip.avi")
        if args.max_fps:
            tree["cameras"][0]["max_fps"] = args.max_fps
        tree["api"] = {"enabled": True, "port": 0}
        tree["runtime"]["stats_interval_s"] = 0.5
        pipe = Pipeline(tree, data)
        try:
            port = pipe.wait_api()
            time.sleep(args.warmup)
            phases = []
            for _ in range(args.rounds):
                phases += [("baseline", measure(pipe, args.seconds)), ("load", load_phase(pipe, port, args))]
            phases.append(("baseline", measure(pipe, args.seconds)))
            if pipe.frame_index() >= frames - 1:
                raise SystemExit(f"the clip ({frames} frames) ended during the benchmark; raise --est-fps")
        finally:
            pipe.stop()
    report(args, frames, phases)
    return 0


def _mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows) if rows else math.nan


def report(args: argparse.Namespace, frames: int, phases: list[tuple[str, dict]]) -> None:
    keys = ("capture_fps", "recognition_fps")
    bases = [p for n, p in phases if n == "baseline"]
    loads = [p for n, p in phases if n == "load"]
    ratio = {k: _mean(loads, k) / _mean(bases, k) for k in keys}
    paired = [{k: p[k] / ((phases[i - 1][1][k] + phases[i + 1][1][k]) / 2) for k in keys}
              for i, (n, p) in enumerate(phases) if n == "load"]
    lat = {"requests": sum(p["requests"] for p in loads), "errors": sum(p["errors"] for p in loads),
           "p50_ms": statistics.median(p["p50_ms"] for p in loads), "p99_ms": max(p["p99_ms"] for p in loads)}
    doc = {"video": args.video, "clip_frames": frames, "max_fps": args.max_fps, "seconds": args.seconds, "clients": args.clients,
           "viewers": args.viewers, "interval_s": args.interval, "rounds": args.rounds,
           "phases": [{"phase": n, **p} for n, p in phases], "ratio": ratio, "paired_ratios": paired, "status": lat,
           "within_5_percent": all(r >= 0.95 for r in ratio.values())}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    pace = f"paced at {args.max_fps:g} frames/s" if args.max_fps else "unpaced"
    print(f"bench_api: {args.video} repeated to {frames} frames, file mode, {pace}; {args.clients} clients polling /api/status "
          f"every {args.interval:g} s + {args.viewers} MJPEG viewers; {args.rounds} round(s) of {args.seconds:g} s phases")
    print(f"{'phase':10}{'capture fps':>13}{'recognition fps':>17}{'api CPU %':>11}{'supervisor %':>14}"
          f"{'clients %':>11}{'load avg':>10}")
    for name, p in phases:
        print(f"{name:10}{p['capture_fps']:13.2f}{p['recognition_fps']:17.2f}{p['api_cpu_percent']:11.1f}"
              f"{p['supervisor_cpu_percent']:14.1f}{p['clients_cpu_percent']:11.1f}{p['load_average']:10.2f}")
    print(f"/api/status under load: {lat['requests']} answers, p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, "
          f"{lat['errors']} errors {loads[0]['first_errors'] or ''}")
    print("MJPEG parts/s per viewer: " + "; ".join(", ".join(f"{v:.2f}" for v in p["mjpeg_parts_per_s"]) for p in loads))
    each = ", ".join(f"{r['capture_fps']:.3f}x" for r in paired)
    print(f"load vs no clients: capture {ratio['capture_fps']:.3f}x, recognition {ratio['recognition_fps']:.3f}x "
          f"(each load phase against the baselines around it: capture {each}); target >= 0.95: "
          f"{'met' if doc['within_5_percent'] else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
