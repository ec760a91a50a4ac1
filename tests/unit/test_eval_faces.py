"""scripts/eval_faces.py and its open-set protocol (scripts/faceset.py): the split, the metrics and the
zero-false-accept threshold on synthetic scores built to prove them, scripts/lfw_subset.py's selection, and
both evaluations on the real asset faces."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import FaceConfig, FaceQualityConfig
from scripts.faceset import (ProbeFace, Scored, Scores, holdout_fraction, list_people, metrics_at, percentiles,
                             score_probes, split_people, sweep, text_histogram, zero_fa_threshold)
from scripts.lfw_subset import ERRATA_PHOTOS, select
from stages.gallery import Gallery


def scores(gen_best, gen_correct, imp_best, gen_missing=0, imp_missing=0) -> Scores:
    g = np.array(gen_best, np.float64)
    return Scores(g, np.array(gen_correct, bool), g.copy(), gen_missing, np.array(imp_best, np.float64), imp_missing)


# --- the split ----------------------------------------------------------------------------------------------------

def people(counts: dict[str, int]) -> dict[str, list[Path]]:
    return {name: [Path(f"{name}/{name}_{i:04d}.jpg") for i in range(1, n + 1)] for name, n in counts.items()}


@pytest.mark.parametrize(
    "counts, k, holdout, max_probes, enrolled, never, probes_of_a",
    [
        ({"a": 4, "b": 2, "c": 1}, 1, 0.0, None, {"a", "b"}, {"c"}, 3),       # one photo: nothing left to probe
        ({"a": 4, "b": 2, "c": 1}, 2, 0.0, None, {"a"}, {"b", "c"}, 2),        # k photos only: never enrolled
        ({"a": 4, "b": 2, "c": 1}, 1, 1.0, None, set(), {"a", "b", "c"}, None),
        ({"a": 8}, 3, 0.0, 2, {"a"}, set(), 2),                                  # probes capped
    ],
)
def test_split_rule(counts, k, holdout, max_probes, enrolled, never, probes_of_a) -> None:
    s = split_people(people(counts), k, holdout, max_probes)
    assert set(s.enroll) == set(s.probes) == enrolled and set(s.never) == never
    if "a" in s.enroll:
        assert s.enroll["a"] == people(counts)["a"][:k]  # the first k photos by name
        assert len(s.probes["a"]) == probes_of_a and s.probes["a"][0] == people(counts)["a"][k]
    for name in never:
        assert s.never[name] == people(counts)[name]


def test_holdout_depends_on_the_name_only() -> None:
    names = [f"person_{i}" for i in range(400)]
    alone = {n: split_people(people({n: 3}), 1, 0.3).never != {} for n in names[:50]}
    together = split_people(people({n: 3 for n in names}), 1, 0.3)
    assert all((n in together.never) == alone[n] for n in names[:50])
    assert 0.22 < len(together.never) / len(names) < 0.38  # about the fraction asked for
    assert all((holdout_fraction(n) < 0.3) == (n in together.never) for n in names)


@pytest.mark.parametrize("k, holdout, max_probes", [(0, 0.3, None), (1, -0.1, None), (1, 1.5, None), (1, 0.3, 0)])
def test_split_rejects_bad_parameters(k, holdout, max_probes) -> None:
    with pytest.raises(ValueError, match="split"):
        split_people(people({"a": 3}), k, holdout, max_probes)


def test_list_people_skips_group_and_hidden_folders_and_non_images(tmp_path: Path) -> None:
    for rel in ("bob/1.jpg", "bob/2.PNG", "bob/notes.txt", "_multi/g.jpg", ".cache/x.jpg", "empty/readme.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "SELECTION.txt").write_text("")
    assert {k: [p.name for p in v] for k, v in list_people(tmp_path).items()} == {"bob": ["1.jpg", "2.PNG"]}
    with pytest.raises(ValueError, match="no person folders"):
        list_people(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a folder"):
        list_people(tmp_path / "missing")


# --- metrics and the zero-false-accept threshold --------------------------------------------------------------------

def test_metrics_count_hits_wrong_names_unknowns_and_false_accepts() -> None:
    s = scores([0.9, 0.7, 0.5, 0.45, 0.2], [True, True, True, False, True], [0.3, 0.48, 0.41], gen_missing=1, imp_missing=2)
    m = metrics_at(s, 0.40)
    assert (m["hits"], m["wrong"], m["unknown"], m["missing"], m["genuine_probes"]) == (3, 1, 2, 1, 6)
    assert (m["false_accepts"], m["impostor_probes"]) == (2, 5)
    assert m["hit_rate"] == pytest.approx(3 / 6) and m["unknown_rate"] == pytest.approx(2 / 6)
    assert m["false_accept_rate"] == pytest.approx(2 / 5)
    assert metrics_at(s, 0.5)["hits"] == 3  # a score equal to the threshold is accepted, as in Gallery.match


def test_zero_fa_threshold_sits_just_above_the_highest_wrong_or_impostor_score() -> None:
    s = scores([0.9, 0.7, 0.5, 0.45], [True, True, True, False], [0.3, 0.48])
    t = zero_fa_threshold(s)
    assert 0.48 < t < 0.48 + 1e-12
    m = metrics_at(s, t)
    assert (m["false_accepts"], m["wrong"], m["hits"]) == (0, 0, 3)
    # a wrong name above every impostor decides it
    assert zero_fa_threshold(scores([0.9, 0.6], [True, False], [0.3])) == pytest.approx(0.6)
    assert zero_fa_threshold(scores([0.9], [True], [])) == -1.0  # nothing false: everything is accepted


@pytest.mark.parametrize("seed", range(5))
def test_no_threshold_with_zero_false_accepts_has_more_hits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    g = rng.uniform(0.1, 1.0, 300)
    s = scores(g, rng.random(300) < 0.9, rng.uniform(-0.1, 0.7, 400), gen_missing=7)
    t0 = zero_fa_threshold(s)
    best = metrics_at(s, t0)
    assert best["false_accepts"] == 0 and best["wrong"] == 0
    candidates = np.concatenate([s.genuine_best, s.impostor_best, np.nextafter(s.impostor_best, 2.0),
                                 np.nextafter(s.genuine_best, 2.0)])
    for t in candidates:
        m = metrics_at(s, t)
        if m["false_accepts"] == 0 and m["wrong"] == 0:
            assert m["hits"] <= best["hits"]
    assert metrics_at(s, np.nextafter(t0, -2.0))["false_accepts"] + metrics_at(s, np.nextafter(t0, -2.0))["wrong"] == 1


def test_sweep_is_sorted_without_duplicates_and_monotone() -> None:
    s = scores([0.9, 0.7, 0.5], [True, True, True], [0.3, 0.45])
    rows = sweep(s, [0.5, 0.3, 0.4, 0.4])
    assert [r["threshold"] for r in rows] == [0.3, 0.4, 0.5]
    assert [r["hits"] for r in rows] == [3, 3, 3] and [r["false_accepts"] for r in rows] == [2, 1, 0]


def test_percentiles_and_histogram_count_every_score() -> None:
    g, i = np.array([0.55, 0.61, 0.99, 1.0]), np.array([-0.5, 0.1, 0.12])
    p = percentiles(g)
    assert (p["n"], p["min"], p["max"], p["p50"]) == (4, 0.55, 1.0, pytest.approx(0.8))
    assert math.isnan(percentiles(np.array([]))["p50"])
    lines = text_histogram(g, i)
    counts = [tuple(int(x) for x in (line.split()[1], line.split("|")[1].split()[0])) for line in lines]
    assert sum(c[0] for c in counts) == 4 and sum(c[1] for c in counts) == 3  # out-of-range scores clipped in
    assert lines[0].startswith("[-0.20,") and lines[-1].startswith("[+0.95,")


# --- probes against a gallery, and the quality gate -----------------------------------------------------------------

def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_scored_probes_and_the_gate() -> None:
    gallery = Gallery(["ann", "bob"], np.stack([unit([1, 0, 0]), unit([0, 1, 0])]))
    probes = [
        ProbeFace("ann/2.jpg", "ann", True, unit([0.9, 0.1, 0.1]), sharpness=300.0, yaw=0.1),
        ProbeFace("ann/3.jpg", "ann", True, unit([0.2, 0.9, 0.1]), sharpness=10.0, yaw=0.1),  # blurry, looks like bob
        ProbeFace("ann/4.jpg", "ann", True, None, "no_face"),
        ProbeFace("cy/1.jpg", "cy", False, unit([0.1, 0.2, 1.0]), sharpness=300.0, yaw=0.9),  # profile stranger
    ]
    scored = score_probes(probes, gallery)
    assert [s.best for s in scored] == ["ann", "bob", None, "bob"]
    assert scored[0].own_sim == pytest.approx(float(unit([0.9, 0.1, 0.1])[0]))
    assert math.isnan(scored[3].own_sim) and math.isnan(scored[2].best_sim)
    plain = Scores.of(scored)
    assert plain.genuine_correct.tolist() == [True, False] and plain.genuine_missing == 1
    assert plain.impostor_best.size == 1 and plain.impostor_missing == 0
    gated = Scores.of(scored, FaceQualityConfig(min_sharpness=40.0, max_abs_yaw=0.6))
    assert gated.genuine_correct.tolist() == [True] and gated.genuine_missing == 2
    assert gated.impostor_best.size == 0 and gated.impostor_missing == 1


# --- lfw_subset's selection -----------------------------------------------------------------------------------------

def test_lfw_subset_takes_every_nth_person_and_leaves_out_the_errata() -> None:
    names = {f"M{i:02d}": [f"M{i:02d}_{j:04d}.jpg" for j in range(1, 11)] for i in range(7)}
    names |= {f"S{i:02d}": [f"S{i:02d}_0001.jpg"] for i in range(5)}
    names |= {"Two_Photos": ["Two_Photos_0001.jpg", "Two_Photos_0002.jpg"], "Jim_OBrien": [f"Jim_OBrien_{j:04d}.jpg" for j in range(1, 5)]}
    names["Recep_Tayyip_Erdogan"] = [f"Recep_Tayyip_Erdogan_{j:04d}.jpg" for j in range(1, 6)]
    got = select(names, min_images=4, every_multi=3, every_single=2, max_images=8)
    # multi-photo people, sorted: M00..M06, Recep (Jim_OBrien left out: two people in one folder)
    assert set(got) == {"M00", "M03", "M06", "S00", "S02", "S04"}
    assert got["M00"] == [f"M00_{j:04d}.jpg" for j in range(1, 9)]
    got = select(names, min_images=4, every_multi=1, every_single=100, max_images=8)
    assert [f[-8:-4] for f in got["Recep_Tayyip_Erdogan"]] == ["0001", "0002", "0003", "0005"]  # 0004 shows Abdullah Gul
    assert "Jim_OBrien" not in got and "Two_Photos" not in got and "Recep_Tayyip_Erdogan_0004" in ERRATA_PHOTOS


# --- the real asset faces -------------------------------------------------------------------------------------------

def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, dict]:
    from scripts.eval_faces import main

    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_leave_one_out_on_the_asset_faces_is_unchanged(assets: Path, capsys: pytest.CaptureFixture) -> None:
    code, r = run_main(["--assets", str(assets)], capsys)
    assert code == 0 and r["rank1"] == {"correct": 14, "probes": 14} and r["t1_all_unknown"] is True
    assert r["genuine"]["min"] == pytest.approx(0.5785, abs=1e-3) and r["impostor"]["max"] == pytest.approx(0.1772, abs=1e-3)


def test_open_set_on_the_asset_faces(assets: Path, faces: Path, capsys: pytest.CaptureFixture) -> None:
    code, r = run_main(["--assets", str(assets), "--set", str(faces), "--enroll-k", "1", "--holdout", "0.3"], capsys)
    # holdout 0.3 by name hash: biden (0.02) and kun (0.29) are never enrolled; obama, kit_harington, rose_leslie are
    assert r["split"]["enrolled_people"] == 3 and r["split"]["never_enrolled_people"] == 2
    assert (r["split"]["genuine_probes"], r["split"]["impostor_probes"]) == (7, 4)
    assert r["enrollment"]["failures"] == 0 and r["enrollment"]["enrolled"] == 3
    assert r["rank1"] == {"correct": 7, "probes": 7}
    m = r["at_threshold"]
    assert r["threshold"] == FaceConfig.model_fields["match_threshold"].default
    assert (m["hits"], m["false_accepts"], m["unknown"]) == (7, 0, 0)
    assert r["impostor"]["max"] < r["zero_fa"]["threshold"] < r["genuine"]["min"] and r["zero_fa"]["hits"] == 7
    assert code == 0


def test_open_set_takes_recognition_face_from_a_config(assets: Path, faces: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "facepro.yaml"
    models = assets / "models"
    cfg.write_text(f"""cameras: [{{name: c, source: {assets}/data/videos/vtest.avi, mode: file}}]
detection: {{detector: {{type: onnx, path: {models}/yolox_nano.onnx, layout: yolox}}}}
recognition:
  face:
    detector: {{type: onnx, path: {models}/scrfd_500m.onnx}}
    embedder: {{type: onnx, path: {models}/mobilefacenet_128d.onnx}}
    match_threshold: 0.99
    quality: {{min_sharpness: 5.0}}
""")
    code, r = run_main(["--set", str(faces), "--config", str(cfg), "--max-yaw", "0.5"], capsys)
    assert r["threshold"] == 0.99 and r["config"]["quality"] == {"min_sharpness": 5.0, "max_abs_yaw": 0.5}
    assert r["at_threshold"]["hits"] < 7 and code == 1  # unknown rate far above 3 %: the check fails


def test_open_set_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from scripts.eval_faces import main

    monkeypatch.delenv("FACEPRO_EVAL_FACES", raising=False)
    assert main(["--set"]) == 2
    assert "FACEPRO_EVAL_FACES" in capsys.readouterr().err
    assert main(["--set", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_dominance_table_counts_photos_below_each_margin() -> None:
    from scripts.faceset import dominance_table

    ratios = {"a.jpg": (1, math.inf), "b.jpg": (2, 1.1), "c.jpg": (3, 1.75), "d.jpg": (2, 2.0), "e.jpg": (2, 9.0)}
    t = dominance_table(ratios, margins=(1.5, 2.0, 2.5))
    assert (t["photos"], t["several_faces"]) == (5, 4)
    assert t["refused"] == {"1.5": 1, "2.0": 2, "2.5": 3}  # a ratio equal to the margin passes, as in pick_subject
    assert [c["file"] for c in t["close"]] == ["b.jpg", "c.jpg", "d.jpg"]
