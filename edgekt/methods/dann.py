"""DANN: unsupervised domain adaptation by backpropagation (Ganin & Lempitsky, ICML 2015).

A domain classifier on the embedding learns to tell source from target images, while a
gradient reversal layer makes the trunk learn features it cannot tell apart. The reversal
strength follows the paper's schedule ``lambda_p = lambda_max * (2 / (1 + exp(-gamma p)) - 1)``
with ``p`` the training progress in [0, 1]. Target labels are never used for training; the
target's validation and test splits are scored each epoch (``val_target_acc``,
``test_target_acc``) to report the adaptation.

The target images are normalised with the *source* statistics: the deployed model applies one
preprocessing (recorded at export) to whatever the device sees.

Batch normalisation (``bn``): ``joint`` normalises the concatenated source + target batch, as a
single-stream DANN does; ``per_domain`` normalises each domain's batch with its own statistics
(domain-specific normalisation, as in AdaBN and AutoDIAL), so the features the domain classifier
must not tell apart are already aligned in mean and variance. Either way
``target_bn_acc`` scores the target with batch-norm statistics re-estimated on the unlabelled
target training images (``adapt_batchnorm``): the model one deploys to the target domain.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgekt.config import Config, DataConfig, Strict, validate
from edgekt.data import BatchLoader, DatasetInfo, Splits, TensorSplit, build_splits, make_loader
from edgekt.engine.fit import evaluate
from edgekt.engine.runtime import Runtime
from edgekt.engine.tasks import METHODS, StepOutput, Task
from edgekt.errors import EdgektError
from edgekt.methods.multitask import _unwrap


class GradReverse(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``-lam`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Gradient reversal layer."""
    return GradReverse.apply(x, lam)


def dann_lambda(progress: float, lambda_max: float = 1.0, gamma: float = 10.0) -> float:
    """The paper's schedule: 0 at the start, rising smoothly to ``lambda_max``."""
    p = min(max(progress, 0.0), 1.0)
    return lambda_max * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


class DannArgs(Strict):
    """``method_args`` of ``method: dann``."""

    target: DataConfig = Field(default_factory=lambda: DataConfig(name="digits"))
    """The unlabelled target domain (a data section); ``image_size`` defaults to the source's."""
    lambda_max: float = Field(1.0, ge=0)
    gamma: float = Field(10.0, gt=0)
    """Steepness of the lambda schedule (paper: 10)."""
    domain_weight: float = Field(1.0, ge=0)
    """Weight of the domain-classification loss."""
    hidden: int = Field(100, gt=0)
    """Width of the domain classifier's hidden layers (paper: 100)."""
    bn: Literal["joint", "per_domain"] = "per_domain"
    """Batch-norm statistics in training: of the source + target batch together, or of each
    domain's batch separately (see the module docstring)."""


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Iterable[Any]) -> nn.Module:
    """AdaBN (Li et al. 2016): re-estimate every batch-norm layer's statistics on (unlabelled)
    images of the deployment domain; ``batches`` yields tensors or (images, ...) tuples.

    Changes ``model`` in place (its running statistics) and returns it in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the whole pass
    model.train()
    dev = next(model.parameters()).device
    for b in batches:
        model(b[0].to(dev) if isinstance(b, tuple | list) else b.to(dev))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


class DomainClassifier(nn.Sequential):
    """Embedding -> source/target logit (two hidden layers, as in the paper's digit experiments)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))


def target_splits(target: DataConfig, source: DatasetInfo, source_name: str = "data"
                  ) -> tuple[Splits, DatasetInfo]:
    """Load the target domain, check it fits the source, and describe it with source statistics.

    Raises EdgektError when the class count, channels or image size differ (before training).
    """
    if target.image_size is None:
        target = target.model_copy(update={"image_size": source.image_size})
    splits = build_splits(target)
    t = splits.info
    if t.num_classes != source.num_classes:
        raise EdgektError(
            f"method_args.target: {target.name!r} has {t.num_classes} classes but the source "
            f"{source.name!r} has {source.num_classes}; DANN needs the same label set (use "
            f"{source_name}.classes / method_args.target.classes to select matching classes)")
    if t.in_channels != source.in_channels or t.image_size != source.image_size:
        raise EdgektError(
            f"method_args.target: {target.name!r} images are {t.in_channels}x{t.image_size}px, "
            f"the source's {source.in_channels}x{source.image_size}px; set "
            f"method_args.target.image_size={source.image_size} (channels must match)")
    return splits, replace(t, mean=list(source.mean), std=list(source.std))


@METHODS.register("dann")
class DannTask(Task):
    """Source cross-entropy + domain classification through a gradient reversal layer."""

    args_model = DannArgs

    def __init__(self, cfg: Config, model: nn.Module, splits: Splits, device: torch.device):
        super().__init__(cfg, model, splits, device)
        self.args: DannArgs = validate(DannArgs, cfg.method_args, "method_args")
        self.device = device
        self.target, self.target_info = target_splits(self.args.target, splits.info)
        self.domain = DomainClassifier(model.embedding_dim, self.args.hidden)
        # Target stream position (epoch, batch): saved so a resumed run sees the same batches.
        self.register_buffer("target_pos", torch.zeros(2, dtype=torch.long))
        self._loader: Any = None  # built on first use, when the loop has set rank and world
        self._iter: Any = None

    def _target_batch(self) -> torch.Tensor:
        """Next unlabelled target batch, cycling through the target training split."""
        if self._loader is None:  # each rank reads its own shard of the target stream
            self._loader = make_loader(self.target.train, self.target_info, self.cfg.data,
                                       train=True, seed=self.cfg.train.seed + 1, rank=self.rank,
                                       world=self.world)
        while True:
            if self._iter is None:
                self._loader.set_epoch(int(self.target_pos[0]))
                self._iter = self._loader.iter_from(int(self.target_pos[1]))
            try:
                x, _labels_unused = next(self._iter)
                self.target_pos[1] += 1
                return x.to(self.device, non_blocking=True)
            except StopIteration:
                self._iter = None
                self.target_pos[0] += 1
                self.target_pos[1] = 0

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:
        self._iter = None  # restart the target stream at the restored position
        return super().load_state_dict(state, strict, assign)

    def training_step(self, model: nn.Module, batch: tuple, step: int) -> StepOutput:
        xs, ys = batch[0], batch[1]
        xt = self._target_batch()
        net = _unwrap(model)
        if self.args.bn == "per_domain":  # each domain normalised by its own batch statistics
            zs = net.forward_features(xs)
            z = torch.cat([zs, net.forward_features(xt)])
        else:
            z = net.forward_features(torch.cat([xs, xt]))
            zs = z[: len(xs)]
        logits = net.head(zs)
        cls = F.cross_entropy(logits.float(), ys, label_smoothing=self.label_smoothing)
        lam = dann_lambda(step / self.total_steps, self.args.lambda_max, self.args.gamma)
        dom_logits = self.domain(grad_reverse(z, lam)).squeeze(1).float()
        dom_y = torch.cat([torch.zeros(len(xs)), torch.ones(len(xt))]).to(dom_logits.device)
        dom = F.binary_cross_entropy_with_logits(dom_logits, dom_y)
        dom_acc = ((dom_logits > 0).float() == dom_y).float().mean()
        loss = cls + self.args.domain_weight * dom
        return StepOutput(loss, logits, ys, {"ce": cls, "domain": dom, "domain_acc": dom_acc,
                                             "lambda": torch.tensor(lam)})

    def extra_metrics(self, model: nn.Module, split: str) -> dict[str, float]:
        part: TensorSplit = getattr(self.target, split)
        loader = make_loader(part, self.target_info, self.cfg.data, train=False)
        rt = Runtime(self.device, None)
        net = _unwrap(model)
        adapted = adapt_batchnorm(copy.deepcopy(net), self.target_bn_batches())
        return {"target_acc": evaluate(net, loader, rt)["acc"],
                "target_bn_acc": evaluate(adapted, loader, rt)["acc"]}

    def target_bn_batches(self) -> BatchLoader:
        """The unlabelled target training images, in order (for ``adapt_batchnorm``)."""
        return make_loader(self.target.train, self.target_info, self.cfg.data, train=False)

    def export_metadata(self) -> dict[str, Any]:
        return {"method": "dann", "target": self.args.target.name,
                "lambda_max": self.args.lambda_max, "gamma": self.args.gamma, "bn": self.args.bn}
