"""GPU training check: AMP (bf16, fp16 + GradScaler), channels_last, AMP distillation and NCCL
DDP under torchrun, on real Fashion-MNIST, against FP32 on the same GPU in the same run.

    python scripts/gpu_check.py --out gpu_check.json            # needs a CUDA GPU
    python scripts/gpu_check.py --device cpu --limit 2000       # the same code paths on a CPU

Each row trains cnn_s with the same seed and epochs; the table shows images/s, test accuracy and
the speed ratio against FP32 without channels_last. The DDP row runs ``torchrun`` with one
process per GPU (NCCL on CUDA, gloo on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from edgekt.config import load_config
from edgekt.engine import fit


def config(run: Path, args: argparse.Namespace, *extra: str):
    return load_config(None, [f"run.dir={run}", "model.name=cnn_s", f"train.epochs={args.epochs}",
                              "train.progress=false", f"train.device={args.device}",
                              "optim.lr=0.003", "data.batch_size=256", "data.augment=true",
                              *([f"data.limit={args.limit}"] if args.limit else []), *extra])


def row(name: str, metrics: dict[str, Any], wall: float) -> dict[str, Any]:
    return {"run": name, "images_per_s": metrics["images_per_s"],
            "test_acc": metrics["test_acc"], "train_loss": metrics["train_loss"],
            "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--teacher", default=None, help="teacher checkpoint for the AMP KD row")
    p.add_argument("--work", default="runs/gpu_check")
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    if args.ddp_worker:  # one torchrun rank
        fit(config(work / "ddp", args, "train.amp=auto"), force=True)
        return
    rows = []
    variants = {"fp32": ["train.amp='off'", "train.channels_last=false"],
                "fp32 + channels_last": ["train.amp='off'", "train.channels_last=true"],
                "bf16 + channels_last": ["train.amp=bf16", "train.channels_last=true"],
                "fp16 + GradScaler + channels_last": ["train.amp=fp16",
                                                      "train.channels_last=true"]}
    if args.device == "cpu":  # fp16 autocast with a GradScaler is a CUDA path
        variants.pop("fp16 + GradScaler + channels_last")
    for name, sets in variants.items():
        t0 = time.perf_counter()
        res = fit(config(work / name.replace(" ", "_"), args, *sets), force=True)
        rows.append(row(name, res.metrics, time.perf_counter() - t0))
        print(rows[-1], flush=True)
    if args.teacher:
        t0 = time.perf_counter()
        margs = (f"method_args={{teacher: {{checkpoint: {args.teacher}}}, "
                 "losses: [{name: hinton_kd, temperature: 4.0}]}")
        res = fit(config(work / "kd_bf16", args, "train.amp=bf16", "method=distill", margs),
                  force=True)
        rows.append(row("KD (cnn_l teacher) bf16", res.metrics, time.perf_counter() - t0))
        print(rows[-1], flush=True)
    t0 = time.perf_counter()
    n = max(1, torch.cuda.device_count()) if args.device.startswith("cuda") else 2
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
           __file__, "--ddp-worker", "--device", args.device, "--epochs", str(args.epochs),
           "--work", str(work), *(["--limit", str(args.limit)] if args.limit else [])]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    ddp = {"run": f"DDP torchrun x{n} ({'nccl' if args.device.startswith('cuda') else 'gloo'})",
           "returncode": done.returncode, "wall_s": time.perf_counter() - t0}
    summary = work / "ddp" / "summary.json"
    if done.returncode == 0 and summary.is_file():
        m = json.loads(summary.read_text())
        ddp.update(images_per_s=m["images_per_s"], test_acc=m["test_acc"],
                   train_loss=m["train_loss"])
    rows.append(ddp)
    base = rows[0]["images_per_s"]
    print(f"\n{'run':38} {'img/s':>9} {'vs fp32':>8} {'test acc':>9}")
    for r in rows:
        ips = r.get("images_per_s")
        print(f"{r['run']:38} {ips or 0:9.0f} {(ips or 0) / base:8.2f} "
              f"{r.get('test_acc', float('nan')):9.4f}")
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "cpu_count": os.cpu_count()}
    Path(args.out).write_text(json.dumps({"env": env, "settings": vars(args), "rows": rows},
                                         indent=2))
    print(f"written {args.out}: {env}")
    if any(r.get("returncode", 0) != 0 for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
