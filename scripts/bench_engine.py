"""Train-step throughput of edgekt's fit() loop vs a minimal hand-written PyTorch loop.

Same model, batch, optimiser, schedule and real Fashion-MNIST data, alternating rounds in one
process; reports the median images/s of each and their ratio (target >= 0.97).

    python scripts/bench_engine.py [--model cnn_s] [--batches 60] [--rounds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from edgekt.config import load_config
from edgekt.data import build_splits, make_loader
from edgekt.engine.fit import Trainer
from edgekt.engine.optim import build_optimizer, build_scheduler, param_groups
from edgekt.models import create_model


def hand_loop(cfg, splits, n_batches: int) -> float:
    """The loop a user would write: forward, cross-entropy, backward, step, schedule."""
    info = splits.info
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, num_classes=info.num_classes,
                         in_channels=info.in_channels, image_size=info.image_size)
    opt = build_optimizer(param_groups(model, cfg.optim, []), cfg.optim)
    sched = build_scheduler(opt, cfg.sched, n_batches, 1)
    loader = make_loader(splits.train, info, cfg.data, train=True, seed=cfg.train.seed)
    model.train()
    t0 = time.perf_counter()
    seen = 0
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        seen += len(y)
    return seen / (time.perf_counter() - t0)


def engine_loop(cfg, splits, run_dir: str) -> float:
    t = Trainer(cfg.model_copy(update={"run": cfg.run.model_copy(update={"dir": run_dir})}),
                force=True, splits=splits)
    rows = t.run()
    return rows.metrics["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn_s")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_engine.json")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 15 batches")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.batches = 2, 15
    torch.set_num_threads(args.threads)
    n = args.batches * args.batch_size
    cfg = load_config(None, [f"model.name={args.model}", f"data.batch_size={args.batch_size}",
                             f"data.limit={n}", "data.val_fraction=0.01", "train.epochs=1",
                             "train.progress=false", f"train.threads={args.threads}"])
    splits = build_splits(cfg.data)
    splits.test = splits.test.subset(torch.arange(256))  # the final test pass is not timed
    hand, engine = [], []
    for r in range(args.rounds):
        hand.append(hand_loop(cfg, splits, args.batches))
        engine.append(engine_loop(cfg, splits, f"/tmp/edgekt_bench_engine/{r}"))
    res = {
        "model": args.model, "batch_size": args.batch_size, "batches": args.batches,
        "rounds": args.rounds, "threads": args.threads, "data": "fashion-mnist (real)",
        "hand_images_per_s": hand, "engine_images_per_s": engine,
        "hand_median": statistics.median(hand), "engine_median": statistics.median(engine),
        "ratio": statistics.median(engine) / statistics.median(hand),
        "loadavg": os.getloadavg(),
    }
    t = Table(title=f"fit() vs hand-written loop: {args.model}, batch {args.batch_size}, "
                    f"{args.batches} batches x {args.rounds} rounds")
    for col in ("loop", "median img/s", "rounds (img/s)"):
        t.add_column(col)
    t.add_row("hand-written", f"{res['hand_median']:.0f}", " ".join(f"{v:.0f}" for v in hand))
    t.add_row("edgekt fit()", f"{res['engine_median']:.0f}", " ".join(f"{v:.0f}" for v in engine))
    t.add_row("ratio", f"{res['ratio']:.3f}", f"load avg {res['loadavg'][0]:.2f}")
    Console().print(t)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
