"""Shared fixtures: small slices of real data and a tiny trained checkpoint, built once."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fashion_splits():
    """Fashion-MNIST (real), training split limited to 2,000 images."""
    from edgekt.config import DataConfig
    from edgekt.data import build_splits

    return build_splits(DataConfig(name="fashion-mnist", limit=2000))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, fashion_splits) -> Path:
    """A cnn_xs trained for one epoch on 2,000 real Fashion-MNIST images (about 3 s, ~60%)."""
    from edgekt.config import load_config
    from edgekt.engine import fit

    run = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config(None, [f"run.dir={run}", "model.name=cnn_xs", "train.epochs=1",
                             "optim.lr=0.005", "data.batch_size=32", "sched.name=none",
                             "train.progress=false", "train.threads=1", "data.limit=2000"])
    fit(cfg, splits=fashion_splits)
    return run / "last.pt"


@pytest.fixture(scope="session")
def fashion_tiny():
    """Fashion-MNIST (real) with 640 training and 1,200 validation images, for loop tests."""
    from edgekt.config import DataConfig
    from edgekt.data import build_splits

    return build_splits(DataConfig(name="fashion-mnist", limit=640, val_fraction=0.02))
