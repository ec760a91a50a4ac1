#!/usr/bin/env python3
"""Where a frame's time goes in each stage process: ``facepro run`` on a file under py-spy.

Starts the pipeline on VIDEO with the config's stages, attaches ``py-spy
record`` (a sampling profiler, https://github.com/benfred/py-spy; install it
with ``pip install -e '.[profile]'``) to every stage process once they run,
and when the run ends prints, per stage, the share of its busy samples (idle
waits are not sampled) spent in each function:

- *self*: the function on top of the stack (native code inside ONNX Runtime
  or OpenCV counts towards the Python call that entered it);
- *inclusive*: functions of FacePro's own packages (``pipeline/``, ``stages/``,
  ``storage/``) anywhere on the stack, so "tracking", "face analysis",
  "journal" read as totals.

py-spy needs ptrace rights on the stage processes (root, or
``kernel.yama.ptrace_scope=0``). Samples are taken at ``--rate`` Hz per
process; shares, not absolute times, are the result (a 2-core machine is
noisy).

Usage: ``FACEPRO_ASSETS=../shared python scripts/profile_run.py [VIDEO] [--config configs/demo.yaml] [--top 12] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chaoslib import STAGES, stage_pids, start_run, wait_for, write_config  # noqa: E402

OWN = ("pipeline/", "stages/", "storage/")


def parse_raw(text: str) -> tuple[Counter, Counter, int]:
    """py-spy ``--format raw`` (collapsed stacks: ``frame;frame;... count``, root first) → (self samples per
    function, inclusive samples per own function, total samples)."""
    own_self: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        own_self[_short(frames[-1])] += n
        for name in {_short(f) for f in frames if any(p in f for p in OWN)}:
            inclusive[name] += n
    return own_self, inclusive, total


def _short(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)``."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    return f"{func} ({'/'.join(parts[-2:]) if parts else path})"


def profile(tree: dict, rate: int, timeout_s: float) -> dict[str, tuple[Counter, Counter, int]]:
    """Run ``tree`` under py-spy; returns per stage (self, inclusive, total samples)."""
    d = Path(tempfile.mkdtemp(prefix="fpp-", dir="/tmp"))
    spies: dict[str, list[tuple[subprocess.Popen, Path]]] = {s: [] for s in STAGES}
    try:
        proc = start_run(write_config(tree, d), d)
        doc = wait_for(proc, d, lambda doc: all(stage_pids(doc, s) for s in STAGES), timeout_s=180, poll_s=0.1)
        if doc is None:
            raise SystemExit(f"the run ended before every stage had started; see {d / 'run.log'}")
        for stage in STAGES:
            for pid in stage_pids(doc, stage):
                out = d / f"{stage}-{pid}.txt"
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                                        "--output", str(out), "--nonblocking"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                spies[stage].append((spy, out))
        proc.wait(timeout=timeout_s)
        result = {}
        for stage, items in spies.items():
            own_self, inclusive, total = Counter(), Counter(), 0
            for spy, out in items:
                spy.wait(timeout=60)
                s, i, t = parse_raw(out.read_text() if out.exists() else "")
                own_self, inclusive, total = own_self + s, inclusive + i, total + t
            result[stage] = (own_self, inclusive, total)
        return result
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("video", nargs="?", default=None, help="default: FACEPRO_ASSETS/data/videos/vtest.avi")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--rate", type=int, default=100, help="samples per second per process")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--timeout-s", type=float, default=900)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: pip install -e '.[profile]'")
    assets = os.environ.get("FACEPRO_ASSETS")
    if args.video is None and not assets:
        raise SystemExit("set FACEPRO_ASSETS or name a video")
    video = Path(args.video or Path(assets) / "data" / "videos" / "vtest.avi").resolve()
    tree = yaml.safe_load(Path(args.config).read_text())
    tree["cameras"] = [{"name": "profile", "source": str(video), "mode": "file"}]
    tree.setdefault("runtime", {})["metrics_port"] = None
    tree = json.loads(os.path.expandvars(json.dumps(tree)))
    started = time.monotonic()
    result = profile(tree, args.rate, args.timeout_s)
    doc = {stage: {"samples": total,
                   "self": [[name, round(100 * n / total, 1)] for name, n in s.most_common(args.top)] if total else [],
                   "inclusive": [[name, round(100 * n / total, 1)] for name, n in i.most_common(args.top)] if total else []}
           for stage, (s, i, total) in result.items()}
    if args.json:
        print(json.dumps({"video": video.name, "wall_s": round(time.monotonic() - started, 1), "stages": doc}))
        return 0
    for stage, d in doc.items():
        print(f"\n== {stage}: {d['samples']} busy samples at {args.rate} Hz")
        for kind in ("self", "inclusive"):
            print(f"  {kind}:")
            for name, pct in d[kind]:
                print(f"    {pct:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
