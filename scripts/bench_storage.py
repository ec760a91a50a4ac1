#!/usr/bin/env python3
"""Storage write benchmark: one transaction per event row vs. EventWriter batches.

Each *row* is one event: a :class:`~pipeline.messages.TrackUpdate` plus one
512-float :class:`~pipeline.messages.EmbeddingRecord` (two database rows:
``events`` and the embedding's table). Both modes write to the same
temporary SQLite file (WAL, ``synchronous=NORMAL``, as the pipeline does):

- ``per_row``: ``flush()`` after every event (one transaction per event);
- ``batched``: :class:`~storage.writer.EventWriter` flushing when
  :meth:`~storage.writer.EventWriter.due` (``--batch-rows`` pending rows).
- ``sqlite_ceiling``: what SQLite itself does on this disk with the same
  schema, SQL and transaction size: plain ``sqlite3`` ``executemany`` of the
  rows EventWriter would bind, built before the clock starts (no Python work
  per row is timed). ``batched`` / ``sqlite_ceiling`` is the share of the
  database's own speed the writer reaches.

Each mode writes a fresh database file in the same temporary folder.
``rows/s`` counts events (each with its embedding: two database rows);
``db_rows_s`` counts database rows.

Messages are built before the clock starts; rows/s = events written / wall
seconds (``time.perf_counter``) including the final flush.

Usage::

    python scripts/bench_storage.py                 # table
    python scripts/bench_storage.py --json          # {"per_row_rows_s": ..., "batched_rows_s": ..., ...}

Pipeline-level numbers (``slow_storage_fps_ratio``: pipeline FPS with a slow
database vs. a fast one) belong in :func:`pipeline_measurements`, which
returns nothing yet; its keys are merged into the JSON output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import StorageConfig  # noqa: E402
from pipeline.messages import EmbeddingRecord, TrackUpdate, new_event_id  # noqa: E402
from benchlib import active_fps, assets_dir, pipeline_tree, run_pipeline  # noqa: E402
from storage.db import open_engine, upgrade  # noqa: E402
from storage.writer import EventWriter  # noqa: E402

T0_NS = 1_700_000_000_000_000_000
#: Target of the batched mode, event rows/s (issue: "writes that never stall").
TARGET_BATCHED_ROWS_S = 30_000


def make_rows(n: int, dim: int, seed: int = 0) -> list[tuple[TrackUpdate, EmbeddingRecord]]:
    """``n`` (update, embedding) pairs of distinct events, ids from :func:`~pipeline.messages.new_event_id`
    like the pipeline's; vectors are unit-norm float32 of ``dim``."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((min(n, 1024), dim)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    box = np.array([10, 20, 110, 320], np.float32)
    rows = []
    for i in range(n):
        eid = new_event_id()  # as tracking makes them: time-ordered UUIDv7, one per event in start order
        t = T0_NS + i * 40_000_000
        u = TrackUpdate(eid, f"cam{i % 4}", i, "person", t, t + 1_000_000_000, i, i + 25, 0.8, box)
        rows.append((u, EmbeddingRecord(eid, "face", "arcface_512d", pool[i % len(pool)], frame_index=i, quality=0.9)))
    return rows


def run_per_row(writer: EventWriter, rows: list[tuple[TrackUpdate, EmbeddingRecord]]) -> float:
    """Write each event and its embedding in its own transaction; returns event rows/s."""
    start = time.perf_counter()
    for u, e in rows:
        writer.add_update(u)
        writer.add_embedding(e)
        writer.flush()
    return len(rows) / (time.perf_counter() - start)


def run_batched(writer: EventWriter, rows: list[tuple[TrackUpdate, EmbeddingRecord]]) -> float:
    """Queue every event and embedding, flushing whenever the writer is due; returns event rows/s."""
    start = time.perf_counter()
    for u, e in rows:
        writer.add_update(u)
        writer.add_embedding(e)
        if writer.due():
            writer.flush()
    writer.flush()
    return len(rows) / (time.perf_counter() - start)


def run_sqlite_ceiling(db_file: Path, rows: list[tuple[TrackUpdate, EmbeddingRecord]], events_per_txn: int) -> float:
    """Plain ``sqlite3`` executemany of the writer's own SQL and bound values; returns event rows/s.

    Run after :func:`run_batched`, whose compiled statements (the SQL EventWriter
    sends for new events) are reused, so both modes execute the same SQL.
    """
    import sqlite3

    from storage import writer as w

    def ordered(sql_key: tuple[str, tuple[str, ...]], values: list[tuple]) -> tuple[str, list[tuple]]:
        sql, positions = w._SQLITE_SQL[sql_key]  # the SQL text and parameter order the writer compiled
        return sql, values if positions is None else [tuple(v[i] for i in positions) for v in values]

    times, now = w.SqliteTimes().text, w.sqlite_time(w.utcnow())
    insert_events, events = ordered(("insert events", w._EVENT_KEYS),
                                    [w._event_values(u, {u.camera: 1 + int(u.camera[3:])}, {}, times) for u, _ in rows])
    insert_vectors, vectors = ordered(("insert track_embeddings", w._VECTOR_KEYS + ("kind",)),
                                      [(e.event_id, e.model, e.vector.shape[0], e.vector.tobytes(), e.frame_index, e.quality,
                                        now, "face") for _, e in rows])
    ids = [u.event_id for u, _ in rows]
    conn = sqlite3.connect(db_file, isolation_level=None)
    try:
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", f"cache_size={-1024 * CACHE_MB}"):
            conn.execute(f"PRAGMA {pragma}")
        conn.executemany("INSERT INTO cameras (id, name, created_at) VALUES (?, ?, ?)",
                         [(1 + i, f"cam{i}", now) for i in range(4)])
        start = time.perf_counter()
        for i in range(0, len(events), events_per_txn):
            batch = ids[i:i + events_per_txn]
            conn.execute("BEGIN IMMEDIATE")
            # the writer's steps: which events are stored (none here), insert the new ones, then the vectors
            conn.execute(f"SELECT id FROM events WHERE id IN ({', '.join('?' * len(batch))})", batch).fetchall()
            conn.executemany(insert_events, events[i:i + events_per_txn])
            conn.executemany(insert_vectors, vectors[i:i + events_per_txn])
            conn.execute("COMMIT")
        return len(events) / (time.perf_counter() - start)
    finally:
        conn.close()


def pipeline_measurements(args: argparse.Namespace) -> dict[str, float]:
    """Detection frames/s of the real pipeline with every storage commit slowed by ``--slow-commit-ms`` vs normal.

    Both runs process ``vtest.avi`` with the asset models in the same invocation,
    alternating ``--repeats`` times; frames/s = detection frames / active time
    (first frame → every frame processed). A ratio near 1 shows storage never
    stalls the pipeline: recognition keeps sending while storage commits.
    Skipped (``{}``) unless ``--pipeline`` is given.
    """
    if not args.pipeline:
        return {}
    assets = assets_dir(args.assets)
    fps: dict[str, list[float]] = {"normal": [], "slow": []}
    for _ in range(args.repeats):
        for name, delay in (("normal", 0.0), ("slow", args.slow_commit_ms)):
            tree = pipeline_tree(assets, storage={"snapshots": False, "debug_commit_delay_ms": delay})
            fps[name].append(active_fps(run_pipeline(tree)))
    normal, slow = statistics.median(fps["normal"]), statistics.median(fps["slow"])
    return {"normal_fps": round(normal, 2), "slow_storage_fps": round(slow, 2),
            "slow_storage_fps_ratio": round(slow / normal, 3), "slow_commit_ms": args.slow_commit_ms}


#: The storage process's page cache (``storage.cache_mb``), used by every mode.
CACHE_MB = StorageConfig().cache_mb


def _fresh_db(folder: Path, name: str) -> str:
    url = f"sqlite:///{folder / name}"
    upgrade(url)
    return url


def bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="facepro-bench-", dir=args.dir) as tmp:
        folder = Path(tmp)
        engine = open_engine(_fresh_db(folder, "per_row.db"), cache_mb=CACHE_MB)
        try:
            per_row = run_per_row(EventWriter(engine, batch_rows=1, batch_ms=1), make_rows(args.per_row_rows, args.dim, seed=1))
        finally:
            engine.dispose()
        engine = open_engine(_fresh_db(folder, "batched.db"), cache_mb=CACHE_MB)
        try:
            writer = EventWriter(engine, batch_rows=args.batch_rows, batch_ms=args.batch_ms)
            batched = run_batched(writer, make_rows(args.batched_rows, args.dim, seed=2))
            flushes = writer.flushes
        finally:
            engine.dispose()
        _fresh_db(folder, "ceiling.db")
        ceiling = run_sqlite_ceiling(folder / "ceiling.db", make_rows(args.batched_rows, args.dim, seed=3),
                                     max(1, args.batched_rows // flushes))
    result: dict[str, Any] = {
        "per_row_rows_s": round(per_row, 1),
        "batched_rows_s": round(batched, 1),
        "ratio": round(batched / per_row, 2),
        "sqlite_ceiling_rows_s": round(ceiling, 1),
        "batched_vs_ceiling": round(batched / ceiling, 3),
        "batched_db_rows_s": round(2 * batched, 1),
        "dim": args.dim,
        "batch_rows": args.batch_rows,
        "per_row_events": args.per_row_rows,
        "batched_events": args.batched_rows,
        "target_batched_rows_s": TARGET_BATCHED_ROWS_S,
    }
    result.update(pipeline_measurements(args))
    return result


def print_table(r: dict[str, Any]) -> None:
    print(f"storage write benchmark: event + {r['dim']}-float embedding per row, SQLite WAL")
    print(f"{'mode':<28}{'events':>10}{'rows/s':>12}")
    print(f"{'per_row (1 txn / event)':<28}{r['per_row_events']:>10}{r['per_row_rows_s']:>12,.0f}")
    print(f"{'batched (' + str(r['batch_rows']) + ' rows / txn)':<28}{r['batched_events']:>10}{r['batched_rows_s']:>12,.0f}")
    print(f"{'sqlite_ceiling (same SQL)':<28}{r['batched_events']:>10}{r['sqlite_ceiling_rows_s']:>12,.0f}")
    ok = "met" if r["batched_rows_s"] >= r["target_batched_rows_s"] else "NOT met"
    print(f"ratio batched / per_row: {r['ratio']:.1f}x; batched / sqlite_ceiling: {r['batched_vs_ceiling']:.2f}; "
          f"batched database rows/s (event + embedding): {r['batched_db_rows_s']:,.0f}")
    print(f"target >= {r['target_batched_rows_s']:,} event rows/s batched: {ok}")
    if "slow_storage_fps_ratio" in r:
        print(f"pipeline detection fps: normal {r['normal_fps']}, storage commits +{r['slow_commit_ms']:.0f} ms "
              f"{r['slow_storage_fps']}; ratio {r['slow_storage_fps_ratio']} (target >= 0.95)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-row-rows", type=int, default=3_000, help="events written one transaction each")
    p.add_argument("--batched-rows", type=int, default=60_000, help="events written in batches")
    p.add_argument("--batch-rows", type=int, default=500, help="EventWriter.batch_rows (pending rows per flush)")
    p.add_argument("--batch-ms", type=int, default=200, help="EventWriter.batch_ms")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension")
    p.add_argument("--dir", type=Path, default=None, help="folder for the temporary database (default: system temp)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--pipeline", action="store_true", help="also run the real pipeline with slowed commits (about 1 min per repeat)")
    p.add_argument("--slow-commit-ms", type=float, default=50.0, help="artificial delay per storage commit, ms")
    p.add_argument("--repeats", type=int, default=1, help="pipeline runs per setting (median shown)")
    p.add_argument("--assets", default=None, help="folder with models/ and data/ (default: FACEPRO_ASSETS)")
    args = p.parse_args(argv)
    if min(args.per_row_rows, args.batched_rows, args.batch_rows, args.batch_ms, args.dim) < 1:
        p.error("every count must be >= 1")
    result = bench(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
