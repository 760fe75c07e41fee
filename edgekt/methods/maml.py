"""MAML: model-agnostic meta-learning (Finn, Abbeel & Levine, ICML 2017).

Each training step samples ``meta_batch`` episodes; for each, an explicit inner loop adapts a
copy of the parameters to the support set with ``inner_steps`` gradient steps (through
``torch.func.functional_call``, so the model itself is never modified), and the query loss of
the adapted parameters is the meta-loss that the ordinary ``fit()`` optimiser minimises.
``first_order: false`` back-propagates through the inner loop (second-order MAML);
``first_order: true`` drops those second derivatives (FOMAML). ``adapt: head`` adapts only the
episode head in the inner loop (ANIL, Raghu et al. 2020) on embeddings computed once per episode,
much cheaper on a CPU. ``head_init: proto`` starts each episode from the prototype classifier
of its support set (Proto-MAML, Triantafillou et al. 2020).

The episode head (``n_way`` outputs) is meta-learned too and starts at zero, so every class
starts symmetric whatever the episode's label order. Batch normalisation uses the statistics
of the batch at hand (support, then query), as in the original MAML, or of the whole episode
(``bn: episode``); evaluation never changes
the model's running statistics. With ``eval_bn: running`` evaluation normalises with the running
statistics gathered during meta-training instead (MAML++'s fix, Antoniou et al. 2019, with one
set of statistics rather than one per step): a 1-shot support set of ``n_way`` images is a poor
batch to normalise with, and support and query are then normalised alike.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from edgekt.config import Config, validate
from edgekt.data import Splits, TensorSplit
from edgekt.engine.tasks import METHODS, StepOutput
from edgekt.errors import EdgektError
from edgekt.fewshot.episodes import EpisodeSpec
from edgekt.fewshot.evaluate import FewShotResult
from edgekt.fewshot.losses import prototypes_of
from edgekt.methods.episodic import EpisodeArgs, EpisodicTask, evaluate_image_episodes, unwrap
from edgekt.models import EdgeNet, Embedding

Params = dict[str, torch.Tensor]


class MamlArgs(EpisodeArgs):
    """``method_args`` of ``method: maml``."""

    inner_steps: int = Field(1, ge=1)
    """Inner-loop gradient steps during meta-training."""
    eval_inner_steps: int = Field(1, ge=1)
    """Inner-loop steps when adapting to an evaluation episode (best: as many as in training;
    on base-class validation episodes 1 beat 3 and 10 after one-step training)."""
    inner_lr: float = Field(0.5, gt=0)
    first_order: bool = False
    """FOMAML: ignore second derivatives through the inner loop."""
    adapt: Literal["all", "head"] = "all"
    """Parameters adapted in the inner loop: all (MAML) or the episode head only (ANIL)."""
    meta_batch: int = Field(4, ge=1)
    """Episodes averaged into one meta-gradient step."""
    head_init: Literal["zero", "proto"] = "zero"
    """Episode head before the inner loop: the meta-learned one (zero at the start, so every
    class starts symmetric), or Proto-MAML's (Triantafillou et al., ICLR 2020): the
    Euclidean prototype classifier of the support embeddings, ``W_c = 2 c``,
    ``b_c = -||c||^2``, through which the meta-gradient also flows."""
    bn: Literal["batch", "episode"] = "batch"
    """Batch-norm statistics of each pass in training mode: of the batch at hand (support,
    then query: the original MAML, where a 1-shot support set is a batch of ``n_way``
    images) or of the whole episode (support and query in one pass, each then taking its
    own rows), so support and query are normalised alike, as in ProtoNet's training pass.
    Both are transductive over the query set."""
    eval_bn: Literal["batch", "running"] = "batch"
    """Batch-norm statistics when adapting to an evaluation episode: as in training (``bn``)
    or the running ones of meta-training."""


def episode_logits(trunk: nn.Module, params: Params, x: torch.Tensor,
                   context: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``x`` under ``params`` (trunk parameters/buffers and ``head.*``)."""
    z = features(trunk, params, x, context)
    return F.linear(z, params["head.weight"], params["head.bias"])


def features(trunk: nn.Module, params: Params, x: torch.Tensor,
             context: torch.Tensor | None = None) -> torch.Tensor:
    """Embeddings of ``x`` under the trunk entries of ``params``; with ``context``, ``x`` is
    passed together with those images (so batch norm in training mode normalises it with the
    statistics of both) and only its own rows are returned."""
    trunk_state = {k: v for k, v in params.items() if not k.startswith("head.")}
    batch = x if context is None else torch.cat([x, context])
    return functional_call(trunk, trunk_state, (batch,), strict=False)[: len(x)].float()


def head_inner_loop(zs: torch.Tensor, ys: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor, *, steps: int, lr: float, first_order: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """ANIL's inner loop: ``steps`` SGD steps of the episode head on fixed support embeddings
    (the trunk is not adapted, so its forward pass is done once, not once per step)."""
    for _ in range(steps):
        loss = F.cross_entropy(F.linear(zs, weight, bias), ys)
        gw, gb = torch.autograd.grad(loss, [weight, bias], create_graph=not first_order)
        weight, bias = weight - lr * gw, bias - lr * gb
    return weight, bias


def inner_loop(trunk: nn.Module, params: Params, adapt_keys: list[str], xs: torch.Tensor,
               ys: torch.Tensor, *, steps: int, lr: float, first_order: bool,
               context: torch.Tensor | None = None) -> Params:
    """``steps`` SGD steps on the support loss; returns the adapted parameters.

    With ``first_order=False`` the result stays differentiable w.r.t. the initial parameters
    through the gradients themselves (second-order MAML). ``context``: images passed with the
    support set for its batch-norm statistics (``bn: episode``), not in the loss.
    """
    for _ in range(steps):
        loss = F.cross_entropy(episode_logits(trunk, params, xs, context), ys)
        grads = torch.autograd.grad(loss, [params[k] for k in adapt_keys],
                                    create_graph=not first_order)
        params = {**params, **{k: params[k] - lr * g
                               for k, g in zip(adapt_keys, grads, strict=True)}}
    return params


@METHODS.register("maml")
class MamlTask(EpisodicTask):
    """Meta-training with an explicit inner loop inside the engine's training step."""

    args_model = MamlArgs

    def __init__(self, cfg: Config, model: nn.Module, splits: Splits, device: torch.device):
        args = validate(MamlArgs, cfg.method_args, "method_args (maml)")
        super().__init__(cfg, model, splits, device, args)
        self.margs: MamlArgs = args
        self.episode_head = nn.Linear(model.embedding_dim, args.n_way)
        nn.init.zeros_(self.episode_head.weight)
        nn.init.zeros_(self.episode_head.bias)

    def _params(self, net: EdgeNet, n_way: int) -> tuple[Embedding, Params, list[str]]:
        trunk = Embedding(net)
        params: Params = {k: p for k, p in trunk.named_parameters()
                          if not k.startswith("net.head.")}
        params["head.weight"] = self.episode_head.weight[:n_way]
        params["head.bias"] = self.episode_head.bias[:n_way]
        keys = [k for k in params if k.startswith("head.") or
                (self.margs.adapt == "all" and params[k].requires_grad)]
        return trunk, params, keys

    def training_step(self, model: nn.Module, batch: tuple, step: int) -> StepOutput:
        net = unwrap(model)
        a = self.margs
        losses, logits, yqs = [], [], []
        for _ in range(a.meta_batch):
            _, xs, ys, xq, yq = self.next_episode()
            trunk, params, keys = self._params(net, a.n_way)
            lq = self._adapted_logits(trunk, params, keys, xs, ys, xq, steps=a.inner_steps,
                                      first_order=a.first_order)
            losses.append(F.cross_entropy(lq, yq))
            logits.append(lq)
            yqs.append(yq)
        loss = torch.stack(losses).mean()
        return StepOutput(loss, torch.cat(logits).detach(), torch.cat(yqs),
                          {"query_ce": loss.detach()})

    def _adapted_logits(self, trunk: Embedding, params: Params, keys: list[str],
                        xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, *, steps: int,
                        first_order: bool) -> torch.Tensor:
        """Query logits after adapting ``params`` to the support set (xs, ys)."""
        lr = self.margs.inner_lr
        # bn: episode normalises each pass with the whole episode's statistics.
        ctx_s, ctx_q = (xq, xs) if self.margs.bn == "episode" else (None, None)
        zs = None
        if self.margs.head_init == "proto":
            zs = features(trunk, params, xs, ctx_s)
            c = prototypes_of(zs, ys, params["head.weight"].shape[0])
            params = {**params, "head.weight": 2 * c, "head.bias": -(c * c).sum(1)}
        if self.margs.adapt == "head":  # ANIL: trunk features once, then a head-only loop
            zs = features(trunk, params, xs, ctx_s) if zs is None else zs
            w, b = head_inner_loop(zs, ys, params["head.weight"], params["head.bias"],
                                   steps=steps, lr=lr, first_order=first_order)
            return F.linear(features(trunk, params, xq, ctx_q), w, b)
        adapted = inner_loop(trunk, params, keys, xs, ys, steps=steps, lr=lr,
                             first_order=first_order, context=ctx_s)
        return episode_logits(trunk, adapted, xq, ctx_q)

    def adapt_and_predict(self, model: nn.Module, xs: torch.Tensor, ys: torch.Tensor,
                          xq: torch.Tensor, n_way: int) -> torch.Tensor:
        """Adapt to one episode's support set and predict its queries (model untouched)."""
        net = unwrap(model)
        trunk, params, keys = self._params(net, n_way)
        # Detached copies: evaluation must neither build a graph to the meta-parameters nor
        # move the model's batch-norm running statistics.
        params = {k: v.detach().requires_grad_(k in keys) for k, v in params.items()}
        params.update({k: b.clone() for k, b in trunk.named_buffers()})
        was = net.training
        net.train(self.margs.eval_bn == "batch")
        try:
            with torch.enable_grad():
                logits = self._adapted_logits(
                    trunk, params, keys, xs.to(self.device), ys.to(self.device),
                    xq.to(self.device), steps=self.margs.eval_inner_steps, first_order=True)
            return logits.detach().argmax(1)
        finally:
            net.train(was)

    def evaluate(self, model: nn.Module, split: TensorSplit, spec: EpisodeSpec, *,
                 episodes: int = 600, seed: int = 0) -> FewShotResult:
        if spec.n_way > self.margs.n_way:
            raise EdgektError(f"maml: evaluation with {spec.n_way} ways needs a model "
                              f"meta-trained with n_way >= {spec.n_way} (has {self.margs.n_way})")
        return evaluate_image_episodes(
            lambda xs, ys, xq, n: self.adapt_and_predict(model, xs, ys, xq, n),
            split, self.info, spec, episodes=episodes, seed=seed)
