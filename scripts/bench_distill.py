"""Distillation benchmark on real Fashion-MNIST.

1. Accuracy: a teacher (or an ensemble), a student from scratch and a student per KD method,
   same epochs, seeds and augmentation; test accuracy mean +- std and the gain over the scratch
   run of the same seed (mean +- std), parameters, CPU time.
2. Transfer: a fraction of the labels; scratch on those vs KD that also learns from the teacher
   on the whole training split with its labels ignored (same optimiser steps).
3. Throughput of one distillation epoch (Hinton KD): ``edgekt`` (the engine's ``fit`` loop)
   vs a minimal hand-written KD loop on the same models and batches, with vs without the
   teacher-output cache, and vs torchdistill's DistillationBox when torchdistill is installed.

    python scripts/bench_distill.py --quick            # about 5-10 min on 2 CPU cores
    python scripts/bench_distill.py --teacher-checkpoint runs/teacher_fashion/best.pt --jobs 2 \
        --epochs 20 --out bench.json                   # the README's tables (hours on a CPU)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from edgekt.checkpoint import load_checkpoint
from edgekt.config import Config, DataConfig, load_config
from edgekt.data import Splits, build_splits, make_loader
from edgekt.distill.losses import KD_LOSSES
from edgekt.engine import Trainer, fit
from edgekt.engine.setup import build_model, model_from_checkpoint
from edgekt.io import atomic_write_text
from edgekt.models import count_params

console = Console(width=max(Console().width, 120))  # keep table rows on one line in logs

# Per-method KD terms, as in edgekt/configs/distill_*.yaml.
METHODS: dict[str, list[dict[str, Any]]] = {
    "hinton_kd": [{"name": "hinton_kd", "temperature": 4.0}],
    "dkd": [{"name": "dkd", "alpha": 1.0, "beta": 2.0, "temperature": 4.0, "warmup_epochs": 1}],
    "dist": [{"name": "dist", "temperature": 4.0}],
    "fitnets": [{"name": "fitnets", "student": "stage2", "teacher": "stage2"},
                {"name": "hinton_kd", "temperature": 4.0}],
    "attention": [{"name": "attention", "weight": 500.0, "student": "stage2", "teacher": "stage2"},
                  {"name": "attention", "weight": 500.0, "student": "stage3", "teacher": "stage3"},
                  {"name": "hinton_kd", "temperature": 4.0}],
    "rkd": [{"name": "rkd"}],
    "pkt": [{"name": "pkt", "weight": 10.0}],
    "crd": [{"name": "crd", "weight": 0.8, "nce_k": 4096},
            {"name": "hinton_kd", "temperature": 4.0}],
}


def make_cfg(run: Path, model: str, kwargs: dict, epochs: int, seed: int, args,
             method_args: dict | None = None) -> Config:
    """One run of the benchmark: scratch and KD students share everything but the method."""
    cfg = load_config(None, [f"run.dir={run}", f"model.name={model}", f"train.epochs={epochs}",
                             f"train.seed={seed}", "train.progress=false",
                             f"train.threads={args.threads}", f"optim.name={args.optim}",
                             f"optim.lr={args.lr}", f"optim.weight_decay={args.weight_decay}",
                             "sched.name=cosine", "sched.warmup_epochs=0.2",
                             f"data.batch_size={args.batch_size}",
                             f"data.augment={str(args.augment).lower()}",
                             f"data.erasing={args.erasing if args.augment else 0.0}"])
    cfg.model.kwargs = dict(kwargs)
    if method_args is not None:
        cfg.method, cfg.method_args = "distill", method_args
    return cfg


def timed_fit(cfg: Config, splits: Splits) -> dict[str, Any]:
    c0, w0 = time.process_time(), time.perf_counter()
    metrics = fit(cfg, splits=splits, force=True).metrics
    return {**metrics, "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0}


_SPLITS: dict[str, Splits] = {}


def run_job(cfg: Config, data: DataConfig) -> dict[str, Any]:
    """One training run, resumable: a finished run with the same config is read back, an
    interrupted one continues from its ``last.pt``. Runs in a worker process with ``--jobs``."""
    torch.set_num_threads(cfg.train.threads)
    run = Path(cfg.run.dir)
    record = run / "bench_run.json"
    want = cfg.model_dump(mode="json")
    if record.exists():
        done = json.loads(record.read_text())
        if done["config"] == want:
            return {**done["metrics"], "train_s": train_seconds(run)}
    key = data.model_dump_json()
    if key not in _SPLITS:
        _SPLITS[key] = build_splits(data)
    # Resume only a run of this very config (a finished or partial run of another one is
    # started over, never continued).
    job = run / "bench_job.json"
    resume = (run / "last.pt").exists() and job.exists() and json.loads(job.read_text()) == want
    if not resume:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(job, json.dumps(want))
    c0, w0 = time.process_time(), time.perf_counter()
    metrics = fit(cfg, splits=_SPLITS[key], resume=resume, force=not resume).metrics
    metrics = {**metrics, "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0}
    atomic_write_text(record, json.dumps({"config": want, "metrics": metrics}, default=str))
    return {**metrics, "train_s": train_seconds(run)}


def train_seconds(run: Path) -> float:
    """Training wall time of a run over all its epochs, across resumes (``cpu_s`` and ``wall_s``
    cover only the last process): the sum of the last record of each epoch's seconds."""
    per_epoch: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "epoch_seconds" in rec:
            per_epoch[rec["epoch"]] = rec["epoch_seconds"]
    return sum(per_epoch.values())


def run_jobs(jobs: dict[str, tuple[Config, DataConfig]], workers: int) -> dict[str, dict]:
    """Run independent training jobs, ``workers`` at a time (each with ``train.threads``)."""
    if workers <= 1:
        return {k: run_job(*v) for k, v in jobs.items()}
    out: dict[str, dict] = {}
    ctx = multiprocessing.get_context("spawn")  # no forked OpenMP state
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futs = {pool.submit(run_job, *v): k for k, v in jobs.items()}
        for fut in as_completed(futs):
            out[futs[fut]] = fut.result()
            m = out[futs[fut]]
            console.print(f"done {futs[fut]}: test acc {m['test_acc']:.4f} "
                          f"({m['wall_s'] / 60:.1f} min)")
    return out


def teacher_spec(args, work: Path, splits: Splits) -> tuple[Any, dict[str, Any]]:
    """The teacher (a checkpoint, an ensemble of checkpoints, or one trained here) and its row."""
    if args.teacher_checkpoint:  # trained elsewhere (e.g. edgekt/configs/teacher_fashion.yaml)
        cks = [load_checkpoint(p) for p in args.teacher_checkpoint]
        params = sum(count_params(model_from_checkpoint(ck)[0]) for ck in cks)
        spec = [{"checkpoint": p} for p in args.teacher_checkpoint]
        names = [ck["model"]["name"] for ck in cks]
        acc = [ensemble_test_acc([p], splits) for p in args.teacher_checkpoint]
        if len(cks) > 1:
            acc.append(ensemble_test_acc(args.teacher_checkpoint, splits))
        console.print(f"[bold]teacher[/] {', '.join(args.teacher_checkpoint)} (test acc {acc})")
        return (spec if len(spec) > 1 else spec[0]), {
            "model": "+".join(names), "params": params, "test_acc": acc[-1],
            "member_test_acc": acc[:len(cks)], "cpu_s": None,
            "checkpoint": args.teacher_checkpoint}
    teacher_run = work / "teacher"
    console.print(f"[bold]teacher[/] {args.teacher} x {args.teacher_epochs} epochs")
    tm = timed_fit(make_cfg(teacher_run, args.teacher, {}, args.teacher_epochs, 0, args), splits)
    ckpt = str(teacher_run / "best.pt")
    args.teacher_checkpoint = [ckpt]  # later sections reuse this teacher
    return {"checkpoint": ckpt}, {"model": args.teacher, "params": tm["params"],
                                  "test_acc": tm["test_acc"], "cpu_s": tm["cpu_s"],
                                  "checkpoint": ckpt}


def ensemble_test_acc(paths: list[str], splits: Splits) -> float:
    """Test accuracy of the averaged logits of several checkpoints."""
    from edgekt.distill.teacher import TeacherConfig, load_teachers

    ens = load_teachers([TeacherConfig(checkpoint=p) for p in paths], splits.info).model
    loader = make_loader(splits.test, splits.info, DataConfig(), train=False)
    correct = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += int((ens(x).argmax(1) == y).sum())
    return correct / len(splits.test)


def kd_args(name: str, teacher: Any, args, work: Path) -> dict[str, Any]:
    losses = [{**t, "teacher": args.tap_map.get(t["teacher"], t["teacher"])}
              if "teacher" in t else t for t in METHODS[name]]
    margs = {"teacher": teacher, "losses": losses, "cache_dir": str(work / "cache"),
             "ce_weight": args.ce_weight}
    if args.mix != "none" and not KD_LOSSES.get(METHODS[name][0]["name"]).targets:
        margs.update(mix=args.mix, mix_alpha=args.mix_alpha)
    return margs


def accuracy_jobs(args, splits: Splits, work: Path, jobs: dict) -> dict[str, Any]:
    """Queue scratch and KD students per seed; return the section's plan."""
    teacher, trow = teacher_spec(args, work, splits)
    data = DataConfig(name="fashion-mnist", limit=args.limit)
    keys: dict[str, list[str]] = {"scratch": []}
    for seed in range(args.seeds):
        jobs[f"scratch{seed}"] = (make_cfg(work / f"scratch{seed}", args.student,
                                           args.student_kwargs, args.epochs, seed, args), data)
        keys["scratch"].append(f"scratch{seed}")
        for name in args.methods:
            if seed > 0 and name in args.single_seed_methods:
                continue
            cfg = make_cfg(work / f"{name}{seed}", args.student, args.student_kwargs, args.epochs,
                           seed, args, kd_args(name, teacher, args, work))
            jobs[f"{name}{seed}"] = (cfg, data)
            keys.setdefault(name, []).append(f"{name}{seed}")
    return {"teacher": trow, "keys": keys}


def transfer_jobs(args, splits: Splits, work: Path, jobs: dict) -> dict[str, Any]:
    """Few labels, many unlabelled images: scratch on the labelled fraction vs KD that also
    learns from the teacher on the whole training split with its labels ignored."""
    data = DataConfig(name="fashion-mnist", limit=args.limit, label_fraction=args.label_fraction)
    few = build_splits(data)
    teacher, trow = teacher_spec(args, work, splits)  # trained on all labels
    n_all = len(splits.train)
    # Same optimiser steps for both: one KD epoch is one pass over the transfer set.
    scratch_epochs = args.transfer_epochs * -(-n_all // args.batch_size) // max(
        1, -(-len(few.train) // args.batch_size))
    keys: dict[str, list[str]] = {"scratch": [], "hinton_kd": []}
    for seed in range(args.seeds):
        cfg = make_cfg(work / f"tscratch{seed}", args.student, args.student_kwargs,
                       scratch_epochs, seed, args)
        cfg.data.label_fraction = args.label_fraction
        jobs[f"tscratch{seed}"] = (cfg, data)
        keys["scratch"].append(f"tscratch{seed}")
        margs = {**kd_args("hinton_kd", teacher, args, work), "transfer": "fashion-mnist"}
        cfg = make_cfg(work / f"tkd{seed}", args.student, args.student_kwargs,
                       args.transfer_epochs, seed, args, margs)
        cfg.data.label_fraction = args.label_fraction
        if args.limit:
            cfg.data.limit = args.limit
        jobs[f"tkd{seed}"] = (cfg, data)
        keys["hinton_kd"].append(f"tkd{seed}")
    return {"teacher": trow, "labels": len(few.train), "unlabelled": n_all,
            "scratch_epochs": scratch_epochs, "kd_epochs": args.transfer_epochs, "keys": keys}


def section_table(plan: dict[str, Any], results: dict[str, dict]) -> dict[str, Any]:
    keys = plan.pop("keys")
    runs = {name: [results[k] for k in ks] for name, ks in keys.items()}
    return {**plan, "students": {k: summarise(v, runs["scratch"]) for k, v in runs.items()}}


def summarise(runs: list[dict], scratch: list[dict]) -> dict[str, Any]:
    """Mean ± std of test accuracy, and the gain over the scratch run of the same seed."""
    accs = [r["test_acc"] for r in runs]
    gains = [100 * (r["test_acc"] - s["test_acc"]) for r, s in zip(runs, scratch, strict=False)]
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return {"test_acc": accs, "mean": statistics.mean(accs), "std": sd,
            "gain_pt": gains, "gain_mean_pt": statistics.mean(gains),
            "gain_std_pt": statistics.stdev(gains) if len(gains) > 1 else 0.0,
            "params": runs[0]["params"], "cpu_s": statistics.mean(r["cpu_s"] for r in runs),
            "train_s": statistics.mean(r.get("train_s", r["wall_s"]) for r in runs)}


# ---- throughput --------------------------------------------------------------------------------
def edgekt_epoch(cfg: Config, splits: Splits) -> float:
    """Seconds of the training part of one epoch of the engine's loop (no evaluation)."""
    Trainer(cfg, force=True, splits=splits).run()
    return json.loads(Path(cfg.run.dir, "summary.json").read_text())["epoch_seconds"]


def hand_loop_epoch(teacher: torch.nn.Module, cfg: Config, splits: Splits) -> float:
    """The minimal KD loop a practitioner would write: same models, batches and optimiser."""
    torch.manual_seed(cfg.train.seed)
    student = build_model(cfg.model, splits.info).train()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr)
    loader = make_loader(splits.train, splits.info, cfg.data, train=True, seed=cfg.train.seed)
    t0 = time.perf_counter()
    for x, y in loader:
        with torch.no_grad():
            t_logits = teacher(x)
        logits = student(x)
        kd = F.kl_div(F.log_softmax(logits / 4, 1), F.log_softmax(t_logits / 4, 1),
                      reduction="batchmean", log_target=True) * 16
        loss = F.cross_entropy(logits, y) + kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def torchdistill_epoch(teacher: torch.nn.Module, cfg: Config, splits: Splits) -> float | str:
    """One epoch of torchdistill's DistillationBox (its own DataLoader) with its KDLoss."""
    try:
        from torchdistill.core.distillation import get_distillation_box
    except ImportError as exc:
        return f"not installed ({exc.__class__.__name__}); pip install torchdistill"
    torch.manual_seed(cfg.train.seed)
    student = build_model(cfg.model, splits.info)
    loader = make_loader(splits.train, splits.info, cfg.data, train=False)
    xs, ys = zip(*loader, strict=True)
    dataset = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    kd = {"key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                      "teacher_module_path": ".", "teacher_module_io": "output",
                                      "temperature": 4.0, "alpha": 0.5, "beta": 1.0}}
    model_cfg = {"forward_proc": "forward_batch_only", "sequential": [], "frozen_modules": [],
                 "forward_hook": {"input": [], "output": []}, "wrapper": None}
    train_config = {
        "num_epochs": 1,
        "train_data_loader": {"dataset_id": "train", "requires_supp": False,
                              "sampler": {"class_or_func": torch.utils.data.RandomSampler,
                                          "kwargs": {}},
                              "kwargs": {"batch_size": cfg.data.batch_size, "num_workers": 0}},
        "teacher": {**model_cfg, "requires_grad": False},
        "student": {**model_cfg, "requires_grad": True},
        "optimizer": {"key": "AdamW", "kwargs": {"lr": cfg.optim.lr}},
        "criterion": {"key": "WeightedSumLoss",
                      "kwargs": {"sub_terms": {"kd": {"criterion": kd, "weight": 1.0}}}},
    }
    box = get_distillation_box(teacher, student, {"train": dataset}, train_config,
                               torch.device("cpu"), None, False, 1.0)
    box.pre_epoch_process(epoch=0)
    t0 = time.perf_counter()
    for x, y in box.train_data_loader:
        loss = box.forward_process(x, y)
        box.post_forward_process(loss=loss)
    return time.perf_counter() - t0


def throughput(args, splits: Splits, work: Path) -> dict[str, Any]:
    # Small val/test splits: only the training part of the epoch is timed.
    few = torch.arange(256)
    splits = Splits(splits.train, splits.val.subset(few), splits.test.subset(few), splits.info)
    teacher_run = work / "tp_teacher"
    fit(make_cfg(teacher_run, args.tp_teacher, {}, 1, 0, args), splits=splits, force=True)
    ckpt = str(teacher_run / "last.pt")
    teacher, _ = model_from_checkpoint(load_checkpoint(ckpt))
    teacher.requires_grad_(False)
    margs = {"teacher": {"checkpoint": ckpt}, "losses": METHODS["hinton_kd"],
             "cache_dir": str(work / "tp_cache")}
    base = make_cfg(work / "tp_student", args.student, args.student_kwargs, 1, 0, args)
    base.sched.name = "none"
    online = base.model_copy(deep=True)
    online.method, online.method_args = "distill", {**margs, "cache": "off"}
    cached = online.model_copy(deep=True)
    cached.method_args = {**margs, "cache": "on"}
    Trainer(cached, force=True, splits=splits)  # builds the cache entry once, outside the timing
    n = len(splits.train)
    times: dict[str, list[float]] = {"hand": [], "edgekt": [], "edgekt_cache": [],
                                     "torchdistill": []}
    td_note = None
    for _ in range(args.repeats):  # interleaved, best of N: the machine is shared
        times["hand"].append(hand_loop_epoch(teacher, base, splits))
        times["edgekt"].append(edgekt_epoch(online, splits))
        times["edgekt_cache"].append(edgekt_epoch(cached, splits))
        td = torchdistill_epoch(teacher, base, splits)
        if isinstance(td, str):
            td_note = td
        else:
            times["torchdistill"].append(td)
    ips = {k: n / min(v) for k, v in times.items() if v}
    return {"teacher": args.tp_teacher, "student": args.student, "images": n,
            "batch_size": args.batch_size, "images_per_s": ips,
            "edgekt_vs_hand": ips["edgekt"] / ips["hand"],
            "cache_speedup": ips["edgekt_cache"] / ips["edgekt"],
            "edgekt_vs_torchdistill": (ips["edgekt"] / ips["torchdistill"]
                                       if "torchdistill" in ips else None),
            "torchdistill_note": td_note, "seconds": times}


# ---- report ------------------------------------------------------------------------------------
def print_tables(res: dict[str, Any]) -> None:
    st = res["settings"]
    for key, title in (("accuracy", f"Fashion-MNIST distillation, all labels ({st['epochs']} "
                                    f"epochs, {st['seeds']} seeds)"),
                       ("transfer", f"{st['label_fraction']:.0%} of the labels + the rest "
                                    f"unlabelled ({st['seeds']} seeds)")):
        if key in res:
            accuracy_rows(res[key], title)
    tp = res.get("throughput")
    if not tp:
        return
    tab = Table(title=f"KD epoch throughput ({tp['teacher']} -> {tp['student']}, "
                      f"{tp['images']} images, batch {tp['batch_size']}, best of "
                      f"{st['repeats']})")
    tab.add_column("loop")
    tab.add_column("images/s", justify="right")
    tab.add_column("vs hand loop", justify="right")
    for k, v in tp["images_per_s"].items():
        tab.add_row(k, f"{v:.0f}", f"{v / tp['images_per_s']['hand']:.2f}x")
    console.print(tab)
    if tp["torchdistill_note"]:
        console.print(f"torchdistill: {tp['torchdistill_note']}")


def accuracy_rows(acc: dict[str, Any], title: str) -> None:
    t = acc["teacher"]
    tab = Table(title=title)
    for col in ("model", "params", "% teacher", "test acc (mean ± std)",
                "gain vs scratch (pt, mean ± std)", "train s/run"):
        tab.add_column(col, justify="right" if col != "model" else "left")
    tab.add_row(f"teacher {t['model']}", f"{t['params']:,}", "100%", f"{t['test_acc']:.4f}", "",
                "trained elsewhere" if t["cpu_s"] is None else f"{t['cpu_s']:.0f}")
    for name, s in acc["students"].items():
        gain = "" if name == "scratch" else f"{s['gain_mean_pt']:+.2f} ± {s['gain_std_pt']:.2f}"
        tab.add_row(name, f"{s['params']:,}", f"{s['params'] / t['params']:.1%}",
                    f"{s['mean']:.4f} ± {s['std']:.4f}", gain, f"{s['train_s']:.0f}")
    console.print(tab)


def cpu_flags() -> list[str]:
    wanted = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted(wanted & set(text.split()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2,000 images, 1 seed, 1 epoch")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--work", help="keep runs (student checkpoints) here instead of a temp dir")
    p.add_argument("--teacher-checkpoint", nargs="+",
                   help="use this trained teacher (several: their ensemble) instead of training")
    p.add_argument("--tap-map", default="",
                   help="teacher tap renames for feature losses, e.g. "
                        "stage2=backbone.layer1,stage3=backbone.layer2 for a ResNet teacher")
    p.add_argument("--single-seed-methods", nargs="*", default=[],
                   help="methods run with seed 0 only (CPU budget); the others get --seeds")
    p.add_argument("--limit", type=int, default=None, help="training images (default: all)")
    p.add_argument("--teacher", default="cnn_l")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--student", default="cnn_s")
    p.add_argument("--student-width", type=float, default=1.0, help="student width_mult")
    p.add_argument("--tp-teacher", default="cnn_l", help="teacher of the throughput test")
    p.add_argument("--methods", nargs="*", default=["hinton_kd", "dkd"], choices=list(METHODS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optim", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--weight-decay", type=float, default=0.0005)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random crop/flip for scratch and KD alike (teacher sees the same view)")
    p.add_argument("--erasing", type=float, default=0.0, help="random erasing probability")
    p.add_argument("--ce-weight", type=float, default=1.0, help="label CE weight of KD runs")
    p.add_argument("--mix", default="none", choices=["none", "mixup", "cutmix", "both"],
                   help="function matching for the KD losses that take no hard labels")
    p.add_argument("--mix-alpha", type=float, default=1.0)
    p.add_argument("--sections", nargs="+", default=["accuracy", "transfer", "throughput"],
                   choices=["accuracy", "transfer", "throughput"])
    p.add_argument("--label-fraction", type=float, default=0.05,
                   help="labels kept in the transfer section")
    p.add_argument("--transfer-epochs", type=int, default=8,
                   help="KD epochs (passes over the unlabelled set) in the transfer section")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at once (processes); with --work, runs resume")
    p.add_argument("--out", default="bench_distill.json")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.seeds, args.teacher_epochs, args.repeats = 1, 1, 2, 1
        args.transfer_epochs = 1
        args.limit = args.limit or 2000
    args.student_kwargs = {"width_mult": args.student_width}
    args.tap_map = dict(kv.split("=", 1) for kv in args.tap_map.split(",") if kv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    splits = build_splits(DataConfig(name="fashion-mnist", limit=args.limit))
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as tmp:
        work = Path(args.work) if args.work else Path(tmp)  # --work keeps the checkpoints
        res: dict[str, Any] = {}
        jobs: dict[str, tuple[Config, DataConfig]] = {}
        plans = {}
        if "accuracy" in args.sections:
            plans["accuracy"] = accuracy_jobs(args, splits, work, jobs)
        if "transfer" in args.sections:
            plans["transfer"] = transfer_jobs(args, splits, work, jobs)
        results = run_jobs(jobs, args.jobs)
        res.update({name: section_table(plan, results) for name, plan in plans.items()})
        if "throughput" in args.sections:
            res["throughput"] = throughput(args, splits, work)
    res["settings"] = {k: v for k, v in vars(args).items()}
    res["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "cpu_flags": cpu_flags(),
                      "torch": torch.__version__, "loadavg_start": load0,
                      "loadavg_end": os.getloadavg()[0]}
    print_tables(res)
    Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    console.print(f"written {args.out} (load average {load0:.1f} -> {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
