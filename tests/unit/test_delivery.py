"""Acknowledged delivery to storage: envelopes, exact acks, re-sends, idempotent writes (no sockets)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.messages import EmbeddingRecord, StorageAck, StorageItem, TrackUpdate
from pipeline.transport import ReliableSender
from storage.db import StorageError, open_engine, upgrade
from storage.queries import count_rows, list_events
from storage.stage import StorageStage
from storage.writer import EventWriter


def _update(i: int, last: int = 5) -> TrackUpdate:
    return TrackUpdate(event_id=f"{i:032x}", camera="cam", track_id=i, label="person", first_seen_ns=1_700_000_000_000_000_000,
                       last_seen_ns=1_700_000_001_000_000_000, first_frame=0, last_frame=last, best_score=0.9,
                       xyxy=np.array([1, 2, 30, 40], np.float32))


def _emb(i: int, frame: int = 3) -> EmbeddingRecord:
    return EmbeddingRecord(event_id=f"{i:032x}", kind="reid", model="osnet", vector=np.full(8, 8 ** -0.5, np.float32),
                           frame_index=frame)


@pytest.fixture()
def engine(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    upgrade(url)
    return open_engine(url)


def _stage(engine) -> StorageStage:
    return StorageStage(EventWriter(engine, batch_rows=1000, batch_ms=1))


def test_storage_acknowledges_exactly_the_committed_items(engine) -> None:
    stage = _stage(engine)
    items = [StorageItem("p1", 1, update=_update(1)), StorageItem("p1", 2, embedding=_emb(1)),
             StorageItem("p2", 7, update=_update(2))]
    for item in items:
        assert stage.process(None, item) == []
    time.sleep(0.01)
    acks = {a.producer: a.seqs.tolist() for a in stage.tick(0)}
    assert acks == {"p1": [1, 2], "p2": [7]}
    assert stage.tick(0) == []  # nothing new, nothing acknowledged
    assert count_rows(engine)["events"] == 2


def test_failed_commit_is_not_acknowledged_and_kept(engine, monkeypatch: pytest.MonkeyPatch) -> None:
    stage = _stage(engine)
    stage.process(None, StorageItem("p", 1, update=_update(1)))
    real = stage.writer.flush
    monkeypatch.setattr(stage.writer, "flush", lambda: (_ for _ in ()).throw(StorageError("database is locked")))
    time.sleep(0.01)
    assert stage.tick(0) == [] and "locked" in stage.last_error
    monkeypatch.setattr(stage.writer, "flush", real)
    stage.process(None, StorageItem("p", 2, update=_update(2)))
    (ack,) = stage.tick(0)
    assert ack.seqs.tolist() == [1, 2] and stage.last_error == ""
    assert count_rows(engine)["events"] == 2


def test_resent_items_are_not_duplicated(engine) -> None:
    for _ in range(2):  # the same items delivered twice (a storage restart before the ack)
        stage = _stage(engine)
        for seq, item in enumerate([_update(1, last=5), _emb(1), _emb(1, frame=4)], start=1):
            kw = {"update": item} if isinstance(item, TrackUpdate) else {"embedding": item}
            stage.process(None, StorageItem("p", seq, **kw))
        stage.finish()
    rows = count_rows(engine)
    assert rows["events"] == 1 and rows["reid_embeddings"] == 2
    assert [e.last_frame for e in list_events(engine)] == [5]


class _FakeSocketSender:
    def __init__(self) -> None:
        self.sent: list[StorageItem] = []

    def send(self, msg, timeout_ms=0) -> bool:
        self.sent.append(msg)
        return True


class _FakeAcks:
    def __init__(self) -> None:
        self.queue: list[StorageAck] = []

    def recv(self, timeout_ms: int):
        return self.queue.pop(0) if self.queue else None


def test_reliable_sender_keeps_until_acked_and_resends_when_storage_goes_quiet() -> None:
    sock, acks = _FakeSocketSender(), _FakeAcks()
    rs = ReliableSender(sock, acks, producer="me", resend_after_s=0.05)
    for i in range(1, 4):
        assert rs.send(_update(i))
    assert [i.seq for i in sock.sent] == [1, 2, 3] and sorted(rs.unacked) == [1, 2, 3]
    acks.queue += [StorageAck("someone-else", np.array([1, 2, 3], np.int64)), StorageAck("me", np.array([1, 3], np.int64))]
    rs.service()
    assert sorted(rs.unacked) == [2]  # exact, not cumulative
    time.sleep(0.06)
    rs.service()
    assert [i.seq for i in sock.sent[-1:]] == [2] and rs.resent == 1  # re-sent after the quiet period
    acks.queue.append(StorageAck("me", np.array([2], np.int64)))
    assert rs.wait_all_acked(timeout_s=1.0)


def test_reliable_sender_bounds_what_it_keeps() -> None:
    rs = ReliableSender(_FakeSocketSender(), _FakeAcks(), producer="me", max_unacked=2)
    for i in range(1, 5):
        rs.send(_update(i))
    assert sorted(rs.unacked) == [3, 4] and rs.dropped == 2
