"""Typed, strict run configuration loaded from YAML with ``--set a.b=c`` overrides."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from edgekt.errors import EdgektError


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(Strict):
    name: str = "fashion-mnist"
    """Registered dataset name (`fashion-mnist`, `digits`, `mnist-5k`, `imagefolder:PATH`)."""
    data_dir: str | None = None
    """Directory holding the raw files; default: $EDGEKT_DATA, then the Debian package path."""
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of the training split held out for validation (deterministic, seeded)."""
    limit: int | None = Field(None, gt=0)
    """Use at most this many training samples (quick runs)."""
    augment: bool = False
    """Random crop + flip on the training split."""
    erasing: float = Field(0.0, ge=0.0, le=1.0)
    """Random erasing probability per training image (Zhong et al. 2020); needs ``augment``."""
    label_fraction: float = Field(1.0, gt=0.0, le=1.0)
    """Keep a seeded fraction of the training labels (the rest of the training split is dropped;
    a distillation ``transfer`` set can still use those images without their labels)."""
    classes: list[int] | None = None
    """Keep only these class indices (relabelled 0..n-1), e.g. few-shot base classes."""
    batch_size: int = Field(128, gt=0)
    eval_batch_size: int = Field(512, gt=0)
    num_workers: int = Field(0, ge=0)
    image_size: int | None = Field(None, gt=0)
    """Resize images to this side length (default: the dataset's native size)."""

    @model_validator(mode="after")
    def _erasing_needs_augment(self) -> DataConfig:
        if self.erasing and not self.augment:
            raise ValueError("data.erasing needs data.augment: true (erasing is applied to the "
                             "augmented training batches)")
        return self


class ModelConfig(Strict):
    name: str = "cnn_s"
    """Registered model name (`edgekt models` lists them)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the model factory (e.g. `width_mult`)."""
    weights: str | None = None
    """Local weights to start from: an edgekt checkpoint, a torchvision `.pth` or `.safetensors`."""


class OptimConfig(Strict):
    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    layer_decay: float | None = Field(None, gt=0, le=1)
    """Layer-wise LR decay: stage k from the head gets lr * layer_decay**k."""
    head_lr_mult: float = Field(1.0, gt=0)
    """Multiplier on the classifier head's learning rate (fine-tuning)."""


class SchedConfig(Strict):
    name: Literal["none", "cosine", "step", "onecycle"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    step_size: int = Field(10, gt=0)
    gamma: float = Field(0.1, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class FinetuneConfig(Strict):
    freeze: Literal["none", "backbone"] | int = "none"
    """Freeze nothing, the whole backbone, or the first N stages of the backbone."""
    new_head: bool = False
    """Replace the loaded classifier head (needed when the class count changes)."""


class TrainConfig(Strict):
    epochs: int = Field(5, gt=0)
    device: str = "auto"
    """`auto` (cuda, then mps, then cpu), or any torch device string."""
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    """Mixed precision; `auto` uses bf16 on GPUs that support it, else fp16, off on CPU."""
    channels_last: bool = True
    """Use channels_last memory format on GPU."""
    compile: bool = False
    grad_accum: int = Field(1, gt=0)
    clip_grad: float | None = Field(None, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    ema: float | None = Field(None, gt=0, lt=1)
    """Keep an exponential moving average of the weights with this decay per step (e.g. 0.999);
    validation, ``best.pt``, the test score and exports then use the averaged weights."""
    seed: int = 0
    deterministic: bool = False
    threads: int | None = Field(None, gt=0)
    """torch intra-op threads on CPU (default: torch's choice)."""
    tensorboard: bool = False
    progress: bool = True


class RunConfig(Strict):
    dir: str = "runs/default"
    """Run directory: checkpoints, metrics and the resolved config are written here."""


class Config(Strict):
    """A whole run: data, model, optimiser, schedule, training, fine-tuning and method."""

    method: str = "supervised"
    """Registered training method (`supervised`, `distill`, ...)."""
    method_args: dict[str, Any] = Field(default_factory=dict)
    """Method-specific options, validated by the method itself."""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    sched: SchedConfig = Field(default_factory=SchedConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    _source: str = PrivateAttr(default="defaults")

    @property
    def source(self) -> str:
        """Where the config came from (its YAML file, or ``defaults``), for error messages."""
        return self._source


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EdgektError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise EdgektError(f"--set {item!r}: {part!r} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise EdgektError(f"--set {item!r}: the value {value!r} is not valid YAML "
                              f"({_yaml_problem(exc)}); quote strings that hold : [ ] {{ }} or #"
                              ) from None
    return raw


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}" if problem else str(exc).splitlines()[0]


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML file that must hold a non-empty mapping; every failure is one clear error.

    Refused: a missing or unreadable file, bytes that are not UTF-8 text (a binary file given
    by mistake), invalid YAML, an empty file (it would silently mean "all defaults") and a
    top level that is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise EdgektError(f"{what} not found: {p}" if not p.exists() else
                          f"{what} {p} is not a regular file")
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as exc:
        raise EdgektError(f"{p}: cannot read the {what} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise EdgektError(f"{p}: not a text {what} (byte {exc.start} is not UTF-8); expected "
                          "YAML") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EdgektError(f"{p}: not valid YAML ({_yaml_problem(exc)})") from None
    if raw is None:
        raise EdgektError(f"{p}: the {what} is empty; write at least one key (an empty file "
                          "would silently mean all defaults)")
    if not isinstance(raw, dict):
        raise EdgektError(f"{p}: expected a mapping of keys at the top level of the {what}, "
                          f"got {type(raw).__name__}")
    return raw


def validate(model: type[BaseModel], raw: dict[str, Any], source: str) -> Any:
    """Validate ``raw`` against ``model``, turning pydantic errors into one readable message."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise EdgektError(format_validation_error(model, exc, source)) from None


def format_validation_error(model: type[BaseModel], exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            valid = _fields_at(model, err["loc"][:-1])
            close = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"  unknown key {loc!r}{hint} (valid here: {', '.join(valid)})")
        else:
            loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
            lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def option_error(model: type[BaseModel], exc: ValidationError, source: str,
                 flags: dict[str, str] | None = None) -> EdgektError:
    """A command's options failed ``model``: one line per field, naming its flag (``--`` + the
    field with dashes unless ``flags`` says otherwise), its key, the value and what was wrong."""
    lines = [f"{source}: invalid option"]
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else "?"
        if err["type"] == "extra_forbidden":
            lines.append(f"  unknown key {key!r} (valid: {', '.join(model.model_fields)})")
        else:
            flag = (flags or {}).get(key, "--" + key.replace("_", "-"))
            lines.append(f"  {flag} {err.get('input')!r} ({key}): {err['msg']}")
    return EdgektError("\n".join(lines))


def merge_options(model: type[Strict] | type[BaseModel], base: Any, changes: dict[str, Any],
                  source: str, flags: dict[str, str] | None = None) -> Any:
    """``base`` (an instance of ``model``, a YAML file of its fields, a mapping, or None for the
    defaults) with ``changes`` applied and validated; a bad value is an ``EdgektError`` naming
    the flag (:func:`option_error`) and the file it came from."""
    if isinstance(base, model):
        raw = base.model_dump()
    elif isinstance(base, str | Path):
        source, raw = str(base), read_yaml_mapping(base, f"{model.__name__} file")
    else:
        raw = dict(base or {})
    try:
        return model.model_validate({**raw, **changes})
    except ValidationError as exc:
        raise option_error(model, exc, source, flags) from None


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        if isinstance(part, int):  # an index into a list of sections
            continue
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        inner = _section_type(getattr(field, "annotation", None))
        if inner is None:
            return []
        model = inner
    return sorted(f.alias or name for name, f in model.model_fields.items())


def _section_type(ann: Any) -> type[BaseModel] | None:
    """The config section inside an annotation (``Section``, ``Section | None``, ``list[..]``)."""
    if typing.get_origin(ann) is None and isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        raw = read_yaml_mapping(path)
    apply_overrides(raw, overrides or [])
    origin = source
    if overrides:
        source += " + --set " + " ".join(overrides)
    cfg: Config = validate(Config, raw, source)
    cfg._source = origin
    return cfg


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    from edgekt.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.model_dump(), sort_keys=False))
