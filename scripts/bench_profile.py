"""Cross-check edgekt's profiler against the runtimes' own tools, and measure its costs.

1. p50 latency: edgekt (onnxruntime and OpenVINO, each in its own process) beside OpenVINO's
   ``benchmark_app`` (sync API, one request, one stream, same threads, f32) and, when it is on
   PATH, ``onnxruntime_perf_test`` (same threads, sequential); ratio edgekt / tool. For
   OpenVINO two edgekt figures: wall-clock around the Python ``infer()`` call (what an app
   sees), and the request's own ``latency`` that benchmark_app reports (``rt``); on a ~40 µs
   model the 2-3 µs between them is the Python call and the GIL hand-over.
2. Profiler overhead: edgekt's timed loop vs a bare ``session.run`` loop on the student,
   interleaved rounds in one fresh process (per-iteration difference as % of p50).
3. Cold start and peak RSS: a fresh process doing ``EdgeModel.load`` + one prediction vs one
   doing ``onnxruntime.InferenceSession`` + one ``run`` (median of alternating runs). Both run
   with byte-compiled modules, as after ``pip install`` (which compiles them): with
   ``PYTHONDONTWRITEBYTECODE`` set and edgekt installed editable, every start would compile
   edgekt's sources while onnxruntime's shipped .pyc files load, which is not what a device
   sees. The children get a private ``PYTHONPYCACHEPREFIX`` and one untimed warm-up round.
4. LiteRT (when ``edgekt[litert-export]`` is installed): the same models as ``.tflite``; edgekt's
   p50 vs a bare ``Interpreter.invoke`` loop on the same file in its own process (target
   within ±5%), and cold start vs a bare interpreter process (target ≤ 1.1×).

Models: the student (cnn_xs) and a teacher (resnet18, 1-channel 28 px) exported to ONNX with
edgekt metadata; latency does not depend on weight values, so fresh weights are used unless
``--models`` gives exported files. The machine is shared: read ratios, not absolute numbers.

    python scripts/bench_profile.py --quick --out bench_profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(width=160)


def export_models(out: Path) -> dict[str, Path]:
    """Student and teacher ONNX files with edgekt metadata (Fashion-MNIST geometry)."""
    import torch

    from edgekt.data import DatasetInfo
    from edgekt.exporters.meta import build_meta
    from edgekt.exporters.onnx_export import export_onnx
    from edgekt.models import create_model

    torch.manual_seed(0)
    info = DatasetInfo(name="fashion-mnist", num_classes=10, in_channels=1, image_size=28,
                       mean=[0.2860], std=[0.3530], labels=[str(i) for i in range(10)])
    paths = {}
    for role, name in (("student", "cnn_xs"), ("teacher", "resnet18")):
        net = create_model(name, num_classes=10, in_channels=1, image_size=28).eval()
        meta = build_meta(info, part="classifier", model_name=name,
                          embedding_dim=net.embedding_dim)
        paths[role] = out / f"{role}.onnx"
        export_onnx(net, meta, paths[role])
        if litert_available():
            from edgekt.exporters.litert_export import convert, embed_metadata

            data = convert(net, meta.input.shape)
            (out / f"{role}.tflite").write_bytes(embed_metadata(data, meta.to_json()))
    return paths


def litert_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("litert_torch") is not None


BARE_LITERT = r"""
import json, sys, time, numpy as np
from ai_edge_litert.interpreter import Interpreter
path, threads, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
it = Interpreter(model_path=path, num_threads=threads)
it.allocate_tensors()
inp = it.get_input_details()[0]
it.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
invoke, clock = it.invoke, time.perf_counter_ns
for _ in range(50):
    invoke()
samples, deadline = [], clock() + int(seconds * 1e9)
while True:
    t0 = clock()
    invoke()
    t1 = clock()
    samples.append(t1 - t0)
    if t1 >= deadline and len(samples) >= 10:
        break
print(json.dumps({"p50": float(np.median(samples)) / 1e6, "n": len(samples)}))
"""


def bare_litert_p50(path: Path, threads: int, seconds: float) -> float:
    proc = subprocess.run([sys.executable, "-c", BARE_LITERT, str(path), str(threads),
                           str(seconds)], capture_output=True, text=True, check=True,
                          cwd=tempfile.gettempdir())
    return json.loads(proc.stdout.strip().splitlines()[-1])["p50"]


def edgekt_p50(path: Path, backend: str, threads: int, seconds: float) -> dict:
    from edgekt.devices.campaign import run_profiles
    from edgekt.devices.config import DeviceConfig
    from edgekt.devices.profiler import ProfileConfig

    row = run_profiles([path], DeviceConfig(name="local"), [backend],
                       ProfileConfig(warmup=50, seconds=seconds, threads=threads,
                                       e2e=False, samples=False))[0]
    if row["status"] != "ok":
        raise RuntimeError(row["error"])
    inner = row["latency_ms"].get("runtime")
    return {"p50": row["latency_ms"]["model"]["p50"], "n": row["latency_ms"]["model"]["n"],
            "runtime_p50": inner["p50"] if inner else None, "loadavg": row["loadavg"]["before"]}


def benchmark_app_p50(path: Path, threads: int, seconds: float) -> float | None:
    tool = shutil.which("benchmark_app") or str(Path(sys.executable).with_name("benchmark_app"))
    if Path(tool).exists():
        cmd = [tool]
    else:  # a venv that sees openvino without its console script: the same entry point
        try:
            import openvino.tools.benchmark.main  # noqa: F401
        except ImportError:
            return None
        cmd = [sys.executable, "-c", "from openvino.tools.benchmark.main import main; main()"]
    proc = subprocess.run([*cmd, "-m", str(path), "-d", "CPU", "-hint", "none", "-api", "sync",
                           "-nireq", "1", "-nstreams", "1", "-nthreads", str(threads),
                           "-shape", "[1,1,28,28]", "-infer_precision", "f32",
                           "-t", str(max(1, round(seconds)))],
                          capture_output=True, text=True, timeout=600)
    m = re.search(r"Median:\s+([\d.]+)\s+(ms|us)", proc.stdout)
    if not m:
        raise RuntimeError(f"benchmark_app failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    return float(m.group(1)) / (1000.0 if m.group(2) == "us" else 1.0)


def ort_perf_test_p50(path: Path, threads: int, seconds: float) -> float | None:
    tool = shutil.which("onnxruntime_perf_test")
    if tool is None:
        return None
    proc = subprocess.run([tool, "-e", "cpu", "-x", str(threads), "-y", "1", "-t",
                           str(max(1, round(seconds))), "-m", "times", str(path)],
                          capture_output=True, text=True, timeout=600)
    m = re.search(r"P50 Latency:\s+([\d.e-]+)\s*s", proc.stdout)
    return float(m.group(1)) * 1000 if m else None


OVERHEAD = r"""
import json, sys, time, numpy as np, onnxruntime as ort
from edgekt.devices import EdgeModel
from edgekt.devices.profiler import time_loop, summarize
path, threads, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = EdgeModel.load(path, threads=threads)
x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
sess, name = m.backend.session, m.backend.input.name
outs, feed = [sess.get_outputs()[0].name], {name: x}
bare, prof, p50 = [], [], []
for _ in range(50):
    sess.run(outs, feed)
for _ in range(rounds):
    t0 = time.perf_counter_ns()
    for _ in range(n):
        sess.run(outs, feed)
    bare.append((time.perf_counter_ns() - t0) / n)
    t0 = time.perf_counter_ns()
    s = time_loop(m.backend.bind(x), warmup=0, iters=n, seconds=1)
    prof.append((time.perf_counter_ns() - t0) / n)
    p50.append(float(np.median(s)))
empty = summarize(time_loop(lambda: None, warmup=100, iters=20000, seconds=1))
print(json.dumps({"bare_ns": bare, "profiler_ns": prof, "p50_ns": p50,
                  "empty_loop_p50_ns": empty["p50"] * 1e6}))
"""

# VmHWM, not ru_maxrss: the latter carries this (torch-importing) parent's peak into children.
PEAK = ("def peak_kb():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            return int(line.split()[1])\n")
EDGEKT_COLD = (PEAK + "import numpy as np\n"
               "from edgekt.devices import EdgeModel\n"
               "m = EdgeModel.load({path!r})\n"
               "m.predict(np.zeros((28, 28), np.uint8))\n"
               "print(peak_kb())\n")
COLD = {
    "bare": (PEAK + "import numpy as np, onnxruntime as ort\n"
                    "s = ort.InferenceSession({path!r}, providers=['CPUExecutionProvider'])\n"
                    "s.run(None, {{s.get_inputs()[0].name: np.zeros((1,1,28,28), np.float32)}})\n"
                    "print(peak_kb())\n"),
    "edgekt": EDGEKT_COLD,
}
COLD_LITERT = {
    "bare": (PEAK + "import numpy as np\n"
                    "from ai_edge_litert.interpreter import Interpreter\n"
                    "it = Interpreter(model_path={path!r})\n"
                    "it.allocate_tensors()\n"
                    "d = it.get_input_details()[0]\n"
                    "it.set_tensor(d['index'], np.zeros(d['shape'], d['dtype']))\n"
                    "it.invoke()\n"
                    "it.get_tensor(it.get_output_details()[0]['index'])\n"
                    "print(peak_kb())\n"),
    "edgekt": EDGEKT_COLD,
}


def cold_start(path: Path, repeats: int, codes: dict[str, str] = COLD) -> dict:
    times: dict[str, list[float]] = {k: [] for k in codes}
    rss: dict[str, list[float]] = {k: [] for k in codes}
    pyc = tempfile.mkdtemp(prefix="bench_profile_pyc_")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = pyc
    for i in range(repeats + 1):
        for name, code in codes.items():  # alternate, so drift in load hits both alike
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code.format(path=str(path))],
                                  capture_output=True, text=True, check=True,
                                  cwd=tempfile.gettempdir(), env=env)
            if i == 0:
                continue  # warm-up round: writes the byte code both sides then reuse
            times[name].append(time.perf_counter() - t0)
            rss[name].append(int(proc.stdout.split()[-1]) / 1024)
    shutil.rmtree(pyc, ignore_errors=True)
    med = {k: (statistics.median(times[k]), statistics.median(rss[k])) for k in codes}
    return {"edgekt_s": med["edgekt"][0], "bare_s": med["bare"][0],
            "time_ratio": med["edgekt"][0] / med["bare"][0],
            "edgekt_rss_mb": med["edgekt"][1], "bare_rss_mb": med["bare"][1],
            "rss_delta_mb": med["edgekt"][1] - med["bare"][1], "repeats": repeats}


def bench_litert(work: Path, models: dict[str, Path], threads: int, seconds: float,
                 rounds: int, repeats: int) -> dict:
    """edgekt's litert backend vs a bare Interpreter on the same .tflite files."""
    out: dict = {"latency": {}}
    table = Table(title=f"LiteRT p50 latency, batch 1, {threads} thread(s), ms")
    for col in ("model", "edgekt litert", "bare invoke loop", "ratio", "edgekt ort"):
        table.add_column(col, justify="right")
    for role, onnx_path in models.items():
        path = work / f"{role}.tflite"
        ours, bare = [], []
        for _ in range(rounds):  # alternate, so load drift hits both alike
            ours.append(edgekt_p50(path, "litert", threads, seconds)["p50"])
            bare.append(bare_litert_p50(path, threads, seconds))
        ort = edgekt_p50(onnx_path, "onnxruntime", threads, seconds)["p50"]
        r = {"edgekt_litert_p50": statistics.median(ours),
             "bare_invoke_p50": statistics.median(bare), "edgekt_ort_p50": ort}
        r["ratio"] = r["edgekt_litert_p50"] / r["bare_invoke_p50"]
        out["latency"][role] = r
        table.add_row(role, f"{r['edgekt_litert_p50']:.4f}", f"{r['bare_invoke_p50']:.4f}",
                      f"{r['ratio']:.3f}", f"{ort:.4f}")
    console.print(table)
    cold = cold_start(work / "student.tflite", repeats, COLD_LITERT)
    out["cold_start"] = c = cold
    console.print(f"LiteRT cold start (process start -> first prediction), median of {repeats}: "
                  f"edgekt {c['edgekt_s']:.3f} s vs bare interpreter {c['bare_s']:.3f} s "
                  f"= {c['time_ratio']:.3f}x (target <= 1.1x); peak RSS "
                  f"{c['edgekt_rss_mb']:.0f} MB vs {c['bare_rss_mb']:.0f} MB")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short loops, student only cold start")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="*", type=Path, help="exported .onnx files (default: "
                    "export a student and a teacher)")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args()
    seconds = 2.0 if args.quick else 10.0
    rounds = 1 if args.quick else 3
    work = Path(tempfile.mkdtemp(prefix="bench_profile_"))
    # Packages all name their file model.onnx: label a model by its folder too.
    models = ({f"{p.parent.name}/{p.stem}": p for p in args.models} if args.models
              else export_models(work))
    results: dict = {"threads": args.threads, "quick": args.quick, "seconds": seconds,
                     "rounds": rounds,
                     "loadavg": os.getloadavg(), "latency": {}}

    table = Table(title=f"p50 latency, batch 1, {args.threads} thread(s), ms")
    for col in ("model", "edgekt ort", "edgekt ov", "edgekt ov rt", "benchmark_app", "ov ratio",
                "ov rt ratio", "ort_perf_test", "ort ratio"):
        table.add_column(col, justify="right")
    for role, path in models.items():
        runs: dict[str, list] = {"ort": [], "ov": [], "bapp": [], "perf": []}
        for _ in range(rounds):  # alternate tools so that load drift hits all of them alike
            runs["ort"].append(edgekt_p50(path, "onnxruntime", args.threads, seconds))
            runs["ov"].append(edgekt_p50(path, "openvino", args.threads, seconds))
            runs["bapp"].append(benchmark_app_p50(path, args.threads, seconds))
            runs["perf"].append(ort_perf_test_p50(path, args.threads, seconds))
        ort_r, ov_r = (min(runs[k], key=lambda r: abs(r["p50"] - statistics.median(
            x["p50"] for x in runs[k]))) for k in ("ort", "ov"))
        bapp = statistics.median(runs["bapp"]) if None not in runs["bapp"] else None
        perf = statistics.median(runs["perf"]) if None not in runs["perf"] else None
        ov_rt = statistics.median(r["runtime_p50"] for r in runs["ov"])
        results["latency"][role] = {"edgekt_ort": ort_r, "edgekt_ov": ov_r,
                                    "edgekt_ov_runtime_p50": ov_rt,
                                    "benchmark_app_p50": bapp, "ort_perf_test_p50": perf,
                                    "ov_ratio": ov_r["p50"] / bapp if bapp else None,
                                    "ov_runtime_ratio": ov_rt / bapp if bapp else None,
                                    "ort_ratio": ort_r["p50"] / perf if perf else None}
        r = results["latency"][role]
        table.add_row(role, f"{ort_r['p50']:.4f}", f"{ov_r['p50']:.4f}", f"{ov_rt:.4f}",
                      f"{bapp:.4f}" if bapp else "n/a",
                      f"{r['ov_ratio']:.3f}" if r["ov_ratio"] else "n/a",
                      f"{r['ov_runtime_ratio']:.3f}" if r["ov_runtime_ratio"] else "n/a",
                      f"{perf:.4f}" if perf else "not installed",
                      f"{r['ort_ratio']:.3f}" if r["ort_ratio"] else "n/a")
    console.print(table)

    student = models.get("student", next(iter(models.values())))
    n, loops = (500, 5) if args.quick else (3000, 9)
    proc = subprocess.run([sys.executable, "-c", OVERHEAD, str(student), str(args.threads),
                           str(n), str(loops)], capture_output=True, text=True, check=True,
                          cwd=tempfile.gettempdir())
    ov = json.loads(proc.stdout)
    # The least-disturbed round of each (min): on shared cores the mean of a round is mostly
    # other processes' noise, which is larger than the quantity measured here.
    bare, prof = min(ov["bare_ns"]), min(ov["profiler_ns"])
    p50 = statistics.median(ov["p50_ns"])
    results["overhead"] = {**ov, "bare_mean_ns": bare, "profiler_mean_ns": prof,
                           "overhead_ns": prof - bare, "overhead_pct_of_p50": (prof - bare) / p50
                           * 100, "empty_loop_pct_of_p50": ov["empty_loop_p50_ns"] / p50 * 100}
    o = results["overhead"]
    console.print(f"profiler overhead on the student (best of {loops} interleaved rounds of "
                  f"{n}): bare loop {bare / 1e3:.1f} µs/iter, "
                  f"edgekt loop {prof / 1e3:.1f} µs/iter -> {o['overhead_ns']:.0f} ns "
                  f"({o['overhead_pct_of_p50']:+.2f}% of p50 {p50 / 1e3:.1f} µs); the empty "
                  f"timed loop costs {ov['empty_loop_p50_ns']:.0f} ns "
                  f"({o['empty_loop_pct_of_p50']:.2f}%)")

    cold = cold_start(student, 3 if args.quick else 7)
    cold["ort_s"], cold["ort_rss_mb"] = cold.pop("bare_s"), cold.pop("bare_rss_mb")
    results["cold_start"] = cold
    console.print(f"cold start (process start -> first prediction), median of {cold['repeats']}: "
                  f"edgekt {cold['edgekt_s']:.3f} s vs bare onnxruntime {cold['ort_s']:.3f} s "
                  f"= {cold['time_ratio']:.3f}x; peak RSS {cold['edgekt_rss_mb']:.0f} MB vs "
                  f"{cold['ort_rss_mb']:.0f} MB ({cold['rss_delta_mb']:+.1f} MB)")
    if litert_available() and not args.models:
        results["litert"] = bench_litert(work, models, args.threads, seconds, rounds,
                                         3 if args.quick else 7)
    results["loadavg_after"] = os.getloadavg()
    console.print(f"[dim]load average before/after: {results['loadavg']} / "
                  f"{results['loadavg_after']} (2 shared cores: ratios, not absolutes)[/]")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
