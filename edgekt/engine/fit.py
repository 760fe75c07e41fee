"""The one training loop. Methods change the task object, never this loop."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.optim.swa_utils import AveragedModel

import edgekt
from edgekt.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from edgekt.config import Config, dump_config
from edgekt.data import BatchLoader, Splits, build_splits, make_loader
from edgekt.engine.guard import param_norm, rescale_lr, weights_problem
from edgekt.engine.metrics import MetricsLog
from edgekt.engine.optim import build_optimizer, build_scheduler, param_groups
from edgekt.engine.runtime import Runtime, setup_runtime, teardown_runtime
from edgekt.engine.setup import (
    build_model,
    info_record,
    model_record,
    set_train_mode,
    to_device,
)
from edgekt.engine.tasks import StepModule, Task, check_method_args, get_method
from edgekt.errors import EdgektError
from edgekt.io import atomic_write_text, check_writable
from edgekt.models import EdgeNet, count_params

console = Console(stderr=True)


@dataclass
class FitResult:
    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, rt: Runtime) -> dict[str, float]:
    """Loss and top-1 accuracy over a loader (summed across ranks under DDP)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss sum, correct, count
    for batch in loader:
        x, y = batch[0].to(rt.device, non_blocking=True), batch[1].to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(x)
        totals[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(y)
    if rt.distributed:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    n = max(totals[2].item(), 1.0)
    return {"loss": totals[0].item() / n, "acc": totals[1].item() / n}


def ema_update(decay: float):
    """EMA step for ``AveragedModel`` with the usual warm-up: the effective decay is
    ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so a short run is not dominated by
    the random initial weights. Integer buffers (BatchNorm counters) are copied."""

    @torch.no_grad()
    def update(ema: list[torch.Tensor], cur: list[torch.Tensor], n: torch.Tensor) -> None:
        d = min(decay, (1.0 + n.item()) / (10.0 + n.item()))
        if torch.is_floating_point(ema[0]):
            torch._foreach_lerp_(ema, cur, 1.0 - d)
        else:
            torch._foreach_copy_(ema, cur)

    return update


class Trainer:
    """Holds the objects of one run; ``run()`` is the explicit loop."""

    def __init__(self, cfg: Config, *, resume: bool = False, force: bool = False,
                 splits: Splits | None = None) -> None:
        self.cfg = cfg
        check_method_args(cfg)  # before any data or model is built
        self.run_dir = check_writable(cfg.run.dir, "run.dir", directory=True)  # before the data
        self.rt = setup_runtime(cfg.train)
        last = self.run_dir / "last.pt"
        if last.exists() and not (resume or force):
            raise EdgektError(f"{self.run_dir} already holds a run: pass --resume to continue it, "
                              f"--force to start over, or set run.dir to a new directory")
        self.splits = splits or build_splits(cfg.data)
        info = self.splits.info
        self.model: EdgeNet = build_model(cfg.model, info, cfg.finetune)
        self.task: Task = get_method(cfg.method)(cfg, self.model, self.splits, self.rt.device)
        self.model = to_device(self.model, self.rt.device, cfg.train.channels_last)
        self.task.to(self.rt.device)
        self.train_loader = self.task.train_loader(make_loader(
            self.splits.train, info, cfg.data, train=True, seed=cfg.train.seed,
            rank=self.rt.rank, world=self.rt.world, with_index=self.task.needs_index))
        self.val_loader = make_loader(self.splits.val, info, cfg.data, train=False,
                                      rank=self.rt.rank, world=self.rt.world)
        self.steps_per_epoch = -(-len(self.train_loader) // cfg.train.grad_accum)
        task = self.task
        task.steps_per_epoch, task.total_steps = self.steps_per_epoch, \
            self.steps_per_epoch * cfg.train.epochs
        task.rank, task.world = self.rt.rank, self.rt.world
        groups = param_groups(self.model, cfg.optim, self.task.extra_parameters())
        self.opt = build_optimizer(groups, cfg.optim)
        self.sched = build_scheduler(self.opt, cfg.sched, self.steps_per_epoch, cfg.train.epochs)
        self.scaler = torch.amp.GradScaler(self.rt.device.type,
                                           enabled=self.rt.amp_dtype == torch.float16)
        self.ema = None
        if cfg.train.ema:
            # Averaged BatchNorm buffers too (use_buffers), so the EMA model evaluates as it is.
            self.ema = AveragedModel(self.model, multi_avg_fn=ema_update(cfg.train.ema),
                                     use_buffers=True)
        self.eval_model: EdgeNet = self.model if self.ema is None else self.ema.module
        fwd_model = torch.compile(self.model) if cfg.train.compile else self.model
        # DDP wraps the model *and* the task: methods may call any part of the model and own
        # trainable modules of their own; all of it is synchronised across ranks.
        self.stepper: nn.Module = StepModule(fwd_model, self.task)
        if self.rt.distributed:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            self.stepper = nn.parallel.DistributedDataParallel(
                self.stepper, device_ids=ids, find_unused_parameters=self.task.ddp_find_unused)
        self.epoch, self.batch, self.step = 0, 0, 0
        self.running = {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0}
        self.best_acc = -1.0
        self.log = MetricsLog(self.run_dir, cfg.train.tensorboard) if self.rt.is_main else None
        if self.rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        self.last_good: Path | None = None  # the newest checkpoint of this run known good
        if resume and last.exists():
            self._restore(load_checkpoint(last))
            self.last_good = last
        elif force and self.log is not None:
            self.log.truncate_after(-1)
        self.ref_norm = param_norm(self.model)

    # ---- checkpoints -------------------------------------------------------------------------
    def state(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "edgekt_version": edgekt.__version__,
            "model": model_record(self.cfg.model, self.splits.info, self.eval_model),
            **self._ema_state(),
            "data": info_record(self.splits.info),
            "config": self.cfg.model_dump(),
            "method": self.task.export_metadata(),
            "task": self.task.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "running": dict(self.running),
            "best_acc": self.best_acc,
            "rng": rng_state(),
            "metrics": metrics,
        }

    def _ema_state(self) -> dict[str, Any]:
        """With EMA, ``model`` holds the averaged weights (what users evaluate and export) and
        ``train_model`` the raw ones the optimiser continues from."""
        if self.ema is None:
            return {}
        return {"train_model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "ema_updates": int(self.ema.n_averaged.item())}

    def save(self, name: str, metrics: dict[str, Any]) -> None:
        problem = weights_problem(self.model, self.opt, self.ref_norm)
        if problem is not None:  # never overwrite a good checkpoint with diverged weights
            raise EdgektError(self._diverged(problem))
        if self.rt.is_main:
            save_checkpoint(self.run_dir / name, self.state(metrics))
        if name == "last.pt":
            self.last_good = self.run_dir / name
        self.ref_norm = param_norm(self.model)

    def _diverged(self, problem: str) -> str:
        where = f"epoch {self.epoch + 1}, batch {self.batch}, step {self.step}"
        if self.last_good is not None and self.last_good.exists():
            keep = (f"The last good checkpoint is {self.last_good} (finite, checked before it "
                    f"was written); continue from it with --resume, e.g. with a lower optim.lr "
                    f"(--set optim.lr=...).")
        else:
            keep = ("No checkpoint of this run was written before it diverged, so there is "
                    "nothing to resume: start over (with --force if run.dir holds an older run).")
        return (f"training diverged at {where}: {problem}. Lower optim.lr, set "
                f"train.clip_grad, or check the data. {keep}")

    def _restore(self, ck: dict[str, Any]) -> None:
        try:
            if self.ema is None:
                self.model.load_state_dict(ck["model"]["state_dict"])
            else:
                self.model.load_state_dict(ck["train_model"])
                self.ema.module.load_state_dict(ck["model"]["state_dict"])
                self.ema.n_averaged.fill_(ck["ema_updates"])
            self.task.load_state_dict(ck["task"])
            # A changed optim.lr (the usual answer to a divergence) wins over the saved one.
            saved_lr = ck.get("config", {}).get("optim", {}).get("lr") or self.cfg.optim.lr
            ratio = self.cfg.optim.lr / saved_lr
            self.opt.load_state_dict(rescale_lr(ck["optimizer"], ratio))
            self.sched.load_state_dict(rescale_lr(ck["scheduler"], ratio))
            self.scaler.load_state_dict(ck["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise EdgektError(f"{self.run_dir / 'last.pt'}: cannot resume: the checkpoint does "
                              f"not match this config ({str(exc)[:300]})") from None
        self.epoch, self.batch, self.step = ck["epoch"], ck["batch"], ck["step"]
        self.running, self.best_acc = dict(ck["running"]), ck["best_acc"]
        set_rng_state(ck["rng"])
        if self.log is not None:
            self.log.truncate_after(self.epoch - 1)
        if self.rt.is_main:
            console.print(f"resumed from {self.run_dir / 'last.pt'} at epoch {self.epoch + 1}, "
                          f"batch {self.batch}")

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, checkpoint_every: int = 0, stop_after_steps: int | None = None) -> FitResult:
        cfg, rt = self.cfg, self.rt
        accum = cfg.train.grad_accum
        n_batches = len(self.train_loader)
        progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.3f} "
                       "{task.fields[ips]:.0f} img/s"),
            TimeRemainingColumn(), console=console,
            disable=not (cfg.train.progress and rt.is_main),
        )
        metrics: dict[str, Any] = {}
        with progress:
            while self.epoch < cfg.train.epochs:
                self.train_loader.set_epoch(self.epoch)
                set_train_mode(self.model, cfg.finetune.freeze)
                bar = progress.add_task("train", total=n_batches, completed=self.batch,
                                        epoch=f"{self.epoch + 1}/{cfg.train.epochs}",
                                        loss=0.0, acc=0.0, ips=0.0)
                t0 = time.perf_counter() - self.running["time"]
                for batch in self.train_loader.iter_from(self.batch):
                    batch = tuple(t.to(rt.device, non_blocking=True) for t in batch)
                    boundary = (self.batch + 1) % accum == 0 or self.batch + 1 == n_batches
                    self._micro_step(batch, boundary)
                    self.batch += 1
                    r = self.running
                    if boundary and checkpoint_every and self.step % checkpoint_every == 0:
                        r["time"] = time.perf_counter() - t0
                        self.save("last.pt", metrics)
                    progress.update(bar, advance=1, loss=r["loss"] / max(r["seen"], 1),
                                    acc=r["correct"] / max(r["seen"], 1),
                                    ips=r["seen"] / max(time.perf_counter() - t0, 1e-9))
                    if stop_after_steps is not None and self.step >= stop_after_steps:
                        return FitResult(self.run_dir, metrics)
                progress.remove_task(bar)
                metrics = self._end_epoch(time.perf_counter() - t0)
        return self._finish(metrics)

    def _micro_step(self, batch: tuple, boundary: bool) -> None:
        cfg, rt = self.cfg, self.rt
        sync = boundary or not isinstance(self.stepper, nn.parallel.DistributedDataParallel)
        ctx = torch.enable_grad() if sync else self.stepper.no_sync()
        with ctx, rt.autocast():
            out = self.stepper(batch, self.step)
        loss = out.loss
        if not torch.isfinite(loss):
            terms = {k: float(v) for k, v in out.terms.items()}
            raise EdgektError(self._diverged(f"the loss became {loss.item()} (terms: {terms})"))
        self.scaler.scale(loss / cfg.train.grad_accum).backward()
        r = self.running
        n = len(out.targets)
        r["loss"] += loss.detach().item() * n
        r["correct"] += int((out.logits.detach().argmax(1) == out.targets).sum())
        r["seen"] += n
        if boundary:
            if cfg.train.clip_grad:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(
                    [p for g in self.opt.param_groups for p in g["params"]], cfg.train.clip_grad
                )
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.step += 1

    def _end_epoch(self, seconds: float) -> dict[str, Any]:
        r = self.running
        val = evaluate(self.eval_model, self.val_loader, self.rt)
        val.update(self.task.extra_metrics(self.eval_model, "val"))  # may override loss/acc
        row = {
            "epoch": self.epoch + 1, "step": self.step,
            "train_loss": r["loss"] / max(r["seen"], 1),
            "train_acc": r["correct"] / max(r["seen"], 1),
            "val_loss": val["loss"], "val_acc": val["acc"],
            "lr": self.opt.param_groups[0]["lr"],
            "epoch_seconds": seconds,
            "images_per_s": r["seen"] * self.rt.world / max(seconds, 1e-9),
        }
        row.update({f"val_{k}": v for k, v in val.items() if k not in ("loss", "acc")})
        if self.rt.is_main:
            console.print(
                f"epoch {row['epoch']}/{self.cfg.train.epochs}  train_loss {row['train_loss']:.4f}"
                f"  train_acc {row['train_acc']:.4f}  val_acc {row['val_acc']:.4f}"
                f"  {row['images_per_s']:.0f} img/s  {seconds:.1f}s"
            )
            self.log.write(row)
        self.epoch += 1
        self.batch = 0
        self.running = {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0}
        improved = val["acc"] > self.best_acc
        self.best_acc = max(self.best_acc, val["acc"])
        self.save("last.pt", row)
        if improved:
            self.save("best.pt", row)
        return row

    def _finish(self, last_row: dict[str, Any]) -> FitResult:
        test_loader = make_loader(self.splits.test, self.splits.info, self.cfg.data, train=False,
                                  rank=self.rt.rank, world=self.rt.world)
        test = evaluate(self.eval_model, test_loader, self.rt)
        test.update(self.task.extra_metrics(self.eval_model, "test"))
        metrics = {**last_row, "test_loss": test["loss"], "test_acc": test["acc"],
                   "best_val_acc": self.best_acc, "params": count_params(self.model)}
        metrics.update({f"test_{k}": v for k, v in test.items() if k not in ("loss", "acc")})
        if self.rt.is_main:
            self.save("last.pt", metrics)
            atomic_write_text(self.run_dir / "summary.json", json.dumps(metrics, indent=2))
            console.print(f"test_acc {test['acc']:.4f}  (run dir: {self.run_dir})")
            self.log.close()
        teardown_runtime(self.rt)
        return FitResult(self.run_dir, metrics)


def fit(cfg: Config, *, resume: bool = False, force: bool = False,
        checkpoint_every: int = 0, splits: Splits | None = None) -> FitResult:
    """Train ``cfg.model`` with ``cfg.method``; write checkpoints and metrics to ``cfg.run.dir``.

    Args:
        resume: continue from ``run.dir/last.pt`` (exactly, in deterministic mode).
        force: overwrite an existing run directory's checkpoints.
        checkpoint_every: also save ``last.pt`` every N optimiser steps (0: each epoch only).
        splits: pre-built data (tests and benchmarks reuse one load).
    """
    if checkpoint_every < 0:
        raise EdgektError(f"--checkpoint-every must be >= 0 (got {checkpoint_every})")
    return Trainer(cfg, resume=resume, force=force, splits=splits).run(checkpoint_every)
