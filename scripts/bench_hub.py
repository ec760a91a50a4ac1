#!/usr/bin/env python3
"""Fleet hub write benchmark: event messages per second through :class:`storage.hub.HubMerge` and
:class:`storage.hub.HubStore`, one transaction per batch, for several batch sizes.

Messages are synthetic FacePro event messages (``--events`` events of ``--boxes`` boxes, each ``new``, then
``update`` with an identity, then ``end``; all ``new`` first, then the updates, then the ends, as live traffic
interleaves events), built before the clock starts. Each batch size writes into an empty ``events`` table:
parse, reduce, one upsert transaction (the hub's per-batch work without the broker). The batch a running hub
commits is what arrived during the previous commit, up to ``--batch`` and the broker's in-flight window
(Mosquitto: ``max_inflight_messages``, default 20).

Database: a fresh schema on the PostgreSQL server of ``--url`` (dropped afterwards), or a temporary SQLite
file with ``--sqlite``.

Usage::

    python scripts/bench_hub.py                       # PostgreSQL at 127.0.0.1:5432/test, table
    python scripts/bench_hub.py --sqlite --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from storage.db import open_engine, upgrade  # noqa: E402
from storage.hub import HubMerge, HubStore  # noqa: E402

START = 1_700_000_000.0


def message(kind: str, event: str, seq: int, box: str) -> bytes:
    """One event message in the shape of :mod:`storage.outbox`."""
    after = {"id": event, "camera": "entrance", "label": "person", "score": 0.8, "top_score": 0.8,
             "start_time": START, "end_time": START + 5 if kind == "end" else None, "box": [1.0, 2.0, 30.0, 60.0],
             "identity": "ann" if seq > 1 else None, "sub_label": ["ann", 0.7] if seq > 1 else None,
             "method": "face" if seq > 1 else None, "has_snapshot": False, "box_id": box, "seq": seq,
             "track_id": 1, "first_frame": 0, "last_frame": 50, "identity_score": 0.7}
    return json.dumps({"type": kind, "before": after, "after": after}).encode()


@contextlib.contextmanager
def database(url: str, sqlite: bool) -> Iterator[str]:
    if sqlite:
        with tempfile.TemporaryDirectory() as folder:
            yield f"sqlite:///{folder}/hub.db"
        return
    schema = f"bench_hub_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield make_url(url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def run(url: str, events: int, boxes: int, batches: list[int]) -> dict[str, float]:
    ids = [uuid.uuid4().hex for _ in range(events)]
    msgs = [message(kind, e, seq, f"box-{i % boxes}") for seq, kind in ((1, "new"), (2, "update"), (3, "end"))
            for i, e in enumerate(ids)]
    upgrade(url)
    engine = open_engine(url)
    store, out = HubStore(engine), {}
    try:
        for batch in batches:
            with engine.begin() as conn:
                conn.execute(text("DELETE FROM events"))
            started = time.perf_counter()
            for i in range(0, len(msgs), batch):
                merge = HubMerge()
                for m in msgs[i:i + batch]:
                    merge.add(m)
                store.write(merge.take())
            out[f"batch_{batch}_messages_s"] = round(len(msgs) / (time.perf_counter() - started), 1)
    finally:
        engine.dispose()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test", help="PostgreSQL server")
    p.add_argument("--sqlite", action="store_true", help="a temporary SQLite file instead")
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--boxes", type=int, default=4)
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default: 1, 20, 100, 500)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with database(args.url, args.sqlite) as url:
        res = run(url, args.events, args.boxes, args.batch or [1, 20, 100, 500])
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.events * 3} messages ({args.events} events x new/update/end, {args.boxes} boxes), "
              f"{'SQLite' if args.sqlite else 'PostgreSQL'}")
        for key, rate in res.items():
            print(f"  batch {key.split('_')[1]:>4}: {rate:>9,.0f} messages/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
