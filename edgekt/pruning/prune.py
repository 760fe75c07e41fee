"""``edgekt prune``: dependency-aware structured channel pruning of a checkpoint (torch-pruning).

torch-pruning (DepGraph, Fang et al., CVPR 2023) traces the model, groups the layers whose
channels must go together (a residual add, a depthwise conv and its BN) and removes whole groups
ranked by an importance criterion. We then record the new sizes as a plain rebuild recipe
(:mod:`edgekt.pruning.recipe`), check that the recipe rebuilds the same function, and only then
write the checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekt.errors import EdgektError
from edgekt.pruning import recipe
from edgekt.pruning.spec import IMPORTANCES, PruneSpec, absolute_target, problems, target_mode

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


def _kept_modules(model: nn.Module, keep: Sequence[str]) -> list[nn.Module]:
    mods = []
    for k in keep:
        if k == "stem":
            mods.append(next(m for m in model.modules() if isinstance(m, nn.Conv2d)))
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
                batches: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
                ) -> dict[str, Any]:
    """Prune ``model`` in place; return the record (MACs/params before and after, mode)."""
    import torch_pruning as tp

    mode = _validate(spec)
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
    ratio = spec.ratio if mode == "ratio" else MAX_RATIO
    rounds = spec.steps if mode == "ratio" else TARGET_ROUNDS
    try:
        pruner = tp.pruner.MetaPruner(
            model, example, importance=_importance(spec.importance),
            global_pruning=spec.global_pruning, pruning_ratio=ratio, iterative_steps=rounds,
            ignored_layers=_kept_modules(model, spec.keep), round_to=spec.round_to,
        )
    except EdgektError:
        raise
    except Exception as exc:  # torch-pruning raises many types while tracing
        raise EdgektError(f"torch-pruning cannot trace this model: {_describe(exc)}") from None
    done = 0
    try:
        for _ in range(rounds):
            if spec.importance == "taylor":
                _taylor_grads(model, batches)
            pruner.step()
            done += 1
            # Counting runs the pruned model: a layer with a hard-coded width fails here.
            now = count(model, example)
            if goal is not None and now[0 if mode == "target_macs" else 1] <= goal:
                break
    except EdgektError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch-pruning and the model raise many types
        raise EdgektError(f"torch-pruning failed on this model after {done} round(s): "
                          f"{_describe(exc)}. Keep the offending layer with --keep") from None
    model.zero_grad(set_to_none=True)
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
            "global": spec.global_pruning, "rounds": done, "keep": list(spec.keep),
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
    batches = _batch_source(ckpt, str(src), splits, data_dir, spec) \
        if spec.importance == "taylor" else None
    record = prune_model(model, example, spec, batches)
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


def _batch_source(ckpt: dict[str, Any], source: str, splits: Any, data_dir: str | None,
                  spec: PruneSpec) -> Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Training images for the taylor criterion, loaded once on first use."""
    cache: list = []

    def get() -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not cache:
            from edgekt.data import build_splits, make_loader
            from edgekt.evaluation import checkpoint_data_config

            data_cfg = checkpoint_data_config(ckpt, source, data_dir)
            sp = splits if splits is not None else build_splits(data_cfg)
            loader = make_loader(sp.train, sp.info, data_cfg, train=False)
            for i, (x, y, *_) in enumerate(loader):
                if i >= spec.calib_batches:
                    break
                cache.append((x, y))
        return cache

    return get
