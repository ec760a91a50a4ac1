#!/usr/bin/env python3
"""GPU check for a machine with an NVIDIA GPU: install the [gpu] profile, prove CUDA runs, benchmark CPU vs GPU.

Steps (each prints what it found; nothing is downloaded):

1. **Install**: with a ``.whl/`` folder in the checkout (ignored by git; wheels
   for that machine's Python), ``onnxruntime`` is uninstalled when an
   ``onnxruntime_gpu`` wheel is there, and every wheel of the folder is
   installed with ``pip install --no-index --no-deps`` (carry each missing
   dependency as its own wheel; the machine's own packages, e.g.
   ``opencv-python-headless``, satisfy the rest); without it, the
   commands that fill it are printed. Then every module the pipeline imports
   is checked (a missing one ends the check, exit 2, naming it).
2. **CUDA**: prints ``onnxruntime.get_device()`` and
   ``get_available_providers()``; opens each model of the demo config with
   ``CUDAExecutionProvider`` first, asserts ``session.get_providers()[0] ==
   'CUDAExecutionProvider'`` and runs it three times on zeros (ms each: the
   first run of a shape is the slow one). Without ``nvidia-smi`` or the
   provider: "no GPU: skipped", and the GPU runs are skipped.
3. **Copy probe**, then the **new-shape probe** (``--no-probe`` skips both).
   The copy probe times YOLOX-Nano (one frame) and OSNet (16 crops) three
   ways: ``session.run`` on a numpy input, IOBinding with the input already on
   the GPU and the output left there, and with the output copied back; the
   difference is the most IOBinding could save a run (on the CPU provider
   without a GPU, to prove the flow). The shape probe: first and second run of
   SCRFD at three new input sizes and of MobileFaceNet at four new batch sizes,
   once per :data:`PROBES` setting (lazy or eager CUDA module loading; cuDNN's
   heuristic, default or exhaustive algorithm search), each in its own process.
4. **Benchmarks**: ``nvidia-smi dmon -s u -d 1`` (GPU utilisation, %, every
   second) runs in the background while ``scripts/bench_e2e.py --rounds 1
   --json`` runs with each ``--cameras`` count (the asset videos in turn,
   ``--resize``d, first ``--max-frames`` frames), on GPU (``--gpu-providers``)
   for every count first, then on CPU (``--only`` keeps one), so a short lease
   measures the GPU. Detection and recognition get ``cameras // 4`` processes
   each (1 to 4); GPU runs of several cameras also run a variant with
   ``detection.batch`` and ``recognition.batch`` (``--gpu-batch``, 8), the
   one-camera GPU run a variant with ``runtime.io_binding: off`` (IOBinding
   is on by default on a GPU; the copy probe bounds what it can save). A run
   that would start after ``--budget-s`` is skipped (said so), one still
   running ``--grace-s`` after it is stopped.
5. **Summary**: one line per run: cameras, provider, pipeline and loop
   frames/s, ratio, bound frames/s and the pipeline's share, GPU utilisation
   mean / max (dmon's ``sm`` column during that run), p99 per stage (ms, the
   run summary's last window), the variant's frames/s. Written with every
   result and the dmon log under ``$OUT`` when set, else ``./gpu-results``
   (``results.json``, ``dmon.log``, ``summary.txt``; ``partial.json`` after
   each run).

Usage on the GPU machine, from the checkout (models and videos carried in an
ignored folder, e.g. ``.assets``)::

    FACEPRO_ASSETS=.assets PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py
    # here, tiny and CPU only, to prove the flow:
    FACEPRO_ASSETS=../shared python3 scripts/gpu_check.py --cameras 1,2 --max-frames 100 --resize ''

A machine without an index and a 64 MiB limit on what travels (this
workplace's device machines): the ``onnxruntime-gpu`` wheel (256 MB) goes
unpacked, as ``tar | xz -9`` (203 MB) split into four parts carried by four
calls of one warm lease, then ``pip uninstall -y onnxruntime`` and the tree
untarred into ``sysconfig.get_paths()["purelib"]``; the commands are in the
README ("GPU check").

Exit status: 0 when every step that could run passed, 1 when the CUDA check
or a benchmark failed, 2 when the install is incomplete.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Modules the pipeline imports (distribution names in brackets where they differ).
NEEDED = ("numpy", "cv2 (opencv-python-headless)", "onnxruntime (onnxruntime-gpu)", "insightface", "trackers",
          "zmq (pyzmq)", "sqlalchemy (SQLAlchemy)", "alembic", "pydantic", "yaml (PyYAML)", "platformdirs",
          "prometheus_client (prometheus-client)", "psutil", "uuid6", "tqdm", "sklearn (scikit-learn)")
CUDA = "CUDAExecutionProvider"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov")


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run ``cmd``, echoing it; output captured as text."""
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def install(wheels: Path) -> None:
    """Install the wheels of ``wheels`` (the [gpu] profile and whatever else is missing), or say how to."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        print(f"no wheels in {wheels}: onnxruntime-gpu is not installed by this script. To carry it (256 MB, in parts "
              "of a device call's size) with the other wheels and the assets, on a machine with pip access, from the "
              "checkout: FACEPRO_ASSETS=../shared python3 scripts/gpu_carry.py, then the calls in .whl/carry/calls.txt")
        return
    if any(w.name.startswith("onnxruntime_gpu") for w in found):
        sh([sys.executable, "-m", "pip", "uninstall", "-y", "onnxruntime"])
    res = sh([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *map(str, found)])
    print(res.stdout[-2000:] + res.stderr[-2000:] if res.returncode else f"installed {len(found)} wheel(s)")


def missing_modules() -> list[str]:
    """The entries of :data:`NEEDED` that do not import."""
    out = []
    for entry in NEEDED:
        try:
            importlib.import_module(entry.split()[0])
        except Exception as err:  # noqa: BLE001 - any import failure counts (a broken CUDA library too)
            out.append(f"{entry}: {type(err).__name__}: {str(err)[:120]}")
    return out


def demo_models(assets: Path) -> list[Path]:
    """The ONNX files the demo config uses (``path:`` values under ``${FACEPRO_ASSETS}``)."""
    import yaml

    tree = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    found: list[Path] = []

    def walk(v: object) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if k == "path" and isinstance(x, str) and x.endswith(".onnx"):
                    found.append(assets / x.replace("${FACEPRO_ASSETS}/", ""))
                else:
                    walk(x)

    walk(tree)
    return found


def _dummy_shape(shape: list) -> list[int]:
    """An input shape with its free dimensions set: batch 1, others 640 pixels."""
    return [d if isinstance(d, int) and d > 0 else (1 if i == 0 else 640) for i, d in enumerate(shape)]


def cuda_check(models: list[Path]) -> bool | None:
    """Open each model with CUDA first and run it once; True: all run on CUDA, False: one does not, None: no GPU."""
    import numpy as np
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21: CUDA / cuDNN of the nvidia-* wheels
        try:
            ort.preload_dlls()
        except Exception as err:  # noqa: BLE001 - reported, the sessions below decide
            print(f"onnxruntime.preload_dlls(): {err}")
    providers = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}: get_device() = {ort.get_device()}, get_available_providers() = {providers}")
    if shutil.which("nvidia-smi") is None or CUDA not in providers:
        why = "no nvidia-smi" if shutil.which("nvidia-smi") is None else f"{CUDA} not available"
        print(f"no GPU: skipped ({why}; the CUDA assertion and the GPU runs)")
        return None
    ok = True
    for path in models:
        try:
            sess = ort.InferenceSession(str(path), providers=[CUDA, "CPUExecutionProvider"])
            first = sess.get_providers()[0]
            assert first == CUDA, f"runs on {first}, not {CUDA}"
            feeds = {i.name: np.zeros(_dummy_shape(i.shape), np.float32) for i in sess.get_inputs()}
            times = timed_runs(sess, feeds, 3)
            print(f"{path.name}: {first}, runs on {_dummy_shape(sess.get_inputs()[0].shape)}: "
                  + ", ".join(f"{t:.1f}" for t in times) + " ms")
        except Exception as err:  # noqa: BLE001 - every model is tried and reported
            print(f"{path.name}: CUDA check FAILED: {err}")
            ok = False
    return ok


def nvidia_lib_dirs() -> list[str]:
    """``lib`` folders of installed ``nvidia-*`` wheels (CUDA, cuDNN), for ``LD_LIBRARY_PATH`` of the runs."""
    dirs = {str(p) for base in sys.path if base and Path(base).is_dir() for p in Path(base).glob("nvidia/*/lib")}
    return sorted(dirs)


def bench_env() -> dict:
    """Environment of the check's child processes: this checkout first on ``PYTHONPATH``, the nvidia wheels'
    libraries on ``LD_LIBRARY_PATH``, unbuffered output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    libs = nvidia_lib_dirs()
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return env


def bench(args: argparse.Namespace, videos: list[Path], cameras: int, providers: str | None, timeout_s: float) -> dict:
    """One ``bench_e2e.py --rounds 1 --json`` run; its document (``error`` set when it failed)."""
    procs = max(1, min(4, cameras // 4))
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_e2e.py"), *map(str, videos), "--rounds", "1", "--json",
           "--cameras", str(cameras), "--processes", f"{procs},{procs}", "--max-frames", str(args.max_frames),
           "--ring-slots", str(args.ring_slots), "--bound-calls", str(args.bound_calls)]
    cmd += ["--resize", args.resize] if args.resize else []
    cmd += ["--providers", providers] if providers else []
    if providers and CUDA in providers and args.gpu_batch > 1 and cameras > 1:  # DeepStream's muxer: frames of all cameras
        b = args.gpu_batch  # recognition too: one frame per camera and wave, face and Re-ID crops in one run each
        cmd += ["--variant", f"batch{b}:detection.batch={b},recognition.batch={b}"]
    if providers and CUDA in providers and cameras == 1:  # what IOBinding (on by default on a GPU) is worth end to end
        cmd += ["--variant", "nobind:runtime.io_binding=off"]
    started = time.time()
    try:
        res = sh(cmd, env=bench_env(), cwd=ROOT, timeout=max(30.0, timeout_s))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s", "window": [started, time.time()]}
    lines = res.stdout.strip().splitlines()
    try:
        doc = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        doc = {"error": f"exit {res.returncode}: {res.stderr[-1500:]}"}
    doc["window"] = [started, time.time()]
    return doc


class Dmon:
    """``nvidia-smi dmon -s u -d 1 -o DT`` in the background, logging GPU utilisation (%) to ``log`` every second."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen | None = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1", "-o", "DT"],
                                         stdout=log.open("w"), stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def samples(self) -> list[tuple[float, float]]:
        """``(time.time() s, sm %)`` rows of the log."""
        if not self.log.exists():
            return []
        cols, out = None, []
        for line in self.log.read_text().splitlines():
            parts = line.replace("#", " ").split()
            if line.startswith("#"):
                cols = parts if cols is None and "sm" in parts else cols
                continue
            if cols is None or len(parts) != len(cols):
                continue
            row = dict(zip(cols, parts))
            try:
                when = datetime.strptime(f"{row['Date']} {row['Time']}", "%Y%m%d %H:%M:%S").timestamp()
                out.append((when, float(row["sm"])))
            except (KeyError, ValueError):
                continue
        return out


def util(samples: list[tuple[float, float]], window: list[float] | None) -> str:
    """``mean/max`` sm % of the samples inside ``window`` (start, end s), ``-`` when none."""
    inside = [u for t, u in samples if window and window[0] <= t <= window[1] + 1]
    return f"{sum(inside) / len(inside):.0f}/{max(inside):.0f}" if inside else "-"


def summary_lines(results: list[dict], samples: list[tuple[float, float]]) -> list[str]:
    """The table: one line per run (see the module docstring)."""
    head = (f"{'cams':>4} {'provider':<8} {'pipe fps':>9} {'loop fps':>9} {'ratio':>6} {'bound fps':>10} {'share':>6} "
            f"{'GPU % pipe':>10} {'GPU % loop':>10}  p99 ms det/rec/storage  events ok")
    lines = [head]
    for r in results:
        doc = r["doc"]
        if "error" in doc or "skipped" in doc:
            lines.append(f"{r['cameras']:>4} {r['provider']:<8} {doc.get('error') or doc.get('skipped')}"[:300])
            continue
        rd = doc["rounds"][0]
        b, lat = rd["bound"], rd["latency_ms"]
        p99 = "/".join(f"{lat[s]['p99']}" for s in ("detection", "recognition", "storage"))
        share = f"{100 * b['share']:.0f}%" if b["share"] is not None else "-"
        lines.append(f"{r['cameras']:>4} {r['provider']:<8} {rd['pipeline_fps']:>9.1f} {rd['loop_fps']:>9.1f} "
                     f"{rd['ratio']:>6.2f} {b['fps'] or 0:>10.1f} {share:>6} {util(samples, rd.get('pipeline_window')):>10} "
                     f"{util(samples, rd.get('loop_window')):>10}  {p99:<23}"
                     f"{ {True: 'yes', False: 'NO', None: 'n/a'}[doc['checks_ok']]}"
                     + "".join(f"  {v['label']}: {v['pipeline_fps']:.1f} fps" for v in rd.get("variants") or []))
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", help="folder with models/ and data/videos/ (default: $FACEPRO_ASSETS)")
    ap.add_argument("--cameras", default="1,4,16", help="comma list of camera counts")
    ap.add_argument("--resize", default="1920x1080", help="WxH copy of the videos ('' for none)")
    ap.add_argument("--max-frames", type=int, default=150, help="frames of each video played per camera")
    ap.add_argument("--ring-slots", type=int, default=12, help="ring slots per camera (shared memory: slots x frame bytes)")
    ap.add_argument("--bound-calls", type=int, default=100, help="timed calls per model for the bare-inference bound")
    ap.add_argument("--gpu-providers", default=f"{CUDA},CPUExecutionProvider")
    ap.add_argument("--budget-s", type=float, default=420, help="no benchmark starts after this many seconds of them")
    ap.add_argument("--grace-s", type=float, default=120, help="a benchmark still running this long after the budget is stopped")
    ap.add_argument("--wheels", default=str(ROOT / ".whl"), help="wheel folder to install from (default: .whl)")
    ap.add_argument("--skip-install", action="store_true")
    ap.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                    help="time new input shapes on CUDA under each PROBES setting before the benchmarks")
    ap.add_argument("--only", choices=("both", "gpu", "cpu"), default="both", help="which providers to benchmark")
    ap.add_argument("--gpu-batch", type=int, default=8, help="GPU runs with several cameras also run a variant with "
                    "this detection.batch and recognition.batch (1: none)")
    return ap.parse_args(argv)


def run_benchmarks(args: argparse.Namespace, videos: list[Path], cuda: str, partial: Path | None = None) -> list[dict]:
    """Every (provider, cameras) run in order, GPU for every camera count then CPU, within ``--budget-s``;
    the GPU runs only when the CUDA check said ``cuda == "ok"``. A run started at budget time ``t`` is stopped
    at ``--budget-s + --grace-s``; the results so far are rewritten to ``partial`` after each run."""
    started, results = time.monotonic(), []
    counts = [int(c) for c in args.cameras.split(",") if c.strip()]
    for provider, providers in (("GPU", args.gpu_providers), ("CPU", "CPUExecutionProvider")):
        if args.only not in ("both", provider.lower()):
            continue
        for cameras in counts:
            left = args.budget_s - (time.monotonic() - started)
            if provider == "GPU" and cuda != "ok":
                doc = {"skipped": f"{cuda}: skipped"}
            elif left <= 0:
                doc = {"skipped": f"skipped: the {args.budget_s:.0f} s budget is spent"}
            else:
                doc = bench(args, videos, cameras, providers, left + args.grace_s)
            results.append({"cameras": cameras, "provider": provider, "doc": doc})
            print(json.dumps({k: v for k, v in results[-1].items()})[:600], flush=True)
            if partial is not None:  # what a lease cut short still brings back
                partial.write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(os.environ.get("OUT") or "gpu-results").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_install:
        install(Path(args.wheels))
    missing = missing_modules()
    if missing:
        print("missing modules (carry their wheels in .whl, see step 1):\n  " + "\n  ".join(missing))
        return 2
    assets = Path(args.assets or os.environ.get("FACEPRO_ASSETS") or "").resolve()
    if not (assets / "models").is_dir():
        print("set FACEPRO_ASSETS or --assets to the folder holding models/ and data/videos/")
        return 2
    os.environ["FACEPRO_ASSETS"] = str(assets)
    print(f"/dev/shm free: {shutil.disk_usage('/dev/shm').free / 2**30:.1f} GiB" if Path("/dev/shm").is_dir() else "no /dev/shm")
    res = sh([sys.executable, str(Path(__file__).resolve()), "--cuda-only"], env=bench_env(), cwd=ROOT)
    print(res.stdout + res.stderr[-2000:])
    cuda = {0: "ok", 3: "no GPU"}.get(res.returncode, "CUDA check failed")
    if cuda == "ok" and args.probe:
        run_copy_probe("cuda")
        run_probes()
    elif args.probe:
        run_copy_probe("cpu")  # the flow, on the CPU provider
    videos = sorted(p for p in (assets / "data" / "videos").iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    dmon = Dmon(out / "dmon.log")
    try:
        results = run_benchmarks(args, videos, cuda, out / "partial.json")
    finally:
        dmon.stop()
    lines = summary_lines(results, dmon.samples())
    (out / "results.json").write_text(json.dumps({"cuda": cuda, "cuda_check": res.stdout, "results": results}, indent=1))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\nresults, dmon log and summary in {out}")
    failed = cuda == "CUDA check failed" or any("error" in r["doc"] for r in results)
    return 1 if failed else 0


#: New-shape probe settings: (label, extra environment, cuDNN convolution algorithm search).
PROBES = (("lazy+heuristic", {}, "HEURISTIC"), ("eager+heuristic", {"CUDA_MODULE_LOADING": "EAGER"}, "HEURISTIC"),
          ("lazy+default", {}, "DEFAULT"), ("lazy+exhaustive", {}, "EXHAUSTIVE"))


def timed_runs(sess, feeds: dict, n: int) -> list[float]:
    """Milliseconds of ``n`` runs of ``sess`` on ``feeds``, in order (the first run of a shape is the slow one)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def shape_probe(search: str) -> int:
    """Print the first and second run (ms) of SCRFD-500M at three new input sizes and of MobileFaceNet at four
    new batch sizes on CUDA with this cuDNN ``search``: what one new input shape costs (issue 12: about a second
    a shape on an H200 with onnxruntime-gpu 1.31, CUDA 13)."""
    import numpy as np
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    assets = Path(os.environ["FACEPRO_ASSETS"]) / "models"
    cases = (("scrfd_500m.onnx", [(1, 3, 640, 640), (1, 3, 384, 640), (1, 3, 224, 384)]),
             ("mobilefacenet_128d.onnx", [(1, 3, 112, 112), (2, 3, 112, 112), (3, 3, 112, 112), (5, 3, 112, 112)]))
    for name, shapes in cases:
        t0 = time.perf_counter()
        so = ort.SessionOptions()
        so.log_severity_level = 3  # SCRFD's declared output sizes warn at every other input size
        sess = ort.InferenceSession(str(assets / name), sess_options=so,
                                    providers=[(CUDA, {"cudnn_conv_algo_search": search}), "CPUExecutionProvider"])
        runs = [f"open {(time.perf_counter() - t0) * 1e3:.0f}"]
        for shape in shapes:
            feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
            times = timed_runs(sess, feed, 2)
            runs.append(f"{'x'.join(map(str, shape[:1] + shape[2:]))}: {times[0]:.0f}/{times[1]:.1f}")
        print(f"  {name} ({sess.get_providers()[0]}): " + ", ".join(runs) + " ms (first/second run)", flush=True)
    return 0


#: Copy-probe inputs: (model file, input shape). YOLOX-Nano's one frame on its canvas, OSNet's 16 person crops.
COPY_CASES = (("yolox_nano.onnx", (1, 3, 416, 416)), ("osnet_x0_25_msmt17.onnx", (16, 3, 256, 128)))


def _median_ms(fn, n: int) -> float:
    """Median milliseconds of ``n`` calls of ``fn`` after one untimed call."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[n // 2]


def copy_probe(device: str, n: int = 30) -> int:
    """What copying inputs and outputs between host and device costs, to decide on ONNX Runtime IOBinding (issue 12).

    Per :data:`COPY_CASES` model, median of ``n`` runs (ms): ``run`` (``session.run`` on a numpy input: the copy to
    the device and the output back included, what FacePro does), ``bound`` (IOBinding: input already on
    ``device``, output left there: the computation alone) and ``bound+out`` (input on the device, output copied
    to the host). ``run - bound`` is the most IOBinding could save a run. ``device``: ``cuda`` (CUDA provider)
    or ``cpu`` (the CPU provider, to prove the flow without a GPU)."""
    import numpy as np
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls") and device == "cuda":
        ort.preload_dlls()
    providers = [CUDA, "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    assets = Path(os.environ["FACEPRO_ASSETS"]) / "models"
    for name, shape in COPY_CASES:
        sess = ort.InferenceSession(str(assets / name), providers=providers)
        inp, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
        x = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
        if isinstance(sess.get_inputs()[0].shape[0], int) and sess.get_inputs()[0].shape[0] != shape[0]:
            x = x[: sess.get_inputs()[0].shape[0]]  # a fixed batch dimension
        on_device = ort.OrtValue.ortvalue_from_numpy(x, device, 0)
        bound = sess.io_binding()
        bound.bind_ortvalue_input(inp, on_device)
        bound.bind_output(out, device)
        back = sess.io_binding()
        back.bind_ortvalue_input(inp, on_device)
        back.bind_output(out, "cpu")
        ms = {"run": _median_ms(lambda: sess.run(None, {inp: x}), n),
              "bound": _median_ms(lambda: sess.run_with_iobinding(bound), n),
              "bound+out": _median_ms(lambda: sess.run_with_iobinding(back), n)}
        mb = x.nbytes / 2**20
        print(f"  {name} ({sess.get_providers()[0]}), input {'x'.join(map(str, x.shape))} ({mb:.1f} MiB): "
              + ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
              + f" ms; copies at most {max(0.0, ms['run'] - ms['bound']):.2f} ms a run"
              f" ({max(0.0, ms['run'] - ms['bound']) / ms['run']:.0%})", flush=True)
    return 0


def run_copy_probe(device: str) -> None:
    """:func:`copy_probe` in a child process, reported like the shape probe."""
    print(f"copy probe ({device}):", flush=True)
    try:
        res = sh([sys.executable, str(Path(__file__).resolve()), "--copy-probe", device], env=bench_env(), cwd=ROOT, timeout=120)
    except subprocess.TimeoutExpired:
        print("  timed out after 120 s (the benchmarks still run)", flush=True)
        return
    print(res.stdout + (res.stderr[-800:] if res.returncode else ""), flush=True)


def run_probes() -> None:
    """:func:`shape_probe` in a child process per :data:`PROBES` setting (module loading is read at CUDA start)."""
    for label, env, search in PROBES:
        print(f"new-shape probe, {label}:", flush=True)
        try:
            res = sh([sys.executable, str(Path(__file__).resolve()), "--shape-probe", search], env={**bench_env(), **env},
                     cwd=ROOT, timeout=120)
        except subprocess.TimeoutExpired:
            print("  timed out after 120 s (the benchmarks still run)", flush=True)
            continue
        print(res.stdout + (res.stderr[-800:] if res.returncode else ""), flush=True)


def cuda_only() -> int:
    """The CUDA step alone, in a child process with :func:`bench_env` (exit 0 CUDA runs, 3 no GPU, 1 failed)."""
    assets = Path(os.environ["FACEPRO_ASSETS"])
    ok = cuda_check(demo_models(assets))
    return {True: 0, None: 3, False: 1}[ok]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--shape-probe"]:
        sys.exit(shape_probe(sys.argv[2]))
    if sys.argv[1:2] == ["--copy-probe"]:
        sys.exit(copy_probe(sys.argv[2]))
    sys.exit(cuda_only() if sys.argv[1:] == ["--cuda-only"] else main())
