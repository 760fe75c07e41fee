"""Multi-task learning: hard parameter sharing, cross-stitch units and GradNorm loss balancing.

One compact trunk serves several tasks on the device (a car cannot run one network per task).
The extra tasks are derived from the dataset's own labels by a class map, so real two-task data
needs no extra files: Fashion-MNIST's 10 classes plus tops/bottoms/footwear/bags, MNIST digits
plus parity or ``>= 5``.

* ``arch: hard``: one trunk (the configured model), one linear head per task; task 0 uses the
  model's own head, so the checkpoint's model is the task-0 classifier.
* ``arch: cross_stitch`` (Misra et al., CVPR 2016): one column per task (copies of the model's
  trunk), mixed after every stage by learned per-channel cross-stitch matrices.
* ``balance: gradnorm`` (Chen et al., ICML 2018): task weights trained so that each task's
  gradient norm on the last shared layer tracks its relative inverse training rate.

``load_multitask(checkpoint)`` rebuilds the whole shared model (one output per task) and
``export_multitask_onnx`` writes it as one ONNX file with one named output per task.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgekt.config import Config, Strict, validate
from edgekt.data import Splits, TensorSplit, make_loader
from edgekt.engine.tasks import METHODS, StepOutput, Task
from edgekt.errors import EdgektError
from edgekt.models import EdgeNet
from edgekt.models.compact import CompactCNN


@dataclass(frozen=True)
class TaskDef:
    """One task: a map from the dataset's class index to this task's label."""

    name: str
    class_map: list[int] | None
    """None: the dataset's own labels."""
    labels: list[str] | None = None

    def num_classes(self, dataset_classes: int) -> int:
        return dataset_classes if self.class_map is None else max(self.class_map) + 1


# Built-in derived tasks; "classes" is the dataset's own labelling.
PRESETS: dict[str, TaskDef] = {
    "classes": TaskDef("classes", None),
    # Fashion-MNIST: T-shirt, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Boot.
    # Dresses count as tops (worn on the upper body and sold in the same department).
    "fashion_coarse": TaskDef("fashion_coarse", [0, 1, 0, 0, 0, 2, 0, 2, 3, 2],
                              ["tops", "bottoms", "footwear", "bags"]),
    "parity": TaskDef("parity", [i % 2 for i in range(10)], ["even", "odd"]),
    "ge5": TaskDef("ge5", [int(i >= 5) for i in range(10)], ["<5", ">=5"]),
}


class CustomTask(Strict):
    class_map: list[int] = Field(min_length=2)
    """Task label of each dataset class, in class order."""
    labels: list[str] | None = None


class MultiTaskArgs(Strict):
    """``method_args`` of ``method: multitask``."""

    tasks: list[str] = Field(default_factory=lambda: ["classes", "fashion_coarse"], min_length=1)
    """Task names, first must be ``classes`` (the model's own head): presets
    (classes, fashion_coarse, parity, ge5) or keys of ``custom``."""
    custom: dict[str, CustomTask] = Field(default_factory=dict)
    arch: Literal["hard", "cross_stitch"] = "hard"
    balance: Literal["fixed", "gradnorm"] = "fixed"
    """``fixed``: loss = sum of weights * task losses; ``gradnorm``: learned weights."""
    weights: list[float] | None = None
    """Fixed task weights (default 1 each); with gradnorm, the initial weights."""
    gradnorm_alpha: float = Field(1.5, ge=0)
    """GradNorm's asymmetry: larger pulls slow tasks harder (paper: 0.12-3.0, 1.5 typical)."""
    stitch_self: float = Field(0.9, gt=0, lt=1)
    """Cross-stitch init: weight of a column's own activations (the rest is shared equally)."""


def resolve_tasks(args: MultiTaskArgs, num_classes: int, source: str = "method_args"
                  ) -> list[TaskDef]:
    """Look task names up and check them against the dataset; bad lists fail before training."""
    defs: list[TaskDef] = []
    for name in args.tasks:
        if name in args.custom:
            c = args.custom[name]
            td = TaskDef(name, list(c.class_map), c.labels)
        elif name in PRESETS:
            td = PRESETS[name]
        else:
            valid = ", ".join([*PRESETS, *args.custom])
            raise EdgektError(f"{source}.tasks: unknown task {name!r} (valid: {valid}; define "
                              f"your own under {source}.custom.<name>.class_map)")
        if td.class_map is not None:
            if len(td.class_map) != num_classes:
                raise EdgektError(
                    f"{source}.tasks: task {name!r} maps {len(td.class_map)} classes but the "
                    f"dataset has {num_classes}; its class_map needs one entry per class")
            if min(td.class_map) < 0:
                raise EdgektError(f"{source}.tasks: task {name!r} has a negative label")
            n = td.num_classes(num_classes)
            if td.labels is not None and len(td.labels) != n:
                raise EdgektError(f"{source}.tasks: task {name!r} has {n} labels in its class_map "
                                  f"but {len(td.labels)} label names")
        defs.append(td)
    if defs[0].class_map is not None:
        raise EdgektError(f"{source}.tasks: the first task must be 'classes' (the model's own "
                          f"head); got {args.tasks}")
    if len({d.name for d in defs}) != len(defs):
        raise EdgektError(f"{source}.tasks: duplicate task names in {args.tasks}")
    if args.weights is not None and len(args.weights) != len(defs):
        raise EdgektError(f"{source}.weights: {len(args.weights)} weights for {len(defs)} tasks "
                          f"{args.tasks}; give one weight per task")
    if args.balance == "gradnorm" and args.arch != "hard":
        raise EdgektError(f"{source}: balance=gradnorm needs arch=hard (it balances gradients "
                          f"on the last shared layer, which cross-stitch columns do not have)")
    return defs


def task_splits(splits: Splits, task: TaskDef) -> Splits:
    """The same images relabelled for one derived task (single-task baselines)."""
    if task.class_map is None:
        return splits
    cmap = torch.tensor(task.class_map)
    n = task.num_classes(splits.info.num_classes)

    def relabel(s: TensorSplit) -> TensorSplit:
        return TensorSplit(s.images, cmap[s.targets], s.indices)

    labels = task.labels or [str(i) for i in range(n)]
    info = replace(splits.info, num_classes=n, labels=list(labels))
    return Splits(relabel(splits.train), relabel(splits.val), relabel(splits.test), info)


def _reinit(module: nn.Module) -> None:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


class CrossStitch(nn.Module):
    """Per-channel linear mixing of T task columns: ``out_i = sum_j alpha[i, j] * x_j``."""

    def __init__(self, tasks: int, channels: int, self_weight: float) -> None:
        super().__init__()
        other = (1.0 - self_weight) / max(tasks - 1, 1)
        init = torch.full((tasks, tasks), other).fill_diagonal_(self_weight)
        self.alpha = nn.Parameter(init.unsqueeze(-1).repeat(1, 1, channels))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        stacked = torch.stack(xs)  # (T, B, C, H, W)
        mixed = torch.einsum("ijc,jbchw->ibchw", self.alpha, stacked)
        return list(mixed.unbind(0))


class MultiTaskParts(nn.Module):
    """What multi-task learning adds to the configured model: extra heads, and for cross-stitch
    the extra columns and stitch units. Kept apart from the model so the checkpoint's ``model``
    stays a plain task-0 classifier and nothing is stored twice."""

    def __init__(self, model: EdgeNet, defs: list[TaskDef], num_classes: int,
                 arch: str, stitch_self: float = 0.9) -> None:
        super().__init__()
        self.names = [d.name for d in defs]
        self.arch = arch
        self.heads = nn.ModuleList(
            nn.Linear(model.embedding_dim, d.num_classes(num_classes)) for d in defs[1:])
        self.columns = nn.ModuleList()
        self.stitches = nn.ModuleList()
        if arch == "cross_stitch":
            if not isinstance(model, CompactCNN):
                raise EdgektError("method_args.arch=cross_stitch needs a stage-wise model "
                                  "(cnn_xs, cnn_s, cnn_m, cnn_l, cnn_xl); use arch=hard for "
                                  f"{type(model).__name__}")
            for _ in defs[1:]:
                col = copy.deepcopy(model)
                _reinit(col)
                del col.head  # each column's head lives in self.heads
                self.columns.append(col)
            for stage in model.stages():
                channels = [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)][-1]
                self.stitches.append(CrossStitch(len(defs), channels.num_features, stitch_self))

    def forward_all(self, model: EdgeNet, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every task, task 0 first."""
        if self.arch == "hard":
            z = model.forward_features(x)
            return [model.head(z), *(h(z) for h in self.heads)]
        cols: list[Any] = [model, *self.columns]
        xs = [x] * len(cols)
        for k, stitch in enumerate(self.stitches):
            xs = stitch([c.stages()[k](xi) for c, xi in zip(cols, xs, strict=True)])
        zs = [c.pool(xi) for c, xi in zip(cols, xs, strict=True)]
        return [model.head(zs[0]), *(h(z) for h, z in zip(self.heads, zs[1:], strict=True))]


class MultiTaskNet(nn.Module):
    """The deployable shared model: ``forward(x)`` returns a tuple of logits, one per task."""

    def __init__(self, model: EdgeNet, parts: MultiTaskParts) -> None:
        super().__init__()
        self.model, self.parts = model, parts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.parts.forward_all(self.model, x))


def _unwrap(model: nn.Module) -> nn.Module:
    """The EdgeNet behind a torch.compile wrapper."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


@METHODS.register("multitask")
class MultiTaskTask(Task):
    """Hard sharing or cross-stitch, fixed weights or GradNorm (see the module docstring)."""

    args_model = MultiTaskArgs

    def __init__(self, cfg: Config, model: nn.Module, splits: Splits, device: torch.device):
        super().__init__(cfg, model, splits, device)
        self.args: MultiTaskArgs = validate(MultiTaskArgs, cfg.method_args, "method_args")
        n = splits.info.num_classes
        self.defs = resolve_tasks(self.args, n)
        self.splits, self.device = splits, device
        self.parts = MultiTaskParts(model, self.defs, n, self.args.arch, self.args.stitch_self)
        maps = [d.class_map or list(range(n)) for d in self.defs]
        self.register_buffer("class_maps", torch.tensor(maps), persistent=False)
        w = torch.tensor(self.args.weights or [1.0] * len(self.defs))
        if self.args.balance == "gradnorm":
            self.task_weights = nn.Parameter(w)
            # Losses at the first step (the denominators of the training rates); saved for resume.
            self.register_buffer("initial_losses", torch.zeros(len(self.defs)))
        else:
            self.register_buffer("task_weights", w, persistent=False)
        # A plain list: assigning a Parameter would register the model's weight in this task.
        self._shared = [p for p in model.stages()[-1].parameters() if p.dim() > 1][-1:]

    def training_step(self, model: nn.Module, batch: tuple, step: int) -> StepOutput:
        x, y = batch[0], batch[1]
        net = _unwrap(model)
        logits = self.parts.forward_all(net, x)
        targets = self.class_maps[:, y]  # (T, B): each task's labels, derived from the classes
        losses = torch.stack([F.cross_entropy(lg.float(), t, label_smoothing=self.label_smoothing)
                              for lg, t in zip(logits, targets, strict=True)])
        terms = {f"loss_{d.name}": v for d, v in zip(self.defs, losses, strict=True)}
        if self.args.balance == "gradnorm":
            loss, gn_terms = self._gradnorm(losses)
            terms.update(gn_terms)
        else:
            loss = (self.task_weights * losses).sum()
        return StepOutput(loss, logits[0], y, terms)

    def _gradnorm(self, losses: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """GradNorm: network loss ``sum w_i L_i`` plus ``sum |w_i g_i - mean(w g) r_i^alpha|``
        whose gradient reaches only the weights (``g_i`` = norm of dL_i/dW, W the last shared
        layer, treated as constant as in the paper)."""
        w = self.task_weights
        T = len(losses)
        with torch.no_grad():  # renormalise after the previous optimiser step: sum(w) == T
            w.clamp_(min=1e-3).mul_(T / w.sum())
            if step_zero := bool((self.initial_losses == 0).all()):
                self.initial_losses.copy_(losses.detach())
        norms = torch.stack([
            torch.autograd.grad(li, self._shared[0], retain_graph=True)[0].norm()
            for li in losses]).detach()
        g = w * norms
        ratio = losses.detach() / self.initial_losses
        target = (g.mean() * (ratio / ratio.mean()) ** self.args.gradnorm_alpha).detach()
        grad_loss = (g - target).abs().sum()
        loss = (w.detach() * losses).sum() + grad_loss
        terms = {f"w_{d.name}": wi.detach() for d, wi in zip(self.defs, w, strict=True)}
        terms["gradnorm"] = grad_loss.detach() * (0 if step_zero else 1)
        return loss, terms

    @torch.no_grad()
    def task_accuracies(self, model: nn.Module, split: TensorSplit) -> dict[str, float]:
        """Accuracy of every task on ``split`` (``acc_<task>``), plus task 0's ``acc`` and
        ``loss`` through the whole network (for cross-stitch ``model(x)`` alone is not it)."""
        net = _unwrap(model)
        was_training = net.training
        net.eval()
        self.parts.eval()
        correct = torch.zeros(len(self.defs))
        loss0 = 0.0
        for x, y in make_loader(split, self.splits.info, self.cfg.data, train=False):
            x, y = x.to(self.device), y.to(self.device)
            logits = self.parts.forward_all(net, x)
            targets = self.class_maps[:, y]
            loss0 += float(F.cross_entropy(logits[0].float(), y, reduction="sum"))
            correct += torch.stack([(lg.argmax(1) == t).sum() for lg, t in
                                    zip(logits, targets, strict=True)]).cpu()
        net.train(was_training)
        self.parts.train(was_training)
        n = max(len(split), 1)
        accs = {f"acc_{d.name}": float(c) / n for d, c in zip(self.defs, correct, strict=True)}
        return {"loss": loss0 / n, "acc": float(correct[0]) / n, **accs}

    def extra_metrics(self, model: nn.Module, split: str) -> dict[str, float]:
        return self.task_accuracies(model, getattr(self.splits, split))

    def export_metadata(self) -> dict[str, Any]:
        return {"method": "multitask", "arch": self.args.arch, "balance": self.args.balance,
                "tasks": [{"name": d.name, "class_map": d.class_map, "labels": d.labels}
                          for d in self.defs]}


def load_multitask(ckpt: dict[str, Any], source: str = "checkpoint") -> MultiTaskNet:
    """Rebuild the shared model of a ``multitask`` checkpoint (eval mode, CPU)."""
    from edgekt.engine.setup import model_from_checkpoint

    cfg: Config = validate(Config, ckpt.get("config", {}), f"{source} (stored config)")
    if cfg.method != "multitask":
        raise EdgektError(f"{source}: trained with method {cfg.method!r}, not 'multitask'")
    model, info = model_from_checkpoint(ckpt, source)
    args = validate(MultiTaskArgs, cfg.method_args, f"{source} method_args")
    parts = MultiTaskParts(model, resolve_tasks(args, info.num_classes), info.num_classes,
                           args.arch, args.stitch_self)
    state = {k.removeprefix("parts."): v for k, v in ckpt["task"].items()
             if k.startswith("parts.")}
    try:
        parts.load_state_dict(state)
    except RuntimeError as exc:
        raise EdgektError(f"{source}: multi-task weights do not fit: {str(exc)[:300]}") from None
    return MultiTaskNet(model, parts).eval()


def export_multitask_onnx(checkpoint: str | Path, out: str | Path) -> list[str]:
    """Export a ``multitask`` checkpoint as one ONNX model with one output per task.

    Output ``k`` is named ``logits_<task>``; the edgekt metadata (``ModelMeta``) describes task
    0 as usual and lists every output with its labels under ``extra["multitask"]``. Returns the
    output names.
    """
    import io
    import warnings

    import onnx

    from edgekt.checkpoint import load_checkpoint
    from edgekt.data import DatasetInfo
    from edgekt.exporters.meta import build_meta
    from edgekt.exporters.onnx_export import set_metadata
    from edgekt.io import atomic_write

    ckpt = load_checkpoint(checkpoint)
    net = load_multitask(ckpt, str(checkpoint))
    info = DatasetInfo(**ckpt["data"])
    tasks = ckpt["method"]["tasks"]
    outputs = [f"logits_{t['name']}" for t in tasks]
    meta = build_meta(info, part="classifier", model_name=ckpt["model"]["name"],
                      embedding_dim=net.model.embedding_dim, dynamic_batch=True)
    meta.output_name = outputs[0]
    meta.extra["multitask"] = [
        {"name": t["name"], "output": o,
         "labels": t["labels"] or (info.labels if t["class_map"] is None else None),
         "class_map": t["class_map"]} for t, o in zip(tasks, outputs, strict=True)]
    buf = io.BytesIO()
    dyn = {name: {0: "batch"} for name in ["input", *outputs]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        torch.onnx.export(net, (torch.zeros(2, info.in_channels, info.image_size,
                                            info.image_size),), buf, dynamo=False,
                          opset_version=17, input_names=["input"], output_names=outputs,
                          dynamic_axes=dyn)
    model = onnx.load_from_string(buf.getvalue())
    set_metadata(model, meta)
    onnx.checker.check_model(model)
    atomic_write(Path(out), lambda f: f.write(model.SerializeToString()))
    return outputs
