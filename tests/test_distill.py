"""The distill method wired into the engine: teacher handling, taps, adapters, cache, bad input,
exact resume and the ``edgekt distill`` command, on real Fashion-MNIST slices."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgekt.checkpoint import load_checkpoint, save_checkpoint
from edgekt.config import load_config
from edgekt.data import Splits
from edgekt.distill.task import DistillTask
from edgekt.engine import Trainer, fit
from edgekt.errors import EdgektError

torch.set_num_threads(1)
SMALL = ["train.progress=false", "train.threads=1", "data.batch_size=32", "optim.lr=0.005",
         "sched.name=none"]


@pytest.fixture(scope="module")
def small(fashion_splits) -> Splits:
    """256 training images: every test here trains for a handful of steps."""
    tr = fashion_splits.train
    keep = torch.arange(256)
    test = fashion_splits.test.subset(torch.arange(512))
    return Splits(tr.subset(keep), fashion_splits.val.subset(torch.arange(256)), test,
                  fashion_splits.info)


def make_cfg(tmp_path: Path, teacher: dict, losses: list[dict], *extra: str, **method_args):
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", "model.name=cnn_s", "method=distill",
                             "train.epochs=1", *SMALL, *extra])
    cfg.method_args = {"teacher": teacher, "losses": losses,
                       "cache_dir": str(tmp_path / "cache"), **method_args}
    return cfg


def make_task(cfg, splits) -> tuple[DistillTask, torch.nn.Module]:
    from edgekt.engine.setup import build_model

    model = build_model(cfg.model, splits.info)
    return DistillTask(cfg, model, splits, torch.device("cpu")), model


def first_batch(task: DistillTask, cfg, splits) -> tuple:
    from edgekt.data import make_loader

    loader = make_loader(splits.train, splits.info, cfg.data, train=True,
                         with_index=task.needs_index)
    return next(iter(loader))


def all_tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from all_tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from all_tensors(v, f"{prefix}[{i}]")


# ---- wiring -------------------------------------------------------------------------------------
def test_task_wiring_teacher_frozen_and_out_of_state(tmp_path, tiny_checkpoint, small):
    losses = [{"name": "hinton_kd"}, {"name": "fitnets", "student": "stage3", "teacher": "stage3"},
              {"name": "attention", "student": "stage2", "teacher": "stage2", "weight": 100},
              {"name": "rkd"}, {"name": "pkt"}, {"name": "dist"}, {"name": "dkd"},
              {"name": "crd", "nce_k": 64}]
    cfg = make_cfg(tmp_path, {"checkpoint": str(tiny_checkpoint)}, losses)
    task, model = make_task(cfg, small)
    assert task.needs_index and task.cache is not None  # no augmentation: cached teacher
    # cnn_s stage3 has 64 channels, the cnn_xs teacher 32: an adapter bridges them
    assert any(k.startswith("terms.1.bridge.proj.0.weight") for k in task.state_dict())
    assert task.terms[2].bridge is None  # attention needs no adapter
    assert not any("teacher" in k for k in task.state_dict())
    assert all(not p.requires_grad for p in task.teacher.parameters())
    task.train()
    assert not task.teacher.training
    out = task.training_step(model, first_batch(task, cfg, small), step=0)
    assert set(out.terms) == {"ce", "hinton_kd", "fitnets", "attention", "rkd", "pkt", "dist",
                              "dkd", "crd"}
    assert all(torch.isfinite(v) for v in out.terms.values())
    out.loss.backward()
    assert model.stage1[0][0].weight.grad.abs().sum() > 0
    assert task.terms[1].bridge.proj[0].weight.grad.abs().sum() > 0
    assert task.terms[7].bridge.embed_t.weight.grad is not None  # CRD trains both projections
    assert all(p.grad is None for p in task.teacher.parameters())
    meta = task.export_metadata()
    assert meta["teacher"]["sha256"] and meta["teacher"]["model"] == "cnn_xs"
    assert [t["name"] for t in meta["losses"]][:2] == ["hinton_kd", "fitnets"]


def test_cache_matches_online_teacher_and_is_reused(tmp_path, tiny_checkpoint, small):
    teacher = {"checkpoint": str(tiny_checkpoint)}
    losses = [{"name": "hinton_kd"}, {"name": "attention"}]
    task, _ = make_task(make_cfg(tmp_path, teacher, losses), small)
    online, _ = make_task(make_cfg(tmp_path, teacher, losses, cache="off"), small)
    assert online.cache is None and not online.needs_index
    x, _, pos = first_batch(task, make_cfg(tmp_path, teacher, losses), small)
    cached = task.cache.lookup(pos, x.device)
    fresh = online.teacher_outputs(x)
    assert set(cached) == set(fresh) == {"logits", "stage3"}
    for k in fresh:
        torch.testing.assert_close(cached[k], fresh[k], rtol=1e-4, atol=1e-5)
    entries = list((tmp_path / "cache").iterdir())
    mtime = (entries[0] / "0.npy").stat().st_mtime_ns
    again, _ = make_task(make_cfg(tmp_path, teacher, losses), small)
    assert again.cache_key == task.cache_key
    assert (entries[0] / "0.npy").stat().st_mtime_ns == mtime  # reused, not recomputed
    other, _ = make_task(make_cfg(tmp_path, teacher, [{"name": "hinton_kd"}]), small)
    assert other.cache_key != task.cache_key  # other taps, other entry
    # a damaged entry is rebuilt rather than trusted
    (entries[0] / "meta.json").write_text("{")
    rebuilt, _ = make_task(make_cfg(tmp_path, teacher, losses), small)
    assert rebuilt.cache is not None and (entries[0] / "meta.json").read_text().startswith("{\"")


def test_augmentation_turns_the_cache_off(tmp_path, tiny_checkpoint, small):
    teacher, losses = {"checkpoint": str(tiny_checkpoint)}, [{"name": "hinton_kd"}]
    task, _ = make_task(make_cfg(tmp_path, teacher, losses, "data.augment=true"), small)
    assert task.cache is None and not task.needs_index
    with pytest.raises(EdgektError, match="data.augment: false"):
        make_task(make_cfg(tmp_path, teacher, losses, "data.augment=true", cache="on"), small)


def test_teacher_from_model_name_and_weights(tmp_path, tiny_checkpoint, small):
    cfg = make_cfg(tmp_path, {"model": "cnn_xs", "weights": str(tiny_checkpoint)},
                   [{"name": "hinton_kd"}])
    task, _ = make_task(cfg, small)
    ref = load_checkpoint(tiny_checkpoint)["model"]["state_dict"]
    torch.testing.assert_close(task.teacher.state_dict()["head.weight"], ref["head.weight"])
    assert task.export_metadata()["teacher"]["source"] == "weights"


# ---- bad input ----------------------------------------------------------------------------------
def bad(tmp_path, small, teacher, losses, match, **kw):
    cfg = make_cfg(tmp_path, teacher, losses, **kw)
    with pytest.raises(EdgektError, match=match):
        Trainer(cfg, splits=small)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_class_count_mismatch(tmp_path, tiny_checkpoint, small):
    ck = load_checkpoint(tiny_checkpoint)
    sd = ck["model"]["state_dict"]
    sd["head.weight"], sd["head.bias"] = sd["head.weight"][:5], sd["head.bias"][:5]
    ck["model"]["num_classes"] = 5
    ck["data"] = {**ck["data"], "num_classes": 5, "labels": ck["data"]["labels"][:5]}
    five = tmp_path / "five.pt"
    save_checkpoint(five, ck)
    bad(tmp_path, small, {"checkpoint": str(five)}, [{"name": "hinton_kd"}],
        "predicts 5 classes but the student's data .* has 10")
    bad(tmp_path, small, {"model": "cnn_xs", "weights": str(five)}, [{"name": "hinton_kd"}],
        "another class count")


def test_unknown_tap_lists_available_names(tmp_path, tiny_checkpoint, small):
    teacher = {"checkpoint": str(tiny_checkpoint)}
    with pytest.raises(EdgektError) as err:
        Trainer(make_cfg(tmp_path, teacher, [{"name": "fitnets", "student": "stage9",
                                              "teacher": "stage3"}]), splits=small)
    msg = str(err.value)
    assert "student has no layer 'stage9'" in msg and "did you mean" in msg
    assert all(n in msg for n in ("embedding", "logits", "stage2", "stage3.1.0", "head"))
    bad(tmp_path, small, teacher, [{"name": "attention", "teacher": "layer4"}],
        "teacher has no layer 'layer4'")


def test_unbridgeable_shapes_and_bad_options(tmp_path, tiny_checkpoint, small):
    teacher = {"checkpoint": str(tiny_checkpoint)}
    bad(tmp_path, small, teacher, [{"name": "fitnets", "student": "stage3",
                                    "teacher": "embedding"}], "no adapter bridges")
    bad(tmp_path, small, teacher, [{"name": "attention", "student": "embedding",
                                    "teacher": "embedding"}], "needs feature maps")
    bad(tmp_path, small, teacher, [{"name": "hinton_kd", "student": "embedding"}],
        "a logit loss needs matching class scores")
    bad(tmp_path, small, teacher, [{"name": "hinton_kd", "temprature": 2}],
        "did you mean 'temperature'")
    bad(tmp_path, small, teacher, [{"name": "kd"}], "unknown KD loss 'kd'")
    bad(tmp_path, small, {"checkpoint": str(tiny_checkpoint), "model": "cnn_xs"},
        [{"name": "hinton_kd"}], "exactly one of teacher.checkpoint or teacher.model")


def test_corrupt_or_code_holding_teacher(tmp_path, tiny_checkpoint, small):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    bad(tmp_path, small, {"checkpoint": str(corrupt)}, [{"name": "hinton_kd"}],
        "corrupt or truncated")
    code = tmp_path / "code.pt"
    torch.save({"model": argparse.Namespace(payload="print('pwned')")}, code)
    bad(tmp_path, small, {"checkpoint": str(code)}, [{"name": "hinton_kd"}], "refused to load")
    bad(tmp_path, small, {"model": "cnn_xs", "weights": str(code)}, [{"name": "hinton_kd"}],
        "refused to load")
    bad(tmp_path, small, {"checkpoint": str(tmp_path / "missing.pt")}, [{"name": "hinton_kd"}],
        "no such file")


# ---- exact resume -------------------------------------------------------------------------------
def test_resume_matches_uninterrupted_run_including_kd_state(tmp_path, tiny_checkpoint, small):
    losses = [{"name": "crd", "nce_k": 32, "weight": 0.5},
              {"name": "fitnets", "student": "stage2", "teacher": "stage2"},
              {"name": "dkd", "warmup_epochs": 1, "beta": 2.0}]
    teacher = {"checkpoint": str(tiny_checkpoint)}
    extra = ("train.epochs=2", "train.deterministic=true")
    full = make_cfg(tmp_path / "a", teacher, losses, *extra)
    fit(full, splits=small)
    part = make_cfg(tmp_path / "b", teacher, losses, *extra)
    Trainer(part, splits=small).run(checkpoint_every=3, stop_after_steps=3)
    mid = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert mid["step"] == 3 and not torch.isnan(mid["task"]["terms.0.bridge.log_z"]).any()
    Trainer(part, resume=True, splits=small).run()
    a = load_checkpoint(tmp_path / "a" / "run" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert a["step"] == b["step"] == 16
    for section in ("model", "task"):
        sa = a[section]["state_dict"] if section == "model" else a[section]
        sb = b[section]["state_dict"] if section == "model" else b[section]
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    assert "terms.0.bridge.memory_s" in a["task"] and "terms.1.bridge.proj.0.weight" in a["task"]


# ---- the command -------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_end_to_end_writes_student_only_checkpoint(tmp_path, tiny_checkpoint, monkeypatch,
                                                        capsys):
    cfg = tmp_path / "distill.yaml"
    cfg.write_text(
        "method: distill\n"
        "method_args:\n"
        f"  teacher: {{checkpoint: {tiny_checkpoint}}}\n"
        "  losses:\n"
        "    - {name: hinton_kd, temperature: 4}\n"
        "    - {name: fitnets, student: stage3, teacher: stage3}\n"
        f"  cache_dir: {tmp_path / 'cache'}\n"
        "model: {name: cnn_s}\n"
        "data: {batch_size: 64, val_fraction: 0.02}\n"
        "train: {epochs: 3, progress: false, threads: 1}\n"
    )
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "edgekt.cli.app", "distill", str(cfg), "--limit", "300",
           "--run-dir", str(run), "--set", "optim.lr=0.005"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "student is" in proc.stdout
    for name in ("last.pt", "best.pt", "summary.json", "config.yaml", "metrics.jsonl"):
        assert (run / name).is_file(), name
    ck = load_checkpoint(run / "last.pt")
    assert ck["model"]["name"] == "cnn_s" and ck["method"]["method"] == "distill"
    assert ck["method"]["teacher"]["sha256"] and ck["metrics"]["test_acc"] > 0.3  # chance: 0.1
    assert all(k.startswith("terms.") for k in ck["task"])
    teacher_sd = load_checkpoint(tiny_checkpoint)["model"]["state_dict"]
    stored = list(all_tensors({k: v for k, v in ck.items() if k != "rng"}))
    for name, tensor in teacher_sd.items():
        if tensor.numel() > 1 and tensor.is_floating_point():
            assert not any(s.shape == tensor.shape and torch.equal(s, tensor) for _, s in stored), \
                f"teacher tensor {name} found in the student checkpoint"
    # a second run into the same directory refuses without --resume/--force (exit code 2)
    from edgekt.cli.app import main

    monkeypatch.setattr(sys, "argv", ["edgekt", *cmd[3:]])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "--resume" in capsys.readouterr().err


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
torch.set_num_threads(1)
from edgekt.config import load_config
from edgekt.engine import Trainer
teacher, run, cache = sys.argv[1:4]
cfg = load_config(None, [f"run.dir={run}", "model.name=cnn_s", "method=distill", "train.epochs=1",
                         "train.progress=false", "data.limit=256", "data.batch_size=32",
                         "train.device=cpu"])
cfg.method_args = {"teacher": {"checkpoint": teacher}, "cache_dir": cache,
                   "losses": [{"name": "crd", "nce_k": 32},
                              {"name": "fitnets", "student": "stage3", "teacher": "stage3"}]}
trainer = Trainer(cfg, force=True)
trainer.run(stop_after_steps=3)
task = trainer.task
vec = torch.cat([p.detach().flatten() for p in task.parameters()]
                + [b.flatten() for n, b in task.named_buffers() if "memory" in n or "log_z" in n])
out = [torch.empty_like(vec) for _ in range(2)]
dist.all_gather(out, vec)
if dist.get_rank() == 0:
    print("KD_STATE_EQUAL", torch.equal(out[0], out[1]))
"""


@pytest.mark.slow
def test_ddp_keeps_adapters_and_memory_bank_identical_across_ranks(tmp_path, tiny_checkpoint):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script),
           str(tiny_checkpoint), str(tmp_path / "run"), str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "KD_STATE_EQUAL True" in proc.stdout
