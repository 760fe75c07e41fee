"""Continual on-device learning on Split-Fashion-MNIST beside Avalanche, a drift stream, kills.

Run:  python scripts/bench_continual.py [--quick] [--avalanche] --out bench_continual.json

Protocol. The stream is Fashion-MNIST's 60,000 training images in 5 experiences of 2 classes
(class order 0-9: T-shirt+Trouser, Pullover+Dress, ...), each seen once, in batches of 32; after
each experience every strategy is tested on the 10,000 test images, per experience. The
frozen backbone is a cnn_s trained on mnist-5k only (handwritten digits): it never saw a
Fashion-MNIST image or label, so nothing of the stream leaks into it. It is exported twice to
ONNX and run by the device runtime (onnxruntime): after stage 3 pooled to a 3x3 grid (576
values, the linear head's embedding) and after stage 2 pooled to a 5x5 grid (800 values, the
latent layer of latent replay, whose numpy MLP block learns above it). Every edgekt row is the
same device learner (``edgekt.devices.continual``) with another configuration.

Avalanche (``--avalanche``: installs avalanche-lib into its own venv under ~/.cache/edgekt,
see ``edgekt.continual.peer``) runs Naive, Replay and Cumulative on the same images, split,
class order and seeds, with its SimpleMLP on raw pixels (``--avalanche-model cnn_s``: edgekt's
cnn_s trained end to end). Replay's memory is the same byte budget spent on raw uint8 28x28
images: 1,000,000 // 784 = 1,275 images (labels not counted, in Avalanche's favour). Avalanche
runs on one thread with passive OpenMP waits (two spinning threads were 5-10x slower on the
shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_BYTES = 28 * 28


def summarise(rows: list[dict]) -> dict:
    """Mean and spread over seeds of one strategy's rows."""
    acc = [r["final_avg_acc"] for r in rows]
    return {"final_avg_acc": float(np.mean(acc)), "final_avg_acc_std": float(np.std(acc)),
            "forgetting": float(np.mean([r["forgetting"] for r in rows])),
            "per_seed": acc, "seeds": [r["seed"] for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="300 training / 100 test images per class, one seed, 20 kill trials")
    ap.add_argument("--out", type=Path, default=Path("bench_continual.json"))
    ap.add_argument("--work", type=Path, default=Path("runs/bench_continual"))
    ap.add_argument("--buffer-bytes", type=int, default=1_000_000)
    ap.add_argument("--lr", type=float, default=2.0, help="linear head's learning rate")
    ap.add_argument("--mlp-lr", type=float, default=0.1, help="latent replay block's rate")
    ap.add_argument("--hidden", type=int, default=128,
                    help="hidden units of the latent replay block")
    ap.add_argument("--holdout-fraction", type=float, default=0.1,
                    help="latent replay: share of the buffer kept to judge updates (the guard)")
    ap.add_argument("--seeds", default=None, help="comma-separated [default: 0,1,2; quick: 0]")
    ap.add_argument("--kill-trials", type=int, default=None)
    ap.add_argument("--backbone-epochs", type=int, default=5)
    ap.add_argument("--no-drift", action="store_true", help="skip the drift scenario")
    ap.add_argument("--avalanche", action="store_true",
                    help="install avalanche-lib into its own venv if needed and run it")
    ap.add_argument("--avalanche-model", default="mlp", choices=("mlp", "cnn_s"))
    ap.add_argument("--avalanche-epochs", type=int, default=1)
    ap.add_argument("--avalanche-lr", type=float, default=0.01)
    ap.add_argument("--avalanche-threads", type=int, default=1)
    ap.add_argument("--cumulative-seeds", default=None,
                    help="seeds of Avalanche's Cumulative, its slowest strategy (3x the data "
                         "through Avalanche's per-sample loader) [default: --seeds]")
    args = ap.parse_args()

    import torch
    from rich.console import Console

    from edgekt.cli.continual import print_report
    from edgekt.continual.crash import kill_trials
    from edgekt.continual.simulate import pretrain_backbone, simulate
    from edgekt.devices.continual import LearnerConfig
    from edgekt.io import atomic_write_text

    torch.set_num_threads(2)
    console = Console(width=160)
    per_class = (300, 100) if args.quick else (None, None)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    n_kill = args.kill_trials or (20 if args.quick else 120)
    t0 = time.perf_counter()
    epochs = 2 if args.quick else args.backbone_epochs
    linear_bb = pretrain_backbone("mnist-5k", args.work, model="cnn_s", epochs=epochs)
    latent_bb = pretrain_backbone("mnist-5k", args.work, model="cnn_s", epochs=epochs, grid=5,
                                  stage=2)
    linear = LearnerConfig(buffer_bytes=args.buffer_bytes, int8=True, lr=args.lr)
    mlp = LearnerConfig(head="mlp", hidden=args.hidden, buffer_bytes=args.buffer_bytes,
                        int8=True, lr=args.mlp_lr, holdout_fraction=args.holdout_fraction)
    out: dict = {"load_avg_start": os.getloadavg(), "cpu_flags": _cpu_flags(), "seeds": seeds,
                 "backbones": {"linear": str(linear_bb), "latent": str(latent_bb)},
                 "backbone_trained_on": "mnist-5k only (no Fashion-MNIST image or label)",
                 "quick": args.quick, "latent_config": asdict(mlp)}
    sim = dict(train_per_class=per_class[0], test_per_class=per_class[1], threads=2,
               seeds=tuple(seeds))
    rows: dict[str, dict] = {}

    def add(key: str, impl: str, model: str, results: list, memory: int, seconds: float) -> None:
        ms = {k: float(np.median([r[k] for r in results])) if k in results[0] else None
              for k in ("update_ms_median", "update_cpu_ms_median")}
        rows[key] = {"implementation": impl, "model": model, "memory_bytes": memory,
                     "update_ms_p50": ms["update_ms_median"],
                     "update_cpu_ms_p50": ms["update_cpu_ms_median"], "seconds": seconds,
                     **summarise(results)}

    reports = {}
    for name, backbone, cfg, strategies in (
            ("linear", linear_bb, linear, ("naive", "replay", "ncm", "joint")),
            ("latent", latent_bb, mlp, ("naive", "replay", "joint"))):
        rep = simulate("class-incremental", backbone, config=cfg, strategies=strategies, **sim)
        print_report(rep)
        reports[name] = rep
        out[f"class-incremental/{name}"] = rep.to_dict()
        for s in strategies:
            rs = [asdict(r) for r in rep.results if r.strategy == s]
            what = {"linear": f"linear head on stage-3 3x3 grid ({rep.embedding_dim}-d)",
                    "latent": f"MLP {rep.embedding_dim}-{args.hidden}-C on stage-2 5x5 grid"
                    }[name] if s != "ncm" else f"class means ({rep.embedding_dim}-d)"
            add(f"edgekt {s} ({name})", "edgekt device", what, rs, rs[0]["memory_bytes"],
                float(sum(r["seconds"] for r in rs)))

    out["avalanche"] = avalanche_rows(args, per_class, seeds, add, console)
    out["rows"] = rows

    if not args.no_drift:
        rep = simulate("drift", linear_bb, config=linear, train_per_class=per_class[0],
                       test_per_class=per_class[1], threads=2)
        print_report(rep)
        out["drift"] = rep.to_dict()

    with tempfile.TemporaryDirectory() as tmp:
        kills = {head: kill_trials(n_kill // 2, tmp + "/" + head, seed=1, head=head)
                 for head in ("softmax", "mlp")}
    out["kill_trials"] = {h: asdict(k) for h, k in kills.items()}
    out["load_avg_end"] = os.getloadavg()
    out["seconds"] = time.perf_counter() - t0

    print_table(console, rows, f"Split-Fashion-MNIST, 5 experiences, one pass, batch 32 (+32 "
                f"replayed), {args.buffer_bytes / 1e6:g} MB memory; mean over seeds {seeds}")
    ours = rows["edgekt replay (latent)"]["final_avg_acc"]
    peer = rows.get("Avalanche replay", {}).get("final_avg_acc")
    out["targets"] = {"latent_replay": ours, "avalanche_replay": peer,
                      "above_avalanche_replay": None if peer is None else ours > peer,
                      "update_ms_p50": rows["edgekt replay (latent)"]["update_ms_p50"],
                      "update_cpu_ms_p50": rows["edgekt replay (latent)"]["update_cpu_ms_p50"],
                      "update_ms_target": 2.0,
                      "kill_violations": sum(len(k.violations) for k in kills.values()),
                      "kill_trials": sum(k.trials for k in kills.values())}
    tg = out["targets"]
    console.print(f"latent replay {ours:.4f} vs Avalanche Replay "
                  f"{'not run' if peer is None else f'{peer:.4f}'}; update p50 "
                  f"{tg['update_ms_p50']:.2f} ms wall, {tg['update_cpu_ms_p50']:.2f} ms CPU "
                  f"(target <= 2); kill trials "
                  f"{tg['kill_trials'] - tg['kill_violations']}/{tg['kill_trials']} without loss")
    console.print(f"CPU flags {out['cpu_flags']}; load average {out['load_avg_start']} -> "
                  f"{out['load_avg_end']}; {out['seconds']:.0f} s")
    atomic_write_text(args.out, json.dumps(out, indent=2))
    console.print(f"wrote {args.out}")


def avalanche_rows(args: argparse.Namespace, per_class: tuple, seeds: list[int],
                   add: Callable[..., None], console: Any) -> dict:
    """Run Avalanche's Naive, Replay and Cumulative beside edgekt (``--avalanche``), adding
    their rows with ``add``; returns what goes into the JSON under ``avalanche``.

    Any failure (the install, the run) is one line on the console and an ``error`` entry:
    the edgekt rows are printed all the same.
    """
    from edgekt.continual.peer import ensure_avalanche, run_avalanche
    from edgekt.continual.simulate import forgetting, load_stream
    from edgekt.errors import EdgektError

    mem_size = args.buffer_bytes // IMAGE_BYTES
    info: dict = {"mem_size_images": mem_size, "mem_note":
                  f"{args.buffer_bytes} bytes / 784 bytes per raw uint8 28x28 image"}
    if not args.avalanche:
        console.print("Avalanche not run: pass --avalanche to install avalanche-lib into its "
                      "own venv under ~/.cache/edgekt and run it beside edgekt", soft_wrap=True)
        return info
    try:
        py = ensure_avalanche()
        x_tr, y_tr, x_te, y_te, _ = load_stream(*per_class)
        t1 = time.perf_counter()
        stream = {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te,
                  "class_order": np.arange(10)}
        cumulative_seeds = ([int(s) for s in args.cumulative_seeds.split(",")]
                            if args.cumulative_seeds else seeds)
        av = None
        for strategies, run_seeds in ((("naive", "replay"), seeds),
                                      (("cumulative",), cumulative_seeds)):
            part = run_avalanche(py, stream, seeds=run_seeds, model=args.avalanche_model,
                                 epochs=args.avalanche_epochs, lr=args.avalanche_lr,
                                 mem_size=mem_size, strategies=strategies,
                                 threads=args.avalanche_threads, echo=console.print)
            av = part if av is None else {**av, "rows": av["rows"] + part["rows"]}
        info.update({k: v for k, v in av.items() if k != "rows"},
                    seconds=time.perf_counter() - t1, rows=av["rows"])
        model = (f"SimpleMLP 784-512-10 on raw pixels ({av['rows'][0]['params']:,} params)"
                 if args.avalanche_model == "mlp" else "cnn_s end to end")
        for s in ("naive", "replay", "cumulative"):
            rs = [{"final_avg_acc": float(np.mean(r["matrix"][-1])),
                   "forgetting": forgetting(r["matrix"]), "seed": r["seed"]}
                  for r in av["rows"] if r["strategy"] == s]
            if not rs:
                continue
            params = av["rows"][0]["params"] * 4
            memory = params + (mem_size * IMAGE_BYTES if s == "replay" else 0)
            add(f"Avalanche {s}", f"Avalanche {av['avalanche']}", model, rs, memory,
                float(sum(r["seconds"] for r in av["rows"] if r["strategy"] == s)))
    except EdgektError as exc:
        # soft_wrap: one line however long the reason (pip's last line, the log's path).
        console.print(f"[yellow]Avalanche not run: {exc}[/]", soft_wrap=True)
        info["error"] = str(exc)
    return info


def print_table(console: Any, rows: dict[str, dict], title: str) -> None:
    """The results table: one row per strategy, edgekt's and Avalanche's."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("strategy", "implementation / model", "final avg acc", "± std", "forgetting",
                "update ms p50", "CPU ms p50", "memory KB"):
        t.add_column(col, justify="left" if col.startswith(("str", "impl")) else "right")
    for key, r in rows.items():
        ms, cpu = ("" if r[k] is None else f"{r[k]:.2f}"
                   for k in ("update_ms_p50", "update_cpu_ms_p50"))
        t.add_row(key, f"{r['implementation']}: {r['model']}", f"{r['final_avg_acc']:.4f}",
                  f"{r['final_avg_acc_std']:.4f}", f"{r['forgetting']:.3f}", ms, cpu,
                  f"{r['memory_bytes'] / 1024:.0f}")
    console.print(t)


def _cpu_flags() -> list[str]:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({f for f in flags if f in ("avx2", "avx512f", "avx512_vnni")})


if __name__ == "__main__":
    main()
