"""Benchmark moving BGR uint8 frames between two processes: FacePro's ring vs the alternatives.

Methods, all measured in one run, for each resolution (1080p: 1920x1080x3 =
6.2 MB, 720p: 1280x720x3 = 2.8 MB per frame):

- ``copy``: in-process ``np.copyto`` of one frame into one of ``--slots``
  preallocated buffers (rotating, so the footprint matches the ring's). The
  memory bound; latency = one copy.
- ``ring``: :class:`pipeline.ring.RingWriter` (file mode) in the producer,
  :class:`~pipeline.messages.FrameRef` over ZeroMQ PUSH/PULL (ipc, via
  :mod:`pipeline.transport` and :mod:`pipeline.codec`); the consumer
  ``RingReader.read``\\ s into a preallocated buffer and releases the slot at once.
- ``ring_view``: the same ring, but the consumer *uses* the frame in place
  (:meth:`RingReader.view`, zero-copy, read-only), then re-checks the slot's
  sequence and releases it: how the detection stage reads frames. Like
  ``zmq_raw``'s ``np.frombuffer``, the consumer gets the pixels without a copy
  of its own; "use" here is a checksum of one row, so the pages are touched.
- ``ring_inplace``: how capture feeds the pipeline: the producer opens the
  next slot (:meth:`RingWriter.begin_write`), the frame is written straight
  into it (here ``np.copyto`` from the source image stands in for
  ``cv2.VideoCapture.read(image=slot)``, which decodes into the slot), then
  :meth:`RingWriter.publish` and the FrameRef; the consumer uses it in place
  like ``ring_view``. Throughput still includes writing every frame once (the
  memory bound); the latency clock starts when the frame is complete in the
  slot, so ``p50_ms``/``p99_ms`` are the transport's own hop.
- ``mp_queue``: ``multiprocessing.Queue(maxsize=slots)`` carrying the numpy
  array (pickled: the Viseron-style baseline).
- ``zmq_raw``: ZeroMQ PUSH/PULL over ipc carrying the raw frame bytes
  (``copy=False``), HWM = ``slots``.

Each cross-process method runs three phases in one producer/consumer pair:
``WARMUP`` frames (not measured: connection set-up, page faults), then up to
``--frames`` frames at full speed (nothing paced; ``--seconds`` caps the phase)
for ``fps``, ``gbps`` and the loaded latency ``p50_ms``/``p99_ms``, then
``--lockstep`` frames with one frame in flight (the producer sends the next
frame only after the consumer finished the previous one) for the transport's
own hop latency ``lockstep_p50_ms``/``lockstep_p99_ms``.

Latency of frame ``i`` = consumer's ``time.time_ns()`` once the frame is usable
(ring: after the copy out of the slot; ring_view / ring_inplace: after the
sequence re-check; mp_queue / zmq_raw: after the receive) minus the producer's
``time.time_ns()`` once the complete frame is in the memory it is sent from
(ring, ring_view: the producer's own buffer, so the copy into the slot
counts; ring_inplace: the slot, taken just before ``publish``; mp_queue,
zmq_raw: before ``put``/``send``). ``time.time_ns`` is one system-wide clock, so
the difference is valid across processes. Under full load the latency
includes queueing behind up to ``slots`` earlier frames.

Units: ``fps`` frames/s, ``gbps`` gigabytes (1e9 bytes) of frame payload per
second, latencies in milliseconds.

Usage::

    python scripts/bench_transport.py [--frames 500] [--seconds 5] [--lockstep 100] [--repeat 1] [--json]

The targets from the issue (ring >= 0.8x copy fps, >= 20x mp_queue fps,
p99 hop < 1 ms) are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

from pipeline.codec import decode, encode
from pipeline.messages import Ack, FrameRef
from pipeline.ring import RingLayout, RingReader, RingWriter, list_segments, ring_name, unlink_segments
from pipeline.transport import Transport

RESOLUTIONS: dict[str, tuple[int, int]] = {"1080p": (1080, 1920), "720p": (720, 1280)}
METHODS = ("copy", "ring", "ring_view", "ring_inplace", "mp_queue", "zmq_raw")
WARMUP = 10
RECV_TIMEOUT_MS = 10_000
_END = b"end"


@dataclass(frozen=True)
class Plan:
    """One method x resolution measurement, passed to both processes (plain scalars only)."""

    method: str
    resolution: str
    height: int
    width: int
    frames: int  # full-speed frames (upper bound)
    seconds: float  # cap on the full-speed phase
    lockstep: int  # one-in-flight frames for the hop latency
    slots: int  # ring slots / queue size / HWM
    workdir: str  # runtime dir for ipc sockets and result files
    run_id: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    @property
    def frame_bytes(self) -> int:
        return self.height * self.width * 3


# ---------------------------------------------------------------- producers
# A producer side has send(frame, index) -> t0_ns, end(), close(), and `profile` (ns totals per step).


class RingProducer:
    """RingWriter (file mode) + FrameRef over PUSH; stamps t0 after wait_slot, before write."""

    def __init__(self, plan: Plan) -> None:
        layout = RingLayout(slots=plan.slots, height=plan.height, width=plan.width)
        self.writer = RingWriter.create(ring_name(plan.run_id, plan.resolution, os.getpid(), 0),
                                        layout, wait_for_release=True, release_timeout_s=RECV_TIMEOUT_MS / 1000)
        self.t = Transport(Path(plan.workdir))
        self.sender = self.t.sender("frames", bind=True, hwm=64)
        self.plan = plan
        self.profile = {"wait_slot_ns": 0, "write_ns": 0, "send_ns": 0}

    def send(self, frame: np.ndarray, index: int) -> int:
        a = time.perf_counter_ns()
        self.writer.wait_slot()  # file mode: blocks until the consumer released the slot
        t0 = time.time_ns()
        b = time.perf_counter_ns()
        slot, seq = self.writer.write(frame, index, t0)
        c = time.perf_counter_ns()
        self.sender.send(FrameRef(camera=self.plan.resolution, ring=self.writer.name, slot=slot, seq=seq,
                                  frame_index=index, captured_at_ns=t0, height=self.plan.height,
                                  width=self.plan.width), timeout_ms=None)
        d = time.perf_counter_ns()
        self._add(b - a, c - b, d - c)
        return t0

    def _add(self, wait: int, write: int, send: int) -> None:
        self.profile["wait_slot_ns"] += wait
        self.profile["write_ns"] += write
        self.profile["send_ns"] += send

    def end(self) -> None:
        self.sender.send(Ack(ok=True, message="end"), timeout_ms=None)
        deadline = time.monotonic() + RECV_TIMEOUT_MS / 1000
        while not self.writer.all_released() and time.monotonic() < deadline:
            time.sleep(0.001)

    def close(self) -> None:
        self.t.close()
        self.writer.close()


class RingInPlaceProducer(RingProducer):
    """Fills the next slot in place (``begin_write``; the copy stands in for the decoder), stamps t0, publishes."""

    def send(self, frame: np.ndarray, index: int) -> int:
        a = time.perf_counter_ns()
        self.writer.wait_slot()
        b = time.perf_counter_ns()
        np.copyto(self.writer.begin_write(), frame)  # capture: cv2.VideoCapture.read(image=slot)
        t0 = time.time_ns()
        slot, seq = self.writer.publish(index, t0)
        c = time.perf_counter_ns()
        self.sender.send(FrameRef(camera=self.plan.resolution, ring=self.writer.name, slot=slot, seq=seq,
                                  frame_index=index, captured_at_ns=t0, height=self.plan.height,
                                  width=self.plan.width), timeout_ms=None)
        self._add(b - a, c - b, time.perf_counter_ns() - c)
        return t0


class QueueProducer:
    """``mp.Queue.put((index, t0, frame))``: the array is pickled by the queue's feeder thread."""

    def __init__(self, plan: Plan, q) -> None:
        self.q = q
        self.profile = {"put_ns": 0}

    def send(self, frame: np.ndarray, index: int) -> int:
        t0 = time.time_ns()
        a = time.perf_counter_ns()
        self.q.put((index, t0, frame), timeout=RECV_TIMEOUT_MS / 1000)
        self.profile["put_ns"] += time.perf_counter_ns() - a
        return t0

    def end(self) -> None:
        self.q.put(None, timeout=RECV_TIMEOUT_MS / 1000)

    def close(self) -> None:
        self.q.close()
        self.q.join_thread()


class ZmqProducer:
    """PUSH of ``[index+t0 header, raw frame bytes]`` with ``copy=False``; stamps t0 once the socket can take it."""

    def __init__(self, plan: Plan) -> None:
        self.t = Transport(Path(plan.workdir))
        self.sock = self.t.sender("frames", bind=True, hwm=plan.slots, linger_ms=1000).sock
        self.profile = {"send_ns": 0}

    def send(self, frame: np.ndarray, index: int) -> int:
        if not self.sock.poll(RECV_TIMEOUT_MS, zmq.POLLOUT):
            raise TimeoutError("zmq_raw: consumer stopped taking frames")
        t0 = time.time_ns()
        a = time.perf_counter_ns()
        self.sock.send_multipart([np.array([index, t0], np.int64), frame], copy=False)
        self.profile["send_ns"] += time.perf_counter_ns() - a
        return t0

    def end(self) -> None:
        self.sock.send(_END)

    def close(self) -> None:
        self.t.close()


# ---------------------------------------------------------------- consumers
# A consumer side has recv() -> (index, t0_ns) once the frame is usable, or None at the end; close();
# `steps_ns`: the last frame's time in (receive, copy-out) steps, zeros where not split.


class RingConsumer:
    """PULL FrameRefs, copy each frame out of the ring into one preallocated buffer, release at once."""

    def __init__(self, plan: Plan) -> None:
        self.t = Transport(Path(plan.workdir))
        self.receiver = self.t.receiver("frames", bind=False, hwm=64)
        self.out = np.empty(plan.shape, np.uint8)
        self.ring: RingReader | None = None
        self.overwritten = 0
        self.steps_ns = (0, 0)  # last frame's (recv incl. waiting for it + decode, read + release)

    def recv(self) -> tuple[int, int] | None:
        a = time.perf_counter_ns()
        msg = self.receiver.recv(RECV_TIMEOUT_MS)
        if msg is None:
            raise TimeoutError(f"ring: no FrameRef within {RECV_TIMEOUT_MS} ms (malformed: {self.receiver.malformed})")
        if isinstance(msg, Ack):
            return None
        b = time.perf_counter_ns()
        self.ring = self.ring or RingReader.attach(msg.ring)
        if self.ring.read(msg.slot, msg.seq, out=self.out) is None:
            self.overwritten += 1  # cannot happen in file mode; counted to prove it
        self.ring.release(msg.slot, msg.seq)
        self.steps_ns = (b - a, time.perf_counter_ns() - b)
        return msg.frame_index, msg.captured_at_ns

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        self.t.close()


class RingViewConsumer(RingConsumer):
    """PULL FrameRefs, use each frame in place (zero-copy view), re-check its sequence, release."""

    def recv(self) -> tuple[int, int] | None:
        a = time.perf_counter_ns()
        msg = self.receiver.recv(RECV_TIMEOUT_MS)
        if msg is None:
            raise TimeoutError(f"ring_view: no FrameRef within {RECV_TIMEOUT_MS} ms (malformed: {self.receiver.malformed})")
        if isinstance(msg, Ack):
            return None
        b = time.perf_counter_ns()
        self.ring = self.ring or RingReader.attach(msg.ring)
        view = self.ring.view(msg.slot, msg.seq)
        if view is None or int(view[view.shape[0] // 2].sum()) < 0 or not self.ring.published(msg.slot, msg.seq):
            self.overwritten += 1  # cannot happen in file mode; counted to prove it
        del view
        self.ring.release(msg.slot, msg.seq)
        self.steps_ns = (b - a, time.perf_counter_ns() - b)
        return msg.frame_index, msg.captured_at_ns


class QueueConsumer:
    """``mp.Queue.get()``: the unpickled array is the consumer's own copy."""

    def __init__(self, plan: Plan, q) -> None:
        self.q = q
        self.overwritten = 0

    def recv(self) -> tuple[int, int] | None:
        self.steps_ns = (0, 0)
        try:
            item = self.q.get(timeout=RECV_TIMEOUT_MS / 1000)
        except queue.Empty:
            raise TimeoutError(f"mp_queue: nothing within {RECV_TIMEOUT_MS} ms") from None
        if item is None:
            return None
        index, t0, frame = item
        assert frame.nbytes > 0
        return index, t0

    def close(self) -> None:
        pass


class ZmqConsumer:
    """PULL the raw frame; ``np.frombuffer`` on the received message (the consumer's own memory)."""

    def __init__(self, plan: Plan) -> None:
        self.t = Transport(Path(plan.workdir))
        self.sock = self.t.receiver("frames", bind=False, hwm=plan.slots).sock
        self.shape = plan.shape
        self.overwritten = 0

    def recv(self) -> tuple[int, int] | None:
        self.steps_ns = (0, 0)
        if not self.sock.poll(RECV_TIMEOUT_MS, zmq.POLLIN):
            raise TimeoutError(f"zmq_raw: nothing within {RECV_TIMEOUT_MS} ms")
        parts = self.sock.recv_multipart(copy=False)
        if len(parts) == 1 and parts[0].bytes == _END:
            return None
        index, t0 = np.frombuffer(parts[0].buffer, np.int64)
        frame = np.frombuffer(parts[1].buffer, np.uint8).reshape(self.shape)
        assert frame.nbytes > 0
        return int(index), int(t0)

    def close(self) -> None:
        self.t.close()


def _producer_side(plan: Plan, q):
    sides = {"ring": RingProducer, "ring_view": RingProducer, "ring_inplace": RingInPlaceProducer, "zmq_raw": ZmqProducer}
    return sides[plan.method](plan) if q is None else QueueProducer(plan, q)


def _consumer_side(plan: Plan, q):
    sides = {"ring": RingConsumer, "ring_view": RingViewConsumer, "ring_inplace": RingViewConsumer, "zmq_raw": ZmqConsumer}
    return sides[plan.method](plan) if q is None else QueueConsumer(plan, q)


# ---------------------------------------------------------------- process bodies


def _wait_done(done, count: int) -> None:
    """Spin until the consumer has finished ``count`` frames (``done``: shared int64 counter)."""
    deadline = time.monotonic() + RECV_TIMEOUT_MS / 1000
    while done.value < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"consumer stuck at {done.value} of {count} frames")
        time.sleep(0)


def producer_main(plan: Plan, q, done) -> None:
    """Producer process: warmup, full-speed and lockstep phases; writes ``producer.json``."""
    result = {"throughput_frames": 0, "profile": {}, "error": ""}
    frame = np.random.default_rng(0).integers(0, 256, plan.shape, dtype=np.uint8)
    side = None
    try:
        side = _producer_side(plan, q)
        index = 0
        for index in range(WARMUP):
            side.send(frame, index)
        _wait_done(done, WARMUP)
        side.profile = dict.fromkeys(side.profile, 0)
        stop_at = time.monotonic() + plan.seconds
        while index + 1 < WARMUP + plan.frames and time.monotonic() < stop_at:
            index += 1
            side.send(frame, index)
        result["throughput_frames"] = index + 1 - WARMUP
        result["profile"] = dict(side.profile)
        for _ in range(plan.lockstep):
            _wait_done(done, index + 1)  # one frame in flight
            index += 1
            side.send(frame, index)
        side.end()
    except Exception as err:
        result["error"] = f"producer: {type(err).__name__}: {err}"
    finally:
        if side is not None:
            side.close()
        Path(plan.workdir, "producer.json").write_text(json.dumps(result))


def consumer_main(plan: Plan, q, done) -> None:
    """Consumer process: writes ``consumer.npy``, (frames, 5) int64 rows of
    (index, t0_ns, t1_ns, step1_ns, step2_ns), and ``consumer.json`` (error, overwritten)."""
    rows = []
    result = {"error": "", "overwritten": 0}
    side = None
    try:
        side = _consumer_side(plan, q)
        while (got := side.recv()) is not None:
            t1 = time.time_ns()
            rows.append((got[0], got[1], t1, *side.steps_ns))
            done.value += 1
        result["overwritten"] = side.overwritten
    except Exception as err:
        result["error"] = f"consumer: {type(err).__name__}: {err}"
    finally:
        if side is not None:
            side.close()
        np.save(Path(plan.workdir, "consumer.npy"), np.asarray(rows, np.int64).reshape(-1, 5))
        Path(plan.workdir, "consumer.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- measurement


def _percentiles_ms(lat_ns: np.ndarray) -> tuple[float | None, float | None]:
    """p50 and p99 of ``lat_ns`` ((n,) int64 nanoseconds) in milliseconds; None for no samples (valid JSON)."""
    if lat_ns.size == 0:
        return None, None
    p50, p99 = np.percentile(lat_ns, [50, 99])
    return round(float(p50) / 1e6, 4), round(float(p99) / 1e6, 4)


def _result(plan: Plan, fps: float, lat_ns: np.ndarray, lock_ns: np.ndarray, **extra) -> dict:
    p50, p99 = _percentiles_ms(lat_ns)
    l50, l99 = _percentiles_ms(lock_ns)
    return {"method": plan.method, "resolution": plan.resolution, "fps": round(fps, 1),
            "gbps": round(fps * plan.frame_bytes / 1e9, 3), "p50_ms": p50, "p99_ms": p99,
            "lockstep_p50_ms": l50, "lockstep_p99_ms": l99, "frames": int(lat_ns.size), **extra}


def measure_copy(plan: Plan) -> dict:
    """In-process ``np.copyto`` into ``plan.slots`` rotating buffers; latency = each copy."""
    src = np.random.default_rng(0).integers(0, 256, plan.shape, dtype=np.uint8)
    dst = [np.empty(plan.shape, np.uint8) for _ in range(plan.slots)]
    for i in range(WARMUP):
        np.copyto(dst[i % plan.slots], src)
    lat = np.empty(plan.frames, np.int64)
    start = time.perf_counter_ns()
    stop_at = start + int(plan.seconds * 1e9)
    n = 0
    while n < plan.frames and time.perf_counter_ns() < stop_at:
        a = time.perf_counter_ns()
        np.copyto(dst[n % plan.slots], src)
        lat[n] = time.perf_counter_ns() - a
        n += 1
    total = time.perf_counter_ns() - start
    return _result(plan, n / (total / 1e9), lat[:n], lat[:0])


def _run_pair(plan: Plan) -> tuple[dict, dict, np.ndarray]:
    """Run producer and consumer processes for ``plan``; returns their JSON results and the consumer rows."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue(maxsize=plan.slots) if plan.method == "mp_queue" else None
    done = ctx.RawValue("q", 0)
    procs = [ctx.Process(target=consumer_main, args=(plan, q, done), daemon=True),
             ctx.Process(target=producer_main, args=(plan, q, done), daemon=True)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + plan.seconds + 3 * RECV_TIMEOUT_MS / 1000 + 30
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [proc.pid for proc in procs if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    work = Path(plan.workdir)
    if hung:
        return {"error": f"processes {hung} did not finish"}, {}, np.empty((0, 5), np.int64)
    files = [work / "producer.json", work / "consumer.json", work / "consumer.npy"]
    if not all(f.exists() for f in files):
        return {"error": f"a process died without results (exit codes {[p.exitcode for p in procs]})"}, {}, np.empty((0, 5), np.int64)
    return json.loads(files[0].read_text()), json.loads(files[1].read_text()), np.load(files[2])


def measure_pair(plan: Plan) -> dict:
    """Throughput and latency of one cross-process method (see module docstring)."""
    prod, cons, rows = _run_pair(plan)
    error = prod.get("error") or cons.get("error") or ""
    n = prod.get("throughput_frames", 0)
    if error or rows.shape[0] < WARMUP + n:
        return {"method": plan.method, "resolution": plan.resolution, "error": error or f"only {rows.shape[0]} frames arrived"}
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    full = rows[WARMUP:WARMUP + n]
    lock = rows[WARMUP + n:]
    span_ns = int(full[:, 2].max() - full[:, 1].min())
    profile = {k.replace("_ns", "_us"): round(v / max(n, 1) / 1e3, 1) for k, v in prod["profile"].items()}
    extra = {"overwritten": cons["overwritten"], "producer_us_per_frame": profile}
    if full[:, 3:].any():
        recv_us, read_us = (full[:, 3:].mean(axis=0) / 1e3).round(1)
        extra["consumer_us_per_frame"] = {"recv_us": float(recv_us), "read_release_us": float(read_us)}
    return _result(plan, n / (span_ns / 1e9), full[:, 2] - full[:, 1], lock[:, 2] - lock[:, 1], **extra)


def measure(plan: Plan) -> dict:
    """Run one method at one resolution; cleans the ring segments and runtime dir whatever happens."""
    Path(plan.workdir).mkdir(parents=True, exist_ok=True)
    try:
        return measure_copy(plan) if plan.method == "copy" else measure_pair(plan)
    finally:
        unlink_segments(list_segments(plan.run_id))
        shutil.rmtree(plan.workdir, ignore_errors=True)


def _median(values: list) -> float | None:
    ok = sorted(v for v in values if v is not None)
    return ok[(len(ok) - 1) // 2] if ok else None


def summarize(runs: list[dict]) -> dict:
    """One method x resolution from its repeated runs: the run with the median fps, with its latencies
    replaced by the median over the runs (a noisy neighbour's spike in one run does not decide a p99), and
    every run's values in ``fps_runs``, ``p99_runs``, ``lockstep_p99_runs``."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["fps"])
    if not ok:
        return runs[-1]
    out = dict(ok[(len(ok) - 1) // 2])
    for key in ("p50_ms", "p99_ms", "lockstep_p50_ms", "lockstep_p99_ms"):
        out[key] = _median([r[key] for r in ok])
    out["fps_runs"] = [r.get("fps") for r in runs]
    out["p99_runs"] = [r.get("p99_ms") for r in runs]
    out["lockstep_p99_runs"] = [r.get("lockstep_p99_ms") for r in runs]
    return out


def codec_cost_us(repeats: int = 2000) -> dict:
    """In-process cost of encoding and decoding one FrameRef, microseconds (part of the ring's per-frame overhead)."""
    ref = FrameRef(camera="cam", ring="facepro_x_cam_1_0", slot=3, seq=12345, frame_index=12344,
                   captured_at_ns=time.time_ns(), height=1080, width=1920)
    a = time.perf_counter_ns()
    for _ in range(repeats):
        frames = encode(ref)
    b = time.perf_counter_ns()
    for _ in range(repeats):
        decode(frames)
    c = time.perf_counter_ns()
    return {"encode_us": round((b - a) / repeats / 1e3, 2), "decode_us": round((c - b) / repeats / 1e3, 2)}


# ---------------------------------------------------------------- report


def ratios(results: list[dict]) -> dict:
    """``ring``/``ring_view``/``ring_inplace`` fps over ``copy`` and ``mp_queue`` per resolution (None where a method failed)."""
    fps = {(r["method"], r["resolution"]): r.get("fps") for r in results}
    out = {}
    for res in RESOLUTIONS:
        for method in ("ring", "ring_view", "ring_inplace"):
            ring = fps.get((method, res))
            for other in ("copy", "mp_queue"):
                base = fps.get((other, res))
                out[f"{method}_vs_{other}_{res}"] = round(ring / base, 3) if ring and base else None
        # the ceiling of ring_vs_mp_queue for any transport that writes each frame once
        copy, queue_fps = fps.get(("copy", res)), fps.get(("mp_queue", res))
        out[f"copy_vs_mp_queue_{res}"] = round(copy / queue_fps, 3) if copy and queue_fps else None
    return out


def print_table(results: list[dict], rat: dict, codec: dict) -> None:
    head = f"{'method':<12} {'res':<6} {'fps':>9} {'GB/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'lock p50':>9} {'lock p99':>9}"
    print(head)
    print("-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['method']:<12} {r['resolution']:<6} ERROR {r['error']}")
            continue
        lat = [r["p50_ms"], r["p99_ms"], r["lockstep_p50_ms"], r["lockstep_p99_ms"]]
        p50, p99, l50, l99 = ("-" if v is None else f"{v:.3f}" for v in lat)
        print(f"{r['method']:<12} {r['resolution']:<6} {r['fps']:>9.1f} {r['gbps']:>7.2f} {p50:>8} {p99:>8} {l50:>9} {l99:>9}")
    print()
    for key, value in rat.items():
        print(f"{key:<33} {value}")
    print("targets: ring_vs_copy >= 0.8, ring_vs_mp_queue >= 20, ring p99 hop < 1 ms")
    for r in results:
        if r.get("method", "").startswith("ring") and "producer_us_per_frame" in r:
            print(f"{r['method']} {r['resolution']} producer us/frame: {r['producer_us_per_frame']}; "
                  f"consumer us/frame: {r.get('consumer_us_per_frame')}")
    print(f"FrameRef codec us: {codec}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=500, help="full-speed frames per method and resolution")
    ap.add_argument("--seconds", type=float, default=5.0, help="cap on each full-speed phase, seconds")
    ap.add_argument("--lockstep", type=int, default=100, help="one-in-flight frames for hop latency (0: skip)")
    ap.add_argument("--slots", type=int, default=8, help="ring slots / queue size / ZeroMQ HWM")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--resolutions", default=",".join(RESOLUTIONS), help="comma-separated subset of " + ",".join(RESOLUTIONS))
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over all methods; per method the median-fps run is kept, latencies are medians over the rounds")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_id = "bench" + uuid.uuid4().hex[:6]
    host = {"cpus": os.cpu_count(), "loadavg_1m_before": round(os.getloadavg()[0], 2)}
    root = Path(tempfile.mkdtemp(prefix="fpb", dir="/tmp"))
    plans = [Plan(method, res, *RESOLUTIONS[res], args.frames, args.seconds, args.lockstep, args.slots,
                  str(root / f"{method}{res}"), run_id)
             for res in args.resolutions.split(",") for method in args.methods.split(",")]
    runs: dict[Plan, list[dict]] = {plan: [] for plan in plans}
    try:
        for _ in range(args.repeat):  # rounds over every method, so a slow spell of the host hits all of them
            for plan in plans:
                runs[plan].append(measure(plan))
        results = [summarize(runs[plan]) for plan in plans]
    finally:
        unlink_segments(list_segments(run_id))
        shutil.rmtree(root, ignore_errors=True)
    rat, codec = ratios(results), codec_cost_us()
    host["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps({"results": results, "ratios": rat, "codec_us": codec, "host": host}))
    else:
        print_table(results, rat, codec)
        print(f"host: {host} (a load average near the CPU count means other processes skewed the numbers)")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
