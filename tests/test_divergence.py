"""Divergence: exploded or non-finite weights are never checkpointed; the message names a
checkpoint that exists and evaluates finite; ``--resume`` (with a lower lr) continues from it."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from edgekt.checkpoint import load_checkpoint
from edgekt.cli.app import app
from edgekt.config import load_config
from edgekt.engine.fit import Trainer, evaluate
from edgekt.engine.guard import GROWTH_LIMIT, param_norm, rescale_lr, weights_problem
from edgekt.engine.setup import model_from_checkpoint
from edgekt.errors import EdgektError

BASE = ["model.name=cnn_xs", "train.progress=false", "train.threads=1", "data.limit=640",
        "data.val_fraction=0.05", "data.batch_size=32", "sched.name=none"]


def cfg_for(run, *extra):
    return load_config(None, [*BASE, f"run.dir={run}", *extra])


def finite_eval(path, splits) -> dict[str, float]:
    from edgekt.data import make_loader
    from edgekt.engine.runtime import setup_runtime

    ck = load_checkpoint(path)
    net, _ = model_from_checkpoint(ck)
    cfg = load_config(None, BASE)
    loader = make_loader(splits.val, splits.info, cfg.data, train=False)
    res = evaluate(net, loader, setup_runtime(cfg.train))
    assert all(torch.isfinite(v).all() for v in ck["model"]["state_dict"].values())
    assert math.isfinite(res["loss"]), res
    return res


def test_exploding_run_keeps_the_good_checkpoint_and_resumes_from_it(tmp_path, fashion_tiny):
    run = tmp_path / "run"
    Trainer(cfg_for(run, "train.epochs=1", "optim.lr=0.003"), splits=fashion_tiny).run()
    good = (run / "last.pt").read_bytes()
    good_val = finite_eval(run / "last.pt", fashion_tiny)
    assert good_val["acc"] > 0.3  # it learnt something (10 classes: chance 0.1)

    # A far too high learning rate, checkpointing after every step: the weights explode
    # (finite but huge) within a step or two, before the loss turns NaN.
    t = Trainer(cfg_for(run, "train.epochs=2", "optim.lr=1e4"), resume=True, splits=fashion_tiny)
    assert t.opt.param_groups[0]["lr"] == pytest.approx(1e4)  # the new lr wins on resume
    with pytest.raises(EdgektError) as info:
        t.run(checkpoint_every=1)
    msg = str(info.value)
    assert "diverged" in msg and f"last good checkpoint is {run / 'last.pt'}" in msg
    assert "--resume" in msg
    assert (run / "last.pt").read_bytes() == good  # never overwritten by the exploded weights
    assert finite_eval(run / "last.pt", fashion_tiny)["acc"] == good_val["acc"]

    # --resume with a sane learning rate continues from that checkpoint and finishes.
    res = CliRunner().invoke(app, ["train", "--resume", "--run-dir", str(run),
                                   *sum((["--set", s] for s in [*BASE, "train.epochs=2",
                                                                "optim.lr=0.001"]), [])])
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(run / "last.pt")
    assert ck["epoch"] == 2 and ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.001)
    assert math.isfinite(ck["metrics"]["test_loss"]) and ck["metrics"]["test_acc"] > 0.3


def test_divergence_before_any_checkpoint_names_none(tmp_path, fashion_tiny):
    run = tmp_path / "fresh"
    t = Trainer(cfg_for(run, "train.epochs=1", "optim.lr=1e4"), splits=fashion_tiny)
    with pytest.raises(EdgektError, match="No checkpoint of this run was written") as info:
        t.run(checkpoint_every=1)
    assert "last.pt" not in str(info.value) and not (run / "last.pt").exists()


def test_divergence_message_through_the_cli_exits_2(tmp_path):
    run = tmp_path / "cli"
    res = CliRunner().invoke(app, ["train", "--run-dir", str(run), "--checkpoint-every", "1",
                                   *sum((["--set", s] for s in [*BASE, "train.epochs=1",
                                                                "optim.lr=1e5"]), [])])
    assert res.exit_code == 2 and "training diverged" in res.output
    assert "Traceback" not in res.output and not (run / "last.pt").exists()


def test_guard_finds_nan_weights_nan_optimizer_state_and_explosions():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    ref = param_norm(net)
    assert weights_problem(net, opt, ref) is None
    with torch.no_grad():
        net[0].weight.mul_(GROWTH_LIMIT * 0.9)  # big growth, but within the limit
    assert weights_problem(net, opt, ref) is None
    with torch.no_grad():
        net[0].weight.mul_(10.0)
    assert "exploded" in weights_problem(net, opt, ref)
    with torch.no_grad():
        net[0].weight.div_(GROWTH_LIMIT * 9)
        net[1].running_var[0] = float("nan")  # a buffer, not a parameter
    assert "running_var" in weights_problem(net, opt, ref)
    net[1].running_var.fill_(1.0)
    opt.state[net[0].bias]["exp_avg_sq"][0] = float("inf")
    assert "exp_avg_sq" in weights_problem(net, opt, ref)


def test_rescale_lr_scales_every_learning_rate_and_nothing_else():
    state = {"param_groups": [{"lr": 0.1, "initial_lr": 0.1, "momentum": 0.9, "params": [0]}],
             "base_lrs": [0.1], "_last_lr": [0.05], "_schedulers": [{"base_lrs": [0.1]}],
             "last_epoch": 7}
    out = rescale_lr(state, 0.5)
    assert out["param_groups"][0] == {"lr": 0.05, "initial_lr": 0.05, "momentum": 0.9,
                                      "params": [0]}
    assert out["base_lrs"] == [0.05] and out["_last_lr"] == [0.025]
    assert out["_schedulers"][0]["base_lrs"] == [0.05] and out["last_epoch"] == 7
