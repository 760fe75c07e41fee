"""``edgekt distill``: train a compact student against a frozen teacher."""

from __future__ import annotations

from rich.table import Table

from edgekt.cli.options import (
    CheckpointEveryOpt,
    ConfigArg,
    DataDirOpt,
    DeviceOpt,
    ForceOpt,
    LimitOpt,
    ResumeOpt,
    RunDirOpt,
    SetOpt,
    cli_overrides,
    make_console,
)

console = make_console()


def distill(
    config: ConfigArg,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    device: DeviceOpt = None,
    run_dir: RunDirOpt = None,
    checkpoint_every: CheckpointEveryOpt = 0,
) -> None:
    """Distil a teacher into a student (``method: distill``; see configs/distill_*.yaml).

    The saved last.pt/best.pt hold the student alone (no teacher weights), ready for export.
    """
    from edgekt.config import load_config
    from edgekt.errors import EdgektError

    cfg = load_config(config, cli_overrides(set_, data_dir=data_dir, limit=limit, device=device,
                                            run_dir=run_dir))
    if cfg.method not in ("supervised", "distill"):  # "supervised" is the default when unset
        raise EdgektError(f"{config}: method is {cfg.method!r}; edgekt distill runs method: "
                          f"distill (use edgekt train for other methods)")
    cfg.method = "distill"
    from edgekt.engine import fit  # torch is imported only once the config is known to be valid

    result = fit(cfg, resume=resume, force=force, checkpoint_every=checkpoint_every)
    m = result.metrics
    if "test_acc" not in m:
        return
    from edgekt.checkpoint import load_checkpoint

    teacher = load_checkpoint(result.run_dir / "last.pt")["method"]["teacher"]
    t = Table(title="distillation", show_header=True)
    for col in ("model", "params", "test acc"):
        t.add_column(col)
    t_acc = teacher["metrics"].get("test_acc")
    t.add_row(f"teacher {teacher['model']}", f"{teacher['params']:,}",
              f"{t_acc:.4f}" if t_acc is not None else "?")
    t.add_row(f"student {cfg.model.name}", f"{m['params']:,}", f"{m['test_acc']:.4f}")
    console.print(t)
    console.print(f"[green]done[/]: student is {m['params'] / teacher['params']:.1%} of the "
                  f"teacher's parameters; checkpoints in {result.run_dir}")
