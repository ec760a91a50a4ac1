"""The storage stage: the only database writer, fed over ZeroMQ by recognition.

``process(None, msg)`` queues a :class:`~pipeline.messages.TrackUpdate` or
:class:`~pipeline.messages.EmbeddingRecord` in the batched
:class:`~storage.writer.EventWriter`; ``tick`` commits a batch when it is due
(``storage.batch_rows`` rows or ``storage.batch_ms`` old); ``finish`` commits
the rest. A failed commit keeps the batch and is retried at the next tick;
the error is reported through ``last_error`` (shown by ``facepro status``); a
database locked by another process (a backup tool, a second writer) is
counted in ``lock_waits`` and the wait so far in ``lock_wait_ms``, and the
batch is committed once the lock is free.
Items arrive as :class:`~pipeline.messages.StorageItem` envelopes; after each
successful commit the stage returns one :class:`~pipeline.messages.StorageAck`
per producer (everything received so far was in the committed batch), which
the producers' ``ReliableSender`` uses to forget them.
Retention (``storage.retention_days`` / ``max_total_mb``, and the pruning
of sent MQTT outbox rows when ``mqtt`` is configured) runs between batches
every ``storage.retention_interval_s``. With ``mqtt`` configured the writer
puts an outbox row in the transaction of each event change (counted in
``outbox_rows``). With an unknown-face assigner on the writer (``recognition.face.unknowns``), ended unnamed
person tracks are clustered in the commit that ends them (counted as ``unknown_tracks``,
``unknown_clusters_created``, ``unknown_skipped_*``), and ``consolidate`` (merging clusters that came
together, counted as ``unknown_clusters_merged``) runs between batches every ``consolidate_interval_s`` and
once at the end.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from pipeline.messages import EmbeddingRecord, StorageAck, StorageItem, TrackUpdate
from storage.db import StorageError
from storage.writer import EventWriter


class StorageStage:
    """Batches incoming updates and embeddings into database transactions.

    Attributes:
        last_error: text of the last failed commit, empty once a commit succeeds.
        written: rows committed so far.
    """

    def __init__(self, writer: EventWriter, retention: Callable[[], object] | None = None,
                 retention_interval_s: float = 300.0, commit_delay_s: float = 0.0,
                 consolidate: Callable[[], int] | None = None, consolidate_interval_s: float = 60.0) -> None:
        self.writer = writer
        self.retention = retention
        self.retention_interval_s = retention_interval_s
        self._next_retention = time.monotonic() + min(10.0, retention_interval_s)
        self.last_error = ""
        self.written = 0
        self.drops = {"malformed": 0}
        self.counts = {"retention_runs": 0, "lock_waits": 0, "lock_wait_ms": 0}
        self._locked_since: float | None = None
        self._received: dict[str, list[int]] = {}  # producer -> seqs in the pending batch
        self.commit_delay_s = commit_delay_s
        self.consolidate = consolidate
        self.consolidate_interval_s = consolidate_interval_s
        self._next_consolidation = time.monotonic() + consolidate_interval_s

    @property
    def backlog(self) -> int:
        """Rows waiting to be committed."""
        return self.writer.pending

    def wants_frame(self, meta: object) -> bool:
        return False

    def process(self, frame: np.ndarray | None, meta: object) -> list[object]:
        if isinstance(meta, StorageItem):
            self._received.setdefault(meta.producer, []).append(meta.seq)
            meta = meta.payload
        try:
            if isinstance(meta, TrackUpdate):
                self.writer.add_update(meta)
            elif isinstance(meta, EmbeddingRecord):
                self.writer.add_embedding(meta)
        except ValueError as err:  # a row the database would reject: count it, keep the batch
            self.drops["malformed"] += 1
            self.last_error = f"rejected row: {err}"
        return []

    def _flush(self) -> list[object]:
        """Commit the batch; on success acknowledge exactly the items it held."""
        if self.commit_delay_s:
            time.sleep(self.commit_delay_s)  # benchmarks: a slow disk
        try:
            self.written += self.writer.flush()
            self.last_error = ""
            if getattr(self.writer, "outbox_box_id", None) is not None:  # (a test's writer may have no outbox)
                self.counts["outbox_rows"] = self.writer.outbox_rows
            unknowns = getattr(self.writer, "unknowns", None)
            if unknowns is not None:
                self.counts.update({k: v for k, v in unknowns.counts.as_dict().items() if k != "unknown_clusters_merged"})
        except StorageError as err:
            self.last_error = str(err)
            self._note_lock(err)
            return []
        self._locked_since = None
        self.counts["lock_wait_ms"] = 0
        acks = [StorageAck(producer=p, seqs=np.array(seqs, np.int64)) for p, seqs in self._received.items() if seqs]
        self._received = {}
        return acks

    def _note_lock(self, err: StorageError) -> None:
        """Count a flush that found the database locked by another process; ``lock_wait_ms`` says for how
        long the batch has been waiting (0 once a commit succeeds), shown by ``facepro status``."""
        if "locked" not in str(err) and "busy" not in str(err):
            return
        now = time.monotonic()
        if self._locked_since is None:
            self._locked_since = now
        self.counts["lock_waits"] += 1
        self.counts["lock_wait_ms"] = int((now - self._locked_since) * 1000)

    def tick(self, now_ns: int) -> list[object]:
        acks = self._flush() if self.writer.due() else []
        if self.retention is not None and time.monotonic() >= self._next_retention and not self.writer.pending:
            self._next_retention = time.monotonic() + self.retention_interval_s
            try:
                self.retention()
                self.counts["retention_runs"] += 1
            except StorageError as err:
                self.last_error = f"retention: {err}"
        if self.consolidate is not None and time.monotonic() >= self._next_consolidation and not self.writer.pending:
            self._next_consolidation = time.monotonic() + self.consolidate_interval_s
            self._consolidate()
        return acks

    def _consolidate(self) -> None:
        try:
            merged = self.consolidate()  # type: ignore[misc]
            self.counts["unknown_clusters_merged"] = self.counts.get("unknown_clusters_merged", 0) + int(merged)
        except StorageError as err:
            self.last_error = f"consolidating unknown faces: {err}"

    def finish(self) -> list[object]:
        acks = self._flush()
        if self.consolidate is not None and not self.writer.pending:
            self._consolidate()
        return acks
