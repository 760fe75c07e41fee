"""Avalanche's Naive, Replay and Cumulative strategies on the stream edgekt's simulator uses.

Run by :mod:`edgekt.continual.peer` inside the venv that holds avalanche-lib (never imported
by edgekt itself)::

    python -m edgekt.continual.avalanche_peer STREAM.npz OUT.json --model mlp --seeds 0,1,2

``STREAM.npz`` holds the raw uint8 images and labels (``x_train``, ``y_train``, ``x_test``,
``y_test``) and the class order (``class_order``: consecutive pairs are the experiences),
exactly as the simulator splits them. Each strategy trains a fresh model with Avalanche's
training loop (SGD with momentum, ``train_mb_size`` 32, ``train_epochs`` per experience); the
accuracy matrix is measured here after each experience on every experience's test images, so
the metrics are the simulator's (:func:`edgekt.continual.metrics.summarise`).

Models: ``mlp`` is Avalanche's ``SimpleMLP`` (784-512-10, dropout 0.5) on raw pixels,
``cnn_s`` is edgekt's cnn_s (the backbone's architecture) trained end to end from scratch on
the stream. Replay keeps ``mem_size`` raw images (Avalanche's class-balanced-by-experience
buffer); its minibatches are ``train_mb_size`` new samples plus as many replayed ones, as
in edgekt's learner.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST, as Avalanche's SplitFMNIST normalises


def _dataset(x: np.ndarray, y: np.ndarray) -> Any:
    import torch

    class Images(torch.utils.data.Dataset):
        """Normalised float images with a ``targets`` list (what nc_benchmark splits on)."""

        def __init__(self) -> None:
            self.x = ((torch.from_numpy(x).float() / 255.0 - MEAN) / STD).unsqueeze(1)
            self.targets = [int(c) for c in y]

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, i: int) -> tuple[Any, int]:
            return self.x[i], self.targets[i]

    return Images()


def _model(name: str) -> Any:
    import torch

    if name == "mlp":
        from avalanche.models import SimpleMLP

        return SimpleMLP(num_classes=10, input_size=28 * 28)
    if name == "cnn_s":
        from edgekt.models import create_model

        net = create_model("cnn_s", num_classes=10, in_channels=1, image_size=28)

        class Logits(torch.nn.Module):  # EdgeNet.forward already returns logits; keep it plain
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net(x)

        return Logits()
    raise SystemExit(f"unknown model {name!r} (mlp or cnn_s)")


def _accuracy(model: Any, x: Any, y: np.ndarray) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred.numpy() == y).mean())


def run(stream: dict[str, np.ndarray], strategy: str, *, model_name: str, seed: int,
        epochs: int, lr: float, mem_size: int, batch: int = 32) -> dict[str, Any]:
    """Train one Avalanche strategy over the stream; the accuracy matrix and timings."""
    import torch
    from avalanche.benchmarks import nc_benchmark
    from avalanche.training import Cumulative, Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin

    torch.manual_seed(seed)
    np.random.seed(seed)
    order = [int(c) for c in stream["class_order"]]
    n_exp = len(order) // 2
    bench = nc_benchmark(_dataset(stream["x_train"], stream["y_train"]),
                         _dataset(stream["x_test"], stream["y_test"]), n_exp, task_labels=False,
                         fixed_class_order=order)
    model = _model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    common = dict(train_mb_size=batch, train_epochs=epochs, eval_mb_size=1000, device="cpu",
                  evaluator=EvaluationPlugin(loggers=[]))
    crit = torch.nn.CrossEntropyLoss()
    cls = {"naive": Naive, "replay": Replay, "cumulative": Cumulative}[strategy]
    extra = {"mem_size": mem_size} if strategy == "replay" else {}
    strat = cls(model=model, optimizer=opt, criterion=crit, **extra, **common)
    tests = []
    for k in range(n_exp):
        mask = np.isin(stream["y_test"], order[2 * k:2 * k + 2])
        xt = _dataset(stream["x_test"][mask], stream["y_test"][mask]).x
        tests.append((xt, stream["y_test"][mask]))
    matrix, t0 = [], time.perf_counter()
    for exp in bench.train_stream:
        strat.train(exp, num_workers=0)
        matrix.append([_accuracy(model, xt, yt) for xt, yt in tests])
    params = sum(p.numel() for p in model.parameters())
    return {"strategy": strategy, "matrix": matrix, "seconds": time.perf_counter() - t0,
            "params": int(params)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stream")
    ap.add_argument("out")
    ap.add_argument("--model", default="mlp", choices=("mlp", "cnn_s"))
    ap.add_argument("--strategies", default="naive,replay,cumulative")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--mem-size", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import avalanche
    import torch

    torch.set_num_threads(args.threads)
    with np.load(args.stream) as z:
        stream = {k: z[k] for k in z.files}
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for s in args.strategies.split(","):
            r = run(stream, s, model_name=args.model, seed=seed, epochs=args.epochs, lr=args.lr,
                    mem_size=args.mem_size)
            rows.append({**r, "seed": seed})
            print(f"avalanche {s} seed {seed}: {np.mean(r['matrix'][-1]):.4f} "
                  f"({r['seconds']:.0f} s)", flush=True)
    info = {"avalanche": avalanche.__version__, "torch": torch.__version__,
            "model": args.model, "epochs": args.epochs, "lr": args.lr, "batch": 32,
            "mem_size": args.mem_size, "optimizer": "SGD momentum 0.9", "rows": rows}
    with open(args.out, "w") as f:  # the parent reads it once the process has exited
        json.dump(info, f)


if __name__ == "__main__":
    main()
