"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file.", show_default=False)]
OptionalConfigArg = Annotated[
    Path | None, typer.Argument(help="YAML config file (default: built-in defaults).",
                                show_default=False)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set optim.lr=0.01 (repeat)."),
]
ResumeOpt = Annotated[bool, typer.Option(help="Continue the run in run.dir from last.pt.")]
ForceOpt = Annotated[bool, typer.Option(help="Start over even if run.dir holds a run.")]
DataDirOpt = Annotated[
    str | None, typer.Option(help="Directory with the dataset files (default: $EDGEKT_DATA).")
]
LimitOpt = Annotated[int | None, typer.Option(help="Use at most N training samples.")]
DeviceOpt = Annotated[str | None, typer.Option(help="Torch device: auto, cpu, cuda, cuda:1, mps.")]
RunDirOpt = Annotated[str | None, typer.Option("--run-dir", help="Run directory (run.dir).")]
CheckpointEveryOpt = Annotated[
    int, typer.Option(help="Also checkpoint every N optimiser steps (0: per epoch).")
]


def field_option(model: type[BaseModel], field: str, *decls: str) -> Any:
    """A ``typer.Option`` whose help and default come from a field of an options model (the
    field's docstring; a list default is shown comma-separated). The flag itself defaults to
    None, so an option left out keeps the value of the config it overrides."""
    info = model.model_fields[field]
    default = info.get_default(call_default_factory=True)
    if isinstance(default, list):
        default = ",".join(default)
    return typer.Option(*decls, help=f"{info.description} \\[default: {default}]",
                        show_default=False)


def cli_overrides(
    sets: list[str] | None, *, data_dir: str | None = None, limit: int | None = None,
    device: str | None = None, run_dir: str | None = None,
) -> list[str]:
    """Turn shortcut options into ``--set`` overrides (explicit --set wins: it comes last)."""
    out = []
    for key, value in (("data.data_dir", data_dir), ("data.limit", limit),
                       ("train.device", device), ("run.dir", run_dir)):
        if value is not None:
            out.append(f"{key}={value}")
    return out + list(sets or [])


def make_console(*, stderr: bool = False) -> Console:
    """A rich console that does not squeeze tables into 80 columns when piped or logged."""
    con = Console(stderr=stderr)
    # Rich falls back to 80 columns off a terminal; a log file or a pipe has no width limit.
    return con if con.is_terminal else Console(stderr=stderr, width=PIPE_WIDTH)


PIPE_WIDTH = 400
