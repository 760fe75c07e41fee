"""Load and check the frozen teacher: from an edgekt checkpoint, or a model name + local weights."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from edgekt.checkpoint import file_sha256, load_checkpoint
from edgekt.config import Strict
from edgekt.data import DatasetInfo
from edgekt.engine.setup import model_from_checkpoint
from edgekt.errors import EdgektError
from edgekt.models import count_params, create_model, load_weights


class TeacherConfig(Strict):
    """Where the teacher comes from: ``checkpoint`` or ``model`` + ``weights``."""

    checkpoint: str | None = None
    """An edgekt checkpoint (e.g. ``runs/teacher/best.pt``); the model is rebuilt from it."""
    model: str | None = None
    """A registered model name, built for this dataset and loaded from ``weights``."""
    weights: str | None = None
    """Local weights for ``model``: an edgekt checkpoint, a ``.pth`` or a ``.safetensors`` file."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra model-factory arguments for ``model``."""

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if (self.checkpoint is None) == (self.model is None):
            raise ValueError("give exactly one of teacher.checkpoint or teacher.model (+ weights)")
        if self.model is not None and self.weights is None:
            raise ValueError("teacher.model needs teacher.weights (a random teacher teaches "
                             "nothing)")
        path = self.checkpoint or self.weights
        if path is not None and not Path(path).is_file():
            key = "checkpoint" if self.checkpoint else "weights"
            raise ValueError(f"teacher.{key}: no such file: {path} (train the teacher first, "
                             f"or fix the path)")
        return self


@dataclass
class Teacher:
    model: nn.Module
    identity: dict[str, Any]
    """What the student's checkpoint records: source, path, sha256, model, params, metrics."""
    info: DatasetInfo | None
    """The data description stored with a checkpoint teacher (None for plain weights)."""


def load_teacher(cfg: TeacherConfig, info: DatasetInfo) -> Teacher:
    """Build the teacher in eval mode with frozen weights, checked against the student's data."""
    path = Path(cfg.checkpoint or cfg.weights or "")
    if cfg.checkpoint is not None:
        ckpt = load_checkpoint(path)
        model, t_info = model_from_checkpoint(ckpt, str(path))
        name, kwargs = ckpt["model"]["name"], dict(ckpt["model"].get("kwargs", {}))
        metrics = {k: v for k, v in ckpt.get("metrics", {}).items() if isinstance(v, int | float)}
        _check_data(t_info, info, path)
    else:
        assert cfg.model is not None
        name, kwargs, metrics, t_info = cfg.model, dict(cfg.kwargs), {}, None
        model = create_model(name, num_classes=info.num_classes, in_channels=info.in_channels,
                             image_size=info.image_size, **kwargs)
        missing = load_weights(model, path)
        if any(k.startswith("head.") for k in missing):
            raise EdgektError(f"teacher.weights {path}: the classifier head does not fit: the "
                              f"weights were trained for another class count than this dataset's "
                              f"{info.num_classes} (or hold no head). Distil from a teacher "
                              f"fine-tuned on this dataset")
        if missing:
            raise EdgektError(f"teacher.weights {path}: {len(missing)} tensors of {name!r} are not "
                              f"in the file (e.g. {', '.join(missing[:4])}); a teacher must load "
                              f"completely")
    model.eval().requires_grad_(False)
    identity = {"source": "checkpoint" if cfg.checkpoint else "weights",
                "path": str(path.resolve()), "sha256": file_sha256(path), "model": name,
                "kwargs": kwargs, "params": count_params(model), "metrics": metrics}
    return Teacher(model, identity, t_info)


class TeacherEnsemble(nn.Module):
    """Several frozen teachers as one: the mean of their logits. Each member first maps the
    student's normalised input to its own normalisation."""

    def __init__(self, members: list[nn.Module],
                 renorms: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        for i, r in enumerate(renorms):
            scale, shift = r if r is not None else (torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
            self.register_buffer(f"scale{i}", scale)
            self.register_buffer(f"shift{i}", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x * getattr(self, f"scale{i}") + getattr(self, f"shift{i}"))
                for i, m in enumerate(self.members)]
        return torch.stack([o.float() for o in outs]).mean(0)


def load_teachers(cfgs: TeacherConfig | list[TeacherConfig], info: DatasetInfo) -> Teacher:
    """One teacher, or an ensemble of several (averaged logits) checked against ``info``."""
    if isinstance(cfgs, TeacherConfig):
        return load_teacher(cfgs, info)
    if not cfgs:
        raise EdgektError("method_args.teacher: the list of teachers is empty")
    members = [load_teacher(c, info) for c in cfgs]
    if len(members) == 1:
        return members[0]
    renorms = [renormaliser(m.info, info) for m in members]
    model = TeacherEnsemble([m.model for m in members], renorms).eval().requires_grad_(False)
    ids = [m.identity for m in members]
    digest = hashlib.sha256("".join(i["sha256"] for i in ids).encode()).hexdigest()
    identity = {"source": "ensemble", "path": [i["path"] for i in ids], "sha256": digest,
                "model": "ensemble(" + ",".join(i["model"] for i in ids) + ")",
                "kwargs": [i["kwargs"] for i in ids], "params": sum(i["params"] for i in ids),
                "metrics": {}, "members": ids}
    return Teacher(model, identity, None)  # type: ignore[arg-type]


def _check_data(t: DatasetInfo, s: DatasetInfo, path: Path) -> None:
    if t.num_classes != s.num_classes:
        raise EdgektError(f"teacher.checkpoint {path}: the teacher predicts {t.num_classes} "
                          f"classes but the student's data ({s.name}) has {s.num_classes}. Use a "
                          f"teacher trained on the same classes (data.classes must match)")
    if t.labels and s.labels and list(t.labels) != list(s.labels):
        raise EdgektError(f"teacher.checkpoint {path}: class labels differ from the data's "
                          f"(teacher {t.labels[:5]}..., data {s.labels[:5]}...)")
    if (t.in_channels, t.image_size) != (s.in_channels, s.image_size):
        raise EdgektError(f"teacher.checkpoint {path}: the teacher takes {t.in_channels}x"
                          f"{t.image_size}x{t.image_size} images, the data gives {s.in_channels}x"
                          f"{s.image_size}x{s.image_size}; set data.image_size to match")


def renormaliser(t: DatasetInfo | None, s: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) turning the student's normalised input into the teacher's, if they differ."""
    if t is None or (list(t.mean) == list(s.mean) and list(t.std) == list(s.std)):
        return None
    sm, ss = torch.tensor(s.mean).view(1, -1, 1, 1), torch.tensor(s.std).view(1, -1, 1, 1)
    tm, ts = torch.tensor(t.mean).view(1, -1, 1, 1), torch.tensor(t.std).view(1, -1, 1, 1)
    # x_t = (raw - tm) / ts with raw = x_s * ss + sm
    return ss / ts, (sm - tm) / ts
