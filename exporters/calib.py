"""Real data for calibration, accuracy control and the parity gate, plus the PyTorch reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgekt.data import BatchLoader, DatasetInfo, Splits, TensorSplit
from edgekt.errors import EdgektError


@dataclass
class EvalData:
    """Normalised float32 NCHW samples and what the PyTorch model outputs for them."""

    calib_x: np.ndarray
    """Real training images used to calibrate INT8 ranges."""
    calib_indices: np.ndarray
    """Their positions in the training split (recorded in the manifest)."""
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    ref_val: np.ndarray
    """PyTorch outputs on ``val_x`` (logits, or embeddings for ``--part embedding``)."""
    ref_test: np.ndarray
    head: tuple[np.ndarray, np.ndarray] | None = None
    """(weight, bias) turning embeddings into logits, for ``--part embedding``."""

    def logits(self, out: np.ndarray) -> np.ndarray:
        if self.head is None:
            return out
        w, b = self.head
        return out @ w.T + b

    def accuracy(self, out: np.ndarray, y: np.ndarray) -> float:
        return float((self.logits(out).argmax(1) == y).mean())

    def val_accuracy(self, out: np.ndarray) -> float:
        return self.accuracy(out, self.val_y)


def normalised(split: TensorSplit, info: DatasetInfo) -> np.ndarray:
    """The exact float input edgekt's loaders feed the model (same code path as training)."""
    loader = BatchLoader(split, info, batch_size=1024)
    return np.concatenate([x.numpy() for x, _ in loader]).astype(np.float32)


def build_eval_data(module: torch.nn.Module, splits: Splits, *, calib_samples: int,
                    val_samples: int | None, test_samples: int | None, seed: int = 0,
                    head: tuple[np.ndarray, np.ndarray] | None = None) -> EvalData:
    """Pick calibration/validation/test samples and run the PyTorch reference on them."""
    n_train = len(splits.train)
    if calib_samples < 1:
        raise EdgektError(f"--calib-samples must be at least 1 (got {calib_samples})")
    if n_train < calib_samples:
        raise EdgektError(
            f"calibration needs {calib_samples} real training samples but the training split of "
            f"{splits.info.name!r} has {n_train}; lower --calib-samples or point --data-dir at "
            "the full dataset")
    if len(splits.val) == 0 or len(splits.test) == 0:
        raise EdgektError(f"the parity gate needs validation and test samples; {splits.info.name!r}"
                          f" has {len(splits.val)} validation and {len(splits.test)} test images")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n_train, generator=g)[:calib_samples].sort().values
    val = _head(splits.val, val_samples)
    test = _head(splits.test, test_samples)
    val_x, test_x = normalised(val, splits.info), normalised(test, splits.info)
    return EvalData(
        calib_x=normalised(splits.train.subset(idx), splits.info),
        calib_indices=idx.numpy(),
        val_x=val_x, val_y=val.targets.numpy(), test_x=test_x, test_y=test.targets.numpy(),
        ref_val=torch_outputs(module, val_x), ref_test=torch_outputs(module, test_x), head=head,
    )


def torch_outputs(module: torch.nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    module.eval()
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(x[i : i + batch])).numpy()
                               for i in range(0, len(x), batch)])


def _head(split: TensorSplit, n: int | None) -> TensorSplit:
    if n is None or n >= len(split):
        return split
    return split.subset(torch.arange(n))
