"""``edgekt export``: checkpoint -> parity-checked ONNX / OpenVINO / LiteRT edge package.

Every knob is a field of ``ExportConfig`` (``edgekt.exporters.config``): a flag left out keeps
the value of ``--config`` (a YAML file of those fields, the same as a pipeline's ``export:``
section), then the field's default. Defaults live in that one class.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from edgekt.cli.options import DataDirOpt, field_option, make_console
from edgekt.exporters.config import ExportConfig

console = make_console()


_opt = partial(field_option, ExportConfig)


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip().lower() for v in value.split(",") if v.strip()]


def export(
    checkpoint: Annotated[Path, typer.Argument(help="An edgekt checkpoint (.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Package directory to create.")],
    config: Annotated[Path | None, typer.Option(
        help="YAML file of export options (the fields below, e.g. a pipeline's export: "
             "section); flags override it.")] = None,
    to: Annotated[str | None, _opt("targets", "--to")] = None,
    precision: Annotated[str | None, _opt("precisions", "--precision")] = None,
    part: Annotated[str | None, _opt("part")] = None,
    calib_samples: Annotated[int | None, _opt("calib_samples")] = None,
    calib_method: Annotated[str | None, _opt("calib_method")] = None,
    max_drop: Annotated[float | None, _opt("max_drop")] = None,
    max_float_fraction: Annotated[float | None, _opt("max_float_fraction")] = None,
    min_agreement: Annotated[float | None, _opt("min_agreement")] = None,
    min_agreement_int8: Annotated[float | None, _opt("min_agreement_int8")] = None,
    allow_mismatch: Annotated[bool | None, _opt("allow_mismatch",
                                                "--allow-mismatch/--no-allow-mismatch")] = None,
    dynamic_batch: Annotated[bool | None, _opt("dynamic_batch",
                                               "--dynamic-batch/--no-dynamic-batch")] = None,
    opset: Annotated[int | None, _opt("opset")] = None,
    val_samples: Annotated[int | None, _opt("val_samples")] = None,
    test_samples: Annotated[int | None, _opt("test_samples")] = None,
    threads: Annotated[int | None, _opt("threads")] = None,
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Export a checkpoint to ONNX / OpenVINO / LiteRT (FP32, FP16, INT8) with a parity gate."""
    from edgekt.exporters.config import export_config
    from edgekt.exporters.package import export_package
    from edgekt.exporters.parity import ParityError, parity_table

    given: dict[str, Any] = {
        "targets": _csv(to), "precisions": _csv(precision), "part": part,
        "calib_samples": calib_samples,
        "calib_method": calib_method.lower() if calib_method else None, "max_drop": max_drop,
        "max_float_fraction": max_float_fraction,
        "min_agreement": min_agreement, "min_agreement_int8": min_agreement_int8,
        "allow_mismatch": allow_mismatch, "dynamic_batch": dynamic_batch, "opset": opset,
        "val_samples": val_samples, "test_samples": test_samples, "threads": threads}
    opts = export_config(config, **{k: v for k, v in given.items() if v is not None})
    try:
        manifest = export_package(checkpoint, out, opts, force=force, data_dir=data_dir,
                                  log=lambda msg: console.print(msg, highlight=False))
    except ParityError as exc:
        console.print(parity_table(exc.artifacts, exc.reference))
        raise
    console.print(parity_table(manifest.artifacts, manifest.reference))
    state = "[green]passed[/]" if manifest.gate["passed"] else "[yellow]FAILED (allowed)[/]"
    console.print(f"parity gate {state}; package written to {out} "
                  f"({len(manifest.artifacts)} artifacts, manifest.json)")
