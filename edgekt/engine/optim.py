"""Optimiser with per-layer learning rates, and warm-up + cosine/step/one-cycle schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from edgekt.config import OptimConfig, SchedConfig
from edgekt.models.base import EdgeNet


def param_groups(model: EdgeNet, cfg: OptimConfig, extra: list[nn.Parameter]) -> list[dict]:
    """Group trainable parameters by depth: with ``layer_decay`` d, backbone stage k of L gets
    ``lr * d**(L-k)``, parameters outside the stages (the stem) ``lr * d**(L+1)``; the head
    gets ``lr * head_lr_mult``; method parameters (adapters, ...) the base lr."""
    decay = cfg.layer_decay or 1.0
    stages = model.stages()
    n = len(stages)
    seen: set[int] = set()
    groups: list[dict] = []

    def add(params, mult: float, name: str) -> None:
        ps = [p for p in params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in ps)
        if ps:
            groups.append({"params": ps, "lr": cfg.lr * mult, "name": name})

    add(model.head.parameters(), cfg.head_lr_mult, "head")
    for k in reversed(range(n)):
        add(stages[k].parameters(), decay ** (n - k), f"stage{k}")
    add(model.parameters(), decay ** (n + 1), "stem")
    add(extra, 1.0, "method")
    return groups


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: SchedConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-optimiser-step schedule (so resuming mid-epoch lands on the right learning rate)."""
    total = max(1, steps_per_epoch * epochs)
    warm = min(total - 1, int(cfg.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler
    if cfg.name == "onecycle":
        max_lr = [g["lr"] for g in opt.param_groups]
        return sched.OneCycleLR(opt, max_lr=max_lr, total_steps=total,
                                pct_start=max(warm / total, 0.05))
    if cfg.name == "cosine":
        span, r = total - warm, cfg.min_lr_ratio
        main = sched.LambdaLR(
            opt, lambda s: r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(s, span) / span))
        )
    elif cfg.name == "step":
        main = sched.StepLR(opt, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.gamma)
    else:
        main = sched.ConstantLR(opt, factor=1.0, total_iters=0)
    if warm == 0:
        return main
    return sched.SequentialLR(
        opt, [sched.LinearLR(opt, start_factor=0.01, total_iters=warm), main], milestones=[warm]
    )
