#!/usr/bin/env python3
"""Chaos proof: crashes must change nothing in file mode.

Runs ``facepro run`` twice on the same file, each in its own temporary data dir
with the models of the base config (``configs/demo.yaml`` by default, which needs
``FACEPRO_ASSETS``):

1. a **clean** run (unpaced, the base config's heartbeat timeout);
2. a **chaos** run of the same file with the camera paced at ``--fps`` frames/s,
   ``--kills`` SIGKILLs of random processes spread over all four stages (victim
   pids from the run's ``status --json``, each stage's ``pids``), and one SIGSTOP
   of a random stage process held ``--stop-s`` s, longer than the chaos config's
   ``runtime.heartbeat_timeout_s`` (``--heartbeat-s``), then SIGCONT if it still exists.

The supervisor stops a stage restarted more than 5 times within 60 s, so a
stage is hit at most once every ``--stage-gap-s`` (13 s) and hits are about
``--gap-s`` (4 s) apart; the default pace makes the run last long enough for all
of them. Kills that did not fit before the file ended are simply not made
(the table shows the kills made).

Then it prints a table against the clean run (see ``scripts/chaoslib.py`` for
the exact definitions): kills per stage, frames out per stage, lost/extra
frames, loss drops, events clean vs chaos, duplicated, never closed and
unmatched events, leaked shared-memory segments, orphan worker processes and
both exit codes. ``--json`` prints the same as one JSON document.

A run still going at its deadline (``--timeout-s``) is hung: it is killed, reported as such, and what it
stored is compared all the same (its summary is missing, so its frame columns read 0).

Exit code 0 when every loss column is 0 (and the event counts are equal, and the
chaos run exited 0), else 1; 2 for a usage error.

Usage: FACEPRO_ASSETS=../shared python scripts/chaos.py VIDEO [--kills 20] [--stop-s S] [--seed K] [--fps F] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the pipeline and storage packages

import cv2  # noqa: E402
import yaml  # noqa: E402

from chaoslib import (STAGES, RunResult, compare_runs, finish_run, format_table, signal_pid, stage_doc,  # noqa: E402
                      stage_pids, start_run, status_doc, stop_for, wait_for, write_config)

WARMUP_S = 5.0  # pacing budget before the first hit, seconds
TAIL_S = 15.0  # pacing budget after the last hit, seconds


def file_tree(base: Path, video: Path, max_fps: float | None = None, heartbeat_s: float | None = None) -> dict:
    """The base config with one file camera on ``video`` (paced at ``max_fps`` frames/s) and no metrics port."""
    tree = yaml.safe_load(base.read_text()) or {}
    camera = {"name": "chaos", "source": str(video.resolve()), "mode": "file"}
    if max_fps:
        camera["max_fps"] = max_fps
    tree["cameras"] = [camera]
    runtime = tree.setdefault("runtime", {}) or {}
    runtime["metrics_port"] = None  # several runs (and other users) on one machine
    if heartbeat_s:
        runtime["heartbeat_timeout_s"] = heartbeat_s
    tree["runtime"] = runtime
    return tree


def frame_count(video: Path) -> int:
    """Frames in ``video`` as the container reports them."""
    cap = cv2.VideoCapture(str(video))
    try:
        return int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()


def default_fps(frames: int, kills: int, gap_s: float, stop_s: float) -> float:
    """A pace (frames/s) at which the file lasts for warm-up, ``kills`` hits ``gap_s`` s apart, the stop and a tail."""
    return round(max(1.0, frames / (WARMUP_S + (kills + 1) * gap_s + stop_s + TAIL_S)), 2)


class Monkey:
    """Hits random processes of a running pipeline: ``kills`` SIGKILLs and one SIGSTOP, spread over the stages.

    Timing (seconds): hits are ``gap_s`` × U(0.75, 1.25) apart; one stage is hit at most once per
    ``stage_gap_s``; the SIGSTOP is held ``stop_s`` and takes a random place among the kills.
    """

    def __init__(self, rng: random.Random, kills: int, stop_s: float, gap_s: float, stage_gap_s: float) -> None:
        self.rng, self.kills, self.stop_s, self.gap_s, self.stage_gap_s = rng, kills, stop_s, gap_s, stage_gap_s
        self.counts: dict[str, int] = {}
        self.log: list[str] = []
        self.run_id: str | None = None

    def _pick(self, doc: dict, last: dict[str, float]) -> tuple[str, int] | None:
        now = time.monotonic()
        ready = [s for s in STAGES if stage_pids(doc, s) and now - last.get(s, -1e9) >= self.stage_gap_s]
        if not ready:
            return None
        stage = self.rng.choice(ready)
        return stage, self.rng.choice(stage_pids(doc, stage))

    def _hit(self, stage: str, pid: int, stop: bool, t0: float) -> None:
        key = f"stop:{stage}" if stop else stage
        ok = stop_for(pid, self.stop_s) if stop else signal_pid(pid, signal.SIGKILL)
        if ok:
            self.counts[key] = self.counts.get(key, 0) + 1
        what = f"SIGSTOP {self.stop_s:.1f} s" if stop else "SIGKILL"
        self.log.append(f"{time.monotonic() - t0:7.1f} s  {what:<14} {stage}-pid {pid}{'' if ok else ' (already gone)'}")

    def run(self, proc, data_dir: Path) -> dict[str, int]:
        """Hit the run of ``proc`` in ``data_dir`` until every hit is made or the run ended; returns hits per stage."""
        doc = wait_for(proc, data_dir, lambda d: all(stage_pids(d, s) for s in STAGES)
                       and stage_doc(d, "recognition")["rate_fps"] > 0, timeout_s=180)
        if doc is None:
            self.log.append(f"no hit: the run ended (exit {proc.poll()}) before every stage was processing frames")
            return self.counts
        self.run_id = doc.get("run_id")
        t0, last = time.monotonic(), {}
        stop_at, made = self.rng.randint(0, self.kills), 0
        while made <= self.kills and proc.poll() is None:
            time.sleep(self.gap_s * self.rng.uniform(0.75, 1.25))
            doc = status_doc(data_dir)
            choice = self._pick(doc, last) if doc else None
            if choice is None:
                continue
            self._hit(*choice, stop=made == stop_at, t0=t0)
            last[choice[0]] = time.monotonic()
            made += 1
        return self.counts


def clean_run(tree: dict, timeout_s: float) -> RunResult:
    """Run ``tree`` once, undisturbed, in a fresh data dir."""
    with tempfile.TemporaryDirectory(prefix="fpx-", dir="/tmp") as d:
        data = Path(d)
        return finish_run(start_run(write_config(tree, data), data), data, tree, timeout_s=timeout_s)


def chaos_run(tree: dict, monkey: Monkey, timeout_s: float) -> RunResult:
    """Run ``tree`` in a fresh data dir while ``monkey`` hits its processes."""
    with tempfile.TemporaryDirectory(prefix="fpx-", dir="/tmp") as d:
        data = Path(d)
        proc = start_run(write_config(tree, data), data)
        try:
            kills = monkey.run(proc, data)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        result = finish_run(proc, data, tree, timeout_s=timeout_s, run_id=monkey.run_id)
        result.kills = kills
        return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("video", type=Path, help="video file (file mode: every frame must be processed exactly once)")
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs over all stages (default: %(default)s)")
    p.add_argument("--heartbeat-s", type=float, default=3.0, help="runtime.heartbeat_timeout_s of the chaos run, s (default: %(default)s)")
    p.add_argument("--stop-s", type=float, help="SIGSTOP held this long, s (default: heartbeat + 2)")
    p.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    p.add_argument("--fps", type=float, help="chaos run pace, frames/s (default: long enough for every hit)")
    p.add_argument("--gap-s", type=float, default=4.0, help="mean time between hits, s (default: %(default)s)")
    p.add_argument("--stage-gap-s", type=float, default=13.0, help="least time between hits of one stage, s (default: %(default)s)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml", help="base config (default: configs/demo.yaml)")
    p.add_argument("--timeout-s", type=float, help="a run still going after this long is hung: killed and reported, s "
                   "(default: 120 + frames / 5 for the clean run, 120 + 3 x frames / fps for the chaos run)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = p.parse_args(argv)
    if not args.video.is_file():
        p.error(f"{args.video}: no such video file")
    if not args.config.is_file():
        p.error(f"{args.config}: no such config")
    if "${FACEPRO_ASSETS}" in args.config.read_text() and not os.environ.get("FACEPRO_ASSETS"):
        p.error("set FACEPRO_ASSETS (the folder holding models/ and data/), e.g. FACEPRO_ASSETS=../shared")
    if args.kills < 0:
        p.error("--kills must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the clean and the chaos run, print the report; 0 when the crashes changed nothing."""
    args = parse_args(argv)
    stop_s = args.stop_s if args.stop_s is not None else args.heartbeat_s + 2.0
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    frames = frame_count(args.video)
    fps = args.fps or default_fps(frames, args.kills, args.gap_s, stop_s)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"chaos: {args.video.name}, {frames} frames; seed {seed}; chaos pace {fps} fps; {args.kills} kills + 1 stop of {stop_s} s "
        f"(heartbeat timeout {args.heartbeat_s} s)")
    started = time.monotonic()
    clean = clean_run(file_tree(args.config, args.video), args.timeout_s or 120 + frames / 5)  # the base heartbeat timeout
    say(f"chaos: clean run done in {time.monotonic() - started:.0f} s (exit {clean.exit_code}, {len(clean.events)} events)")
    monkey = Monkey(random.Random(seed), args.kills, stop_s, args.gap_s, args.stage_gap_s)
    chaos = chaos_run(file_tree(args.config, args.video, max_fps=fps, heartbeat_s=args.heartbeat_s), monkey,
                      args.timeout_s or 120 + 3 * frames / fps)
    report = compare_runs(clean, chaos)
    report.update(video=str(args.video), frames=frames, seed=seed, fps=fps, kills_requested=args.kills, stop_s=stop_s,
                  heartbeat_s=args.heartbeat_s, hits=monkey.log, chaos_output_tail=chaos.output[-2000:])
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(["hits:", *monkey.log, "", format_table(report)]))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
