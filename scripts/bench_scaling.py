#!/usr/bin/env python3
"""Benchmark: the demo video with 1 vs 2 motion/detection processes, same total thread budget.

The motion gate is off and face work is reduced to almost nothing
(``face.every_n_frames`` = 1000), so the detector is the bottleneck. Both
configurations run the real multi-process pipeline (``facepro run``) in the
same invocation, alternating, ``--repeats`` times each; frames/s is the number
of frames divided by the run's ``active_s`` (first captured frame → every
frame processed by recognition, from the run summary), so start-up time does
not dilute the ratio.

Thread budget: 1 process x ``cores`` ONNX Runtime threads vs 2 processes x
``cores/2`` threads (the recognition process gets 1 thread in both).

Usage: FACEPRO_ASSETS=../shared python scripts/bench_scaling.py [--repeats 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from benchlib import active_fps, assets_dir, pipeline_tree, run_pipeline


def config(assets: Path, processes: int, threads: int, video: str) -> dict:
    return pipeline_tree(
        assets, video,
        detection={"processes": processes, "threads": threads, "motion": {"enabled": False}},
        recognition={"processes": 1, "threads": 1, "face": {**pipeline_tree(assets)["recognition"]["face"], "every_n_frames": 1000}},
    )


def run_once(cfg: dict) -> float:
    """Run the pipeline on ``cfg``; returns detection frames/s over the active period."""
    return active_fps(run_pipeline(cfg))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=os.environ.get("FACEPRO_ASSETS"), help="folder with models/ and data/ (FACEPRO_ASSETS)")
    ap.add_argument("--video", default="vtest.avi")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    assets = assets_dir(args.assets)
    cores = os.cpu_count() or 1
    fps: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        fps[1].append(run_once(config(assets, 1, cores, args.video)))
        fps[2].append(run_once(config(assets, 2, max(1, cores // 2), args.video)))
    fps_1, fps_2 = statistics.median(fps[1]), statistics.median(fps[2])
    doc = {"fps_1": round(fps_1, 2), "fps_2": round(fps_2, 2), "ratio": round(fps_2 / fps_1, 3),
           "runs_1": [round(x, 2) for x in fps[1]], "runs_2": [round(x, 2) for x in fps[2]], "cores": cores}
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"cores: {cores}, video: {args.video}, repeats: {args.repeats} (median shown)")
        print(f"{'detection processes':<22}{'threads each':>14}{'frames/s':>10}")
        print(f"{1:<22}{cores:>14}{fps_1:>10.1f}")
        print(f"{2:<22}{max(1, cores // 2):>14}{fps_2:>10.1f}")
        print(f"ratio 2/1: {fps_2 / fps_1:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
