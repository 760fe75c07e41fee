"""The ``distill`` training method: a frozen teacher, a student, and any weighted KD terms.

Registered in ``edgekt.engine.tasks.METHODS``; the engine's one ``fit()`` loop trains it. The
teacher is deliberately *not* a sub-module of the task: it is never trained, never switched to
train mode by ``task.train()``, and never written into checkpoints (the student checkpoint holds
the student, the adapters and the KD state only, plus the teacher's identity in the metadata).
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model
from rich.console import Console
from torch import nn

from edgekt.config import Config, Strict, validate
from edgekt.data import BatchLoader, Splits, make_loader
from edgekt.data.base import PairedLoader
from edgekt.distill import cache as tcache
from edgekt.distill.bridges import Adapter, CRDMemory
from edgekt.distill.losses import KD_LOSSES, KDLoss
from edgekt.distill.mixing import Mix, mix_batch
from edgekt.distill.taps import FeatureTaps
from edgekt.distill.teacher import TeacherConfig, load_teachers, renormaliser
from edgekt.distill.transfer import transfer_split
from edgekt.engine.tasks import METHODS, StepOutput, Task
from edgekt.errors import EdgektError

console = Console(stderr=True)


class LossTerm(BaseModel):
    """One KD term; keys other than these are the loss's own options (e.g. ``temperature``)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str
    """A registered KD loss: hinton_kd, dkd, dist, fitnets, attention, rkd, pkt, crd."""
    weight: float = Field(1.0, ge=0)
    student: str | None = None
    """Student tap (module name, ``embedding`` or ``logits``); default depends on the loss."""
    teacher: str | None = None
    """Teacher tap; default depends on the loss."""
    warmup_epochs: float = Field(0.0, ge=0)
    """Ramp this term's weight linearly from 0 over this many epochs (DKD uses 20 in its paper)."""


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value


class DistillOptions(Strict):
    """``method_args`` of ``method: distill``."""

    teacher: Annotated[list[TeacherConfig], BeforeValidator(_as_list)]
    """One teacher, or a list whose averaged logits are the teacher (an ensemble)."""
    losses: list[LossTerm] = Field(min_length=1)
    ce_weight: float = Field(1.0, ge=0)
    """Weight of the label cross-entropy."""
    cache: Literal["auto", "on", "off"] = "auto"
    """Teacher-output cache: ``auto`` uses it when ``data.augment`` is false and it fits
    ``cache_max_mb``."""
    cache_dir: str | None = None
    """Where cache entries live (default: ``$EDGEKT_CACHE/teacher``, else
    ``~/.cache/edgekt/teacher``)."""
    cache_max_mb: float = Field(4096.0, gt=0)
    mix: Literal["none", "mixup", "cutmix", "both"] = "none"
    """Function matching (Beyer et al. 2022, "Knowledge distillation: A good teacher is patient
    and consistent"): mix each training batch with a shuffled copy of itself (mixup, cutmix, or
    one of the two at random per batch); teacher and student see the same mixed images."""
    mix_alpha: float = Field(1.0, gt=0)
    """Beta(alpha, alpha) of the mixing ratio."""
    transfer: str | None = None
    """A dataset whose images (labels ignored) the student also learns from the teacher on: any
    dataset name, ``train`` (all training images of ``data.name``, e.g. with
    ``data.label_fraction``), or ``imagefolder:PATH`` (class folders, or images in PATH). Its
    training split is used (``data.limit`` applies to it too), so validation and test images
    never leak in."""
    transfer_batch_size: int | None = Field(None, gt=0)
    """Transfer images per step (default: ``data.batch_size``)."""


def options_model(name: str, *sources: Any) -> type[BaseModel]:
    """A strict pydantic model of the keyword-only options (with defaults) of ``sources``."""
    fields: dict[str, Any] = {}
    for src in sources:
        hints = typing.get_type_hints(src)
        for p in inspect.signature(src).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty:
                fields[p.name] = (hints[p.name], p.default)
    return create_model(f"{name}_options", __config__=ConfigDict(extra="forbid"), **fields)


def _bridge_sources(spec: KDLoss) -> list[Any]:
    return [CRDMemory.__init__] if spec.bridge == "crd" else []


class Term(nn.Module):
    """One configured KD term: taps, optional bridge module, loss function and weight."""

    def __init__(self, key: str, spec: KDLoss, cfg: LossTerm, options: dict[str, Any],
                 bridge: nn.Module | None) -> None:
        super().__init__()
        self.key, self.spec, self.weight = key, spec, cfg.weight
        self.s_tap, self.t_tap, self.warmup_epochs = cfg.student, cfg.teacher, cfg.warmup_epochs
        self.options = options
        self.bridge = bridge

    def forward(self, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                pos: torch.Tensor | None) -> torch.Tensor:
        fn = self.spec.fn
        if self.spec.inputs == "vectors":
            s, t = s.flatten(1), t.flatten(1)
        if self.spec.bridge == "crd":
            assert isinstance(self.bridge, CRDMemory) and pos is not None
            temp = self.options["temperature"]
            s_scores, t_scores, log_z = self.bridge(s, t, pos, temp)
            n = self.bridge.n_data
            return (fn(s_scores, log_z[0], temperature=temp, n_data=n)
                    + fn(t_scores, log_z[1], temperature=temp, n_data=n))
        if self.bridge is not None:
            s = self.bridge(s)
        return fn(s, t, y, **self.options) if self.spec.targets else fn(s, t, **self.options)

    def ramp(self, step: int, steps_per_epoch: int) -> float:
        if not self.warmup_epochs:
            return 1.0
        return min(1.0, step / (self.warmup_epochs * steps_per_epoch))


@METHODS.register("distill")
class DistillTask(Task):
    """Student trained on ``ce_weight * CE + sum_i weight_i * ramp_i * KD_i`` against a frozen
    teacher (see ``DistillOptions``)."""

    args_model = DistillOptions

    def __init__(self, cfg: Config, model: nn.Module, splits: Splits, device: torch.device):
        super().__init__(cfg, model, splits, device)
        source = "method_args (method: distill)"
        self.opts: DistillOptions = validate(DistillOptions, cfg.method_args, source)
        info = splits.info
        teacher = load_teachers(self.opts.teacher, info)
        self.teacher_identity = teacher.identity
        # A plain attribute, not a sub-module: keeps the teacher out of state_dict/parameters().
        object.__setattr__(self, "teacher", teacher.model)
        renorm = renormaliser(teacher.info, info)
        self._renorm = None if renorm is None else tuple(r.to(device) for r in renorm)

        specs = [(t, KD_LOSSES.get(t.name)) for t in self.opts.losses]
        self._check_combination(specs, source)
        for term, spec in specs:
            defaults = _default_taps(spec, model, teacher.model)
            term.student = term.student or defaults[0]
            term.teacher = term.teacher or defaults[1]
        self.s_taps = FeatureTaps(model, [t.student for t, _ in specs], "student")
        self.t_taps = FeatureTaps(teacher.model, [t.teacher for t, _ in specs], "teacher")
        s_shapes, t_shapes = self._probe(model, info)

        self.terms = nn.ModuleList()
        for i, (term, spec) in enumerate(specs):
            where = f"{source}.losses[{i}] ({term.name})"
            options = validate(options_model(term.name, spec.fn, *_bridge_sources(spec)),
                               term.model_extra or {}, where).model_dump()
            bridge = self._bridge(spec, term, options, s_shapes, t_shapes, splits, where)
            fn_opts = {k: v for k, v in options.items()
                       if k in inspect.signature(spec.fn).parameters}
            unique = sum(t.name == term.name for t, _ in specs) == 1
            key = term.name if unique else f"{term.name}{i}"
            self.terms.append(Term(key, spec, term, fn_opts, bridge))

        self.teacher.to(device)
        if cfg.train.channels_last and device.type == "cuda":
            self.teacher.to(memory_format=torch.channels_last)
        self.ce_weight = self.opts.ce_weight
        self.transfer = None if self.opts.transfer is None else transfer_split(
            self.opts.transfer, cfg.data, info)
        self.cache: tcache.TeacherCache | None = None
        self.cache_key: str | None = None
        if self._use_cache(splits, t_shapes):
            self._open_cache(splits, device)
        self.needs_index = self.cache is not None or any(s.bridge == "crd" for _, s in specs)

    # ---- set-up ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _probe(self, model: nn.Module, info) -> tuple[dict, dict]:
        """Output shape of every tap, from one forward pass of each model on a blank batch."""
        x = torch.zeros(2, info.in_channels, info.image_size, info.image_size,
                        device=next(model.parameters()).device)
        was = model.training
        model.eval()
        s = {k: tuple(v.shape) for k, v in self.s_taps.collect(model(x)).items()}
        model.train(was)
        x = x.to(next(self.teacher.parameters()).device)
        t = {k: tuple(v.shape) for k, v in self.t_taps.collect(self.teacher(x)).items()}
        return s, t

    def _bridge(self, spec: KDLoss, term: LossTerm, options: dict[str, Any], s_shapes: dict,
                t_shapes: dict, splits: Splits, where: str) -> nn.Module | None:
        ss, ts = s_shapes[term.student], t_shapes[term.teacher]
        if spec.inputs == "maps" and spec.bridge != "adapter" and (len(ss) != 4 or len(ts) != 4):
            raise EdgektError(f"{where}: needs feature maps (B,C,H,W), but student tap "
                              f"{term.student!r} gives {ss} and teacher tap {term.teacher!r} "
                              f"gives {ts}")
        if spec.inputs == "logits" and ss != ts:
            raise EdgektError(f"{where}: taps give {ss} (student) and {ts} (teacher); a logit "
                              f"loss needs matching class scores (tap 'logits')")
        if spec.bridge == "adapter":
            return Adapter(ss, ts, where) if ss != ts else None
        if spec.bridge == "crd":
            kw = {k: options[k] for k in ("feat_dim", "nce_k", "momentum")}
            s_dim, t_dim = _numel(ss), _numel(ts)
            return CRDMemory(s_dim, t_dim, tcache.split_positions(splits.train), **kw)
        return None

    def _check_combination(self, specs: list[tuple[LossTerm, KDLoss]], source: str) -> None:
        hard = [t.name for t, spec in specs if spec.targets]
        if self.opts.mix != "none" and hard:
            raise EdgektError(f"{source}: mix: {self.opts.mix} mixes images of two classes, but "
                              f"{hard} need one hard label per image; use hinton_kd or dist, or "
                              f"mix: none")
        if self.opts.transfer is not None:
            if hard:
                raise EdgektError(f"{source}: transfer images have no labels, but {hard} need "
                                  f"them; use hinton_kd or dist with a transfer set")
            if any(spec.bridge == "crd" for _, spec in specs):
                raise EdgektError(f"{source}: crd indexes the labelled split only and cannot "
                                  f"use a transfer set")
        if len(self.opts.teacher) > 1:
            feats = [f"{t.name} ({t.teacher or 'default tap'})" for t, spec in specs
                     if spec.inputs != "logits"]
            if feats:
                raise EdgektError(f"{source}: a teacher ensemble offers only its averaged "
                                  f"logits, but {feats} tap teacher features; use one teacher")

    def train_loader(self, loader: BatchLoader) -> BatchLoader | PairedLoader:
        if self.transfer is None:
            return loader
        size = self.opts.transfer_batch_size or self.cfg.data.batch_size
        primary = BatchLoader(self.transfer, loader.info, size, shuffle=True, seed=loader.seed + 1,
                              augment=loader.augment, rank=loader.rank, world=loader.world)
        return PairedLoader(primary, loader)

    def _use_cache(self, splits: Splits, t_shapes: dict) -> bool:
        mode = self.opts.cache
        if mode == "off":
            return False
        if self.opts.mix != "none" or self.opts.transfer is not None:
            if mode == "on":
                raise EdgektError("method_args.cache: on cannot be used with mix or transfer "
                                  "(the teacher sees new images every step)")
            return False
        if self.cfg.data.augment:
            if mode == "on":
                raise EdgektError("method_args.cache: on needs data.augment: false (with random "
                                  "augmentation the teacher sees a new image every epoch)")
            return False
        mb = len(splits.train) * sum(_numel(s) for s in t_shapes.values()) * 4 / 2**20
        if mode == "auto" and mb > self.opts.cache_max_mb:
            console.print(f"teacher cache skipped: it would take {mb:.0f} MB "
                          f"(> method_args.cache_max_mb={self.opts.cache_max_mb:.0f})")
            return False
        return True

    def _open_cache(self, splits: Splits, device: torch.device) -> None:
        self.cache_key = tcache.cache_key(self.teacher_identity, self.t_taps.names, splits.info,
                                          "train", splits.train)
        root = Path(self.opts.cache_dir) if self.opts.cache_dir else tcache.default_cache_dir()
        loader = make_loader(splits.train, splits.info, self.cfg.data.model_copy(
            update={"augment": False}), train=False)
        self.cache = tcache.open_or_build(root, self.cache_key, splits.train, loader,
                                          lambda x: self.teacher_outputs(x.to(device)),
                                          log=console.print)

    # ---- training ------------------------------------------------------------------------------
    def teacher_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's tapped outputs for a batch (frozen, eval mode, inference_mode)."""
        with torch.inference_mode():
            if self._renorm is not None:
                x = x * self._renorm[0] + self._renorm[1]
            out = self.t_taps.collect(self.teacher(x))
        # Inference tensors cannot be saved for backward: hand the losses normal copies.
        return {k: v.clone() for k, v in out.items()}

    def training_step(self, model: nn.Module, batch: tuple, step: int) -> StepOutput:
        x, y = batch[0], batch[1]
        n_labelled = len(y)
        pos, mixed = None, None
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + step)
        if self.transfer is not None:
            # Labelled images stay clean (their CE is exact); the transfer images are mixed.
            x_u = batch[2]
            if self.opts.mix != "none":
                x_u = mix_batch(x_u, self.opts.mix, self.opts.mix_alpha, g)[0]
            x = torch.cat([x, x_u])
        else:
            pos = batch[2] if len(batch) > 2 else None
            if self.opts.mix != "none":
                x, mixed = mix_batch(x, self.opts.mix, self.opts.mix_alpha, g)
        if self.cache is not None:
            t_out = self.cache.lookup(pos, x.device)
        else:
            t_out = self.teacher_outputs(x)
        logits = model(x)
        s_out = self.s_taps.collect(logits)
        ce = self._ce(logits[:n_labelled].float(), y, mixed)
        loss = self.ce_weight * ce
        terms = {"ce": ce}
        for term in self.terms:
            value = term(s_out[term.s_tap], t_out[term.t_tap], y, pos)
            terms[term.key] = value
            loss = loss + term.weight * term.ramp(step, self.steps_per_epoch) * value
        return StepOutput(loss, logits[:n_labelled], y, terms)

    def _ce(self, logits: torch.Tensor, y: torch.Tensor, mixed: Mix | None) -> torch.Tensor:
        ls = self.label_smoothing
        if mixed is None:
            return F.cross_entropy(logits, y, label_smoothing=ls)
        return (mixed.lam * F.cross_entropy(logits, y, label_smoothing=ls)
                + (1 - mixed.lam) * F.cross_entropy(logits, y[mixed.perm], label_smoothing=ls))

    def train(self, mode: bool = True) -> DistillTask:
        super().train(mode)
        self.teacher.eval()  # never leaves eval mode (BatchNorm statistics stay the teacher's)
        return self

    def export_metadata(self) -> dict[str, Any]:
        return {
            "method": "distill",
            "teacher": self.teacher_identity,
            "losses": [t.model_dump() for t in self.opts.losses],
            "ce_weight": self.ce_weight,
            "teacher_cache": self.cache_key,
        }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def _default_taps(spec: KDLoss, student: nn.Module, teacher: nn.Module) -> tuple[str, str]:
    """``logits`` for logit losses, ``embedding`` for vector losses, the last backbone stage for
    feature-map losses."""
    if spec.inputs == "logits":
        return "logits", "logits"
    if spec.inputs == "vectors":
        return "embedding", "embedding"
    return _last_stage_name(student), _last_stage_name(teacher)


def _last_stage_name(model: nn.Module) -> str:
    last = model.stages()[-1]
    return next(name for name, m in model.named_modules() if m is last)
