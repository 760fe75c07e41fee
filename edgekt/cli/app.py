"""The ``edgekt`` command. Heavy imports (torch, onnx, openvino) happen inside commands."""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from edgekt.cli import continual, distill, export, fewshot, pipeline, profile, prune, train
from edgekt.cli.serve import serve
from edgekt.errors import EdgektError


def print_user_error(exc: EdgektError) -> None:
    """One red line (or a few) on stderr, never wrapped mid-path, no traceback."""
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False,
                               soft_wrap=True)


class EdgektGroup(TyperGroup):
    """The root command: a user error raised by any subcommand exits 2 with its message.

    Doing this in the command itself (not only in ``main``) gives in-process callers such as
    ``typer.testing.CliRunner`` the same exit status and output as the console script.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except EdgektError as exc:
            print_user_error(exc)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=EdgektGroup,
    name="edgekt",
    help="Train, distil, export, profile and run small neural networks on edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("train")(train.train)
app.command("distill")(distill.distill)
app.command("pipeline")(pipeline.pipeline)
app.command("eval")(train.evaluate_checkpoint)
app.command("export")(export.export)
app.command("prune")(prune.prune)
app.command("info")(train.info)
app.command("models")(train.list_models)
app.command("datasets")(train.list_datasets)
app.command("profile")(profile.profile)
app.add_typer(profile.devices_app, name="devices")
app.add_typer(fewshot.app, name="fewshot")
app.add_typer(continual.app, name="continual")
app.command("serve")(serve)


def main() -> None:
    """Console entry point: user errors print one clear message and exit 2."""
    try:
        app()
    except EdgektError as exc:
        print_user_error(exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
