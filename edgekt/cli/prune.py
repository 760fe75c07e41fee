"""``edgekt prune``: structured channel pruning of a checkpoint (recover it with edgekt distill)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from edgekt.cli.options import DataDirOpt

console = Console()


def prune(
    checkpoint: Annotated[Path, typer.Argument(help="An edgekt checkpoint (.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the pruned checkpoint.")],
    ratio: Annotated[float | None, typer.Option(
        help="Fraction of channels to remove from each prunable group, 0 < r < 1.")] = None,
    target_macs: Annotated[float | None, typer.Option(
        help="Prune until MACs/image fall to this (a count, or a fraction of the model if < 1).",
    )] = None,
    target_params: Annotated[float | None, typer.Option(
        help="Prune until parameters fall to this (a count, or a fraction if < 1).")] = None,
    importance: Annotated[str, typer.Option(
        help="Channel ranking: l1, l2 (weight magnitude), taylor (needs the data), bn-scale.",
    )] = "l2",
    global_: Annotated[bool, typer.Option(
        "--global/--uniform", help="Rank channels across layers, or the same ratio per layer.",
    )] = False,
    steps: Annotated[int, typer.Option(
        help="Pruning rounds (iterative pruning; with --recover-steps, prune-and-recover).",
    )] = 1,
    keep: Annotated[list[str] | None, typer.Option(
        help="Module left unpruned (repeat): stem, head, a module path, or auto (the head; the "
             "stem too unless it is full-resolution and < 25% of the model is kept). "
             "Default: auto.",
    )] = None,
    recover_steps: Annotated[int, typer.Option(
        help="KD steps from the unpruned model on its training images after every round.",
    )] = 0,
    recover_lr: Annotated[float, typer.Option(help="AdamW learning rate of the recovery.")] = 0.003,
    round_to: Annotated[int | None, typer.Option(
        help="Keep channel counts multiples of N.")] = None,
    data_dir: DataDirOpt = None,
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Prune CHECKPOINT's channels with torch-pruning; write a normal edgekt checkpoint.

    Recover the accuracy with edgekt distill: model.name: pruned:OUT as the student, CHECKPOINT
    as the teacher (see configs/distill_pruned.yaml).
    """
    from edgekt.pruning.prune import PruneSpec, prune_checkpoint

    spec = PruneSpec(ratio=ratio, target_macs=target_macs, target_params=target_params,
                     importance=importance, global_pruning=global_, steps=steps,
                     keep=tuple(keep) if keep else ("auto",), round_to=round_to,
                     recover_steps=recover_steps, recover_lr=recover_lr)
    rec = prune_checkpoint(checkpoint, out, spec, data_dir=data_dir, force=force)
    t = Table(title=f"pruned {checkpoint} -> {out}")
    for col in ("", "before", "after", "fraction"):
        t.add_column(col)
    t.add_row("MACs", f"{rec['macs_before']:,}", f"{rec['macs_after']:,}",
              f"{rec['macs_fraction']:.3f}")
    t.add_row("params", f"{rec['params_before']:,}", f"{rec['params_after']:,}",
              f"{rec['params_fraction']:.3f}")
    console.print(t)
