"""``edgekt pipeline``: data -> teacher -> students -> export -> profile -> report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgekt.cli.options import SetOpt, make_console

console = make_console()


def pipeline(
    config: Annotated[Path | None, typer.Argument(help="Pipeline YAML (default: --preset).",
                                                  show_default=False)] = None,
    preset: Annotated[str | None, typer.Option(help="quick (minutes on a CPU) or full (GPU).")
                      ] = None,
    set_: SetOpt = None,
    from_stage: Annotated[str | None, typer.Option(
        "--from", help="Redo this stage and the later ones: teacher, students, export, "
                       "profile, report.")] = None,
    run_dir: Annotated[str | None, typer.Option("--run-dir", help="Run directory.")] = None,
) -> None:
    """Run the whole pipeline; finished stages are skipped, an interrupted one resumes."""
    from edgekt.io import check_writable
    from edgekt.pipeline import load_pipeline_config, run_pipeline

    overrides = list(set_ or []) + ([f"run_dir={run_dir}"] if run_dir else [])
    cfg = load_pipeline_config(config, preset, overrides)
    check_writable(cfg.run_dir, "run_dir", directory=True)
    report = run_pipeline(cfg, redo_from=from_stage, log=console.print)
    t = Table(title=f"edgekt pipeline: {cfg.run_dir}")
    for col in ("model", "runtime", "precision", "device", "MACs", "test acc", "p50 ms",
                "speed-up", "Pareto"):
        t.add_column(col)
    for r in sorted(report["rows"], key=lambda r: (r["device"], r["p50_ms"] or 1e9)):
        t.add_row(r["name"], r["runtime"], str(r["precision"]), r["device"],
                  "-" if r.get("macs") is None else f"{r['macs']:,}",
                  "-" if r["test_acc"] is None else f"{r['test_acc']:.4f}",
                  "-" if r["p50_ms"] is None else f"{r['p50_ms']:.3f}",
                  "-" if not r.get("speedup_vs_teacher_eager")
                  else f"{r['speedup_vs_teacher_eager']:.1f}x",
                  "yes" if r.get("pareto") else "")
    console.print(t)
    console.print(f"report: {Path(cfg.run_dir) / 'report.md'}, plots: "
                  f"{Path(cfg.run_dir) / 'pareto.png'}, {Path(cfg.run_dir) / 'latency_cdf.png'}")
