"""edgekt prune: torch-pruning on edgekt checkpoints, rebuild recipes, bad input, KD recovery."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgekt.checkpoint import load_checkpoint, save_checkpoint
from edgekt.config import ModelConfig
from edgekt.engine.setup import info_record, model_from_checkpoint, model_record
from edgekt.errors import EdgektError
from edgekt.models import EdgeNet, create_model

pytest.importorskip("torch_pruning")
from edgekt.pruning.prune import PruneSpec, prune_checkpoint, prune_model  # noqa: E402

torch.set_num_threads(1)


def _checkpoint(name: str, info, path):
    torch.manual_seed(0)
    m = create_model(name, num_classes=info.num_classes, in_channels=info.in_channels,
                     image_size=info.image_size).eval()
    save_checkpoint(path, {"model": model_record(ModelConfig(name=name), info, m),
                           "data": info_record(info), "config": {}})
    return path


def test_pruned_cnn_is_a_normal_checkpoint(tmp_path, tiny_checkpoint, fashion_splits):
    from edgekt.evaluation import checkpoint_info
    from edgekt.exporters import export_package

    out = tmp_path / "pruned.pt"
    rec = prune_checkpoint(tiny_checkpoint, out, PruneSpec(ratio=0.5, importance="bn-scale"))
    assert rec["macs_after"] < 0.5 * rec["macs_before"] and rec["params_after"] < rec[
        "params_before"]
    raw = torch.load(out, weights_only=True)  # plain values only: no pickled module
    prune = raw["model"]["prune"]
    assert prune["format"] == "edgekt.prune/1" and prune["base"]["name"] == "cnn_xs"
    convs = {p for p, m in prune["modules"].items() if "out_channels" in m["attrs"]}
    assert convs and "stage1.0.0" not in convs  # the stem is kept by default
    net, _ = model_from_checkpoint(raw, str(out))
    assert net.embedding_dim == net.head.in_features < 32
    info = checkpoint_info(out)
    assert info["model"] == "cnn_xs" and info["params"] == rec["params_after"]
    man = export_package(out, tmp_path / "pkg", targets=["onnx"], precisions=["fp32"],
                         splits=fashion_splits, val_samples=64, test_samples=64, threads=1)
    assert man.gate["passed"]


@pytest.mark.parametrize("name, spec", [
    ("resnet18", PruneSpec(ratio=0.5)),
    ("mobilenet_v2", PruneSpec(ratio=0.5, steps=2)),
    ("timm:mobilenetv4_conv_small", PruneSpec(target_macs=0.3)),
])
def test_families_prune(name, spec, tmp_path, fashion_tiny):
    src = _checkpoint(name, fashion_tiny.info, tmp_path / "src.pt")
    rec = prune_checkpoint(src, tmp_path / "p.pt", spec)
    # Half the channels of most layers: about a quarter of the MACs remain.
    assert 0.05 < rec["macs_fraction"] <= (0.3 if spec.target_macs else 0.45)
    net, _ = model_from_checkpoint(load_checkpoint(tmp_path / "p.pt"))
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_taylor_importance_uses_real_images(tmp_path, tiny_checkpoint, fashion_tiny):
    rec = prune_checkpoint(tiny_checkpoint, tmp_path / "t.pt",
                           PruneSpec(ratio=0.3, importance="taylor", steps=2,
                                     global_pruning=True, calib_batches=1),
                           splits=fashion_tiny)
    assert rec["rounds"] == 2 and rec["global"]


@pytest.mark.parametrize("spec, match", [
    (PruneSpec(ratio=1.5), "between 0 and 1"),
    (PruneSpec(ratio=0.0), "between 0 and 1"),
    (PruneSpec(target_macs=1e12), "not below the model"),
    (PruneSpec(ratio=0.5, target_macs=0.5), "exactly one"),
    (PruneSpec(ratio=0.5, importance="l3"), "--importance"),
    (PruneSpec(ratio=0.5, keep=("stem", "nope")), "no module 'nope'"),
])
def test_bad_input_writes_nothing(tmp_path, tiny_checkpoint, spec, match):
    out = tmp_path / "p.pt"
    with pytest.raises(EdgektError, match=match):
        prune_checkpoint(tiny_checkpoint, out, spec)
    assert list(tmp_path.iterdir()) == []


def test_newer_prune_format_and_restacking_are_refused(tmp_path, tiny_checkpoint):
    out = tmp_path / "p.pt"
    prune_checkpoint(tiny_checkpoint, out, PruneSpec(ratio=0.25))
    with pytest.raises(EdgektError, match="already pruned"):
        prune_checkpoint(out, tmp_path / "q.pt", PruneSpec(ratio=0.25))
    ckpt = load_checkpoint(out)
    ckpt["model"]["prune"]["format"] = "edgekt.prune/2"
    with pytest.raises(EdgektError, match=r"format 'edgekt.prune/2'.*Upgrade edgekt"):
        model_from_checkpoint(ckpt, "future.pt")


class HardCodedWidth(EdgeNet):
    """A trunk whose forward assumes 8 channels: pruning it must fail with a clear message."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.mid = nn.Conv2d(8, 8, 3)
        self.embedding_dim = 8
        self.head = nn.Linear(8, 10)

    def forward_features(self, x):
        x = self.mid(self.conv(x))
        return x.reshape(x.shape[0], 8, -1).mean(-1)


def test_untraceable_model_names_the_problem():
    with pytest.raises(EdgektError, match="torch-pruning"):
        prune_model(HardCodedWidth(), torch.zeros(1, 1, 12, 12),
                    PruneSpec(ratio=0.5, keep=("head",)))


def test_pruned_student_recovers_by_distillation(tmp_path, tiny_checkpoint, fashion_splits):
    """prune -> distil (pruned:PATH student, the unpruned teacher): it learns, well above chance."""
    from edgekt.config import load_config
    from edgekt.engine import fit
    from edgekt.evaluation import evaluate_checkpoint_file  # noqa: F401 (same reader as the CLI)

    pruned = tmp_path / "pruned.pt"
    prune_checkpoint(tiny_checkpoint, pruned, PruneSpec(ratio=0.6, importance="l2"))
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", f"model.name=pruned:{pruned}",
                             "method=distill", "train.epochs=2", "train.progress=false",
                             "train.threads=1", "data.batch_size=32", "optim.lr=0.005",
                             "sched.name=none", "data.limit=2000"])
    cfg.method_args = {"teacher": {"checkpoint": str(tiny_checkpoint)},
                       "losses": [{"name": "hinton_kd", "weight": 1.0, "temperature": 4.0}],
                       "cache_dir": str(tmp_path / "cache")}
    result = fit(cfg, splits=fashion_splits)
    saved = load_checkpoint(result.run_dir / "last.pt")
    assert saved["model"]["name"] == "cnn_xs" and "prune" in saved["model"]
    student, _ = model_from_checkpoint(saved)
    assert student.head.in_features < 32
    assert result.metrics["test_acc"] > 0.45  # chance is 0.10 on 10 balanced classes


def test_cli_prunes_and_info_reports_the_record(tmp_path, tiny_checkpoint):
    from typer.testing import CliRunner

    from edgekt.cli.app import app

    out = tmp_path / "p.pt"
    bad = CliRunner().invoke(app, ["prune", str(tiny_checkpoint), "--out", str(out),
                                   "--ratio", "1.2"])
    assert bad.exit_code == 2 and "between 0 and 1" in bad.output and not out.exists()
    res = CliRunner().invoke(app, ["prune", str(tiny_checkpoint), "--out", str(out),
                                   "--target-params", "0.5", "--importance", "l1", "--global"])
    assert res.exit_code == 0, res.output
    info = CliRunner().invoke(app, ["info", str(out), "--json"])
    import json

    rec = json.loads(info.output)["pruning"]
    assert rec["params_after"] <= 0.5 * rec["params_before"] and rec["importance"] == "l1"


def test_reinit_gives_the_pruned_architecture_freshly_initialised(tmp_path, tiny_checkpoint):
    """The scratch baseline of a pruned student: same shapes, none of the pruned weights."""
    pruned = tmp_path / "pruned.pt"
    prune_checkpoint(tiny_checkpoint, pruned, PruneSpec(ratio=0.5))
    kw = {"num_classes": 10, "in_channels": 1, "image_size": 28}
    inherited = create_model(f"pruned:{pruned}", **kw).state_dict()
    torch.manual_seed(0)
    fresh = create_model(f"pruned:{pruned}", reinit=True, **kw).state_dict()
    assert {k: v.shape for k, v in fresh.items()} == {k: v.shape for k, v in inherited.items()}
    convs = [k for k, v in fresh.items() if v.dim() == 4]
    assert convs and not any(torch.equal(fresh[k], inherited[k]) for k in convs)
    bn_means = [v for k, v in fresh.items() if k.endswith("running_mean")]
    assert bn_means and all(torch.count_nonzero(v) == 0 for v in bn_means)  # untrained BN
    assert all(torch.isfinite(v.float()).all() for v in fresh.values())
    with pytest.raises(EdgektError, match="only kwarg is reinit"):
        create_model(f"pruned:{pruned}", width_mult=0.5, **kw)


def test_auto_keep_prunes_a_full_resolution_stem_only_under_a_quarter(fashion_tiny):
    """``keep: auto``: the head always; cnn_xs's stride-1 stem only for a gentle target."""
    torch.manual_seed(0)
    kw = {"num_classes": 10, "in_channels": 1, "image_size": 28}
    example = torch.zeros(1, 1, 28, 28)
    hard = prune_model(create_model("cnn_xs", **kw), example, PruneSpec(target_macs=0.1))
    gentle = prune_model(create_model("cnn_xs", **kw), example, PruneSpec(target_macs=0.5))
    assert hard["keep"] == ["head"] and gentle["keep"] == ["head", "stem"]
    # A stride-2 stem (ResNet's ImageNet stem) is kept at any target.
    resnet = prune_model(create_model("resnet18", stem="imagenet", **kw), example,
                         PruneSpec(ratio=0.6))  # keeps 16% of the MACs, one step
    assert resnet["keep"] == ["head", "stem"]


def test_prune_and_recover_rounds_recover_accuracy(tmp_path, tiny_checkpoint, fashion_splits):
    """Iterative prune-and-recover (KD from the unpruned model between rounds) beats the same
    pruning without recovery by a clear margin on held-out images."""
    from edgekt.config import DataConfig
    from edgekt.data import make_loader
    from edgekt.engine.fit import evaluate
    from edgekt.engine.runtime import Runtime, select_device

    def test_acc(path):
        net, info = model_from_checkpoint(load_checkpoint(path))
        loader = make_loader(fashion_splits.test, info, DataConfig(), train=False)
        return float(evaluate(net, loader, Runtime(select_device("cpu"), None))["acc"])

    torch.manual_seed(0)
    plain = prune_checkpoint(tiny_checkpoint, tmp_path / "a.pt",
                             PruneSpec(target_macs=0.15, steps=2), splits=fashion_splits)
    torch.manual_seed(0)
    rec = prune_checkpoint(tiny_checkpoint, tmp_path / "b.pt",
                           PruneSpec(target_macs=0.15, steps=2, recover_steps=25,
                                     recover_lr=0.01), splits=fashion_splits)
    assert rec["recover_steps"] == 25 and rec["rounds"] == 2 and plain["recover_steps"] == 0
    assert rec["macs_fraction"] <= 0.15 and plain["macs_fraction"] <= 0.15
    before, after = test_acc(tmp_path / "a.pt"), test_acc(tmp_path / "b.pt")
    assert after > max(0.3, before + 0.05), (before, after)


@pytest.mark.parametrize("args, match", [
    (["--recover-steps", "-1"], "--recover-steps must be 0 or more"),
    (["--recover-steps", "5", "--recover-lr", "0"], "--recover-lr must be between 0 and 1"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_cli_refuses_bad_recovery_options(tmp_path, tiny_checkpoint, args, match):
    from typer.testing import CliRunner

    from edgekt.cli.app import app

    out = tmp_path / "p.pt"
    res = CliRunner().invoke(app, ["prune", str(tiny_checkpoint), "--out", str(out),
                                   "--target-macs", "0.3", *args])
    assert res.exit_code == 2 and match in res.output and not out.exists(), res.output


def test_recovery_needs_a_teacher_and_data():
    with pytest.raises(EdgektError, match="--recover-steps needs the unpruned model"):
        prune_model(create_model("cnn_xs", num_classes=10, in_channels=1, image_size=28),
                    torch.zeros(1, 1, 28, 28), PruneSpec(ratio=0.5, recover_steps=3))
