"""What to prune and how: one spec and one set of checks for the CLI, the API and the pipeline.

Torch-free, so that config loading (``edgekt pipeline``) can check a pruning request before
anything heavy is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

IMPORTANCES = ("l1", "l2", "taylor", "bn-scale")
AUTO_STEM_BELOW = 0.25
"""``keep: auto`` prunes a full-resolution stem when less than this fraction of the MACs (or
params) is kept: a kept stem pins the input width of the next conv, the costliest layer of a
stride-1 CNN, which then eats half of a 10% budget (measured on cnn_l, README)."""
TARGETS = ("ratio", "target_macs", "target_params")


@dataclass
class PruneSpec:
    """What to prune and how (one of ``ratio``, ``target_macs``, ``target_params``)."""

    ratio: float | None = None
    """Fraction of channels removed from every prunable group (0 < ratio < 1)."""
    target_macs: float | None = None
    """Stop when MACs per image fall to this: an absolute count, or a fraction if < 1."""
    target_params: float | None = None
    """Stop when parameters fall to this: an absolute count, or a fraction if < 1."""
    importance: str = "l2"
    """Channel ranking: l1/l2 weight magnitude, taylor (first-order, on real images), bn-scale."""
    global_pruning: bool = False
    """Rank channels across layers (global) instead of the same ratio per layer (uniform)."""
    steps: int = 1
    """Pruning rounds: each removes a share of the channels (in target mode, an equal factor of
    the MACs/params), then re-ranks; with ``recover_steps`` each round is followed by recovery."""
    keep: Sequence[str] = field(default_factory=lambda: ("auto",))
    """Modules left untouched: ``stem`` (first conv), ``head``, module paths, or ``auto``: the
    head, and the stem unless it runs at full input resolution and the pruning keeps less than
    a quarter of the model (see :data:`AUTO_STEM_BELOW`)."""
    recover_steps: int = 0
    """Distillation steps from the unpruned model after every round (prune-and-recover)."""
    recover_lr: float = 0.003
    """AdamW learning rate of those recovery steps (cosine-decayed within each round)."""
    round_to: int | None = None
    """Keep channel counts multiples of this (SIMD-friendly widths)."""
    calib_batches: int = 4
    """Batches of training images for the taylor criterion."""


def cli_flag(name: str) -> str:
    """How ``edgekt prune`` spells a spec field (``target_macs`` -> ``--target-macs``)."""
    return "--" + name.replace("_", "-")


def problems(spec: PruneSpec, flag: Callable[[str], str] = cli_flag) -> list[str]:
    """Everything wrong with ``spec`` that needs no model, each naming its field via ``flag``."""
    out = []
    given = [k for k in TARGETS if getattr(spec, k) is not None]
    if len(given) != 1:
        names = [flag(k) for k in TARGETS]
        out.append(f"give exactly one of {', '.join(names[:-1])} or {names[-1]} "
                   f"(got {', '.join(flag(g) for g in given) or 'none'})")
    if spec.ratio is not None and not 0.0 < spec.ratio < 1.0:
        out.append(f"{flag('ratio')} must be between 0 and 1, exclusive (got {spec.ratio})")
    if spec.importance not in IMPORTANCES:
        out.append(f"{flag('importance')} must be one of {', '.join(IMPORTANCES)} "
                   f"(got {spec.importance!r})")
    if spec.steps < 1:
        out.append(f"{flag('steps')} must be at least 1 (got {spec.steps})")
    if spec.recover_steps < 0:
        out.append(f"{flag('recover_steps')} must be 0 or more (got {spec.recover_steps})")
    if not 0.0 < spec.recover_lr < 1.0:
        out.append(f"{flag('recover_lr')} must be between 0 and 1, exclusive "
                   f"(got {spec.recover_lr})")
    for k in ("target_macs", "target_params", "round_to"):
        v = getattr(spec, k)
        if v is not None and v <= 0:
            out.append(f"{flag(k)} must be positive (got {v})")
    return out


def target_mode(spec: PruneSpec) -> str:
    """Which of ``ratio``, ``target_macs``, ``target_params`` drives the pruning."""
    return next(k for k in TARGETS if getattr(spec, k) is not None)


def absolute_target(value: float, base: int) -> int:
    """A target given as a fraction (< 1) of ``base`` or as an absolute count."""
    return int(value * base) if value < 1 else int(value)
