"""Counter blocks: layout round trip, writer and reader in separate objects, survival without close."""

from __future__ import annotations

import gc
import os
import uuid

import numpy as np
import pytest

from pipeline import counters as cb
from pipeline.counters import CounterBlock, CounterBlockError, block_name, owner_of
from pipeline.messages import DROP_REASONS
from pipeline.metrics import Heartbeat, StageCounters


@pytest.fixture()
def name():
    n = block_name(f"t{uuid.uuid4().hex[:7]}", "detection", 0, 1)
    yield n
    cb.unlink_block(n)


def test_layout_is_fixed_and_documented() -> None:
    assert cb.BLOCK_BYTES == 4096 and cb.DROPS_AT == 16 and cb.EXTRA_AT == 32
    assert cb.NAMES_AT == 512 and cb.ERROR_AT == 2560 and cb.MAX_EXTRA == 32 and cb.NAME_BYTES == 64
    assert len(DROP_REASONS) <= cb.MAX_DROPS
    assert block_name("ab12cd34", "capture", 2, 7) == "facepro_ab12cd34_ctr_capture_2_7"


def test_writer_increments_are_visible_to_a_reader_at_once(name: str) -> None:
    created = CounterBlock.create(name, owner_pid=4242)
    counters = StageCounters("detection", 0, block=CounterBlock.attach(name))
    reader = CounterBlock.attach(name)
    counters.frames_in += 3
    counters.frames_out += 2
    counters.sent = 2
    counters.backlog = 1
    counters.oldest_wait_ms = 12.5
    counters.drop("lost", 4)
    counters.drops[DROP_REASONS.index("overwritten")] += 1
    counters.extra["face_rejected_blurry"] = 7
    counters.extra.update(storage_unacked=3)
    counters.last_error = "ModelError: é" * 100  # cut at 1023 bytes on a character boundary
    for ms in (10.0, 20.0, 30.0):
        counters.observe_ms(ms)
    counters.publish()
    snap = reader.read()
    assert (snap.frames_in, snap.frames_out, snap.sent, snap.backlog) == (3, 2, 2, 1)
    assert snap.pid == os.getpid() and snap.owner_pid == 4242 and owner_of(name) == 4242
    assert snap.drops[DROP_REASONS.index("lost")] == 4 and snap.drops[DROP_REASONS.index("overwritten")] == 1
    assert snap.extra == {"face_rejected_blurry": 7, "storage_unacked": 3}
    assert snap.oldest_wait_ms == 12.5 and snap.latency_p50_ms == 20.0 and snap.max_rss_mb > 0
    assert snap.last_error.startswith("ModelError: é") and len(snap.last_error.encode()) <= 1023
    assert snap.heartbeat_ns > 0
    assert counters.extra["face_rejected_blurry"] == 7 and dict(counters.extra) == snap.extra
    created.close()


def test_counts_survive_the_writer_object_dropped_without_close(name: str) -> None:
    CounterBlock.create(name).close()
    counters = StageCounters("recognition", 1, block=CounterBlock.attach(name))
    counters.frames_out += 41
    counters.extra["x"] = 5
    del counters
    gc.collect()
    snap = CounterBlock.attach(name).read()
    assert snap.frames_out == 41 and snap.extra == {"x": 5}


def test_extra_names_are_limited(name: str) -> None:
    block = CounterBlock.create(name)
    c = StageCounters("storage", 0, block=block)
    for i in range(cb.MAX_EXTRA):
        c.extra[f"count_{i}"] = i
    with pytest.raises(CounterBlockError, match="full"):
        block.slot("one_too_many")
    c.extra["one_too_many"] = 1  # a process reporting one counter too many is not failed for it: the counter is left out
    assert c.extra.left_out == {"one_too_many"} and "one_too_many" not in c.extra
    with pytest.raises(CounterBlockError, match="UTF-8 bytes"):
        CounterBlock.private().slot("n" * 65)
    assert len(c.extra) == cb.MAX_EXTRA and block.read().extra["count_31"] == 31
    block.close()


def test_attach_rejects_missing_and_foreign_segments(name: str) -> None:
    with pytest.raises(CounterBlockError, match="cannot attach"):
        CounterBlock.attach(name)
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(name=name, create=True, size=cb.BLOCK_BYTES)
    try:
        with pytest.raises(CounterBlockError, match="not a version-1"):
            CounterBlock.attach(name)
        assert owner_of(name) is None
    finally:
        shm.close()


def test_heartbeat_thread_stamps_the_block() -> None:
    import time

    c = StageCounters("capture", 0)
    hb = Heartbeat(c, None, 0.02).start()
    first = int(c.block.ints[cb.W_HEARTBEAT_NS])
    time.sleep(0.15)  # the main thread does nothing: the thread keeps beating
    hb.stop()
    assert int(c.block.ints[cb.W_HEARTBEAT_NS]) > first > 0


def test_private_block_has_the_same_layout() -> None:
    c = StageCounters("test", 0)
    c.frames_in = 5
    assert c.block.read().frames_in == 5 and c.block.name is None and not c.block.unlink()
    assert isinstance(c.drops, np.ndarray) and c.drops.dtype == np.int64 and len(c.drops) == len(DROP_REASONS)


def test_counts_written_by_a_sigkilled_process_are_kept(name: str) -> None:
    import subprocess
    import sys

    block = CounterBlock.create(name)
    code = ("import os, signal, sys\n"
            "from pipeline.counters import CounterBlock\nfrom pipeline.metrics import StageCounters\n"
            "c = StageCounters('detection', 0, block=CounterBlock.attach(sys.argv[1]))\n"
            "for _ in range(1000): c.frames_out += 1\n"
            "c.drop('lost', 2); c.extra['killed'] = 1\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    res = subprocess.run([sys.executable, "-c", code, name], cwd=os.getcwd(), timeout=60)
    assert res.returncode == -9
    snap = block.read()
    assert snap.frames_out == 1000 and snap.drops[DROP_REASONS.index("lost")] == 2 and snap.extra == {"killed": 1}
    assert snap.pid not in (0, os.getpid())
    block.close()
