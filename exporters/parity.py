"""The parity gate: every artifact against the PyTorch model on real validation and test images."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.table import Table

from edgekt.errors import EdgektError
from edgekt.exporters.base import Runner
from edgekt.exporters.calib import EvalData


class ParityError(EdgektError):
    """Raised when an artifact's top-1 agreement with PyTorch is below its threshold."""

    def __init__(self, message: str, artifacts: list[dict[str, Any]],
                 reference: dict[str, Any]) -> None:
        super().__init__(message)
        self.artifacts, self.reference = artifacts, reference


def measure(run: Runner, data: EvalData) -> dict[str, Any]:
    """Output differences, top-1 agreement and accuracy of one artifact vs the PyTorch model.

    Differences are taken on the raw outputs (logits, or embeddings for ``--part embedding``);
    agreement and accuracy on logits (embeddings go through the exported head first).
    """
    val, test = run(data.val_x), run(data.test_x)
    diff = np.abs(val.astype(np.float64) - data.ref_val)
    ref_top1 = data.logits(data.ref_val).argmax(1)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "agreement": float((data.logits(val).argmax(1) == ref_top1).mean()),
        "test_agreement": float((data.logits(test).argmax(1) ==
                                 data.logits(data.ref_test).argmax(1)).mean()),
        "val_acc": data.accuracy(val, data.val_y),
        "test_acc": data.accuracy(test, data.test_y),
        "n_val": len(val),
        "n_test": len(test),
    }


def reference(data: EvalData) -> dict[str, Any]:
    """The PyTorch model's own numbers on the same samples."""
    return {"val_acc": data.accuracy(data.ref_val, data.val_y),
            "test_acc": data.accuracy(data.ref_test, data.test_y),
            "n_val": len(data.val_y), "n_test": len(data.test_y)}


def apply_gate(parity: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Add the threshold and verdict to a parity record."""
    return {**parity, "min_agreement": threshold, "passed": parity["agreement"] >= threshold}


def parity_table(artifacts: list[dict[str, Any]], ref: dict[str, Any]) -> Table:
    """Rich table: one row per artifact plus the PyTorch reference."""
    t = Table(title="parity vs PyTorch", caption="diff and agreement on validation images, "
              "accuracy on the test split; gate: agreement >= threshold")
    for col in ("file", "runtime", "prec", "max|d|", "mean|d|", "agree", "test acc", "gate"):
        t.add_column(col, justify="left" if col in ("file", "runtime") else "right")
    t.add_row("(pytorch)", "torch", "fp32", "-", "-", "-", f"{ref['test_acc']:.4f}", "")
    for a in artifacts:
        p = a["parity"]
        verdict = "[green]ok[/]" if p["passed"] else f"[red]FAIL[/] <{p['min_agreement']:g}"
        t.add_row(a["file"], a["runtime"], a["precision"], f"{p['max_abs_diff']:.1e}",
                  f"{p['mean_abs_diff']:.1e}", f"{p['agreement']:.4f}", f"{p['test_acc']:.4f}",
                  verdict)
    return t
