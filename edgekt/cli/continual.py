"""``edgekt continual simulate``: replay a real stream through the on-device learner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgekt.cli.options import make_console

console = make_console()
app = typer.Typer(help="Continual on-device learning (new classes, drift) without forgetting.",
                  no_args_is_help=True)


@app.command()
def simulate(
    backbone: Annotated[Path, typer.Option(help="Exported embedding model (.onnx/.xml or an "
                                                 "export directory).")],
    scenario: Annotated[str, typer.Option(help="class-incremental or drift.")]
    = "class-incremental",
    strategies: Annotated[str, typer.Option(help="Comma-separated: naive, replay, ncm, joint.")]
    = "naive,replay,ncm,joint",
    buffer_bytes: Annotated[int, typer.Option(help="Replay buffer budget in bytes.")] = 1_000_000,
    int8: Annotated[bool, typer.Option(help="Store replayed latents as int8.")] = True,
    head: Annotated[str, typer.Option(help="softmax (linear head on the embedding) or mlp (a "
                                           "hidden layer above a latent layer: latent "
                                           "replay).")] = "softmax",
    hidden: Annotated[int, typer.Option(help="Hidden units of the mlp head.")] = 128,
    lr: Annotated[float | None, typer.Option(help="SGD learning rate of the head [default: 2.0 "
                                                  "for softmax, 0.1 for mlp].")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per observe() call.")] = 32,
    train_per_class: Annotated[int | None, typer.Option(help="Use at most N training images "
                                                             "per class.")] = None,
    test_per_class: Annotated[int | None, typer.Option(help="At most N test images per "
                                                            "class.")] = None,
    shift: Annotated[str, typer.Option(help="Drift: brightness, contrast, blur or all.")] = "all",
    data_dir: Annotated[str | None, typer.Option(help="Fashion-MNIST directory.")] = None,
    seed: int = 0,
    out: Annotated[Path | None, typer.Option(help="Write the report as JSON here.")] = None,
) -> None:
    """Accuracy matrix, final average accuracy, forgetting, update latency and memory."""
    from edgekt.continual.simulate import simulate as run
    from edgekt.devices.continual import LearnerConfig
    from edgekt.errors import EdgektError
    from edgekt.io import atomic_write_text, check_writable

    if out is not None:
        check_writable(out, "--out")
    if head not in ("softmax", "mlp"):
        raise EdgektError(f"--head {head!r}: expected softmax or mlp")
    lr = lr if lr is not None else (0.1 if head == "mlp" else 2.0)
    cfg = LearnerConfig(head=head, hidden=hidden, buffer_bytes=buffer_bytes, int8=int8, lr=lr,
                        seed=seed)
    report = run(scenario, backbone, strategies=tuple(s.strip() for s in strategies.split(",")),
                 config=cfg, batch_size=batch_size, train_per_class=train_per_class,
                 test_per_class=test_per_class, data_dir=data_dir, shift=shift, seed=seed)
    print_report(report)
    if out is not None:
        atomic_write_text(out, json.dumps(report.to_dict(), indent=2))
        console.print(f"report written to {out}")


def print_report(report) -> None:
    """Rich tables: one accuracy matrix per strategy, then the summary."""
    exps = report.experiences
    for r in report.results:
        t = Table(title=f"{report.scenario} / {r.strategy}: accuracy after each experience")
        t.add_column("trained on")
        for name in exps:
            t.add_column(name, justify="right")
        for i, row in enumerate(r.matrix):
            t.add_row(exps[i], *[f"{a:.3f}" if j <= i or report.scenario == "drift" else
                                 f"[dim]{a:.3f}[/]" for j, a in enumerate(row)])
        console.print(t)
    s = Table(title=f"{report.scenario}: summary (embedding {report.embedding_dim}-d, "
                    f"batch {report.batch_size})")
    for col in ("strategy", "final avg acc", "forgetting", "update ms p50", "update ms p95",
                "memory KB", "accepted", "rolled back", "drift events"):
        s.add_column(col, justify="right")
    for r in report.results:
        c = r.counters
        s.add_row(r.strategy, f"{r.final_avg_acc:.4f}", f"{r.forgetting:.4f}",
                  f"{r.update_ms_median:.3f}", f"{r.update_ms_p95:.3f}",
                  f"{r.memory_bytes / 1024:.0f}", str(c["updates_accepted"]),
                  str(c["updates_rolled_back"]), str(c["drift_events"]))
    console.print(s)
