"""``edgekt prune``: dependency-aware structured channel pruning of a checkpoint (torch-pruning).

torch-pruning (DepGraph, Fang et al., CVPR 2023) traces the model, groups the layers whose
channels must go together (a residual add, a depthwise conv and its BN) and removes whole groups
ranked by an importance criterion. We then record the new sizes as a plain rebuild recipe
(:mod:`edgekt.pruning.recipe`), check that the recipe rebuilds the same function, and only then
write the checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekt.errors import EdgektError
from edgekt.pruning import recipe
from edgekt.pruning.spec import (
    AUTO_STEM_BELOW,
    IMPORTANCES,
    PruneSpec,
    absolute_target,
    problems,
    target_mode,
)

# Finest step of the target-driven search: the pruner advances 1/TARGET_ROUNDS of the maximum
# ratio per round and stops as soon as the MACs/params target is met.
TARGET_ROUNDS = 50
MAX_RATIO = 0.95

__all__ = ["IMPORTANCES", "PruneSpec", "count", "prune_checkpoint", "prune_model"]


def _validate(spec: PruneSpec) -> str:
    found = problems(spec)
    if found:
        raise EdgektError("; ".join(found))
    return target_mode(spec)


def _importance(name: str) -> Any:
    import torch_pruning as tp

    return {"l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
            "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "taylor": lambda: tp.importance.GroupTaylorImportance(),
            "bn-scale": lambda: tp.importance.BNScaleImportance()}[name]()


def _first_conv(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def _stem_full_resolution(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether the first conv's output has the input's height (a stride-1 stem)."""
    seen: list[int] = []
    hook = _first_conv(model).register_forward_hook(lambda m, i, o: seen.append(o.shape[-2]))
    try:
        with torch.no_grad():
            model(example)
    finally:
        hook.remove()
    return bool(seen) and seen[0] == example.shape[-2]


def resolve_keep(model: nn.Module, example: torch.Tensor, spec: PruneSpec,
                 kept_fraction: float) -> list[str]:
    """``spec.keep`` with ``auto`` expanded (``kept_fraction``: the share of the model the
    target or ratio keeps)."""
    keep: list[str] = []
    for k in spec.keep:
        if k != "auto":
            keep.append(k)
            continue
        keep.append("head")
        if kept_fraction >= AUTO_STEM_BELOW or not _stem_full_resolution(model, example):
            keep.append("stem")
    return list(dict.fromkeys(keep))


def _kept_modules(model: nn.Module, keep: Sequence[str]) -> list[nn.Module]:
    mods = []
    for k in keep:
        if k == "stem":
            mods.append(_first_conv(model))
        elif k == "head":
            mods.append(model.head)
        else:
            try:
                mods.append(model.get_submodule(k))
            except AttributeError:
                raise EdgektError(f"--keep: the model has no module {k!r}") from None
    return mods


def count(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, params) per image, as torch-pruning counts them."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def prune_model(model: nn.Module, example: torch.Tensor, spec: PruneSpec,
                batches: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                recover: Callable[[nn.Module], None] | None = None) -> dict[str, Any]:
    """Prune ``model`` in place; return the record (MACs/params before and after, mode).

    ``recover(model)`` runs after every round when ``spec.recover_steps`` > 0 (prune-and-recover:
    the channels of the next round are ranked on the recovered weights).
    """
    import torch_pruning as tp

    mode = _validate(spec)
    if spec.recover_steps and recover is None:
        raise EdgektError("--recover-steps needs the unpruned model and its training images "
                          "(prune a checkpoint)")
    model.eval()
    macs0, params0 = count(model, example)
    goal = None
    if mode != "ratio":
        value = getattr(spec, mode)
        base = macs0 if mode == "target_macs" else params0
        goal = absolute_target(value, base)
        if goal >= base:
            what = "MACs" if mode == "target_macs" else "parameters"
            raise EdgektError(f"--{mode.replace('_', '-')} {value:g} is not below the model's "
                              f"{base:,} {what}: nothing to prune")
        kept = goal / base
    else:
        kept = (1.0 - spec.ratio) ** 2  # channels in and out both shrink
    keep = resolve_keep(model, example, spec, kept)
    ratio = spec.ratio if mode == "ratio" else MAX_RATIO
    fine = spec.steps if mode == "ratio" else TARGET_ROUNDS * spec.steps
    try:
        pruner = tp.pruner.MetaPruner(
            model, example, importance=_importance(spec.importance),
            global_pruning=spec.global_pruning, pruning_ratio=ratio, iterative_steps=fine,
            ignored_layers=_kept_modules(model, keep), round_to=spec.round_to,
        )
    except EdgektError:
        raise
    except Exception as exc:  # torch-pruning raises many types while tracing
        raise EdgektError(f"torch-pruning cannot trace this model: {_describe(exc)}") from None
    which = 0 if mode == "target_macs" else 1
    # Round r of R ends at base * (goal/base)^(r/R): each round removes an equal factor.
    ends = [None] * spec.steps if goal is None else \
        [base * (goal / base) ** ((r + 1) / spec.steps) for r in range(spec.steps)]
    done = 0
    now = (macs0, params0)
    try:
        for end in ends:
            for _ in range(fine if end is not None else 1):
                if spec.importance == "taylor":
                    _taylor_grads(model, batches)
                pruner.step()
                done += 1
                # Counting runs the pruned model: a layer with a hard-coded width fails here.
                now = count(model, example)
                if end is None or now[which] <= end or done >= fine:
                    break
            if spec.recover_steps and recover is not None:
                recover(model)
            if goal is not None and now[which] <= goal:
                break
    except EdgektError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch-pruning and the model raise many types
        raise EdgektError(f"torch-pruning failed on this model after {done} step(s): "
                          f"{_describe(exc)}. Keep the offending layer with --keep") from None
    model.zero_grad(set_to_none=True)
    model.eval()
    if hasattr(model, "head"):
        model.embedding_dim = int(model.head.in_features)
    macs1, params1 = now
    if (macs1, params1) == (macs0, params0):
        raise EdgektError(f"nothing was pruned with --importance {spec.importance}"
                          f"{' --global' if spec.global_pruning else ''}: every channel scored "
                          f"the same (an untrained model?); try --importance l2 or --uniform")
    if goal is not None and (macs1 if mode == "target_macs" else params1) > goal:
        raise EdgektError(f"could not reach --{mode.replace('_', '-')} {goal:,}: stopped at "
                          f"{macs1:,} MACs / {params1:,} params with {MAX_RATIO:.0%} of the "
                          f"prunable channels removed (the kept layers cost the rest)")
    return {"mode": mode, "ratio": spec.ratio, "target": goal, "importance": spec.importance,
            "global": spec.global_pruning, "rounds": spec.steps, "steps": done, "keep": keep,
            "recover_steps": spec.recover_steps,
            "recover_lr": spec.recover_lr if spec.recover_steps else None,
            "macs_before": macs0, "macs_after": macs1, "params_before": params0,
            "params_after": params1, "macs_fraction": round(macs1 / macs0, 4),
            "params_fraction": round(params1 / params0, 4)}


def _taylor_grads(model: nn.Module, batches: Callable[[], list] | None) -> None:
    if batches is None:
        raise EdgektError("--importance taylor needs training images (the checkpoint's dataset)")
    model.zero_grad(set_to_none=True)
    for x, y in batches():
        nn.functional.cross_entropy(model(x), y).backward()


def _describe(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def prune_checkpoint(src: str | Path, dst: str | Path, spec: PruneSpec, *,
                     splits: Any = None, data_dir: str | None = None, force: bool = False,
                     ) -> dict[str, Any]:
    """Prune the model of checkpoint ``src`` and write the pruned checkpoint to ``dst``.

    Returns the pruning record also stored in the checkpoint (``model.prune.record``). Nothing is
    written unless the recipe rebuilds a model whose outputs equal the pruned model's.
    """
    from edgekt.checkpoint import load_checkpoint, save_checkpoint
    from edgekt.engine.setup import model_from_checkpoint

    _validate(spec)
    out = Path(dst)
    if out.exists() and not force:
        raise EdgektError(f"{out} exists; pass --force to replace it")
    ckpt = load_checkpoint(src)
    model, info = model_from_checkpoint(ckpt, str(src))
    rec = ckpt["model"]
    if "prune" in rec:
        raise EdgektError(f"{src} is already pruned; prune its unpruned source again with a "
                          f"stronger target instead (recipes do not stack)")
    original = copy.deepcopy(model)
    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
    data = _TrainingData(ckpt, str(src), splits, data_dir)
    batches = (lambda: data.batches(spec.calib_batches)) if spec.importance == "taylor" else None
    recover = (lambda m: recover_by_kd(m, original, data.stream(), spec.recover_steps,
                                       spec.recover_lr)) if spec.recover_steps else None
    record = prune_model(model, example, spec, batches, recover)
    prune = {"format": recipe.FORMAT, "base": {"name": rec["name"], "kwargs": rec["kwargs"]},
             "modules": recipe.capture(model, original), "record": record,
             "source": {"checkpoint": str(src), "metrics": dict(ckpt.get("metrics", {}))}}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _check_rebuild(rec, prune, state, model, example)
    new_rec = {**{k: v for k, v in rec.items() if k != "state_dict"}, "prune": prune,
               "embedding_dim": int(model.head.in_features), "state_dict": state}
    save_checkpoint(out, {"model": new_rec, "data": ckpt["data"],
                          "config": ckpt.get("config", {}),
                          "method": {"method": "prune", "record": record},
                          "metrics": {}})
    return record


def _check_rebuild(rec: dict[str, Any], prune: dict[str, Any], state: dict[str, torch.Tensor],
                   pruned: nn.Module, example: torch.Tensor) -> None:
    """The recipe must rebuild exactly the pruned function, or nothing is written."""
    from edgekt.models import create_model

    try:
        rebuilt = create_model(rec["name"], num_classes=rec["num_classes"],
                               in_channels=rec["in_channels"], image_size=rec["image_size"],
                               **rec["kwargs"])
        recipe.apply(rebuilt, prune)
        rebuilt.load_state_dict(state)
    except (RuntimeError, AttributeError) as exc:
        raise EdgektError(f"the pruned model cannot be rebuilt from its recipe "
                          f"({_describe(exc)}); nothing was written") from None
    x = torch.randn(4, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = pruned.eval()(x), rebuilt.eval()(x)
    if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
        raise EdgektError("the model rebuilt from the pruning recipe computes something else "
                          f"(max diff {float((a - b).abs().max()):.3g}): a layer keeps a "
                          "hard-coded width; add it to --keep. Nothing was written")


class _TrainingData:
    """The checkpoint's own training images, loaded on first use (taylor, recovery)."""

    def __init__(self, ckpt: dict[str, Any], source: str, splits: Any, data_dir: str | None
                 ) -> None:
        self.ckpt, self.source, self.splits, self.data_dir = ckpt, source, splits, data_dir
        self._calib: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._stream: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _loader(self, train: bool) -> Any:
        from edgekt.data import build_splits, make_loader
        from edgekt.evaluation import checkpoint_data_config

        cfg = checkpoint_data_config(self.ckpt, self.source, self.data_dir)
        if self.splits is None:
            self.splits = build_splits(cfg)
        return make_loader(self.splits.train, self.splits.info, cfg, train=train)

    def batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n`` unaugmented batches (the same ones every call)."""
        if not self._calib:
            for i, (x, y, *_) in enumerate(self._loader(train=False)):
                if i >= n:
                    break
                self._calib.append((x, y))
        return self._calib

    def stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Augmented training batches, epoch after epoch (one stream shared by all rounds)."""
        if self._stream is None:
            loader = self._loader(train=True)

            def forever() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                while True:
                    for x, y, *_ in loader:
                        yield x, y

            self._stream = forever()
        return self._stream


def recover_by_kd(model: nn.Module, teacher: nn.Module,
                  batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float,
                  temperature: float = 4.0) -> None:
    """``steps`` of Hinton KD from ``teacher`` between two pruning rounds (AdamW, cosine).

    A loop of its own, not ``fit``: it runs inside the pruner, on a model whose parameters the
    next round replaces, so it needs no checkpoint, resume or logging.
    """
    from edgekt.distill.losses import hinton_kd

    teacher.eval()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(steps):
        x, _y = next(batches)
        with torch.no_grad():
            target = teacher(x)
        loss = hinton_kd(model(x), target, temperature=temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.zero_grad(set_to_none=True)
    model.eval()
