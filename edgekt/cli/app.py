"""The ``edgekt`` command. Heavy imports (torch, onnx, openvino) happen inside commands."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from edgekt.cli import continual, distill, export, fewshot, pipeline, profile, train
from edgekt.cli.serve import serve
from edgekt.errors import EdgektError

app = typer.Typer(
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
        # Escaped: messages quote user text and extras such as 'edgekt[serve]', not markup.
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
