"""Prune-then-distil benchmark on real Fashion-MNIST.

For each MACs fraction of the teacher (default 25%, 10%, 5%) three students get the same epochs:
  * pruned+KD  - ``edgekt prune --target-macs f`` of the teacher, recovered by Hinton KD
                 (``model.name: pruned:PATH``);
  * scratch    - the teacher's architecture narrowed (``width_mult``) to the same MACs, CE only;
  * scratch+KD - the same narrow network distilled from the teacher.
Reported: test accuracy, params, MACs, INT8 ONNX batch-1 latency (onnxruntime, 1 thread, p50,
after warm-up; each model timed in this process, so compare ratios within one run), the
latency ratio against the MACs ratio, and CPU time of the recovery/training.

    python scripts/bench_prune.py --quick                   # 600 images, 1 epoch, 25% only
    python scripts/bench_prune.py --teacher-checkpoint runs/teacher_fashion/best.pt \
        --epochs 10 --out bench_prune.json                  # the full table (hours on a CPU)
    python scripts/bench_prune.py ... --rounds 3 --recover-epochs 1   # prune-and-recover rounds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from edgekt.checkpoint import load_checkpoint
from edgekt.config import Config, load_config
from edgekt.data import Splits, build_splits
from edgekt.engine import fit
from edgekt.engine.setup import model_from_checkpoint
from edgekt.io import atomic_write_text
from edgekt.models import create_model
from edgekt.pruning.prune import PruneSpec, count, prune_checkpoint

console = Console(width=max(Console().width, 120))
KD = [{"name": "hinton_kd", "weight": 1.0, "temperature": 4.0}]


def data_sets(args) -> list[str]:
    """The data settings shared by the splits and every run's recorded config."""
    return [f"data.val_fraction={args.val_fraction}",
            *([f"data.limit={args.limit}"] if args.limit else [])]


def test_accuracy(ckpt: Path, splits: Splits) -> float:
    """A checkpoint's accuracy on the whole test split (for a teacher saved without it)."""
    from edgekt.data import make_loader
    from edgekt.engine.fit import evaluate
    from edgekt.engine.runtime import Runtime, select_device

    model, info = model_from_checkpoint(load_checkpoint(ckpt))
    loader = make_loader(splits.test, info, load_config(None, []).data, train=False)
    return float(evaluate(model, loader, Runtime(select_device("cpu"), None))["acc"])


def make_cfg(run: Path, model: str, kwargs: dict, epochs: int, args, lr: float,
             teacher: Path | None = None) -> Config:
    cfg = load_config(None, [f"run.dir={run}", f"model.name={model}", f"train.epochs={epochs}",
                             "train.progress=false", f"train.threads={args.threads}",
                             f"optim.lr={lr}", "optim.weight_decay=0.0005", "sched.name=cosine",
                             f"data.batch_size={args.batch_size}", *data_sets(args)])
    cfg.model.kwargs = dict(kwargs)
    if teacher is not None:
        cfg.method = "distill"
        cfg.method_args = {"teacher": {"checkpoint": str(teacher)}, "losses": KD,
                           "cache_dir": str(run.parent / "cache")}
    return cfg


def timed_fit(cfg: Config, splits: Splits) -> tuple[dict[str, Any], Path]:
    c0 = time.process_time()
    res = fit(cfg, splits=splits, force=True)
    return {**res.metrics, "cpu_s": round(time.process_time() - c0, 1)}, res.run_dir / "last.pt"


def width_for_macs(name: str, info, goal: int) -> float:
    """Bisect ``width_mult`` of ``name`` so its MACs match ``goal``."""
    ex = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
    lo, hi = 0.05, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        m = create_model(name, num_classes=info.num_classes, in_channels=info.in_channels,
                         image_size=info.image_size, width_mult=mid)
        lo, hi = (mid, hi) if count(m, ex)[0] < goal else (lo, mid)
    return round((lo + hi) / 2, 4)


def onnx_latency(model: Path, splits: Splits, runs: int, batch: int = 1) -> float:
    """p50 ms per call of ``model`` (onnxruntime, 1 thread) on ``batch`` real test images."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    info = splits.info  # latency does not depend on the values, but feed real images
    x = splits.test.images[:batch].numpy().astype(np.float32) / 255.0
    x = (x - np.array(info.mean, np.float32).reshape(1, -1, 1, 1)) \
        / np.array(info.std, np.float32).reshape(1, -1, 1, 1)
    for _ in range(20):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def int8_latency(ckpt: Path, splits: Splits, work: Path, runs: int, batch: int
                 ) -> dict[str, Any]:
    """Export INT8 ONNX (parity-gated); time it at batch 1 and per image at ``batch``."""
    from edgekt.exporters import export_package

    man = export_package(ckpt, work, targets=["onnx"], precisions=["int8"], splits=splits,
                         val_samples=200, test_samples=200, threads=1, force=True,
                         allow_mismatch=True, dynamic_batch=True)
    model = work / "model.int8.onnx"
    art = man.artifacts[0]
    return {"int8_p50_ms": round(onnx_latency(model, splits, runs), 4),
            f"int8_b{batch}_ms_per_image": round(
                onnx_latency(model, splits, max(20, runs // 10), batch) / batch, 5),
            "int8_test_acc": art["parity"]["test_acc"],
            "int8_agreement": art["parity"]["agreement"]}


def retime(ckpts: list[Path], splits: Splits, work: Path, runs: int, batch: int
           ) -> list[dict[str, Any]]:
    """Export and time these checkpoints again, one after another in this one process
    (comparable ratios, whatever the load was during the training runs)."""
    rows = []
    for i, ckpt in enumerate(ckpts):
        rows.append({"checkpoint": str(ckpt), **describe(ckpt),
                     **int8_latency(ckpt, splits, work / f"retime_{i}", runs, batch)})
        console.print(rows[-1])
    return rows


def describe(ckpt: Path) -> dict[str, int]:
    net, info = model_from_checkpoint(load_checkpoint(ckpt))
    macs, params = count(net, torch.zeros(1, info.in_channels, info.image_size, info.image_size))
    return {"macs": macs, "params": params}


def run(args) -> dict[str, Any]:
    splits = build_splits(load_config(None, data_sets(args)).data)
    tmp = Path(args.work or tempfile.mkdtemp(prefix="bench_prune_"))
    rows: list[dict[str, Any]] = []
    load0 = os.getloadavg()
    if args.teacher_checkpoint:
        teacher = Path(args.teacher_checkpoint)
        t_metrics = load_checkpoint(teacher).get("metrics", {})
        t_name = load_checkpoint(teacher)["model"]["name"]
    else:
        t_metrics, teacher = timed_fit(make_cfg(tmp / "teacher", args.teacher, {},
                                                args.teacher_epochs, args, 0.003), splits)
        t_name = args.teacher
    if t_metrics.get("test_acc") is None:  # best.pt is saved before the final test pass
        t_metrics = {**t_metrics, "test_acc": test_accuracy(teacher, splits)}
    t = {"variant": "teacher", "fraction": 1.0, "test_acc": t_metrics.get("test_acc"),
         "cpu_s": t_metrics.get("cpu_s"), **describe(teacher),
         **int8_latency(teacher, splits, tmp / "pkg_teacher", args.latency_runs,
                         args.latency_batch)}
    rows.append(t)
    save(result(rows, t_name, args, load0), args.out, partial=True)
    info = splits.info
    for frac in args.fractions:
        tag = f"{frac:g}"
        pruned = tmp / f"pruned_{tag}.pt"
        # The recovery between pruning rounds is paid from the pruned student's epochs, so all
        # three students take the same number of optimiser steps.
        per_epoch = -(-len(splits.train) // args.batch_size)
        recover = round(args.recover_epochs * per_epoch / args.rounds) if args.recover_epochs \
            else 0
        c0 = time.process_time()
        prune_checkpoint(teacher, pruned, PruneSpec(target_macs=frac, importance=args.importance,
                                                    global_pruning=args.global_pruning,
                                                    keep=tuple(args.keep), steps=args.rounds,
                                                    recover_steps=recover,
                                                    recover_lr=args.recover_round_lr),
                         splits=splits, force=True)
        prune_cpu = round(time.process_time() - c0, 1)
        goal = describe(pruned)["macs"]
        width = width_for_macs(t_name, info, goal)
        variants = [
            ("pruned+KD", make_cfg(tmp / f"pkd_{tag}", f"pruned:{pruned}", {},
                                   args.epochs - args.recover_epochs, args, args.recovery_lr,
                                   teacher)),
            ("scratch", make_cfg(tmp / f"scr_{tag}", t_name, {"width_mult": width}, args.epochs,
                                 args, 0.003)),
            ("scratch+KD", make_cfg(tmp / f"skd_{tag}", t_name, {"width_mult": width},
                                    args.epochs, args, 0.003, teacher)),
        ]
        for label, cfg in [(lab, c) for lab, c in variants if lab in args.variants]:
            metrics, ckpt = timed_fit(cfg, splits)
            cpu = metrics["cpu_s"] + (prune_cpu if label == "pruned+KD" else 0.0)
            row = {"variant": label, "fraction": frac, "test_acc": metrics.get("test_acc"),
                   "val_acc": metrics.get("val_acc"), "cpu_s": round(cpu, 1), **describe(ckpt),
                   **int8_latency(ckpt, splits, tmp / f"pkg_{label}_{tag}", args.latency_runs,
                                  args.latency_batch)}
            row["macs_ratio"] = round(row["macs"] / t["macs"], 4)
            row["latency_ratio"] = round(row["int8_p50_ms"] / t["int8_p50_ms"], 4)
            rows.append(row)
            console.print(row)
            save(result(rows, t_name, args, load0), args.out, partial=True)
    return result(rows, t_name, args, load0)


def result(rows: list[dict[str, Any]], t_name: str, args, load0: tuple[float, ...]
           ) -> dict[str, Any]:
    return {"rows": rows, "teacher": t_name, "args": vars(args), "cpu": cpu_flags(),
            "platform": platform.platform(), "loadavg_start": load0,
            "loadavg_end": os.getloadavg()}


def save(res: dict[str, Any], out: str, partial: bool = False) -> None:
    """Written after every row too, so an interrupted run keeps what it measured."""
    atomic_write_text(Path(out), json.dumps({**res, "partial": partial}, indent=2, default=str))


def cpu_flags() -> list[str]:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({f for f in flags if f in ("avx2", "avx512f", "avx512_vnni")})


def print_table(res: dict[str, Any]) -> None:
    tab = Table(title=f"prune + KD vs scratch (teacher {res['teacher']}; CPU {res['cpu']})")
    batch = res["args"]["latency_batch"]
    for col in ("variant", "MACs frac", "val acc", "test acc", "params", "MACs", "INT8 p50 ms",
                f"INT8 b{batch} ms/img", "latency ratio", "MACs ratio", "CPU s"):
        tab.add_column(col)
    for r in res["rows"]:
        tab.add_row(r["variant"], f"{r['fraction']:g}",
                    f"{r['val_acc']:.4f}" if r.get("val_acc") is not None else "-",
                    f"{r['test_acc']:.4f}" if r["test_acc"] is not None else "-",
                    f"{r['params']:,}", f"{r['macs']:,}", f"{r['int8_p50_ms']:.4f}",
                    str(r.get(f"int8_b{batch}_ms_per_image", "-")),
                    str(r.get("latency_ratio", 1.0)), str(r.get("macs_ratio", 1.0)),
                    str(r["cpu_s"]))
    console.print(tab)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="600 images, cnn_s teacher, batch 32, 1 epoch, the 25%% fraction only")
    p.add_argument("--teacher-checkpoint", help="a trained teacher (else one is trained)")
    p.add_argument("--teacher", default="cnn_l")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=10, help="epochs of every student")
    p.add_argument("--fractions", type=float, nargs="*", default=[0.25, 0.10, 0.05])
    p.add_argument("--importance", default="l2")
    p.add_argument("--global-pruning", action="store_true")
    p.add_argument("--keep", nargs="*", default=list(PruneSpec().keep),
                   help="modules left unpruned (edgekt prune --keep)")
    p.add_argument("--rounds", type=int, default=PruneSpec().steps,
                   help="pruning rounds (edgekt prune --steps)")
    p.add_argument("--recover-epochs", type=int, default=0,
                   help="epochs of the pruned student's budget spent on KD recovery between "
                        "the pruning rounds (edgekt prune --recover-steps), split evenly")
    p.add_argument("--recover-round-lr", type=float, default=PruneSpec().recover_lr,
                   help="learning rate of that recovery (edgekt prune --recover-lr)")
    p.add_argument("--variants", nargs="*", default=["pruned+KD", "scratch", "scratch+KD"],
                   help="which students to train per fraction")
    p.add_argument("--recovery-lr", type=float, default=0.005,
                   help="learning rate of the pruned student's distillation")
    p.add_argument("--limit", type=int, default=None, help="training images (default: all)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="validation images, a fraction of the training split (evaluated per epoch)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency-runs", type=int, default=500)
    p.add_argument("--latency-batch", type=int, default=64,
                   help="also time INT8 at this batch, per image (amortises the per-call cost)")
    p.add_argument("--retime", nargs="*", metavar="WORK",
                   help="only export and time again the students under these --work dirs (and "
                        "--teacher-checkpoint), in one process")
    p.add_argument("--work", help="keep runs here instead of a temp dir")
    p.add_argument("--out", default="bench_prune.json")
    args = p.parse_args()
    if args.quick:
        args.limit, args.teacher, args.teacher_epochs = 600, "cnn_s", 1
        args.epochs, args.fractions, args.latency_runs = 1, [0.25], 100
        args.batch_size = 32  # 1 epoch of 600 images: enough steps to leave chance level
    if not 0 <= args.recover_epochs < args.epochs:
        p.error(f"--recover-epochs must be 0 or more and below --epochs ({args.epochs})")
    torch.set_num_threads(args.threads)
    if args.retime:
        splits = build_splits(load_config(None, data_sets(args)).data)
        ckpts = [*([Path(args.teacher_checkpoint)] if args.teacher_checkpoint else []),
                 *sorted(c for w in args.retime for c in Path(w).glob("*/last.pt"))]
        rows = retime(ckpts, splits, Path(tempfile.mkdtemp(prefix="bench_prune_retime_")),
                      args.latency_runs, args.latency_batch)
        save({"retime": rows, "cpu": cpu_flags(), "loadavg": os.getloadavg()}, args.out)
        return
    res = run(args)
    print_table(res)
    save(res, args.out)
    console.print(f"wrote {args.out}" + (" (quick mode: smoke numbers, not results)"
                                         if args.quick else ""))


if __name__ == "__main__":
    main()
