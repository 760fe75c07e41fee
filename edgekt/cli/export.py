"""``edgekt export``: checkpoint -> parity-checked ONNX / OpenVINO / LiteRT edge package."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgekt.cli.options import DataDirOpt, make_console

console = make_console()


def _csv(value: str) -> list[str]:
    return [v.strip().lower() for v in value.split(",") if v.strip()]


def export(
    checkpoint: Annotated[Path, typer.Argument(help="An edgekt checkpoint (.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Package directory to create.")],
    to: Annotated[str, typer.Option("--to", help="Targets, comma-separated: onnx,openvino,"
                                    "litert.")] = "onnx",
    precision: Annotated[str, typer.Option(
        help="Comma-separated: fp32,fp16,int8 (LiteRT: fp32,int8).")] = "fp32",
    part: Annotated[str, typer.Option(
        help="classifier, or embedding (trunk only; the head goes to head.npz).")] = "classifier",
    calib_samples: Annotated[int, typer.Option(
        help="Real training images used to calibrate INT8.")] = 300,
    calib_method: Annotated[str, typer.Option(
        help="INT8 range calibration: minmax, entropy, percentile.")] = "minmax",
    max_drop: Annotated[float | None, typer.Option(
        help="Max INT8 validation accuracy drop in points (e.g. 0.5): keeps sensitive layers "
             "in float, or fails.")] = None,
    min_agreement: Annotated[float, typer.Option(
        help="Min top-1 agreement with PyTorch for FP32/FP16 artifacts.")] = 0.99,
    min_agreement_int8: Annotated[float, typer.Option(
        help="Min top-1 agreement with PyTorch for INT8 artifacts.")] = 0.97,
    allow_mismatch: Annotated[bool, typer.Option(
        help="Write the package even if an artifact fails the parity gate.")] = False,
    dynamic_batch: Annotated[bool, typer.Option(
        help="Dynamic batch dimension (default: static batch 1, which NPUs prefer).")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    val_samples: Annotated[int, typer.Option(
        help="Validation images for parity and accuracy control (0: all).")] = 1000,
    test_samples: Annotated[int, typer.Option(
        help="Test images for the accuracy column (0: all).")] = 0,
    threads: Annotated[int | None, typer.Option(
        help="Runtime threads during calibration and parity.")] = None,
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Export a checkpoint to ONNX / OpenVINO / LiteRT (FP32, FP16, INT8) with a parity gate."""
    from edgekt.exporters.package import export_package
    from edgekt.exporters.parity import ParityError, parity_table

    try:
        manifest = export_package(
            checkpoint, out, targets=_csv(to), precisions=_csv(precision), part=part,
            force=force, data_dir=data_dir, val_samples=val_samples or None,
            test_samples=test_samples or None, min_agreement=min_agreement,
            min_agreement_int8=min_agreement_int8, allow_mismatch=allow_mismatch,
            log=lambda msg: console.print(msg, highlight=False), opset=opset,
            dynamic_batch=dynamic_batch, calib_samples=calib_samples,
            calib_method=calib_method.lower(), max_drop=max_drop, threads=threads,
        )
    except ParityError as exc:
        console.print(parity_table(exc.artifacts, exc.reference))
        raise
    console.print(parity_table(manifest.artifacts, manifest.reference))
    state = "[green]passed[/]" if manifest.gate["passed"] else "[yellow]FAILED (allowed)[/]"
    console.print(f"parity gate {state}; package written to {out} "
                  f"({len(manifest.artifacts)} artifacts, manifest.json)")
