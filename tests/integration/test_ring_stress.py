"""Cross-process stress test of the shared-memory frame ring (:mod:`pipeline.ring`).

One writer process publishes 720p BGR frames at full speed; every frame's
pixels are a pattern derived from its sequence number, so a frame that mixes
two writes (a torn read) fails :meth:`Pattern.matches`. The writer announces
each :class:`~pipeline.messages.FrameRef` over ZeroMQ (PUB in live mode, so
every reader sees every frame; PUSH in file mode, so each frame has exactly
one owner); pixels only ever travel through the ring. Slow readers (sleeping
before each read) and fast readers run in separate processes and write their
counts to JSON/``.npy`` result files.

Properties checked:

- every frame a reader accepts (``RingReader.read`` returned an array) is
  byte-exact for its ``seq``, in both modes;
- per reader, drops counted == frames announced − frames accepted;
- live mode: the slow reader sees drops (the writer never waits);
- file mode: nothing is dropped, every ``seq`` is accepted exactly once
  across the readers, and the writer never had to reclaim a slot;
- the writer unlinks its ring: no segment of this module's run id is left.

Every receive has a timeout and every process join a deadline, so a broken
ring fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zmq

from pipeline.codec import decode, encode
from pipeline.messages import Ack, FrameRef
from pipeline.ring import RingLayout, RingReader, RingWriter, list_segments, ring_name, unlink_segments
from pipeline.transport import Transport

#: 720p BGR: 2.76 MB per frame, so a copy takes long enough to overlap a rewrite.
FRAME_SHAPE = (720, 1280, 3)
RUN_ID = uuid.uuid4().hex[:8]
RECV_TIMEOUT_MS = 15_000  # a reader gives up when nothing arrives for this long
RUN_DEADLINE_S = 45.0  # whole scenario, start of processes to last join
_POS_MUL = 0x9E3779B97F4A7C15  # odd: consecutive words differ
_SEQ_MUL = 0xD1B54A32D192ED03  # odd: two different seqs differ in every word


class Pattern:
    """Expected pixels of frame ``seq``: 64-bit word ``i`` = ``i * P + seq * S`` (mod 2**64).

    ``P`` and ``S`` are odd, so frames of two different seqs differ in every
    8-byte word: a copy that takes any part of another frame fails
    :meth:`matches`.

    Args:
        shape: ``(H, W, C)`` of the uint8 frames; ``H * W * C`` must be a multiple of 8.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        nbytes = int(np.prod(shape))
        if nbytes % 8:
            raise ValueError(f"frame of {nbytes} bytes is not a whole number of 64-bit words")
        self.shape = shape
        self._base = np.arange(nbytes // 8, dtype=np.uint64) * np.uint64(_POS_MUL)
        self._words = np.empty_like(self._base)

    def _fill(self, seq: int) -> np.ndarray:
        np.add(self._base, np.uint64(seq * _SEQ_MUL % 2**64), out=self._words)
        return self._words

    def frame(self, seq: int) -> np.ndarray:
        """The ``(H, W, C)`` uint8 frame of ``seq`` (a view of an internal buffer, valid until the next call)."""
        return self._fill(seq).view(np.uint8).reshape(self.shape)

    def matches(self, frame: np.ndarray, seq: int) -> bool:
        """True when ``frame`` ((H, W, C) uint8) is exactly the frame of ``seq``."""
        words = np.ascontiguousarray(frame).reshape(-1).view(np.uint64)
        return bool(np.array_equal(words, self._fill(seq)))


# ---------------------------------------------------------------- in-process checks


def test_pattern_rejects_a_frame_mixing_two_seqs() -> None:
    pattern = Pattern(FRAME_SHAPE)
    a, b = pattern.frame(7).copy(), pattern.frame(8).copy()
    torn = a.copy()
    torn[FRAME_SHAPE[0] // 2:] = b[FRAME_SHAPE[0] // 2:]
    assert pattern.matches(a, 7) and pattern.matches(b, 8)
    assert not pattern.matches(torn, 7) and not pattern.matches(torn, 8)
    a.reshape(-1)[-1] ^= 1  # a single flipped bit
    assert not pattern.matches(a, 7)


class _RewriteMidCopy(np.ndarray):
    """An ``out`` buffer whose ``np.copyto`` lets the writer rewrite the slot halfway through the copy."""

    rewrite = None  # callable run between the two halves

    def __array_function__(self, func, types, args, kwargs):
        if func is not np.copyto:
            return super().__array_function__(func, types, args, kwargs)
        dst, src = self.view(np.ndarray), np.asarray(args[1])
        half = dst.shape[0] // 2
        np.copyto(dst[:half], src[:half])
        type(self).rewrite()
        np.copyto(dst[half:], src[half:])
        return None


def test_read_discards_a_frame_rewritten_during_the_copy() -> None:
    """The seqlock's second check: a copy overlapped by a rewrite is torn, and read() returns None."""
    pattern = Pattern(FRAME_SHAPE)
    name = ring_name(RUN_ID, "tear", os.getpid(), 0)
    writer = RingWriter.create(name, RingLayout(slots=1, height=FRAME_SHAPE[0], width=FRAME_SHAPE[1]), wait_for_release=False)
    reader = RingReader.attach(name)
    try:
        slot, seq = writer.write(pattern.frame(1), 0, time.time_ns())
        _RewriteMidCopy.rewrite = lambda: writer.write(pattern.frame(2), 1, time.time_ns())
        out = np.empty(FRAME_SHAPE, np.uint8).view(_RewriteMidCopy)
        try:
            assert reader.read(slot, seq, out=out) is None
        finally:
            _RewriteMidCopy.rewrite = None
        torn = out.view(np.ndarray)
        assert not pattern.matches(torn, 1) and not pattern.matches(torn, 2)  # the copy really was torn
        assert pattern.matches(reader.read(slot, 2), 2)
    finally:
        reader.close()
        writer.close()
    assert name not in list_segments(RUN_ID)


# ---------------------------------------------------------------- processes


def _socket(t: Transport, kind: int, name: str, *, bind: bool, hwm: int = 0) -> zmq.Socket:
    """A raw ZeroMQ socket at ``t``'s endpoint ``name`` (``hwm=0``: unbounded, nothing dropped)."""
    sock = t.ctx.socket(kind)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    if kind == zmq.XPUB:
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # one subscription message per reader
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.bind(t.endpoint(name)) if bind else sock.connect(t.endpoint(name))
    return sock


def _wait_subscribers(pub: zmq.Socket, count: int, timeout_s: float) -> None:
    """Block until ``count`` SUB sockets have subscribed to the XPUB ``pub`` (no slow-joiner loss)."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while seen < count:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0 or not pub.poll(left_ms, zmq.POLLIN):
            raise TimeoutError(f"only {seen} of {count} readers subscribed within {timeout_s} s")
        seen += pub.recv()[:1] == b"\x01"


def _publish_frames(cfg: dict, writer: RingWriter, send) -> int:
    """Write ``cfg['frames']`` pattern frames into ``writer`` and ``send`` a FrameRef for each; returns the count."""
    pattern = Pattern(FRAME_SHAPE)
    for seq in range(1, cfg["frames"] + 1):
        if not writer.wait_slot():
            break
        now = time.time_ns()
        slot, got = writer.write(pattern.frame(seq), seq - 1, now)
        assert got == seq
        send(FrameRef(camera=cfg["camera"], ring=writer.name, slot=slot, seq=seq, frame_index=seq - 1,
                      captured_at_ns=now, height=FRAME_SHAPE[0], width=FRAME_SHAPE[1]))
    return writer.next_seq - 1


def _wait_all_released(writer: RingWriter, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not writer.all_released():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{writer.occupancy()} frames never released")
        time.sleep(0.001)


def writer_main(cfg: dict, readers_done) -> None:
    """Writer process: ring + announcements; writes ``writer.json`` ({produced, error})."""
    result = {"produced": 0, "error": ""}
    layout = RingLayout(slots=cfg["slots"], height=FRAME_SHAPE[0], width=FRAME_SHAPE[1])
    live = cfg["mode"] == "live"
    t = Transport(Path(cfg["runtime_dir"]))
    ctl = _socket(t, zmq.XPUB, "ctl", bind=True)  # live: FrameRefs + done; file: done only
    writer = None
    try:
        writer = RingWriter.create(ring_name(cfg["run_id"], cfg["camera"], os.getpid(), 0), layout,
                                   wait_for_release=not live, release_timeout_s=20.0)
        if live:
            send = lambda ref: ctl.send_multipart(encode(ref), copy=False)  # noqa: E731
        else:
            frames = t.sender("frames", bind=True, hwm=64)
            send = lambda ref: frames.send(ref, timeout_ms=None)  # noqa: E731
        _wait_subscribers(ctl, cfg["readers"], timeout_s=20.0)
        result["produced"] = _publish_frames(cfg, writer, send)
        if not live:
            _wait_all_released(writer, timeout_s=30.0)  # every frame consumed before "done"
        ctl.send_multipart(encode(Ack(ok=True, message="done")))
        readers_done.wait(RUN_DEADLINE_S)  # keep the ring alive for late (live) readers
    except Exception as err:  # reported to the test through writer.json
        result["error"] = f"{type(err).__name__}: {err}"
    finally:
        ctl.close()
        t.close()
        if writer is not None:
            writer.close()
        Path(cfg["runtime_dir"], "writer.json").write_text(json.dumps(result))


@dataclass
class _Tally:
    """One reader's counts (written to ``<name>.json``)."""

    received: int = 0  # FrameRefs received
    accepted: int = 0  # read() returned a frame
    dropped: int = 0  # read() returned None (counted as ``overwritten``)
    raced: int = 0  # of the drops: still published just before read(), rewritten during it
    torn: int = 0  # accepted frames whose pixels are not exactly their seq's pattern
    error: str = ""


def _consume(ref: FrameRef, ring: RingReader, out: np.ndarray, release: bool, tally: _Tally, pattern: Pattern) -> int | None:
    """Read ``ref`` into ``out``, release it (file mode), check its pixels; returns the seq if accepted."""
    was_published = ring.published(ref.slot, ref.seq)
    frame = ring.read(ref.slot, ref.seq, out=out)
    if frame is None:
        tally.dropped += 1
        tally.raced += was_published
        return None
    if release:
        ring.release(ref.slot, ref.seq)
    tally.accepted += 1
    tally.torn += not pattern.matches(frame, ref.seq)
    return ref.seq


def _receive_loop(cfg: dict, delay_s: float, sockets: list[zmq.Socket], tally: _Tally, accepted: list[int]) -> None:
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    pattern, out, ring = Pattern(FRAME_SHAPE), np.empty(FRAME_SHAPE, np.uint8), None
    try:
        while True:
            ready = dict(poller.poll(RECV_TIMEOUT_MS))
            if not ready:
                raise TimeoutError(f"nothing received for {RECV_TIMEOUT_MS} ms")
            sock = sockets[0] if sockets[0] in ready else sockets[-1]
            msg = decode(sock.recv_multipart(copy=False))
            if isinstance(msg, Ack):
                return
            tally.received += 1
            ring = ring or RingReader.attach(msg.ring)
            if delay_s:
                time.sleep(delay_s)
            seq = _consume(msg, ring, out, cfg["mode"] == "file", tally, pattern)
            if seq is not None:
                accepted.append(seq)
    finally:
        if ring is not None:
            ring.close()


def reader_main(cfg: dict, name: str, delay_s: float) -> None:
    """Reader process: sleeps ``delay_s`` before each read; writes ``<name>.json`` and ``<name>.npy`` (accepted seqs)."""
    tally, accepted = _Tally(), []
    t = Transport(Path(cfg["runtime_dir"]))
    ctl = _socket(t, zmq.SUB, "ctl", bind=False)  # live: FrameRefs + done; file: done only
    try:
        frames = [t.receiver("frames", bind=False, hwm=64).sock] if cfg["mode"] == "file" else []
        _receive_loop(cfg, delay_s, [*frames, ctl], tally, accepted)
    except Exception as err:
        tally.error = f"{type(err).__name__}: {err}"
    finally:
        ctl.close()
        t.close()
        np.save(Path(cfg["runtime_dir"], f"{name}.npy"), np.asarray(accepted, np.int64))
        Path(cfg["runtime_dir"], f"{name}.json").write_text(json.dumps(vars(tally)))


# ---------------------------------------------------------------- scenario runner


@dataclass
class RunResult:
    """What one scenario produced: the writer's counts, each reader's tally and accepted seqs."""

    produced: int
    readers: dict[str, dict]
    accepted: dict[str, np.ndarray]  # (n,) int64 seqs per reader, in acceptance order
    leftover: list[str]  # segments of RUN_ID present right after every process exited


def _join_all(procs: list, deadline: float) -> None:
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [p.name for p in procs if p.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    assert not hung, f"processes still running after the deadline: {hung}"


def _collect(runtime_dir: Path, names: list[str]) -> RunResult:
    w = json.loads((runtime_dir / "writer.json").read_text())
    assert w["error"] == "", f"writer failed: {w['error']}"
    readers = {n: json.loads((runtime_dir / f"{n}.json").read_text()) for n in names}
    for n, tally in readers.items():
        assert tally["error"] == "", f"reader {n} failed: {tally['error']}"
    accepted = {n: np.load(runtime_dir / f"{n}.npy") for n in names}
    return RunResult(w["produced"], readers, accepted, list_segments(RUN_ID))


def run_scenario(mode: str, frames: int, slots: int, readers: dict[str, float]) -> RunResult:
    """Run one writer and ``readers`` (name -> sleep before each read, s) to completion."""
    runtime_dir = Path(tempfile.mkdtemp(prefix="fpr", dir="/tmp"))
    cfg = {"mode": mode, "frames": frames, "slots": slots, "readers": len(readers), "run_id": RUN_ID,
           "camera": mode, "runtime_dir": str(runtime_dir)}
    ctx = mp.get_context("spawn")
    readers_done = ctx.Event()
    procs = [ctx.Process(target=reader_main, args=(cfg, n, d), name=n, daemon=True) for n, d in readers.items()]
    writer = ctx.Process(target=writer_main, args=(cfg, readers_done), name="writer", daemon=True)
    deadline = time.monotonic() + RUN_DEADLINE_S
    try:
        for proc in [*procs, writer]:
            proc.start()
        _join_all(procs, deadline)
        readers_done.set()
        _join_all([writer], deadline + 10)
        return _collect(runtime_dir, list(readers))
    finally:
        for proc in [*procs, writer]:
            if proc.is_alive():
                proc.kill()
        unlink_segments(list_segments(RUN_ID))  # never leave a failed run's ring behind
        shutil.rmtree(runtime_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def live_run() -> RunResult:
    """Live mode, 4 slots, 400 frames: a slow reader (4 ms per frame) and a fast one, both see every FrameRef."""
    return run_scenario("live", frames=400, slots=4, readers={"slow": 0.004, "fast": 0.0})


@pytest.fixture(scope="module")
def file_run() -> RunResult:
    """File mode, 4 slots, 300 frames shared (PUSH/PULL) by a slow reader (3 ms per frame) and two fast ones."""
    return run_scenario("file", frames=300, slots=4, readers={"slow": 0.003, "fast1": 0.0, "fast2": 0.0})


# ---------------------------------------------------------------- cross-process properties


def test_live_mode_accepts_only_exact_frames_and_counts_every_drop(live_run: RunResult) -> None:
    assert live_run.produced == 400
    for name, tally in live_run.readers.items():
        assert tally["received"] == live_run.produced, name  # PUB with no HWM: every FrameRef arrives
        assert tally["torn"] == 0, f"{name} accepted {tally['torn']} torn frames"
        assert tally["dropped"] == live_run.produced - tally["accepted"], name
        seqs = live_run.accepted[name]
        assert len(seqs) == tally["accepted"] and len(np.unique(seqs)) == len(seqs), name
        assert np.all(np.diff(seqs) > 0), name  # accepted in publication order
        assert seqs.size == 0 or (seqs.min() >= 1 and seqs.max() <= live_run.produced), name


def test_live_mode_slow_reader_is_overrun(live_run: RunResult) -> None:
    """The writer never waits in live mode: a reader 4 ms behind a 4-slot ring must lose frames."""
    assert live_run.readers["slow"]["dropped"] > 0
    assert sum(t["accepted"] for t in live_run.readers.values()) > 0  # the pixel check had frames to check


def test_file_mode_delivers_every_frame_exactly_once(file_run: RunResult) -> None:
    assert file_run.produced == 300
    for name, tally in file_run.readers.items():
        assert tally["torn"] == 0, f"{name} accepted {tally['torn']} torn frames"
        assert tally["dropped"] == 0 and tally["dropped"] == tally["received"] - tally["accepted"], name
    assert sum(t["received"] for t in file_run.readers.values()) == file_run.produced
    every = np.sort(np.concatenate(list(file_run.accepted.values())))
    assert np.array_equal(every, np.arange(1, file_run.produced + 1))  # each seq once, none missing


def test_no_segment_of_the_run_is_left(live_run: RunResult, file_run: RunResult) -> None:
    assert live_run.leftover == [] and file_run.leftover == []
    assert list_segments(RUN_ID) == []
