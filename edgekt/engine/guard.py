"""Divergence guard: never checkpoint weights that are non-finite or have just exploded.

A checkpoint is "good" when every floating-point tensor of the model (parameters and buffers
such as BatchNorm statistics) and of the optimiser state is finite, and the parameters' global
L2 norm is at most ``GROWTH_LIMIT`` times the norm at the previous good checkpoint (or at the
start of the run). Why a growth limit: a run can blow its weights up to huge but finite values
a few steps before the loss turns NaN; a finite check alone would save them as "good". Healthy
training changes the global norm slowly: on the tiny Fashion-MNIST runs of the test suite it
moves by well under 2x per epoch (weight decay and normalisation keep it in check), while an
exploding step multiplies it by orders of magnitude. 100x leaves ample room for the first and
the fastest-growing healthy epochs and still refuses every explosion we provoked.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

GROWTH_LIMIT = 100.0
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr", "base_lrs", "_last_lr")


@torch.no_grad()
def param_norm(model: nn.Module) -> float:
    """Global L2 norm of the model's parameters (float64, so huge weights do not overflow)."""
    total = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
    return math.sqrt(total)


@torch.no_grad()
def weights_problem(model: nn.Module, opt: torch.optim.Optimizer, ref_norm: float | None,
                    ) -> str | None:
    """Why the current weights must not be checkpointed, or None when they are good."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return f"the model's {name} holds NaN/inf values"
    for group in opt.param_groups:  # also the method's own parameters (bridges, heads)
        for p in group["params"]:
            if not torch.isfinite(p).all():
                return f"a parameter of shape {tuple(p.shape)} holds NaN/inf values"
    for key, state in opt.state.items():
        for sub, t in state.items():
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                shape = tuple(key.shape) if torch.is_tensor(key) else "?"
                return f"the optimiser's {sub} (parameter of shape {shape}) holds NaN/inf values"
    norm = param_norm(model)
    if not math.isfinite(norm):
        return "the weights' norm overflowed"
    if ref_norm and norm > GROWTH_LIMIT * ref_norm:
        return (f"the weights exploded: their norm grew {norm / ref_norm:.3g}x (from "
                f"{ref_norm:.4g} to {norm:.4g}; the guard refuses more than {GROWTH_LIMIT:g}x "
                "between checkpoints)")
    return None


def rescale_lr(state: Any, ratio: float) -> Any:
    """Multiply every learning rate in an optimiser or scheduler state dict by ``ratio``.

    Used on ``--resume`` with a changed ``optim.lr`` (the usual answer to a divergence): the
    saved state would otherwise bring the old learning rate back.
    """
    if isinstance(state, dict):
        return {k: (_scale(v, ratio) if k in _LR_KEYS else rescale_lr(v, ratio))
                for k, v in state.items()}
    if isinstance(state, list):
        return [rescale_lr(v, ratio) for v in state]
    return state


def _scale(value: Any, ratio: float) -> Any:
    if isinstance(value, list):
        return [_scale(v, ratio) for v in value]
    if isinstance(value, float | int) and not isinstance(value, bool):
        return value * ratio
    if torch.is_tensor(value):
        return value * ratio
    return value
