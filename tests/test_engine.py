import pytest
import torch

from edgekt.checkpoint import load_checkpoint
from edgekt.config import load_config
from edgekt.engine import fit
from edgekt.engine.fit import Trainer
from edgekt.engine.optim import param_groups
from edgekt.engine.tasks import StepOutput, SupervisedTask
from edgekt.errors import EdgektError
from edgekt.models import create_model

BASE = ["model.name=cnn_xs", "train.progress=false", "train.threads=1", "data.limit=640"]


def cfg_for(tmp_path, *extra):
    return load_config(None, [*BASE, f"run.dir={tmp_path}", *extra])


def weights(path):
    return load_checkpoint(path)["model"]["state_dict"]


def test_training_learns_real_data_and_writes_run_files(tiny_checkpoint):
    run = tiny_checkpoint.parent
    ck = load_checkpoint(tiny_checkpoint)
    assert ck["metrics"]["test_acc"] > 0.5  # 10 classes: chance is 0.10
    for name in ["last.pt", "best.pt", "metrics.jsonl", "metrics.csv", "config.yaml",
                 "summary.json"]:
        assert (run / name).is_file(), name
    assert ck["optimizer"]["state"] and ck["scheduler"] and ck["rng"]["torch"].numel() > 0
    assert ck["config"]["model"]["name"] == "cnn_xs" and ck["data"]["labels"][0] == "T-shirt/top"


def test_resume_mid_epoch_is_exact(tmp_path, fashion_tiny):
    extra = ["train.epochs=2", "train.deterministic=true", "data.augment=true",
             "model.kwargs={dropout: 0.2}", "sched.warmup_epochs=0.5", "optim.lr=0.01"]
    a = fit(cfg_for(tmp_path / "a", *extra), splits=fashion_tiny)
    t = Trainer(cfg_for(tmp_path / "b", *extra), splits=fashion_tiny)
    t.run(checkpoint_every=2, stop_after_steps=7)  # "killed" after step 7, last save at step 6
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 6
    b = fit(cfg_for(tmp_path / "b", *extra), resume=True, splits=fashion_tiny)
    wa, wb = weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.metrics["train_loss"] == b.metrics["train_loss"]
    assert a.metrics["test_acc"] == b.metrics["test_acc"]


def test_existing_run_needs_resume_or_force(tmp_path, fashion_tiny):
    fit(cfg_for(tmp_path, "train.epochs=1"), splits=fashion_tiny)
    with pytest.raises(EdgektError, match="--resume"):
        fit(cfg_for(tmp_path, "train.epochs=1"), splits=fashion_tiny)


def test_nan_loss_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path, fashion_tiny,
                                                               monkeypatch):
    real = SupervisedTask.training_step

    def poisoned(self, model, batch, step):
        out = real(self, model, batch, step)
        return out if step < 3 else StepOutput(out.loss * float("nan"), out.logits, out.targets)

    monkeypatch.setattr(SupervisedTask, "training_step", poisoned)
    t = Trainer(cfg_for(tmp_path, "train.epochs=1"), splits=fashion_tiny)
    with pytest.raises(EdgektError, match="loss became nan.*last good checkpoint"):
        t.run(checkpoint_every=1)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3


def test_freeze_backbone_trains_only_the_head(tmp_path, fashion_tiny, tiny_checkpoint):
    t = Trainer(cfg_for(tmp_path, "train.epochs=1", f"model.weights={tiny_checkpoint}",
                        "finetune.freeze=backbone"), splits=fashion_tiny)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.run()
    after = t.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}  # BatchNorm statistics frozen too


def test_layer_decay_and_head_multiplier():
    cfg = load_config(None, ["optim.lr=1.0", "optim.layer_decay=0.5", "optim.head_lr_mult=3"])
    m = create_model("cnn_s", num_classes=10, in_channels=1, image_size=28)
    lrs = {g["name"]: g["lr"] for g in param_groups(m, cfg.optim, [])}
    assert lrs == {"head": 3.0, "stage2": 0.5, "stage1": 0.25, "stage0": 0.125}
    n_params = sum(len(g["params"]) for g in param_groups(m, cfg.optim, []))
    assert n_params == len(list(m.parameters()))


def test_grad_accumulation_counts_optimizer_steps(tmp_path, fashion_tiny):
    r = fit(cfg_for(tmp_path, "train.epochs=1", "train.grad_accum=2", "data.batch_size=64"),
            splits=fashion_tiny)
    assert r.metrics["step"] == 5  # 10 micro-batches of 64 / 2


def test_finetune_with_new_head_on_other_dataset(tmp_path, tiny_checkpoint):
    r = fit(cfg_for(tmp_path, "data.name=mnist-5k", "train.epochs=1", "data.limit=1000",
                    f"model.weights={tiny_checkpoint}", "finetune.new_head=true",
                    "finetune.freeze=1", "optim.layer_decay=0.7", "optim.lr=0.01",
                    "data.batch_size=32", "sched.name=none"))
    assert r.metrics["test_acc"] > 0.4


@pytest.mark.parametrize("sched", ["cosine", "step", "onecycle", "none"])
def test_schedules_warm_up_and_decay(sched):
    from edgekt.engine.optim import build_optimizer, build_scheduler

    cfg = load_config(None, [f"sched.name={sched}", "sched.warmup_epochs=1", "sched.step_size=2",
                             "optim.lr=1.0", "optim.name=sgd"])
    m = create_model("cnn_xs", num_classes=10, in_channels=1, image_size=28)
    opt = build_optimizer(param_groups(m, cfg.optim, []), cfg.optim)
    s = build_scheduler(opt, cfg.sched, steps_per_epoch=10, epochs=4)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs[0] < 0.2 and max(lrs) == pytest.approx(1.0, rel=0.05)  # warm-up to the base lr
    if sched != "none":
        assert lrs[-1] < 0.2  # decayed by the end
    else:
        assert lrs[-1] == pytest.approx(1.0)
