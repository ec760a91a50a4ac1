"""Anonymous identities in the database (storage/unknowns.py, storage/corrections.py): clustering as the writer
commits ended tracks, persistence across writers (runs), naming, merging, negatives, retention, the outbox;
plus the gallery's negative rule (stages/gallery.py) and the API routes."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import Engine, select, text

from pipeline.messages import EmbeddingRecord
from stages.gallery import Gallery
from storage.corrections import NotFoundError, merge_clusters, name_unknown, relabel_event
from storage.models import UnknownCluster, utcnow
from storage.queries import enroll, get_event, list_events, load_gallery, load_negatives
from storage.retention import apply_retention
from storage.unknowns import UnknownAssigner, UnknownSettings, consolidate_clusters, list_unknowns, parse_unknown
from storage.writer import EventWriter
from tests.unit.test_storage import SEC, T0, update

D = 16
MODEL = "mobilefacenet_128d"


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _basis(i: int) -> np.ndarray:
    e = np.zeros(D, np.float32)
    e[i] = 1.0
    return e


def _near(i: int, rng: np.random.Generator, cos: float = 0.9) -> np.ndarray:
    """A unit vector at cosine ``cos`` from basis vector ``i`` (a face of person ``i``)."""
    r = rng.standard_normal(D)
    r[i] = 0.0
    r /= np.linalg.norm(r)
    return (cos * _basis(i) + np.sqrt(1 - cos * cos) * r).astype(np.float32)


class Store:
    """What the storage process does: an EventWriter with an UnknownAssigner over the test's database."""

    def __init__(self, engine: Engine, settings: UnknownSettings = UnknownSettings()) -> None:
        self.engine = engine
        self.assigner = UnknownAssigner(settings)
        self.writer = EventWriter(engine, unknowns=self.assigner, outbox_box_id="box")
        self.rng = np.random.default_rng(0)
        self.n = 0

    def track(self, person: int, faces: int = 4, *, ended: bool = True, camera: str = "cam0", t_s: int = 0,
              cos: float = 0.9, label: str = "person", identity: str | None = None) -> str:
        """One track of ``person`` with ``faces`` face embeddings, committed; returns its event id."""
        self.n += 1
        event_id = f"{self.n:032x}"
        self.writer.add_update(update(event_id, camera=camera, t0=T0 + t_s * SEC, label=label, identity=identity,
                                      method="face" if identity else None))
        for f in range(faces):
            self.writer.add_embedding(EmbeddingRecord(event_id, "face", MODEL, _near(person, self.rng, cos),
                                                      frame_index=2 * f, quality=0.5 + 0.1 * f))
        if ended:
            self.writer.add_update(update(event_id, camera=camera, t0=T0 + t_s * SEC, last=20, ended=True,
                                          label=label, identity=identity, method="face" if identity else None))
        self.writer.flush()
        return event_id


def _unknown(engine: Engine, event_id: str) -> str | None:
    row = get_event(engine, event_id)
    assert row is not None
    return row.unknown


@pytest.fixture()
def store(engine: Engine) -> Store:
    return Store(engine)


# ------------------------------------------------------------------ assignment


def test_ended_unnamed_person_tracks_get_one_anonymous_id_per_person(store: Store, engine: Engine) -> None:
    tracks = [(p, store.track(p, camera=f"cam{p % 2}")) for p in (0, 1, 0, 2, 1, 0)]
    names = {p: {_unknown(engine, e) for q, e in tracks if q == p} for p in (0, 1, 2)}
    assert all(len(n) == 1 and None not in n for n in names.values()), names
    assert names == {0: {"unknown-1"}, 1: {"unknown-2"}, 2: {"unknown-3"}}  # numbered in order of first sight
    listed = {u.name: u for u in list_unknowns(engine)}
    assert {n: (u.tracks, u.events) for n, u in listed.items()} == {"unknown-1": (3, 3), "unknown-2": (2, 2), "unknown-3": (1, 1)}
    assert store.assigner.counts.unknown_tracks == 6 and store.assigner.counts.unknown_clusters_created == 3
    with engine.connect() as conn:  # each clustered track keeps its track-level vector (frame -1)
        assert conn.execute(text("SELECT count(*) FROM track_embeddings WHERE frame_index = -1")).scalar() == 6


@pytest.mark.parametrize(("kw", "clustered"), [
    (dict(), True),
    (dict(ended=False), False),  # still open: clustered when it ends
    (dict(identity="alice"), False),  # named tracks are not anonymous
    (dict(label="car"), False),
    (dict(faces=1), False),  # fewer than min_faces quality faces
    (dict(faces=0), False),  # no face at all
])
def test_only_ended_unnamed_person_tracks_with_enough_faces_are_clustered(store: Store, engine: Engine, kw: dict,
                                                                          clustered: bool) -> None:
    enroll(engine, "alice", _basis(9)[None, :], MODEL)
    event_id = store.track(0, **kw)
    assert (_unknown(engine, event_id) is not None) is clustered


def test_the_end_arriving_after_the_faces_and_resent_updates_change_nothing(store: Store, engine: Engine) -> None:
    event_id = store.track(0, ended=False)
    assert _unknown(engine, event_id) is None
    end = update(event_id, last=20, ended=True)
    store.writer.add_update(end)
    store.writer.flush()
    assert _unknown(engine, event_id) == "unknown-1"
    store.writer.add_update(end)  # at-least-once delivery: the same end again
    store.writer.flush()
    assert _unknown(engine, event_id) == "unknown-1" and list_unknowns(engine)[0].tracks == 1


def test_ids_persist_across_runs_and_a_number_is_never_given_twice(engine: Engine) -> None:
    first = Store(engine)
    a, b = first.track(0), first.track(1)
    later = Store(engine)  # a new storage process (a second run) reads the clusters from the database
    later.n = first.n
    assert _unknown(engine, later.track(1)) == _unknown(engine, b) == "unknown-2"
    assert _unknown(engine, later.track(0)) == _unknown(engine, a) == "unknown-1"
    name_unknown(engine, "unknown-2", "Bob")  # cluster 2 is gone ...
    assert _unknown(engine, later.track(3)) == "unknown-3"
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM events WHERE unknown_id = 3"))
        conn.execute(text("DELETE FROM unknown_clusters WHERE id = 3"))
    assert _unknown(engine, later.track(4)) == "unknown-4"  # ... and neither 2 nor 3 comes back


def test_noisy_tracks_are_not_clustered(engine: Engine) -> None:
    store = Store(engine)
    store.n = 0
    event_id = store.track(0, faces=5, cos=0.2)  # five faces that barely agree: a bad track
    assert _unknown(engine, event_id) is None
    assert store.assigner.counts.unknown_skipped_inconsistent == 1


def test_consolidation_merges_clusters_that_came_together_into_the_oldest(engine: Engine) -> None:
    strict = Store(engine, UnknownSettings(threshold=0.99))  # every track opens its own cluster
    events = [strict.track(0) for _ in range(3)] + [strict.track(1)]
    assert len(list_unknowns(engine)) == 4
    assert consolidate_clusters(engine, 0.45) == 2
    assert [_unknown(engine, e) for e in events] == ["unknown-1"] * 3 + ["unknown-4"]
    assert {u.name: u.tracks for u in list_unknowns(engine)} == {"unknown-1": 3, "unknown-4": 1}


@pytest.mark.parametrize("face, expected", [
    ({}, (0.50, 0.50)),  # the default match threshold
    ({"match_threshold": 0.6}, (0.6, 0.6)),  # recalibrated (another embedder): clustering follows
    ({"match_threshold": 0.6, "unknowns": {"cluster_threshold": 0.55}}, (0.55, 0.6)),
    ({"unknowns": {"merge_threshold": 0.7, "cluster_threshold": None}}, (0.50, 0.7)),
    ({"unknowns": {"enabled": False}}, None),
])
def test_the_clustering_thresholds_are_the_match_threshold_unless_set(face: dict, expected: tuple | None) -> None:
    from pipeline.config import parse_config
    from pipeline.identities import unknown_assigner
    from tests.unit.test_config import BASE

    cfg = parse_config({**BASE, "recognition": {"face": {**BASE["recognition"]["face"], **face}}})
    assigner = unknown_assigner(cfg)
    got = None if assigner is None else (assigner.settings.threshold, assigner.settings.merge_threshold)
    assert got == expected


def test_the_outbox_end_message_carries_the_anonymous_id(store: Store, engine: Engine) -> None:
    event_id = store.track(0)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT type, payload FROM mqtt_outbox WHERE event_id = :e ORDER BY seq"),
                            {"e": event_id}).all()
    end = json.loads([p for t, p in rows if t == "end"][0])
    assert end["after"]["unknown"] == "unknown-1" and end["after"]["identity"] is None


def test_a_fleet_hub_stores_a_box_s_anonymous_ids_as_the_box_sent_them(store: Store, engine: Engine, tmp_path) -> None:
    from storage.db import open_engine, upgrade
    from storage.hub import HubMerge, HubStore

    events = [store.track(p) for p in (0, 1, 0)] + [store.track(2, ended=False)]
    with engine.connect() as conn:
        sent = list(conn.execute(text("SELECT payload FROM mqtt_outbox ORDER BY id")).scalars())
    hub_url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(hub_url)
    hub = open_engine(hub_url)
    try:
        merge = HubMerge()
        for p in sent[::-1]:  # late messages: the end's unknown wins whatever the order
            merge.add(p.encode())
        HubStore(hub).write(merge.take())
        assert [_unknown(hub, e) for e in events] == [_unknown(engine, e) for e in events] == \
               ["unknown-1", "unknown-2", "unknown-1", None]
        assert [e.event_id for e in list_events(hub, box="box", unknown="unknown-1")] == [events[2], events[0]]
        assert list_events(hub, box="other", unknown="unknown-1") == []
        assert list_unknowns(hub) == []  # the hub has no clusters of its own: naming happens on the box
    finally:
        hub.dispose()


# ------------------------------------------------------------------ naming and merging


def test_naming_a_cluster_enrolls_its_faces_and_relabels_its_events(store: Store, engine: Engine) -> None:
    events = [store.track(0) for _ in range(3)]
    other = store.track(1)
    res = name_unknown(engine, "unknown-1", "Alice")
    assert (res.created, res.embeddings, res.events) == (True, 3, 3)
    assert {r.event_id for r in list_events(engine, identity="Alice")} == set(events)
    for e in events:
        row = get_event(engine, e)
        assert (row.identity, row.method, row.unknown) == ("Alice", "face", None)
        assert row.identity_score > 0.9  # its track vector against the cluster centroid
    assert _unknown(engine, other) == "unknown-2" and [u.name for u in list_unknowns(engine)] == ["unknown-2"]
    names, vectors = load_gallery(engine, MODEL)
    gallery = Gallery(names, vectors)
    assert gallery.match(_near(0, np.random.default_rng(5))[None, :])[0].identity == "Alice"
    # Alice's next track is Alice's (the gallery names it): and naming into an enrolled identity adds to it
    store.track(0, identity="Alice")
    store.track(0, cos=0.85)
    assert name_unknown(engine, "unknown-3", "Alice").created is False


@pytest.mark.parametrize(("unknown", "name", "error", "match"), [
    ("unknown-9", "Alice", NotFoundError, "no cluster unknown-9"),
    ("Alice", "Bob", ValueError, "not an anonymous identity"),
    ("unknown-1", " Alice", ValueError, "leading/trailing spaces"),
    ("unknown-1", "unknown-2", ValueError, "names unknown-<number> are the anonymous clusters'"),
])
def test_naming_errors_change_nothing(store: Store, engine: Engine, unknown: str, name: str, error: type,
                                      match: str) -> None:
    event_id = store.track(0)
    with pytest.raises(error, match=match):
        name_unknown(engine, unknown, name)
    assert _unknown(engine, event_id) == "unknown-1" and load_gallery(engine, MODEL).names == []


def test_merging_two_clusters_moves_tracks_and_events(engine: Engine) -> None:
    strict = Store(engine, UnknownSettings(threshold=0.99))
    a, b = strict.track(0), strict.track(0)
    assert merge_clusters(engine, "unknown-1", "unknown-2") == 1
    assert _unknown(engine, a) == _unknown(engine, b) == "unknown-1"
    assert [(u.name, u.tracks, u.events) for u in list_unknowns(engine)] == [("unknown-1", 2, 2)]
    with pytest.raises(ValueError, match="no cluster unknown-2"):
        merge_clusters(engine, "unknown-1", "unknown-2")


def test_enrolled_names_cannot_look_like_anonymous_ones(engine: Engine) -> None:
    with pytest.raises(ValueError, match="anonymous clusters'"):
        enroll(engine, "unknown-3", _basis(0)[None, :], MODEL)
    assert parse_unknown("unknown-3") == 3 and parse_unknown("unknown-03") is None and parse_unknown("Unknown-3") is None


# ------------------------------------------------------------------ negatives


@pytest.mark.parametrize(("to_bob", "to_negative", "expected"), [
    (0.60, 0.30, "bob"),  # the probe is more like Bob than like the face that is not Bob
    (0.60, 0.60, None),  # as similar to the negative as to Bob: refused (>=)
    (0.60, 0.90, None),
    (0.30, 0.10, None),  # below the threshold anyway
])
def test_a_negative_example_refuses_a_name_by_the_rule(to_bob: float, to_negative: float, expected: str | None) -> None:
    """Bob's template is e0, his negative e1; the probe has the given cosines to both (and no other component
    needed beyond e2)."""
    probe = to_bob * _basis(0) + to_negative * _basis(1)
    probe = probe + np.sqrt(max(0.0, 1 - to_bob ** 2 - to_negative ** 2)) * _basis(2)
    g = Gallery(["bob"], _basis(0)[None, :], threshold=0.4, negatives=(["bob"], _basis(1)[None, :]))
    m = g.match(probe[None, :].astype(np.float32))[0]
    assert m.identity == expected
    assert m.refused == (("bob",) if to_bob >= 0.4 and expected is None else ())


def test_a_refused_name_falls_to_the_next_identity_above_the_threshold() -> None:
    probe = _unit(0.7 * _basis(0) + 0.6 * _basis(1) + 0.3 * _basis(2))
    g = Gallery(["bob", "carol"], np.stack([_basis(0), _basis(1)]), threshold=0.4,
                negatives=(["bob", "dave"], np.stack([probe, _basis(3)])))  # dave is not in the gallery: ignored
    m = g.match(probe[None, :])[0]
    assert (m.identity, m.refused) == ("carol", ("bob",)) and m.similarity == pytest.approx(0.6 / np.linalg.norm([0.7, 0.6, 0.3]), abs=1e-5)
    assert g.negatives == 1
    with pytest.raises(ValueError, match="negatives"):
        Gallery(["bob"], _basis(0)[None, :], negatives=(["bob"], np.ones((1, 3), np.float32)))


def test_relabel_not_stores_a_negative_and_the_event_becomes_unknown(store: Store, engine: Engine) -> None:
    enroll(engine, "Bob", _basis(5)[None, :], MODEL)
    wrong = store.track(0, identity="Bob")  # person 0 was (wrongly) named Bob
    res = relabel_event(engine, wrong, not_name="Bob", assigner=store.assigner)
    assert (res.identity, res.unknown, res.negative_of) == (None, "unknown-1", "Bob")
    row = get_event(engine, wrong)
    assert (row.identity, row.method, row.unknown) == (None, None, "unknown-1")
    names, negatives = load_negatives(engine, MODEL)
    assert names == ["Bob"] and negatives.shape == (1, D)
    rows = load_gallery(engine, MODEL)
    gallery = Gallery(rows.names, rows.vectors, threshold=-1.0, negatives=(names, negatives))  # everyone would be Bob
    rng = np.random.default_rng(9)
    assert gallery.match(_near(0, rng)[None, :])[0].identity is None  # person 0 is no longer named Bob
    assert gallery.match(_near(5, rng)[None, :])[0].identity == "Bob"  # Bob still is


def test_relabel_as_adds_the_face_and_takes_the_event_out_of_its_cluster(store: Store, engine: Engine) -> None:
    a, b = store.track(0), store.track(0)
    res = relabel_event(engine, a, as_name="Carol")
    assert (res.identity, res.unknown, res.added_to) == ("Carol", None, "Carol")
    row = get_event(engine, a)
    assert (row.identity, row.method, row.unknown) == ("Carol", "face", None) and row.identity_score == pytest.approx(1.0, abs=1e-5)
    assert load_gallery(engine, MODEL).names == ["Carol"]
    assert [(u.name, u.tracks, u.events) for u in list_unknowns(engine)] == [("unknown-1", 1, 1)]
    relabel_event(engine, b, as_name="Carol")  # its last track: the cluster goes
    assert list_unknowns(engine) == []


@pytest.mark.parametrize(("kw", "error", "match"), [
    (dict(), ValueError, "needs --not NAME"),
    (dict(not_name="Bob", as_name="Bob"), ValueError, "both name"),
    (dict(not_name="Nobody"), NotFoundError, "no identity named 'Nobody'"),
    (dict(as_name=" x"), ValueError, "leading/trailing"),
])
def test_relabel_errors_change_nothing(store: Store, engine: Engine, kw: dict, error: type, match: str) -> None:
    enroll(engine, "Bob", _basis(5)[None, :], MODEL)
    event_id = store.track(0, identity="Bob")
    with pytest.raises(error, match=match):
        relabel_event(engine, event_id, **kw)
    assert get_event(engine, event_id).identity == "Bob" and load_negatives(engine, MODEL)[0] == []
    with pytest.raises(NotFoundError, match="no event"):
        relabel_event(engine, "f" * 32, not_name="Bob")
    faceless = store.track(0, faces=0, identity="Bob")
    with pytest.raises(ValueError, match="has no face embedding"):
        relabel_event(engine, faceless, not_name="Bob")


# ------------------------------------------------------------------ retention


def test_retention_removes_clusters_whose_events_all_expired(store: Store, engine: Engine) -> None:
    old = store.track(0, t_s=0)
    store.track(1, t_s=0)
    recent = store.track(1, t_s=10 * 86400)
    now = utcnow().replace(microsecond=0)
    with engine.begin() as conn:  # date the first two events 30 days back, the last one now
        conn.execute(text("UPDATE events SET started_at = :t"), {"t": (now - timedelta(days=30)).replace(tzinfo=None)})
        conn.execute(text("UPDATE events SET started_at = :t WHERE id = :e"), {"t": now.replace(tzinfo=None), "e": recent})
    res = apply_retention(engine, 7, None, None, now=now)
    assert res.events_deleted == 2 and res.clusters_deleted == 1
    assert [(u.name, u.events, u.tracks) for u in list_unknowns(engine)] == [("unknown-2", 1, 2)]
    assert get_event(engine, old) is None
    with engine.connect() as conn:
        assert conn.execute(select(UnknownCluster.id)).scalars().all() == [2]


# ------------------------------------------------------------------ the API and the CLI


from tests.unit.test_api import Api, analyzer, api  # noqa: E402,F401  (fixtures: the app over a real database)


def test_api_lists_names_and_relabels_as_the_cli_does(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main
    from storage.db import open_engine

    engine = open_engine(api.url)
    store = Store(engine)
    a, b, c = store.track(0), store.track(0), store.track(1)
    client = api.client()
    unknowns = client.get("/api/unknowns").json()["unknowns"]
    assert [(u["name"], u["tracks"], u["events"]) for u in unknowns] == [("unknown-2", 1, 1), ("unknown-1", 2, 2)]
    assert main(["identities", "list", "--unknown", "--json", "--config", str(api.cfg_file)]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == unknowns
    page = client.get("/api/events", params={"unknown": "unknown-1"}).json()["events"]
    assert {e["event_id"] for e in page} == {a, b} and {e["unknown"] for e in page} == {"unknown-1"}
    assert main(["events", "--json", "--unknown", "unknown-1", "--config", str(api.cfg_file)]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == page
    assert client.get("/api/events", params={"unknown": "bob"}).status_code == 422

    r = client.post("/api/identities/unknown-1/name", json={"name": "Alice"})
    assert r.status_code == 200, r.text
    assert r.json() == {"unknown": "unknown-1", "name": "Alice", "created": True, "embeddings": 2, "events": 2}
    assert {e["event_id"] for e in client.get("/api/events", params={"identity": "Alice"}).json()["events"]} == {a, b}
    assert client.post("/api/identities/unknown-1/name", json={"name": "Alice"}).status_code == 404
    assert client.post("/api/identities/unknown-2/name", json={"name": " Alice"}).status_code == 400
    assert client.post("/api/identities/Alice/name", json={"name": "Bob"}).status_code == 422  # not an unknown-<n>

    r = client.post(f"/api/events/{a}/relabel", json={"not": "Alice"})
    assert r.status_code == 200, r.text
    assert r.json() == {"event_id": a, "identity": None, "unknown": "unknown-3", "negative_of": "Alice", "added_to": None}
    assert client.post(f"/api/events/{a}/relabel", json={}).status_code == 400
    assert client.post(f"/api/events/{'f' * 32}/relabel", json={"as": "Carol"}).status_code == 404
    r = client.post(f"/api/events/{c}/relabel", json={"as": "Carol"})
    assert r.json()["identity"] == "Carol" and client.get(f"/api/events/{c}").json()["unknown"] is None

    assert main(["identities", "name", "unknown-3", "Alice", "--config", str(api.cfg_file)]) == 0
    assert "named unknown-3 Alice (added to the enrolled identity): 1 embedding(s), 1 event(s) relabelled" in capsys.readouterr().out
    assert main(["identities", "merge", "unknown-2", "Alice", "--config", str(api.cfg_file)]) == 2
    assert "Alice is enrolled and unknown-2 anonymous; name the cluster instead" in capsys.readouterr().err
    assert main(["identities", "merge", "Alice", "unknown-1", "--config", str(api.cfg_file)]) == 2  # named: gone
    assert "no cluster unknown-1" in capsys.readouterr().err
    for extra in (["--db", api.url], ["--box", "box-a"]):  # listing options: a relabel corrects the box's own database
        assert main(["events", "relabel", c, "--not", "Carol", "--config", str(api.cfg_file), *extra]) == 2
        err = capsys.readouterr().err
        assert "run the relabel on the box that stored the event" in err and err.count("\n") == 1
    assert get_event(engine, c).identity == "Carol"  # untouched
    engine.dispose()


# ------------------------------------------------------------------ the gallery of a running recognition process


def test_a_running_recognition_process_reloads_the_gallery_when_names_or_negatives_change(store: Store,
                                                                                         engine: Engine) -> None:
    from pipeline.identities import GalleryRefresh

    clock = [0.0]
    got: list[Gallery] = []
    refresh = GalleryRefresh(engine, MODEL, 0.4, got.append, interval_s=2.0, clock=lambda: clock[0])
    event_id = store.track(0)
    clock[0] = 2.0
    refresh()
    assert got == []  # tracks and clusters are not the gallery: nothing to reload
    name_unknown(engine, _unknown(engine, event_id), "Alice")
    clock[0] = 3.0
    refresh()
    assert got == []  # not due yet
    clock[0] = 4.0
    refresh()
    assert [g.identities for g in got] == [("Alice",)] and refresh.reloads == 1
    enroll(engine, "Bob", _basis(5)[None, :], MODEL)
    bob_event = store.track(5, identity="Bob")
    relabel_event(engine, bob_event, not_name="Bob")
    clock[0] = 6.0
    refresh()
    assert [g.identities for g in got][-1] == ("Alice", "Bob") and got[-1].negatives == 1
    clock[0] = 8.0
    refresh()
    assert refresh.reloads == 2  # unchanged since


def test_the_storage_stage_counts_unknowns_and_consolidates_at_its_end(engine: Engine) -> None:
    from functools import partial

    from storage.stage import StorageStage

    strict = Store(engine, UnknownSettings(threshold=0.99))  # two clusters of one person, merged at the end
    stage = StorageStage(strict.writer, consolidate=partial(consolidate_clusters, engine, 0.45))
    event_id = f"{99:032x}"
    stage.process(None, update(event_id, last=20, ended=True))
    for f in range(3):
        stage.process(None, EmbeddingRecord(event_id, "face", MODEL, _near(0, strict.rng), frame_index=f, quality=0.9))
    other = strict.track(0)
    stage.finish()
    assert stage.counts["unknown_tracks"] == 2 and stage.counts["unknown_clusters_created"] == 2
    assert stage.counts["unknown_clusters_merged"] == 1
    assert _unknown(engine, event_id) == _unknown(engine, other) == "unknown-1"


from tests.unit.test_storage import pg_url  # noqa: E402,F401  (fixture: a fresh PostgreSQL schema)


@pytest.mark.postgres
def test_postgres_clusters_names_and_negatives(pg_url: str) -> None:  # noqa: F811
    from storage.db import open_engine, upgrade

    upgrade(pg_url)
    engine = open_engine(pg_url)
    try:
        store = Store(engine)
        a, b, c = store.track(0), store.track(1), store.track(0)
        assert [_unknown(engine, e) for e in (a, b, c)] == ["unknown-1", "unknown-2", "unknown-1"]
        assert name_unknown(engine, "unknown-1", "Alice").events == 2
        res = relabel_event(engine, a, not_name="Alice", assigner=store.assigner)
        assert (res.identity, res.unknown) == (None, "unknown-3") and load_negatives(engine, MODEL)[0] == ["Alice"]
        assert consolidate_clusters(engine, 0.45) == 0
        assert [u.name for u in list_unknowns(engine)] == ["unknown-3", "unknown-2"]
    finally:
        engine.dispose()


def test_a_failed_commit_leaves_no_trace_in_the_assigners_cached_clusters(store: Store, engine: Engine,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    first = store.track(0)
    import storage.unknowns as unknowns

    def fail(*args: object, **kw: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(unknowns, "_store_track_vectors", fail)  # fails after the clusters were updated in memory
    with pytest.raises(RuntimeError):
        store.track(1)
    monkeypatch.undo()
    store.writer.discard()
    second = store.track(1)  # clusters read again: person 1 is new, person 0's cluster unchanged
    assert (_unknown(engine, first), _unknown(engine, second)) == ("unknown-1", "unknown-2")
    assert {u.name: u.tracks for u in list_unknowns(engine)} == {"unknown-1": 1, "unknown-2": 1}
