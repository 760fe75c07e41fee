"""``edgekt train``, ``eval``, ``info``, ``models``, ``datasets``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgekt.cli.options import (
    CheckpointEveryOpt,
    DataDirOpt,
    DeviceOpt,
    ForceOpt,
    LimitOpt,
    OptionalConfigArg,
    ResumeOpt,
    RunDirOpt,
    SetOpt,
    cli_overrides,
    make_console,
)

console = make_console()


def train(
    config: OptionalConfigArg = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    device: DeviceOpt = None,
    run_dir: RunDirOpt = None,
    checkpoint_every: CheckpointEveryOpt = 0,
) -> None:
    """Train or fine-tune a model (any method) from a YAML config."""
    from edgekt.config import load_config

    cfg = load_config(config, cli_overrides(set_, data_dir=data_dir, limit=limit, device=device,
                                            run_dir=run_dir))
    from edgekt.engine import fit  # torch is imported only once the config is known to be valid

    result = fit(cfg, resume=resume, force=force, checkpoint_every=checkpoint_every)
    if "test_acc" in result.metrics:
        console.print(f"[green]done[/]: test accuracy {result.metrics['test_acc']:.4f}, "
                      f"checkpoints in {result.run_dir}")


def evaluate_checkpoint(
    checkpoint: Annotated[Path, typer.Argument(help="An edgekt checkpoint (.pt).")],
    split: Annotated[str, typer.Option(help="test or val.")] = "test",
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Evaluate a checkpoint on its dataset's test (or validation) split."""
    from edgekt.evaluation import evaluate_checkpoint_file

    res = evaluate_checkpoint_file(checkpoint, split=split, data_dir=data_dir,
                                   device=device or "auto")
    if as_json:
        print(json.dumps(res))
    else:
        console.print(f"{checkpoint}: {split} accuracy {res['acc']:.4f}, loss {res['loss']:.4f} "
                      f"({res['n']} samples)")


def info(checkpoint: Annotated[Path, typer.Argument(help="An edgekt checkpoint (.pt).")],
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Parameters, FLOPs, size, metrics and config of a checkpoint."""
    from edgekt.evaluation import checkpoint_info

    data = checkpoint_info(checkpoint)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    t = Table(title=str(checkpoint), show_header=False)
    for key in ("model", "method", "dataset", "params", "flops", "file_mb", "epoch", "step"):
        t.add_row(key, str(data[key]))
    if data.get("pruning"):
        r = data["pruning"]
        t.add_row("pruned", f"MACs {r['macs_before']:,} -> {r['macs_after']:,}, params "
                            f"{r['params_before']:,} -> {r['params_after']:,} ({r['importance']})")
    for key, value in data["metrics"].items():
        t.add_row(f"metrics.{key}", f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(t)


def list_models() -> None:
    """List registered model names."""
    from edgekt.models import MODELS

    console.print("\n".join([*MODELS.names(), "timm:NAME (any timm model, local weights only)",
                             "pruned:CHECKPOINT (the output of edgekt prune)"]))


def list_datasets() -> None:
    """List registered dataset names (plus imagefolder:PATH for your own images)."""
    from edgekt.data import DATASETS

    console.print("\n".join([*DATASETS.names(), "imagefolder:PATH"]))
