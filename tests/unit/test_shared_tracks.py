"""Re-ID / gait linking across recognition processes through the database (pipeline.worker.SharedNamedTracks)."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import Engine

from pipeline.config import GaitConfig
from pipeline.messages import TrackUpdate
from pipeline.worker import SharedNamedTracks
from stages.gait import CameraSilhouettes
from stages.identity import Named
from stages.recognition import GaitLinker
from stages.tracking import ActiveTrack
from storage.db import open_engine
from storage.queries import enroll
from storage.writer import EventWriter

FRAME = np.zeros((4, 4, 3), np.uint8)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _FixedSilhouettes(CameraSilhouettes):
    """Every person box shows the same upright walker."""

    def update(self, frame: np.ndarray) -> None:
        pass

    def silhouette(self, xyxy: np.ndarray) -> np.ndarray:
        m = np.zeros((120, 80), np.uint8)
        m[10:110, 30:50] = 255
        return m




@pytest.fixture()
def engine(engine: Engine) -> Engine:
    """The shared database fixture with "alice" enrolled."""
    enroll(engine, "alice", np.eye(1, 4, dtype=np.float32), "m")
    return engine


def _walk(linker: GaitLinker, camera: str, track_id: int, frames: int = 3) -> None:
    linker.silhouettes.setdefault(camera, _FixedSilhouettes())
    person = ActiveTrack(track_id=track_id, event_id=f"{track_id:032x}", xyxy=np.zeros(4, np.float32), label="person")
    for _ in range(frames):
        linker.observe(camera, [person], FRAME)


def _store_named_track(engine: Engine, linker: GaitLinker, camera: str, track_id: int) -> None:
    """What the process owning ``camera`` does when a track named Alice by face ends: update + gait embedding to storage."""
    event_id = f"{track_id:032x}"
    rec = linker.end(camera, track_id, event_id, Named("alice", "face", 0.8))
    w = EventWriter(engine, 100, 100)
    w.add_update(TrackUpdate(event_id, camera, track_id, "person", 1, 2, 0, 3, 0.9, np.zeros(4, np.float32),
                             identity="alice", method="face", identity_score=0.8, ended=True))
    w.add_embedding(rec)
    w.flush()


def test_a_track_named_in_another_process_links_a_track_here(engine):
    cfg = GaitConfig(min_frames=3, link_threshold=0.99)
    there, here = GaitLinker(cfg), GaitLinker(cfg)  # process 0 owns cam0, process 1 owns cam1
    clock = _Clock()
    shared = SharedNamedTracks(engine, ["cam1"], [("gait", here.embedder.model_name, here)], interval_s=2.0, clock=clock)
    _walk(there, "cam0", 1)
    _store_named_track(engine, there, "cam0", 1)
    _walk(here, "cam1", 5)
    assert here.link("cam1", 5) is None  # not polled yet: process 1 does not know Alice
    clock.now = 1.0
    shared()
    assert shared.received == 0  # polls only every interval_s
    clock.now = 2.5
    shared()
    assert shared.received == 1
    named = here.link("cam1", 5)
    assert named is not None and (named.identity, named.method) == ("alice", "gait")
    clock.now = 5.0
    shared()
    assert shared.received == 1  # each stored track is handed over once


def test_own_cameras_and_tracks_stored_before_start_are_not_handed_over(engine):
    cfg = GaitConfig(min_frames=3, link_threshold=0.99)
    there, here = GaitLinker(cfg), GaitLinker(cfg)
    _walk(there, "cam0", 1)
    _store_named_track(engine, there, "cam0", 1)  # an earlier run: clothes may have changed since
    clock = _Clock()
    shared = SharedNamedTracks(engine, ["cam1"], [("gait", here.embedder.model_name, here)], clock=clock)
    _walk(here, "cam1", 2)
    _store_named_track(engine, here, "cam1", 2)  # this process's own camera: already remembered in memory
    clock.now = 10.0
    shared()
    assert shared.received == 0 and len(here.earlier) == 1  # only its own track, from end()


def test_an_unreadable_database_only_delays_sharing(engine, data_dir, caplog):
    cfg = GaitConfig(min_frames=3, link_threshold=0.99)
    here = GaitLinker(cfg)
    clock = _Clock()
    shared = SharedNamedTracks(engine, ["cam1"], [("gait", here.embedder.model_name, here)], clock=clock)
    broken = open_engine(f"sqlite:///{data_dir / 'missing' / 'none.db'}")  # no tables
    shared.engine = broken
    clock.now = 3.0
    shared()  # logged, not raised
    assert "reading named gait tracks" in caplog.text and shared.received == 0
    shared.engine = engine
    there = GaitLinker(cfg)
    _walk(there, "cam0", 1)
    _store_named_track(engine, there, "cam0", 1)
    clock.now = 6.0
    shared()
    assert shared.received == 1
    broken.dispose()
