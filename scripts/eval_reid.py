#!/usr/bin/env python
"""Evaluate person Re-ID track linking (OSNet) on the asset videos.

Pipeline per video: YOLOX-Nano person detection (:class:`stages.detector.ObjectDetector`)
→ ByteTrack tracking (:class:`stages.tracking.CameraTracks`) → OSNet
embeddings (:class:`stages.reid.ReidEmbedder`, Zhou et al. 2019) of every
active person track, sampled every ``--sample-every`` video frames, less often
once the track has ``--settle-samples`` samples, as the recognition stage does
(:class:`stages.reid.TrackReid`); a track's Re-ID descriptor is the
normalised mean of its samples.

**Calibration** (label-free, on ``--calibration-video``, default ``vtest.avi``,
a campus path where several people are visible at once):

- *genuine* scores: for each track with at least ``3 * --min-samples``
  samples, the cosine similarity between the mean of its first third and the
  mean of its last third of samples (the same person, before and after a
  gap, as two fragments of an interrupted track would be);
- *impostor* scores: the cosine similarity of the means of two tracks that
  are both matched to a detection in at least one common frame (two people
  visible at once are different people).

The link threshold is picked with :func:`eval_faces.threshold_for_far` at
``--far`` (default 0.001): the midpoint of the gap if the two sets separate,
else just above the impostor score at the ``1 - far`` quantile (with fewer
than ``1/far`` impostor pairs: above the highest one). ``--threshold`` skips
the calibration.

**Test** (on ``--video``, default ``one-by-one-person-detection.mp4``: six
different people walk in one after another): tracks are linked online in
order of their first frame, each to the earlier tracks that ended before it
started (:func:`stages.reid.link_tracks`); a linked track takes over the
person id of the earlier track. Each track is assigned to the known
person (frame range from the asset README, or ``--ranges``) it overlaps
most. The check: no track is linked to a track of a different known person,
and the six people stay six distinct person ids. As a positive control the
same linking runs on *fragments*: every track is cut into its first and last
third of samples, and each last third should link back to its own first
third.

Printed: per-track table, same-track similarity (sample pairs within a
track: mean/min) vs different-track similarity (between track means:
mean/max), the calibration, the linking result and the check.

Usage::

    FACEPRO_ASSETS=../shared python scripts/eval_reid.py [--json] [--stride 2] [--threshold 0.9]

Exit status: 0 when the check passes (or there is no ground truth), 1 when it
fails, 2 on a usage or model error. Runs in about 1.5 minutes on 2 CPU cores
(every frame of both videos).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from eval_faces import UsageError, assets_dir, describe, model_path, run_report, threshold_for_far
from pipeline.config import OnnxDetectorConfig, OnnxReidConfig, TrackingConfig
from stages.detector import ObjectDetector
from stages.reid import ReidEmbedder, TrackReid, link_tracks, similarity_matrix
from stages.runtime import SessionOptions, for_model
from stages.tracking import CameraTracks

#: The six people of one-by-one-person-detection.mp4, video frames (asset README; approximate).
ONE_BY_ONE_RANGES: tuple[tuple[int, int], ...] = ((75, 190), (250, 440), (525, 690), (750, 860), (925, 1190), (1250, 1360))
ONE_BY_ONE = "one-by-one-person-detection.mp4"
FPS_NS = 100_000_000  # both asset videos are 10 fps; capture times are synthetic


@dataclass
class TrackRecord:
    """One person track of a video.

    Attributes:
        track_id: per-video track id (from :class:`CameraTracks`).
        frames: video frame indices where the track was matched to a detection.
        samples: ``(k, d) float32`` unit OSNet embeddings, in frame order.
        sample_frames: video frame index of each sample.
    """

    track_id: int
    frames: list[int] = field(default_factory=list)
    samples: np.ndarray | None = None
    sample_frames: list[int] = field(default_factory=list)

    @property
    def first_frame(self) -> int:
        return self.frames[0]

    @property
    def last_frame(self) -> int:
        return self.frames[-1]

    @property
    def n_samples(self) -> int:
        return 0 if self.samples is None else int(self.samples.shape[0])

    def mean(self, part: slice = slice(None)) -> np.ndarray:
        m = self.samples[part].mean(axis=0)
        return (m / max(float(np.linalg.norm(m)), 1e-12)).astype(np.float32)


def open_video(path: Path) -> cv2.VideoCapture:
    """An opened capture of ``path``.

    Raises:
        UsageError: the file is missing or OpenCV cannot open it.
    """
    if not path.is_file():
        raise UsageError(f"video {path} does not exist")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise UsageError(f"cannot open video {path}")
    return cap


def run_video(
    path: Path, detector: ObjectDetector, embedder: ReidEmbedder, args: argparse.Namespace
) -> tuple[dict[int, TrackRecord], int, float]:
    """Detect, track and sample Re-ID embeddings over one video.

    Every ``args.stride``-th frame is processed; the tracker sees them as
    consecutive frames (its lost-track buffer counts processed frames).

    Returns:
        ``(tracks by id, frames processed, seconds)``.

    Raises:
        UsageError: the video is missing or cannot be decoded.
    """
    cap = open_video(path)
    tracker = CameraTracks("eval", TrackingConfig(), detector.class_names)
    reid = TrackReid(every_n_frames=args.sample_every, max_samples=100_000, settle_samples=args.settle_samples or None,
                     max_interval=args.max_interval)
    records: dict[int, TrackRecord] = {}
    start, index, processed = time.perf_counter(), -1, 0
    try:
        while args.max_frames is None or index + 1 < args.max_frames:
            index += 1
            if index % args.stride:
                if not cap.grab():
                    break
                continue
            ok, frame = cap.read()
            if not ok:
                break
            det = detector.detect(frame)
            tracker.update(processed, processed * FPS_NS, det)
            processed += 1
            due = []
            for t in tracker.active():
                records.setdefault(t.track_id, TrackRecord(t.track_id)).frames.append(index)
                if t.xyxy[3] - t.xyxy[1] >= args.min_height and reid.due(t.track_id, index):
                    due.append(t)
            if due:
                emb = embedder.embed(frame, np.stack([t.xyxy for t in due]))
                for t, e in zip(due, emb):
                    reid.add(t.track_id, e, index)
                    records[t.track_id].sample_frames.append(index)
    finally:
        cap.release()
    tracker.finish()
    if processed == 0:
        raise UsageError(f"no frame could be decoded from {path}")
    for tid in reid.track_ids:
        records[tid].samples = reid.samples(tid)
    return records, processed, time.perf_counter() - start


def usable(tracks: dict[int, TrackRecord], min_samples: int) -> list[TrackRecord]:
    """Tracks with at least ``min_samples`` Re-ID samples, in first-frame order."""
    return sorted((t for t in tracks.values() if t.n_samples >= min_samples), key=lambda t: t.first_frame)


def thirds(t: TrackRecord) -> tuple[slice, slice]:
    """Sample slices of a track's first and last third."""
    k = t.n_samples // 3
    return slice(0, k), slice(t.n_samples - k, t.n_samples)


def similarity_stats(tracks: list[TrackRecord]) -> dict:
    """Same-track (sample pairs within a track) and different-track (track means) cosine similarities."""
    within = []
    per_track = {}
    for t in tracks:
        s = t.samples @ t.samples.T
        pairs = s[np.triu_indices(t.n_samples, 1)]
        within.append(pairs)
        per_track[t.track_id] = describe(pairs)
    means = {t.track_id: t.mean() for t in tracks}
    sims = similarity_matrix(means, means)
    between = sims[np.triu_indices(len(tracks), 1)] if len(tracks) > 1 else np.zeros(0)
    return {
        "same_track_pairs": describe(np.concatenate(within) if within else np.zeros(0)),
        "different_track_means": describe(between),
        "per_track": per_track,
        "matrix": sims,
    }


def calibration_scores(tracks: list[TrackRecord], min_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Label-free genuine (first vs last third of a track) and impostor (co-visible tracks) scores."""
    genuine = []
    for t in tracks:
        if t.n_samples >= 3 * min_samples:
            first, last = thirds(t)
            genuine.append(float(t.mean(first) @ t.mean(last)))
    impostor = []
    frame_sets = [set(t.frames) for t in tracks]
    for i in range(len(tracks)):
        for j in range(i + 1, len(tracks)):
            if frame_sets[i] & frame_sets[j]:
                impostor.append(float(tracks[i].mean() @ tracks[j].mean()))
    return np.array(genuine), np.array(impostor)


def known_person(t: TrackRecord, ranges: tuple[tuple[int, int], ...]) -> int | None:
    """Index of the known frame range the track overlaps most (frames inside it), None if none."""
    frames = np.array(t.frames)
    overlap = [int(np.sum((frames >= a) & (frames <= b))) for a, b in ranges]
    return int(np.argmax(overlap)) if overlap and max(overlap) > 0 else None


def link_online(units: list[tuple[int, int, int, np.ndarray]], threshold: float) -> tuple[dict[int, int], dict[int, tuple[int, float]]]:
    """Link tracks in order of first frame to earlier tracks that ended before they started.

    Args:
        units: ``(id, first_frame, last_frame, (d,) mean)`` per track (or fragment).
        threshold: cosine similarity needed to link.

    Returns:
        ``(person id of each unit, {unit id: (earlier unit id, similarity)} for linked units)``;
        an unlinked unit starts a new person id (its own id).
    """
    person: dict[int, int] = {}
    links: dict[int, tuple[int, float]] = {}
    for uid, first, _, mean in sorted(units, key=lambda u: (u[1], u[0])):
        earlier = {u: m for u, f, last, m in units if u in person and last < first}
        link = link_tracks({uid: mean}, earlier, threshold).get(uid)
        if link is None:
            person[uid] = uid
        else:
            person[uid] = person[link.earlier_id]
            links[uid] = (link.earlier_id, link.similarity)
    return person, links


def linking_check(units: list[tuple[int, int, int, np.ndarray]], truth: dict[int, int | None], threshold: float, n_people: int) -> dict:
    """Link ``units`` online and compare with the known person of each unit."""
    person, links = link_online(units, threshold)
    wrong = [
        {"unit": u, "earlier": e, "similarity": s, "persons": [truth[u], truth[e]]}
        for u, (e, s) in links.items()
        if truth[u] is not None and truth[e] is not None and truth[u] != truth[e]
    ]
    ids_per_known = {k: sorted({person[u] for u in person if truth[u] == k}) for k in range(n_people)}
    seen = [k for k, ids in ids_per_known.items() if ids]
    distinct = len({person[u] for u in person if truth[u] is not None})
    same_missed = [
        u for u in person if truth[u] is not None and u not in links and any(truth[v] == truth[u] and v < u for v in person)
    ]
    return {
        "links": {str(u): {"earlier": e, "similarity": s} for u, (e, s) in links.items()},
        "person_of": {str(u): p for u, p in person.items()},
        "wrong_links": wrong,
        "known_people_seen": len(seen),
        "distinct_person_ids": distinct,
        "person_ids_per_known_person": {str(k): v for k, v in ids_per_known.items()},
        "same_person_units_not_linked": same_missed,
        "ok": not wrong and distinct >= len(seen) and all(len(set(ids_per_known[k]) & set(ids_per_known[j])) == 0 for k in seen for j in seen if k < j),
    }


def parse_ranges(text: str | None, video: Path) -> tuple[tuple[int, int], ...]:
    if text:
        try:
            return tuple(tuple(int(v) for v in part.split("-")) for part in text.split(","))  # type: ignore[misc]
        except ValueError:
            raise UsageError(f"--ranges: expected 'a-b,c-d,...' frame ranges, got {text!r}") from None
    return ONE_BY_ONE_RANGES if video.name == ONE_BY_ONE else ()


def video_path(assets: Path, name: str) -> Path:
    p = Path(name).expanduser()
    return p if p.is_file() or p.parent != Path(".") else assets / "data" / "videos" / name


def evaluate(args: argparse.Namespace) -> dict:
    """Run calibration and test; returns the JSON-able report."""
    assets = assets_dir(args.assets)
    opts = SessionOptions(threads=args.threads)
    detector = ObjectDetector(OnnxDetectorConfig(path=model_path(assets, args.detector), layout="yolox"), opts)
    embedder = ReidEmbedder(model_path(assets, args.reid_model),
                            for_model(opts, None, OnnxReidConfig.model_fields["graph_optimization"].default))  # as the pipeline
    report: dict = {"detector": Path(args.detector).name, "reid_model": embedder.model_name, "stride": args.stride,
                    "sample_every": args.sample_every, "min_samples": args.min_samples, "target_far": args.far}

    if args.threshold is not None:
        threshold = args.threshold
        report["calibration"] = {"rule": "given (--threshold)", "threshold": threshold}
    else:
        cal_path = video_path(assets, args.calibration_video)
        cal_tracks, cal_frames, cal_s = run_video(cal_path, detector, embedder, args)
        cal_usable = usable(cal_tracks, args.min_samples)
        genuine, impostor = calibration_scores(cal_usable, args.min_samples)
        if genuine.size == 0 or impostor.size == 0:
            raise UsageError(f"calibration video {cal_path.name}: {genuine.size} genuine and {impostor.size} impostor scores; "
                             "use a video with several people visible at once, or pass --threshold")
        thr = threshold_for_far(genuine, impostor, args.far)
        threshold = thr.value
        report["calibration"] = {
            "video": cal_path.name, "frames": cal_frames, "seconds": cal_s, "tracks": len(cal_tracks),
            "tracks_used": len(cal_usable), "genuine_first_vs_last_third": describe(genuine),
            "impostor_co_visible": describe(impostor), "rule": thr.rule, "threshold": threshold,
            "tar": thr.tar, "far": thr.far, "min_measurable_far": thr.min_measurable_far,
        }
    report["threshold"] = threshold

    path = video_path(assets, args.video)
    ranges = parse_ranges(args.ranges, path)
    tracks, frames, secs = run_video(path, detector, embedder, args)
    used = usable(tracks, args.min_samples)
    stats = similarity_stats(used)
    truth = {t.track_id: (known_person(t, ranges) if ranges else None) for t in used}
    units = [(t.track_id, t.first_frame, t.last_frame, t.mean()) for t in used]
    person, links = link_online(units, threshold)
    means = {t.track_id: t.mean() for t in used}
    table = []
    for i, t in enumerate(used):
        others = [(float(stats["matrix"][i, j]), used[j].track_id) for j in range(len(used)) if j != i]
        best = max(others) if others else (float("nan"), None)
        table.append({
            "track": t.track_id, "first_frame": t.first_frame, "last_frame": t.last_frame, "samples": t.n_samples,
            "known_person": truth[t.track_id], "same_track": stats["per_track"][t.track_id],
            "most_similar_track": best[1], "most_similar": best[0],
            "linked_to": links.get(t.track_id, (None,))[0], "person_id": person[t.track_id],
        })
    report["test"] = {
        "video": path.name, "frames": frames, "seconds": secs, "person_tracks": len(tracks), "tracks_used": len(used),
        "short_tracks": [{"track": t.track_id, "first_frame": t.first_frame, "last_frame": t.last_frame, "samples": t.n_samples}
                         for t in sorted(tracks.values(), key=lambda t: t.first_frame) if t.n_samples < args.min_samples],
        "known_ranges": [list(r) for r in ranges],
        "same_track_pairs": stats["same_track_pairs"], "different_track_means": stats["different_track_means"],
        "tracks": table,
        "distinct_persons": len(set(person.values())),
    }
    if ranges:
        # different-person vs same-person similarities by ground truth, for information (not used to choose the threshold)
        diff = [float(means[a.track_id] @ means[b.track_id]) for i, a in enumerate(used) for b in used[i + 1:]
                if truth[a.track_id] is not None and truth[b.track_id] is not None and truth[a.track_id] != truth[b.track_id]]
        report["test"]["different_person_means"] = describe(np.array(diff))
        report["test"]["check"] = linking_check(units, truth, threshold, len(ranges))
        frag_units, frag_truth, frag_sims = [], {}, []
        for t in used:
            if t.n_samples < 3 * args.min_samples:
                continue
            first, last = thirds(t)
            a, b = 2 * t.track_id, 2 * t.track_id + 1  # fragment ids
            frag_units += [(a, t.sample_frames[first.start], t.sample_frames[first.stop - 1], t.mean(first)),
                           (b, t.sample_frames[last.start], t.sample_frames[last.stop - 1], t.mean(last))]
            frag_truth[a] = frag_truth[b] = truth[t.track_id]
            frag_sims.append(float(t.mean(first) @ t.mean(last)))
        frag = linking_check(frag_units, frag_truth, threshold, len(ranges))
        own = sum(1 for u, l in frag["links"].items() if int(u) % 2 == 1 and l["earlier"] == int(u) - 1)
        frag.update({"fragments": len(frag_units), "last_third_linked_to_own_first": own, "tracks_split": len(frag_units) // 2,
                     "same_person_fragment_similarity": describe(np.array(frag_sims))})
        report["test"]["fragments"] = frag
        report["oracle_threshold_interval"] = [report["test"]["different_person_means"]["max"],
                                               report["test"]["fragments"]["same_person_fragment_similarity"]["min"]]
    return report


def fmt_score(v: float | None, fmt: str = ".3f") -> str:
    """``v`` formatted with ``fmt``, or ``-`` for None/NaN."""
    return "-" if v is None or v != v else format(v, fmt)


def print_report(r: dict) -> None:
    print(f"models: detector {r['detector']}, Re-ID {r['reid_model']}; every {r['stride']} frame(s), "
          f"a Re-ID sample every {r['sample_every']} frames, tracks need >= {r['min_samples']} samples")
    c = r["calibration"]
    if "video" in c:
        print(f"\ncalibration on {c['video']}: {c['frames']} frames in {c['seconds']:.0f} s, {c['tracks']} person tracks, {c['tracks_used']} used")
        print(f"{'scores (cosine)':<40}{'n':>6}{'min':>8}{'mean':>8}{'max':>8}")
        for key, label in (("genuine_first_vs_last_third", "genuine: first vs last third of a track"),
                           ("impostor_co_visible", "impostor: co-visible tracks")):
            s = c[key]
            print(f"{label:<40}{s['n']:>6}{fmt_score(s['min']):>8}{fmt_score(s['mean']):>8}{fmt_score(s['max']):>8}")
        rule = "midpoint of the gap" if c["rule"] == "midpoint" else "just above the impostor 1-FAR quantile (scores overlap)"
        print(f"threshold {c['threshold']:.3f} for target FAR {r['target_far']:g} ({rule}); "
              f"on the calibration set TAR {c['tar']:.3f}, FAR {c['far']:.3f} (smallest measurable FAR {c['min_measurable_far']:.4f})")
    else:
        print(f"\nthreshold {c['threshold']:.3f} ({c['rule']})")
    t = r["test"]
    print(f"\ntest on {t['video']}: {t['frames']} frames in {t['seconds']:.0f} s, {t['person_tracks']} person tracks, "
          f"{t['tracks_used']} with enough samples")
    if t["known_ranges"]:
        print("known people (frame ranges): " + ", ".join(f"P{i}={a}-{b}" for i, (a, b) in enumerate(t["known_ranges"])))
    print(f"{'track':>5}{'frames':>12}{'samples':>8}{'person':>7}{'same-track mean/min':>21}{'most similar':>14}{'linked to':>10}{'person id':>10}")
    for row in t["tracks"]:
        kp = "-" if row["known_person"] is None else f"P{row['known_person']}"
        st = row["same_track"]
        best = f"{row['most_similar_track']}:{fmt_score(row['most_similar'], '.2f')}" if row["most_similar_track"] is not None else "-"
        print(f"{row['track']:>5}{row['first_frame']:>6}-{row['last_frame']:<5}{row['samples']:>8}{kp:>7}"
              f"{fmt_score(st['mean']):>13}/{fmt_score(st['min']):<7}{best:>14}{str(row['linked_to'] or '-'):>10}{row['person_id']:>10}")
    for s in t["short_tracks"]:
        print(f"  (track {s['track']}, frames {s['first_frame']}-{s['last_frame']}: {s['samples']} samples, not used)")
    print(f"\n{'similarity (cosine)':<44}{'n':>6}{'min':>8}{'mean':>8}{'max':>8}")
    rows = [("same track: sample pairs", t["same_track_pairs"]), ("different tracks: track means", t["different_track_means"])]
    if "different_person_means" in t:
        rows.append(("different known people: track means", t["different_person_means"]))
        rows.append(("same track: first vs last third means", t["fragments"]["same_person_fragment_similarity"]))
    for label, s in rows:
        print(f"{label:<44}{s['n']:>6}{fmt_score(s['min']):>8}{fmt_score(s['mean']):>8}{fmt_score(s['max']):>8}")
    print(f"\nlinking at threshold {r['threshold']:.3f}: {t['tracks_used']} tracks -> {t['distinct_persons']} person ids")
    if "check" in t:
        ch, fr = t["check"], t["fragments"]
        print(f"  known people seen {ch['known_people_seen']}, distinct person ids among them {ch['distinct_person_ids']}, "
              f"wrong links (different people) {len(ch['wrong_links'])}")
        for w in ch["wrong_links"]:
            print(f"  WRONG: track {w['unit']} (P{w['persons'][0]}) linked to track {w['earlier']} (P{w['persons'][1]}) at {w['similarity']:.3f}")
        print(f"  fragments (first/last third of each track): {fr['last_third_linked_to_own_first']}/{fr['tracks_split']} last thirds "
              f"linked to their own first third, wrong links {len(fr['wrong_links'])}")
        lo, hi = r["oracle_threshold_interval"]
        print(f"  (by ground truth, thresholds in ({fmt_score(lo)}, {fmt_score(hi)}] keep different people apart and link every fragment)")
        ok = ch["ok"] and fr["ok"]
        print(f"\nsix people stay distinct, no link across people: {'PASS' if ok else 'FAIL'}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", help="assets folder with models/ and data/ (default: $FACEPRO_ASSETS)")
    p.add_argument("--video", default=ONE_BY_ONE, help="test video: file in <assets>/data/videos or a path (default %(default)s)")
    p.add_argument("--ranges", help="known people of the test video as frame ranges 'a-b,c-d,...' (default: the README's for one-by-one)")
    p.add_argument("--calibration-video", default="vtest.avi", help="video for the label-free threshold calibration (default %(default)s)")
    p.add_argument("--threshold", type=float, help="use this link threshold instead of calibrating")
    p.add_argument("--far", type=float, default=0.001, help="target false link rate for the calibration (default %(default)s)")
    p.add_argument("--detector", default="yolox_nano.onnx", help="YOLOX person detector (default %(default)s)")
    p.add_argument("--reid-model", default="osnet_x0_25_msmt17.onnx", help="OSNet ONNX model (default %(default)s)")
    p.add_argument("--stride", type=int, default=1, help="process every n-th frame (default %(default)s)")
    p.add_argument("--sample-every", type=int, default=5, help="Re-ID sample of a track every n video frames (default %(default)s)")
    p.add_argument("--settle-samples", type=int, default=OnnxReidConfig.model_fields["settle_samples"].default,
                   help="after this many samples a track is sampled ever less often, as recognition does (0: never; default %(default)s)")
    p.add_argument("--max-interval", type=int, default=OnnxReidConfig.model_fields["max_interval_frames"].default,
                   help="longest wait between two samples of a settled track, frames (default %(default)s)")
    p.add_argument("--min-samples", type=int, default=3, help="tracks with fewer Re-ID samples are not linked (default %(default)s)")
    p.add_argument("--min-height", type=float, default=0.0, help="person boxes lower than this many pixels are not embedded (default %(default)s)")
    p.add_argument("--max-frames", type=int, help="stop each video after this many frames")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stride < 1 or args.sample_every < 1 or args.min_samples < 1:
        print("eval_reid: error: --stride, --sample-every and --min-samples must be >= 1", file=sys.stderr)
        return 2
    report = run_report("eval_reid", evaluate, print_report, args)
    if report is None:
        return 2
    check = report["test"].get("check")
    return 0 if check is None or (check["ok"] and report["test"]["fragments"]["ok"]) else 1


if __name__ == "__main__":
    sys.exit(main())
