"""Checkpoint -> few-shot edge package: the embedding export plus a calibrated, empty classifier.

``build_package`` exports the embedding part (``edgekt.exporters.export_package``, parity-gated),
then sets the classifier up *on the exported model* as the device will run it: the metric and
embedding transform of the training method, SimpleShot's base-class mean for ``cl2n``, and the
open-set rejection calibrated on the base classes' validation images (by default the
``normalized`` rule: whitening and prior spread fitted there, per-class radii from the shots).
The result is ``OUT/fewshot_state.npz`` with no class enrolled; ``edgekt fewshot enroll``
adds classes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekt.checkpoint import load_checkpoint
from edgekt.data import build_splits
from edgekt.devices.fewshot import (
    REJECTIONS,
    OpenSetRates,
    PrototypeClassifier,
    default_state_path,
)
from edgekt.errors import EdgektError
from edgekt.fewshot.evaluate import FewShotSetup, embed_in_chunks, raw_images


def calibrate_package(checkpoint: str | Path, package: str | Path, *, shots: int = 5,
                      target_frr: float = 0.05, transform: str = "auto",
                      data_dir: str | None = None, threads: int | None = None,
                      force: bool = False, rejection: str = "normalized"
                      ) -> tuple[PrototypeClassifier, OpenSetRates]:
    """Create the package's classifier state from the checkpoint's base classes."""
    from edgekt.devices.model import EdgeModel

    check_calibration(shots, target_frr, rejection)
    setup = FewShotSetup.from_checkpoint(load_checkpoint(checkpoint), str(checkpoint), transform)
    state = default_state_path(package)
    if state.exists() and not force:
        raise EdgektError(f"{state} exists (it may hold enrolled classes); pass --force to "
                          f"start a new, empty classifier over it")
    for p in (state, state.with_name(state.name + ".prev")):
        p.unlink(missing_ok=True)
    model = EdgeModel.load(package, threads=threads, part="embedding")
    splits = build_splits(setup.base_data(data_dir))
    center = None
    if setup.transform == "cl2n":
        center = embed_in_chunks(model, raw_images(splits.train)[:10_000]).mean(0)
    clf = PrototypeClassifier(model, state, metric=setup.metric, transform=setup.transform,
                              center=center, scale=setup.scale)
    calib = splits.val if len(splits.val) else splits.test
    rates = clf.calibrate_threshold(raw_images(calib), calib.targets.numpy(), shots=shots,
                                    target_frr=target_frr, trials=50,
                                    rejection=rejection)  # type: ignore[arg-type]
    return clf, rates


def check_calibration(shots: int, target_frr: float, rejection: str = "normalized") -> None:
    """Refuse calibration settings that would give a meaningless (NaN) threshold."""
    if rejection not in REJECTIONS:
        raise EdgektError(f"--rejection must be one of {', '.join(REJECTIONS)} (got "
                          f"{rejection!r})")
    if shots < 1:
        raise EdgektError(f"--shots must be >= 1 (got {shots})")
    if not 0.0 <= target_frr < 1.0:  # NaN fails too
        raise EdgektError(f"--target-frr must be in [0, 1) (got {target_frr})")


def build_package(checkpoint: str | Path, out: str | Path, *, force: bool = False,
                  shots: int = 5, target_frr: float = 0.05, transform: str = "auto",
                  data_dir: str | None = None, log: Callable[[str], None] | None = None,
                  rejection: str = "normalized", **export_options: Any
                  ) -> tuple[PrototypeClassifier, OpenSetRates]:
    """Export the embedding of ``checkpoint`` to ``out`` and calibrate its classifier."""
    from edgekt.exporters.package import export_package

    check_calibration(shots, target_frr, rejection)  # before the export, which takes a while
    export_package(checkpoint, out, part="embedding", force=force, data_dir=data_dir, log=log,
                   **export_options)
    return calibrate_package(checkpoint, out, shots=shots, target_frr=target_frr,
                             transform=transform, data_dir=data_dir, force=True,
                             rejection=rejection)
