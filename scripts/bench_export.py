"""Benchmark exported artifacts of a Fashion-MNIST student and teacher.

For each checkpoint: export ONNX + OpenVINO at FP32/FP16/INT8 and LiteRT at FP32/INT8 (when
``edgekt[litert-export]`` is installed; INT8 calibrated on real training images), then report
per artifact the test accuracy and top-1 agreement with PyTorch (from the parity gate), file
size, and batch-1 latency (load, first call, p50/p90 of steady state), each backend timed in
its own subprocess so runtimes do not disturb each other. Prints the CPU flags that decide
whether INT8 can be fast, and recommends FP32 wherever INT8 is slower.

    python scripts/bench_export.py --student runs/student/best.pt --teacher runs/teacher/best.pt \
        --out bench_export.json
    python scripts/bench_export.py --quick --out /tmp/bench_export.json   # trains tiny models
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16")


def cpu_flags() -> dict[str, bool]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return {f: f in have for f in FLAGS}


# ----------------------------------------------------------------------------- worker (subprocess)
def worker(kind: str, path: str, x_path: str, threads: int, runs: int, config: str) -> None:
    """Time one artifact at batch 1. Imports only the runtime it measures."""
    x = np.load(x_path, allow_pickle=False)
    t0 = time.perf_counter()
    if kind == "torch":
        import torch

        torch.set_num_threads(threads)
        from edgekt.checkpoint import load_checkpoint
        from edgekt.engine.setup import model_from_checkpoint

        model, _ = model_from_checkpoint(load_checkpoint(path))
        xt = torch.from_numpy(x)

        def infer():
            with torch.inference_mode():
                return model(xt)
    elif kind == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name

        def infer():
            return sess.run(None, {name: x})
    elif kind == "litert":
        from ai_edge_litert.interpreter import Interpreter

        if json.loads(config).get("xnnpack_amx") is False:  # the export's runtime_config
            from edgekt.devices.backends.amx import deny_amx

            deny_amx()

        it = Interpreter(model_path=path, num_threads=threads)
        it.allocate_tensors()
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        scale, zero = inp["quantization"]
        xq = (np.clip(np.round(x / scale) + zero, -128, 127) if scale else x).astype(inp["dtype"])

        def infer():  # the app's loop: set, invoke, read (int8 I/O as the file has it)
            it.set_tensor(inp["index"], xq)
            it.invoke()
            return it.get_tensor(out["index"])
    else:
        import openvino as ov

        cfg = {**json.loads(config), "INFERENCE_NUM_THREADS": threads}
        req = ov.Core().compile_model(path, "CPU", cfg).create_infer_request()

        def infer():
            return req.infer({0: x})
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    infer()
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(max(10, runs // 10)):  # warm-up
        infer()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        infer()
        times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"load_s": load_s, "first_ms": first_ms,
                      "p50_ms": float(np.percentile(times, 50)),
                      "p90_ms": float(np.percentile(times, 90))}))


def time_in_subprocess(kind: str, path: Path, x_path: Path, threads: int, runs: int,
                       config: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    res = subprocess.run(
        [sys.executable, __file__, "--worker", kind, str(path), str(x_path), str(threads),
         str(runs), json.dumps(config)], capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"worker {kind} {path} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver
def train_quick(work: Path) -> tuple[Path, Path]:
    """Tiny stand-ins when no checkpoints are given (1 epoch on a slice of real data)."""
    from edgekt.config import load_config
    from edgekt.engine import fit

    paths = []
    for name, model, limit in (("student", "cnn_xs", 4000), ("teacher", "cnn_l", 4000)):
        cfg = load_config(None, [f"run.dir={work / name}", f"model.name={model}",
                                 "train.epochs=1", "optim.lr=0.003", "data.batch_size=32",
                                 "train.progress=false", f"data.limit={limit}"])
        fit(cfg, force=True)
        paths.append(work / name / "best.pt")
    return paths[0], paths[1]


def bench_model(role: str, ckpt: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    from edgekt.exporters import export_package

    out = work / f"pkg_{role}"
    t0 = time.perf_counter()
    manifest = export_package(
        ckpt, out, targets=args.targets, precisions=["fp32", "fp16", "int8"],
        force=True, allow_mismatch=True, val_samples=args.val_samples,
        test_samples=args.test_samples, calib_samples=args.calib_samples,
        data_dir=args.data_dir, threads=args.threads, log=lambda m: print(f"  [{role}] {m}"))
    print(f"  [{role}] exported in {time.perf_counter() - t0:.1f} s")
    x = np.load(_sample_path(manifest, work, role), allow_pickle=False)
    x_path = work / f"x_{role}.npy"
    np.save(x_path, x)
    rows = [{"model": role, "artifact": "pytorch eager", "runtime": "torch", "precision": "fp32",
             "test_acc": manifest.reference["test_acc"], "agreement": 1.0,
             "bytes": ckpt.stat().st_size,
             **time_in_subprocess("torch", ckpt, x_path, args.threads, args.runs, {})}]
    for a in manifest.artifacts:
        size = sum(manifest.files[f]["bytes"] for f in a["files"])
        rows.append({"model": role, "artifact": a["file"], "runtime": a["runtime"],
                     "precision": a["precision"], "test_acc": a["parity"]["test_acc"],
                     "agreement": a["parity"]["agreement"], "bytes": size,
                     **time_in_subprocess(a["runtime"], out / a["file"], x_path, args.threads,
                                          args.runs, a["runtime_config"])})
        if a["runtime"] == "litert" and a["precision"] == "int8" and cpu_flags().get("amx_int8"):
            # The export timed XNNPACK's AMX and VNNI kernels and kept the faster; show both.
            other = {} if a["runtime_config"].get("xnnpack_amx") is False else \
                {"xnnpack_amx": False}
            label = "AMX allowed" if not other else "AMX denied"
            rows.append({**rows[-1], "artifact": f"{a['file']} ({label})",
                         "alternative": True,
                         **time_in_subprocess("litert", out / a["file"], x_path, args.threads,
                                              args.runs, other)})
    return rows


def _sample_path(manifest, work: Path, role: str) -> Path:
    """One real test image, normalised exactly as the embedded metadata says."""
    from edgekt.checkpoint import load_checkpoint
    from edgekt.data import build_splits
    from edgekt.evaluation import checkpoint_data_config

    ckpt = load_checkpoint(manifest.source["checkpoint"])
    splits = build_splits(checkpoint_data_config(ckpt, "bench", None))
    pre = manifest.meta["preprocess"]
    raw = splits.test.images[:1].numpy().astype(np.float32)
    mean = np.array(pre["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.array(pre["std"], np.float32).reshape(1, -1, 1, 1)
    path = work / f"raw_{role}.npy"
    np.save(path, ((raw * pre["scale"] - mean) / std).astype(np.float32))
    return path


def recommend(rows: list[dict]) -> list[str]:
    notes = []
    rows = [r for r in rows if not r.get("alternative")]  # the export's own settings only
    for model in dict.fromkeys(r["model"] for r in rows):
        for rt in dict.fromkeys(r["runtime"] for r in rows if r["runtime"] != "torch"):
            by = {r["precision"]: r for r in rows if r["model"] == model and r["runtime"] == rt}
            if "fp32" not in by or "int8" not in by:
                continue
            f, q = by["fp32"], by["int8"]
            drop = 100 * (f["test_acc"] - q["test_acc"])
            if q["p50_ms"] < f["p50_ms"]:
                notes.append(f"{model}/{rt}: INT8 recommended ({f['p50_ms'] / q['p50_ms']:.2f}x "
                             f"faster than FP32, accuracy drop {drop:+.2f} pt)")
            else:
                notes.append(f"{model}/{rt}: keep FP32 - INT8 is SLOWER ({q['p50_ms']:.3f} vs "
                             f"{f['p50_ms']:.3f} ms p50; drop {drop:+.2f} pt)")
    student = [r for r in rows if r["model"] == "student"]
    lite = next((r for r in student if r["runtime"] == "litert" and r["precision"] == "int8"),
                None)
    others = [r for r in student if r["runtime"] in ("onnxruntime", "openvino")]
    if lite and others:
        best = min(others, key=lambda r: r["p50_ms"])
        ref = next(r for r in student if r["runtime"] == "torch")
        drop = 100 * (ref["test_acc"] - lite["test_acc"])
        notes.append(f"student LiteRT INT8 vs the fastest ONNX Runtime/OpenVINO artifact "
                     f"({best['artifact']}, {best['runtime']}): "
                     f"{best['p50_ms'] / lite['p50_ms']:.2f}x faster, accuracy drop vs "
                     f"PyTorch {drop:+.2f} pt (target: >= 1.5x at <= 0.3 pt)")
    eager = {r["model"]: r for r in rows if r["runtime"] == "torch"}
    if {"student", "teacher"} <= set(eager):
        best = min((r for r in rows if r["model"] == "student" and r["runtime"] != "torch"),
                   key=lambda r: r["p50_ms"])
        t = eager["teacher"]
        notes.append(f"best student artifact {best['artifact']} ({best['runtime']}): "
                     f"{t['p50_ms'] / best['p50_ms']:.1f}x faster than the teacher in PyTorch "
                     f"eager, accuracy {100 * (best['test_acc'] - t['test_acc']):+.2f} pt "
                     "(target: >= 20x at <= 1 pt loss)")
    return notes


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]),
               sys.argv[7])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path)
    ap.add_argument("--teacher", type=Path)
    ap.add_argument("--quick", action="store_true", help="fewer samples and runs; trains tiny "
                    "models when --student/--teacher are not given")
    ap.add_argument("--out", type=Path, default=Path("bench_export.json"))
    ap.add_argument("--work", type=Path, default=None, help="where packages are written")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    args.runs = 200 if args.quick else 2000
    args.val_samples = 500 if args.quick else 1000
    args.test_samples = 2000 if args.quick else 0  # 0: all
    args.calib_samples = 300
    import importlib.util

    args.targets = ["onnx", "openvino"]
    if importlib.util.find_spec("litert_torch") is not None:
        args.targets.append("litert")
    else:
        print("litert-torch is not installed: no LiteRT rows (pip install -e '.[litert-export]')")

    import torch
    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(args.threads)
    console = Console(width=max(140, Console().width))
    flags = cpu_flags()
    console.print("CPU flags: " + ", ".join(f"{k}={'yes' if v else 'no'}"
                                            for k, v in flags.items()))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_export-"))
    student, teacher = args.student, args.teacher
    if student is None or teacher is None:
        if not args.quick:
            raise SystemExit("give --student and --teacher checkpoints (or use --quick)")
        qs, qt = train_quick(work)
        student, teacher = student or qs, teacher or qt
    rows = []
    for role, ckpt in (("student", student), ("teacher", teacher)):
        rows += bench_model(role, ckpt, work, args)
    eager = {r["model"]: r["p50_ms"] for r in rows if r["runtime"] == "torch"}
    t = Table(title=f"export benchmark (batch 1, {args.threads} thread(s), "
                    f"load avg {os.getloadavg()[0]:.2f})")
    for c in ("model", "artifact", "runtime", "prec", "test acc", "agree", "size KB", "load s",
              "first ms", "p50 ms", "p90 ms", "vs eager"):
        t.add_column(c, justify="left" if c in ("model", "artifact", "runtime") else "right")
    for r in rows:
        t.add_row(r["model"], r["artifact"], r["runtime"], r["precision"],
                  f"{r['test_acc']:.4f}", f"{r['agreement']:.4f}", f"{r['bytes'] / 1e3:.1f}",
                  f"{r['load_s']:.2f}", f"{r['first_ms']:.2f}", f"{r['p50_ms']:.3f}",
                  f"{r['p90_ms']:.3f}", f"{eager[r['model']] / r['p50_ms']:.1f}x")
    console.print(t)
    notes = recommend(rows)
    for n in notes:
        console.print("- " + n)
    result = {"cpu_flags": flags, "threads": args.threads, "quick": args.quick,
              "loadavg": os.getloadavg(), "student": str(student), "teacher": str(teacher),
              "rows": rows, "recommendations": notes}
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
