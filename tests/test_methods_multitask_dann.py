"""Multi-task (hard sharing, cross-stitch, GradNorm) and DANN on small real-data slices."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgekt.checkpoint import load_checkpoint
from edgekt.config import DataConfig, load_config
from edgekt.data import build_splits
from edgekt.engine import fit
from edgekt.errors import EdgektError
from edgekt.methods.dann import adapt_batchnorm, dann_lambda, grad_reverse, target_splits
from edgekt.methods.multitask import (
    PRESETS,
    MultiTaskArgs,
    export_multitask_onnx,
    load_multitask,
    resolve_tasks,
    task_splits,
)

BASE = ["model.name=cnn_xs", "train.epochs=1", "optim.lr=0.005", "train.progress=false",
        "train.threads=1"]


@pytest.fixture(scope="module")
def small_fashion(fashion_splits):
    from edgekt.data import Splits

    s = fashion_splits
    return Splits(s.train.subset(torch.arange(600)), s.val.subset(torch.arange(300)),
                  s.test.subset(torch.arange(300)), s.info)


def test_presets_map_fashion_and_digits():
    coarse = PRESETS["fashion_coarse"]
    # Trouser -> bottoms, Sandal/Sneaker/Ankle boot -> footwear, Bag -> bags.
    assert coarse.class_map[1] == 1 and coarse.class_map[8] == 3
    assert [coarse.class_map[i] for i in (5, 7, 9)] == [2, 2, 2]
    assert PRESETS["parity"].class_map[:4] == [0, 1, 0, 1]
    assert PRESETS["ge5"].class_map[4:6] == [0, 1]


@pytest.mark.parametrize("raw,match", [
    ({"tasks": ["classes", "nope"]}, "unknown task 'nope'"),
    ({"tasks": ["fashion_coarse", "classes"]}, "first task must be 'classes'"),
    ({"tasks": ["classes", "parity"], "weights": [1.0]}, "1 weights for 2 tasks"),
    ({"tasks": ["classes", "short"], "custom": {"short": {"class_map": [0, 1, 0]}}},
     "maps 3 classes but the dataset has 10"),
    ({"tasks": ["classes", "parity"], "arch": "cross_stitch", "balance": "gradnorm"},
     "gradnorm needs arch=hard"),
])
def test_bad_task_lists_fail_clearly(raw, match):
    with pytest.raises(EdgektError, match=match):
        resolve_tasks(MultiTaskArgs.model_validate(raw), 10)


def test_task_splits_relabel(small_fashion):
    coarse = task_splits(small_fashion, PRESETS["fashion_coarse"])
    assert coarse.info.num_classes == 4 and coarse.info.labels[0] == "tops"
    expect = torch.tensor(PRESETS["fashion_coarse"].class_map)[small_fashion.test.targets]
    assert torch.equal(coarse.test.targets, expect)


@pytest.mark.parametrize("arch,balance", [("hard", "fixed"), ("hard", "gradnorm"),
                                          ("cross_stitch", "fixed")])
def test_multitask_trains_exports_one_output_per_task(tmp_path, small_fashion, arch, balance):
    cfg = load_config(None, [*BASE, f"run.dir={tmp_path}", "method=multitask",
                             f"method_args={{arch: {arch}, balance: {balance}}}"])
    m = fit(cfg, splits=small_fashion).metrics
    # Per-task accuracies reported; the coarse task (4 classes) beats chance after one epoch.
    assert {"test_acc_classes", "test_acc_fashion_coarse"} <= set(m)
    assert m["test_acc_fashion_coarse"] > 0.4
    assert m["test_acc"] == pytest.approx(m["test_acc_classes"])
    ckpt = load_checkpoint(tmp_path / "last.pt")
    net = load_multitask(ckpt)
    x = torch.randn(3, 1, 28, 28)
    outs = net(x)
    assert [o.shape[1] for o in outs] == [10, 4]
    if balance == "gradnorm":  # weights renormalised to sum to the task count, not stuck at 1
        w = ckpt["task"]["task_weights"]
        assert abs(float(w.sum()) - 2.0) < 0.2 and not torch.allclose(w, torch.ones(2))
    names = export_multitask_onnx(tmp_path / "last.pt", tmp_path / "mt.onnx")
    assert names == ["logits_classes", "logits_fashion_coarse"]
    sess = ort.InferenceSession(str(tmp_path / "mt.onnx"))
    got = sess.run(None, {"input": x.numpy()})
    for o, g in zip(outs, got, strict=True):
        np.testing.assert_allclose(o.detach().numpy(), g, atol=1e-4)
    meta = json.loads({p.key: p.value for p in onnx.load(tmp_path / "mt.onnx").metadata_props}
                      ["edgekt"])
    assert [t["output"] for t in meta["extra"]["multitask"]] == names


def test_gradient_reversal_and_schedule():
    x = torch.ones(3, requires_grad=True)
    grad_reverse(x, 0.5).sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), -0.5))
    assert dann_lambda(0.0) == 0.0 and 0.99 < dann_lambda(1.0) <= 1.0
    assert dann_lambda(0.1) < dann_lambda(0.5)


def test_adapt_batchnorm_uses_the_target_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    x = 3.0 + 2.0 * torch.randn(64, 1, 4, 4)
    adapted = adapt_batchnorm(net, [x[:32], (x[32:], None)])
    assert not adapted.training
    h = net[0](x).detach()
    assert torch.allclose(net[1].running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(net[1].running_var, h.var((0, 2, 3)), rtol=0.05)
    # Normalised with the target's own statistics: zero mean, unit variance on the target.
    out = adapted(x).detach()
    assert out.mean().abs() < 0.05 and abs(float(out.std()) - 1.0) < 0.1


def test_dann_target_checks(fashion_splits):
    mnist = build_splits(DataConfig(name="mnist-5k", limit=200))
    ts, tinfo = target_splits(DataConfig(name="digits"), mnist.info)
    assert ts.train.images.shape[-1] == 28 and tinfo.mean == mnist.info.mean
    with pytest.raises(EdgektError, match="4 classes but the source"):
        target_splits(DataConfig(name="digits", classes=[0, 1, 2, 3]), mnist.info)
    with pytest.raises(EdgektError, match="image_size=28"):
        target_splits(DataConfig(name="digits", image_size=16), mnist.info)


def test_dann_trains_and_reports_target_accuracy(tmp_path):
    src = build_splits(DataConfig(name="mnist-5k", limit=1000))
    cfg = load_config(None, [*BASE, f"run.dir={tmp_path}", "data.name=mnist-5k",
                             "data.limit=1000", "data.batch_size=100", "train.epochs=3",
                             "optim.lr=0.01",
                             "method=dann"])
    m = fit(cfg, splits=src).metrics
    # 30 steps: the source is learnt and the unlabelled target (sklearn digits) is well above
    # chance (0.1), with the trained statistics and with target ones (measured 0.62 / 0.32 / 0.31).
    assert m["test_acc"] > 0.45 and m["test_target_acc"] > 0.2 and "val_target_acc" in m
    assert m["test_target_bn_acc"] > 0.2
    ck = load_checkpoint(tmp_path / "last.pt")
    steps = ck["step"]
    # The target stream advanced once per step (labels unused) and is saved for resume.
    n_target = len(target_splits(DataConfig(name="digits"), src.info)[0].train)
    per_pass = -(-n_target // cfg.data.batch_size)
    t_epoch, t_batch = (int(v) for v in ck["task"]["target_pos"])
    assert steps > per_pass and t_epoch * per_pass + t_batch == steps
