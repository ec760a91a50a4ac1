#!/usr/bin/env python
"""Evaluate gait (Gait Energy Image) track matching on the asset videos.

Pipeline per video, as :class:`stages.recognition.GaitLinker` runs it:
YOLOX-Nano person detection (:class:`stages.detector.ObjectDetector`) →
ByteTrack (:class:`stages.tracking.CameraTracks`) → every frame feeds a MOG2
background model (:class:`stages.gait.CameraSilhouettes`, frames downscaled
to ``--width-px``), each active person track's silhouette is size-normalised
(:func:`stages.gait.normalise_silhouette`) → GEI (Han & Bhanu 2006, the mean
of a track's silhouettes) → :func:`stages.gait.gei_embedding` (or, with
``--model``, a GEI-input ONNX gait model, :class:`stages.gait.OnnxGaitEmbedder`),
compared by cosine similarity.

**Calibration** (label-free, on ``--calibration-video``, default ``vtest.avi``:
a campus path with several people in view at once). Tracks with at least
``2 * --min-frames`` usable silhouettes are cut into a first and a second
half, one GEI each:

- *genuine*: first half vs second half of the same track;
- *impostor*: whole-track GEIs of two tracks that share at least one frame
  (two people visible at once are different people);
- *rank-1*: each track's second half against the first halves of all tracks;
  correct when the most similar is its own (chance is 1 / tracks).

The threshold for ``--far`` (default 0.01) comes from
:func:`eval_faces.threshold_for_far`; it is printed next to the configured
``recognition.gait.link_threshold`` (``--threshold``, default from
:class:`pipeline.config.GaitConfig`).

**Test** (on ``--video``, default ``one-by-one-person-detection.mp4``: six
different people walk in one after another; frame ranges from the asset
README or ``--ranges``): whole-track GEIs are linked online in order of first
frame to earlier tracks that ended before they started, at the configured
threshold (:func:`eval_reid.link_online`); a link between tracks of two
different known people is a wrong link.

Printed: the silhouette counts (usable / rejected), the similarity tables,
rank-1, the calibrated threshold and the linking check.

Usage::

    FACEPRO_ASSETS=../shared python scripts/eval_gait.py [--json] [--threshold 0.986]

Exit status: 0 when the test video has no wrong link at the configured
threshold (or has no ground truth), 1 when it has, 2 on a usage or model
error. About a minute on 2 CPU cores (every frame of both videos).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval_faces import UsageError, assets_dir, describe, model_path, run_report, threshold_for_far
from eval_reid import (FPS_NS, ONE_BY_ONE, fmt_score, known_person, link_online, open_video, parse_ranges,
                       video_path)
from pipeline.config import GaitConfig, OnnxDetectorConfig, TrackingConfig
from stages.detector import ObjectDetector
from stages.gait import CameraSilhouettes, GaitEmbedder, GeiEmbedder, OnnxGaitEmbedder, normalise_silhouette
from stages.runtime import SessionOptions
from stages.tracking import CameraTracks


@dataclass
class GaitTrack:
    """One person track's normalised silhouettes.

    Attributes:
        track_id: per-video track id.
        frames: video frame indices where the track was matched to a detection.
        silhouettes: ``(GEI_HEIGHT, GEI_WIDTH) float32`` {0, 1} masks, in frame order.
        rejected: silhouettes that were empty or too small (not used).
    """

    track_id: int
    frames: list[int] = field(default_factory=list)
    silhouettes: list[np.ndarray] = field(default_factory=list)
    rejected: int = 0

    @property
    def first_frame(self) -> int:
        return self.frames[0]

    @property
    def last_frame(self) -> int:
        return self.frames[-1]

    def embedding(self, embedder: GaitEmbedder, part: slice = slice(None)) -> np.ndarray:
        """``(d,) float32`` unit embedding of the GEI of the silhouettes in ``part``."""
        return embedder.embed(np.mean(self.silhouettes[part], axis=0))

    def halves(self, embedder: GaitEmbedder) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of the GEIs of the first and the second half of the silhouettes."""
        mid = len(self.silhouettes) // 2
        return self.embedding(embedder, slice(0, mid)), self.embedding(embedder, slice(mid, None))


def run_video(path: Path, detector: ObjectDetector, width_px: int) -> tuple[dict[int, GaitTrack], int, float]:
    """Detect, track and collect silhouettes of every person track over every frame of ``path``.

    Returns:
        ``(tracks by id, frames processed, seconds)``.

    Raises:
        UsageError: the video is missing or cannot be decoded.
    """
    cap = open_video(path)
    tracker = CameraTracks("eval", TrackingConfig(), detector.class_names)
    background = CameraSilhouettes(width_px)
    tracks: dict[int, GaitTrack] = {}
    start, index = time.perf_counter(), 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            det = detector.detect(frame)
            tracker.update(index, index * FPS_NS, det)
            background.update(frame)
            for t in tracker.active():
                if t.label != "person":
                    continue
                rec = tracks.setdefault(t.track_id, GaitTrack(t.track_id))
                rec.frames.append(index)
                crop = background.silhouette(t.xyxy)
                norm = normalise_silhouette(crop) if crop is not None else None
                if norm is None:
                    rec.rejected += 1
                else:
                    rec.silhouettes.append(norm)
            index += 1
    finally:
        cap.release()
    tracker.finish()
    if index == 0:
        raise UsageError(f"no frame could be decoded from {path}")
    return tracks, index, time.perf_counter() - start


def usable(tracks: dict[int, GaitTrack], min_silhouettes: int) -> list[GaitTrack]:
    """Tracks with at least ``min_silhouettes`` usable silhouettes, in first-frame order."""
    return sorted((t for t in tracks.values() if len(t.silhouettes) >= min_silhouettes), key=lambda t: t.first_frame)


def calibration(tracks: list[GaitTrack], embedder: GaitEmbedder) -> dict:
    """Genuine (half vs half), impostor (co-visible tracks) scores and half-track rank-1 over ``tracks``."""
    halves = [t.halves(embedder) for t in tracks]
    genuine = np.array([float(a @ b) for a, b in halves])
    whole = [t.embedding(embedder) for t in tracks]
    frame_sets = [set(t.frames) for t in tracks]
    impostor = np.array([float(whole[i] @ whole[j]) for i in range(len(tracks)) for j in range(i + 1, len(tracks))
                         if frame_sets[i] & frame_sets[j]])
    different = np.array([float(halves[i][1] @ halves[j][0]) for i in range(len(tracks)) for j in range(len(tracks)) if i != j])
    firsts = np.stack([a for a, _ in halves]) if halves else np.zeros((0, 1), np.float32)
    rank1 = sum(1 for i, (_, second) in enumerate(halves) if int(np.argmax(firsts @ second)) == i)
    return {"genuine": genuine, "impostor": impostor, "different_halves": different, "rank1": rank1}


def evaluate(args: argparse.Namespace) -> dict:
    """Run calibration and test; returns the JSON-able report."""
    assets = assets_dir(args.assets)
    opts = SessionOptions(threads=args.threads)
    detector = ObjectDetector(OnnxDetectorConfig(path=model_path(assets, args.detector), layout="yolox"), opts)
    embedder: GaitEmbedder = OnnxGaitEmbedder(model_path(assets, args.model), opts) if args.model else GeiEmbedder()
    report: dict = {"detector": Path(args.detector).name, "gait_model": embedder.model_name, "width_px": args.width_px,
                    "min_frames": args.min_frames, "threshold": args.threshold, "target_far": args.far}

    cal_path = video_path(assets, args.calibration_video)
    tracks, frames, secs = run_video(cal_path, detector, args.width_px)
    used = usable(tracks, 2 * args.min_frames)
    if len(used) < 2:
        raise UsageError(f"calibration video {cal_path.name}: {len(used)} person tracks with >= {2 * args.min_frames} "
                         "silhouettes; use a longer video with several people, or a smaller --min-frames")
    cal = calibration(used, embedder)
    report["calibration"] = {
        "video": cal_path.name, "frames": frames, "seconds": secs, "person_tracks": len(tracks), "tracks_used": len(used),
        "silhouettes": sum(len(t.silhouettes) for t in tracks.values()),
        "silhouettes_rejected": sum(t.rejected for t in tracks.values()),
        "genuine_first_vs_second_half": describe(cal["genuine"]),
        "impostor_co_visible": describe(cal["impostor"]),
        "different_tracks_halves": describe(cal["different_halves"]),
        "rank1": cal["rank1"],
    }
    if cal["impostor"].size:
        thr = threshold_for_far(cal["genuine"], cal["impostor"], args.far)
        report["calibration"].update({"rule": thr.rule, "calibrated_threshold": thr.value, "tar": thr.tar, "far": thr.far})
        report["calibration"]["at_configured"] = {
            "tar": float(np.mean(cal["genuine"] >= args.threshold)), "far": float(np.mean(cal["impostor"] >= args.threshold))}

    path = video_path(assets, args.video)
    ranges = parse_ranges(args.ranges, path)
    tracks, frames, secs = run_video(path, detector, args.width_px)
    used = usable(tracks, args.min_frames)
    units = [(t.track_id, t.first_frame, t.last_frame, t.embedding(embedder)) for t in used]
    person, links = link_online(units, args.threshold)
    truth = {t.track_id: (known_person(t, ranges) if ranges else None) for t in used}  # type: ignore[arg-type]
    wrong = [{"track": u, "earlier": e, "similarity": s, "persons": [truth[u], truth[e]]} for u, (e, s) in links.items()
             if truth[u] is not None and truth[e] is not None and truth[u] != truth[e]]
    right = [u for u, (e, _) in links.items() if truth[u] is not None and truth[u] == truth[e]]
    report["test"] = {
        "video": path.name, "frames": frames, "seconds": secs, "person_tracks": len(tracks), "tracks_used": len(used),
        "known_ranges": [list(r) for r in ranges],
        "tracks": [{"track": t.track_id, "first_frame": t.first_frame, "last_frame": t.last_frame,
                    "silhouettes": len(t.silhouettes), "rejected": t.rejected, "known_person": truth[t.track_id],
                    "linked_to": links.get(t.track_id, (None, None))[0], "similarity": links.get(t.track_id, (None, None))[1]}
                   for t in used],
        "links": len(links), "right_links": len(right), "wrong_links": wrong,
        "distinct_persons": len(set(person.values())),
    }
    return report


def print_report(r: dict) -> None:
    c = r["calibration"]
    print(f"gait: {r['gait_model']} embeddings of GEIs of MOG2 silhouettes (frames downscaled to {r['width_px']} px wide), "
          f"detector {r['detector']}")
    print(f"\ncalibration on {c['video']}: {c['frames']} frames in {c['seconds']:.0f} s, {c['person_tracks']} person tracks, "
          f"{c['tracks_used']} with >= {2 * r['min_frames']} silhouettes; silhouettes used {c['silhouettes']}, "
          f"rejected (empty or too small) {c['silhouettes_rejected']}")
    print(f"{'scores (cosine)':<44}{'n':>6}{'min':>8}{'mean':>8}{'max':>8}")
    for key, label in (("genuine_first_vs_second_half", "genuine: first vs second half of a track"),
                       ("different_tracks_halves", "different tracks: second vs first halves"),
                       ("impostor_co_visible", "impostor: co-visible tracks (whole GEIs)")):
        s = c[key]
        print(f"{label:<44}{s['n']:>6}{fmt_score(s['min']):>8}{fmt_score(s['mean']):>8}{fmt_score(s['max']):>8}")
    print(f"rank-1 of second halves among first halves: {c['rank1']}/{c['tracks_used']} (chance 1/{c['tracks_used']})")
    if "calibrated_threshold" in c:
        a = c["at_configured"]
        print(f"threshold for FAR {r['target_far']:g}: {c['calibrated_threshold']:.3f} ({c['rule']}; TAR {c['tar']:.2f}); "
              f"at the configured {r['threshold']:.3f}: TAR {a['tar']:.2f}, FAR {a['far']:.2f}")
    t = r["test"]
    print(f"\ntest on {t['video']}: {t['frames']} frames in {t['seconds']:.0f} s, {t['person_tracks']} person tracks, "
          f"{t['tracks_used']} with >= {r['min_frames']} silhouettes, linked at {r['threshold']:.3f}")
    print(f"{'track':>5}{'frames':>12}{'silhouettes':>12}{'rejected':>9}{'person':>7}{'linked to':>10}{'similarity':>11}")
    for row in t["tracks"]:
        kp = "-" if row["known_person"] is None else f"P{row['known_person']}"
        print(f"{row['track']:>5}{row['first_frame']:>6}-{row['last_frame']:<5}{row['silhouettes']:>12}{row['rejected']:>9}{kp:>7}"
              f"{str(row['linked_to'] or '-'):>10}{fmt_score(row['similarity']):>11}")
    print(f"links {t['links']}: right {t['right_links']}, wrong {len(t['wrong_links'])}; "
          f"{t['tracks_used']} tracks -> {t['distinct_persons']} person ids")
    for w in t["wrong_links"]:
        print(f"  WRONG: track {w['track']} (P{w['persons'][0]}) linked to track {w['earlier']} (P{w['persons'][1]}) at {w['similarity']:.3f}")


def build_parser() -> argparse.ArgumentParser:
    default = GaitConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", help="assets folder with models/ and data/ (default: $FACEPRO_ASSETS)")
    p.add_argument("--video", default=ONE_BY_ONE, help="test video: file in <assets>/data/videos or a path (default %(default)s)")
    p.add_argument("--ranges", help="known people of the test video as frame ranges 'a-b,c-d,...' (default: the README's for one-by-one)")
    p.add_argument("--calibration-video", default="vtest.avi", help="video for the label-free calibration (default %(default)s)")
    p.add_argument("--threshold", type=float, default=default.link_threshold,
                   help="link threshold to test (default: recognition.gait.link_threshold, %(default)s)")
    p.add_argument("--far", type=float, default=0.01, help="target false link rate for the calibration (default %(default)s)")
    p.add_argument("--min-frames", type=int, default=default.min_frames,
                   help="silhouettes per GEI (default: recognition.gait.min_frames, %(default)s)")
    p.add_argument("--width-px", type=int, default=default.width_px,
                   help="background-subtraction width (default: recognition.gait.width_px, %(default)s)")
    p.add_argument("--model", help="GEI-input ONNX gait model (file in <assets>/models or a path); default: the classical GEI embedding")
    p.add_argument("--detector", default="yolox_nano.onnx", help="YOLOX person detector (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.min_frames < 2 or args.width_px < 64:
        print("eval_gait: error: --min-frames must be >= 2 and --width-px >= 64", file=sys.stderr)
        return 2
    report = run_report("eval_gait", evaluate, print_report, args)
    if report is None:
        return 2
    return 1 if report["test"]["wrong_links"] else 0


if __name__ == "__main__":
    sys.exit(main())
