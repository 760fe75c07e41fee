import pytest
import torch

from edgekt.config import DataConfig
from edgekt.data import build_splits, make_loader
from edgekt.data.base import random_crop_flip
from edgekt.errors import EdgektError


def test_fashion_mnist_is_real_and_split_deterministically(fashion_splits):
    s = fashion_splits
    assert s.info.num_classes == 10 and s.info.image_size == 28 and s.info.in_channels == 1
    assert len(s.train) == 2000 and len(s.val) == 6000 and len(s.test) == 10000
    assert s.info.mean == [0.2860] and s.info.labels[9] == "Ankle boot"
    again = build_splits(DataConfig(name="fashion-mnist", limit=2000, val_fraction=0.1))
    assert torch.equal(again.val.indices, s.val.indices)
    assert not set(s.val.indices.tolist()) & set(s.train.indices.tolist())
    # real images: every class present, pixel statistics close to the published ones
    assert set(s.test.targets.tolist()) == set(range(10))
    assert abs(s.test.images.float().mean().item() / 255 - 0.286) < 0.01


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    from edgekt.data import sources

    monkeypatch.setattr(sources, "DEBIAN_FASHION", tmp_path / "none")
    monkeypatch.delenv("EDGEKT_DATA", raising=False)
    try:
        build_splits(DataConfig(name="fashion-mnist", data_dir=str(tmp_path)))
    except EdgektError as e:
        assert "apt-get install dataset-fashion-mnist" in str(e) and "--data-dir" in str(e)
    else:
        raise AssertionError("expected an EdgektError")


def test_unknown_dataset_lists_valid_names():
    try:
        build_splits(DataConfig(name="fashon-mnist"))
    except EdgektError as e:
        assert "did you mean 'fashion-mnist'" in str(e)
    else:
        raise AssertionError


def test_small_datasets_and_class_subset():
    d = build_splits(DataConfig(name="digits", classes=[3, 5, 7], image_size=16))
    assert d.info.num_classes == 3 and d.info.labels == ["3", "5", "7"]
    assert d.train.images.shape[-1] == 16 and set(d.train.targets.tolist()) == {0, 1, 2}
    m = build_splits(DataConfig(name="mnist-5k"))
    assert len(m.train) + len(m.val) + len(m.test) == 5000


def test_loader_normalises_orders_and_shards(fashion_splits):
    s = fashion_splits
    cfg = DataConfig(batch_size=64)
    loader = make_loader(s.train, s.info, cfg, train=True, seed=3)
    loader.set_epoch(1)
    first = next(iter(loader))[0]
    assert abs(first.mean().item()) < 0.5  # normalised
    again = make_loader(s.train, s.info, cfg, train=True, seed=3)
    again.set_epoch(1)
    assert torch.equal(next(again.iter_from(0))[0], first)
    assert torch.equal(list(again.iter_from(0))[2][0], next(again.iter_from(2))[0])  # resumable
    shards = [make_loader(s.train, s.info, cfg, train=True, rank=r, world=2, with_index=True)
              for r in range(2)]
    seen = [torch.cat([b[2] for b in sh]) for sh in shards]
    assert len(seen[0]) == len(seen[1]) == 1000
    assert not set(seen[0].tolist()) & set(seen[1].tolist())


def test_augmentation_is_seeded_and_keeps_shape():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    a = random_crop_flip(x, torch.Generator().manual_seed(0))
    b = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)


def test_imagefolder_reads_the_users_images(tmp_path):
    """Real digits written as PNG class folders, read back through torchvision's ImageFolder."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for split, rows in (("train", range(0, 60)), ("test", range(60, 90))):
        for i in rows:
            folder = tmp_path / split / f"digit{d.target[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            img = (d.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(img).convert("RGB").save(folder / f"{i}.png")
    s = build_splits(DataConfig(name=f"imagefolder:{tmp_path}", image_size=16))
    assert s.info.in_channels == 3 and s.info.image_size == 16
    assert s.info.labels == [f"digit{k}" for k in range(10)]
    assert len(s.train) + len(s.val) == 60 and len(s.test) == 30
    with pytest.raises(EdgektError, match="not a directory"):
        build_splits(DataConfig(name=f"imagefolder:{tmp_path / 'nope'}"))
