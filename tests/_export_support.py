"""Helpers shared by the exporter tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

from edgekt.checkpoint import load_checkpoint, save_checkpoint


def outlier_checkpoint(src: Path, dst: Path, scale: float = 1000.0) -> Path:
    """The same function as ``src`` in float, but hostile to per-tensor INT8 activations.

    Channel 0 of stage 1's output is scaled up by ``scale`` (BN gamma/beta) and the next conv's
    weights for that channel are scaled down by the same factor (ReLU and max-pool commute with
    positive scaling), so float outputs are unchanged while INT8 loses the other channels.
    """
    ckpt = load_checkpoint(src)
    sd = ckpt["model"]["state_dict"]
    sd["stage1.1.1.weight"][0] *= scale
    sd["stage1.1.1.bias"][0] *= scale
    sd["stage2.1.0.weight"][:, 0] /= scale
    save_checkpoint(dst, ckpt)
    return dst
