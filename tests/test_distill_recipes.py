"""Distillation recipes that pay off: EMA, random erasing, label fractions, teacher ensembles,
function matching (mixup/cutmix) and unlabelled transfer sets, on small real data."""

from __future__ import annotations

import pytest
import torch

from edgekt.checkpoint import load_checkpoint
from edgekt.config import DataConfig, load_config
from edgekt.data import Splits, build_splits, make_loader
from edgekt.data.base import random_erasing
from edgekt.distill.mixing import mix_batch
from edgekt.engine import Trainer, fit
from edgekt.errors import EdgektError

BASE = ["train.progress=false", "train.threads=1", "data.batch_size=64", "optim.lr=0.005",
        "sched.name=cosine", "data.limit=2000", "data.val_fraction=0.02"]


def _small_eval(splits: Splits) -> Splits:
    """Evaluate on 600 validation and 2,000 test images: the tests time training, not scoring."""
    return Splits(splits.train, splits.val.subset(torch.arange(600)),
                  splits.test.subset(torch.arange(2000)), splits.info)


@pytest.fixture(scope="module")
def labelled():
    return _small_eval(build_splits(DataConfig(name="fashion-mnist", limit=2000,
                                               val_fraction=0.02)))


@pytest.fixture(scope="module")
def few_labels():
    return _small_eval(build_splits(DataConfig(name="fashion-mnist", limit=2000,
                                               val_fraction=0.02, label_fraction=0.1)))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, labelled):
    """Two cnn_s teachers (different seeds) trained on all 2,000 labelled images."""
    out = []
    for seed in (0, 1):
        run = tmp_path_factory.mktemp(f"teacher{seed}")
        fit(load_config(None, [*BASE, f"run.dir={run}", "model.name=cnn_s", "train.epochs=4",
                               f"train.seed={seed}"]), splits=labelled)
        out.append(run / "last.pt")
    return out


def test_label_fraction_is_seeded_and_validated(labelled, few_labels):
    assert len(few_labels.train) == round(0.1 * len(labelled.train))
    again = build_splits(DataConfig(name="fashion-mnist", limit=2000, val_fraction=0.02,
                                    label_fraction=0.1))
    assert torch.equal(again.train.indices, few_labels.train.indices)
    assert torch.equal(few_labels.val.indices, labelled.val.indices)  # same held-out images
    assert set(few_labels.train.indices.tolist()) <= set(labelled.train.indices.tolist())
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(EdgektError, match="label_fraction"):
            load_config(None, [f"data.label_fraction={bad}"])


def test_random_erasing_is_seeded_and_needs_augment():
    x = torch.full((64, 1, 28, 28), 7.0)
    a = random_erasing(x, torch.Generator().manual_seed(3), p=0.5)
    b = random_erasing(x, torch.Generator().manual_seed(3), p=0.5)
    assert torch.equal(a, b)
    erased = (a != 7.0).flatten(1).any(1)
    assert 16 < int(erased.sum()) < 48  # about half the images, p=0.5
    assert float((a != 7.0).float().mean()) < 0.2  # small boxes only
    with pytest.raises(EdgektError, match="erasing needs data.augment"):
        load_config(None, ["data.erasing=0.25"])


def test_mixing_is_deterministic_and_keeps_pixel_mass():
    x = torch.randn(16, 1, 28, 28)
    for mode in ("mixup", "cutmix", "both"):
        a, ma = mix_batch(x, mode, 1.0, torch.Generator().manual_seed(5))
        b, mb = mix_batch(x, mode, 1.0, torch.Generator().manual_seed(5))
        assert torch.equal(a, b) and ma.lam == mb.lam and 0.0 <= ma.lam <= 1.0
        expected = ma.lam * x.sum() + (1 - ma.lam) * x[ma.perm].sum()
        if mode == "mixup":
            assert torch.allclose(a.sum(), expected, rtol=1e-4, atol=1e-3)


def test_ema_weights_are_saved_evaluated_and_resumed_exactly(tmp_path, labelled):
    over = [*BASE, "model.name=cnn_xs", "train.epochs=2", "train.ema=0.99",
            "train.deterministic=true", "data.augment=true", "data.erasing=0.5"]
    full = fit(load_config(None, [*over, f"run.dir={tmp_path / 'a'}"]), splits=labelled)
    ck = load_checkpoint(tmp_path / "a" / "last.pt")
    raw, ema = ck["train_model"], ck["model"]["state_dict"]
    assert ck["ema_updates"] == ck["step"] == 2 * 32  # one update per optimiser step
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    assert full.metrics["test_acc"] > 0.5  # the averaged weights learnt (chance: 0.1)

    cfg = load_config(None, [*over, f"run.dir={tmp_path / 'b'}"])
    Trainer(cfg, splits=labelled).run(checkpoint_every=10, stop_after_steps=40)
    Trainer(cfg, resume=True, splits=labelled).run()
    resumed = load_checkpoint(tmp_path / "b" / "last.pt")
    for k, v in ema.items():
        assert torch.equal(v, resumed["model"]["state_dict"][k]), k
    for k, v in raw.items():
        assert torch.equal(v, resumed["train_model"][k]), k


def _distill_cfg(run, teacher, **margs):
    cfg = load_config(None, [*BASE, f"run.dir={run}", "model.name=cnn_xs", "method=distill"])
    cfg.method_args = {"teacher": teacher, "losses": [{"name": "hinton_kd", "temperature": 4.0}],
                       **margs}
    return cfg


def test_ensemble_teacher_averages_member_logits(tmp_path, teachers, labelled):
    from edgekt.distill.task import DistillTask

    cfg = _distill_cfg(tmp_path, [{"checkpoint": str(t)} for t in teachers])
    task = DistillTask(cfg, _student(labelled), labelled, torch.device("cpu"))
    x = next(iter(make_loader(labelled.val, labelled.info, cfg.data, train=False)))[0][:8]
    members = task.teacher.members
    with torch.no_grad():
        expected = (members[0](x) + members[1](x)) / 2
    assert torch.allclose(task.teacher_outputs(x)["logits"], expected, atol=1e-5)
    ident = task.export_metadata()["teacher"]
    assert ident["source"] == "ensemble" and len(ident["members"]) == 2
    single = DistillTask(_distill_cfg(tmp_path, {"checkpoint": str(teachers[0])}),
                         _student(labelled), labelled, torch.device("cpu"))
    assert single.teacher_identity["sha256"] != ident["sha256"]  # the cache keys on all members


def test_bad_recipes_fail_before_training(tmp_path, teachers, labelled):
    from edgekt.distill.task import DistillTask

    def build(teacher, **margs):
        cfg = _distill_cfg(tmp_path, teacher, **margs)
        cfg.method_args["losses"] = margs.pop("losses", cfg.method_args["losses"])
        return DistillTask(cfg, _student(labelled), labelled, torch.device("cpu"))

    one = {"checkpoint": str(teachers[0])}
    with pytest.raises(EdgektError, match="need one hard label"):
        build(one, mix="mixup", losses=[{"name": "dkd"}])
    with pytest.raises(EdgektError, match="transfer images have no labels"):
        build(one, transfer="fashion-mnist", losses=[{"name": "dkd"}])
    with pytest.raises(EdgektError, match="cache: on cannot be used"):
        build(one, mix="cutmix", cache="on")
    with pytest.raises(EdgektError, match="ensemble offers only"):
        build([one, {"checkpoint": str(teachers[1])}],
              losses=[{"name": "fitnets", "student": "stage3", "teacher": "stage3"}])


def test_unreadable_transfer_image_is_named(tmp_path, teachers, labelled):
    from PIL import Image

    from edgekt.distill.task import DistillTask

    folder = tmp_path / "rgb"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (28, 28), (i * 40, 0, 0)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    cfg = _distill_cfg(tmp_path, {"checkpoint": str(teachers[0])},
                       transfer=f"imagefolder:{folder}")
    with pytest.raises(EdgektError, match="broken.png"):
        DistillTask(cfg, _student(labelled), labelled, torch.device("cpu"))


def test_unlabelled_transfer_beats_the_scratch_student(tmp_path, teachers, few_labels):
    """10% of 2,000 labels: the scratch student vs KD from a teacher on all 2,000 images
    (labels ignored), same optimiser steps; the margin is the point of the feature."""
    scratch = fit(load_config(None, [*BASE, f"run.dir={tmp_path / 's'}", "model.name=cnn_xs",
                                     "train.epochs=60", "data.label_fraction=0.1"]),
                  splits=few_labels).metrics["test_acc"]
    cfg = _distill_cfg(tmp_path / "k", {"checkpoint": str(teachers[0])}, transfer="fashion-mnist")
    cfg.train.epochs, cfg.data.label_fraction = 8, 0.1
    kd = fit(cfg, splits=few_labels).metrics["test_acc"]
    assert kd > scratch + 0.03, (kd, scratch)


def _student(splits):
    from edgekt.models import create_model

    info = splits.info
    return create_model("cnn_xs", num_classes=info.num_classes, in_channels=info.in_channels,
                        image_size=info.image_size)
