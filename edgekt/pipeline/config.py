"""The pipeline's typed config: teacher, students, export, profile, report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field

from edgekt.config import Strict, apply_overrides, read_yaml_mapping, validate
from edgekt.devices.profiler import ProfileConfig
from edgekt.errors import EdgektError
from edgekt.exporters.config import ExportConfig
from edgekt.pruning.spec import PruneSpec, absolute_target, problems, target_mode

PRESETS_DIR = Path(__file__).parents[1] / "configs"


class TeacherSpec(Strict):
    checkpoint: str | None = None
    """Use this trained teacher checkpoint instead of training one."""
    config: str = "quick_teacher.yaml"
    """Training config (a path, or the name of a packaged config in edgekt/configs)."""
    set: list[str] = Field(default_factory=list)
    """Overrides for the teacher's training config (`optim.lr=0.01`, ...)."""


_PRUNE_DEFAULTS = PruneSpec()


class PruneStudentSpec(Strict):
    """A student made by pruning a model of the pipeline (``edgekt prune``'s options)."""

    model_config = ConfigDict(populate_by_name=True)

    from_: Literal["teacher"] = Field("teacher", alias="from")
    """The model to prune: ``teacher`` (the pipeline's teacher checkpoint), which also stays
    the teacher of the distillation."""
    ratio: float | None = None
    """Fraction of channels removed from every prunable group (0 < ratio < 1)."""
    target_macs: float | None = None
    """Prune until MACs per image fall to this: a count, or a fraction of the teacher if < 1."""
    target_params: float | None = None
    """Prune until parameters fall to this: a count, or a fraction of the teacher if < 1."""
    importance: str = _PRUNE_DEFAULTS.importance
    """Channel ranking: l1, l2 (weight magnitude), taylor (on training images), bn-scale."""
    global_pruning: bool = Field(_PRUNE_DEFAULTS.global_pruning, alias="global")
    """``global: true`` ranks channels across layers instead of the same ratio per layer."""
    steps: int = _PRUNE_DEFAULTS.steps
    """Pruning rounds (with ``recover_steps``: prune-and-recover rounds)."""
    keep: list[str] = Field(default_factory=lambda: list(_PRUNE_DEFAULTS.keep))
    """Modules left unpruned: ``stem``, ``head``, module paths or ``auto`` (the head; the stem
    unless it is full-resolution and less than a quarter of the teacher is kept)."""
    recover_steps: int = _PRUNE_DEFAULTS.recover_steps
    """KD steps from the teacher after every pruning round, before the distillation."""
    recover_lr: float = _PRUNE_DEFAULTS.recover_lr
    """Learning rate of those recovery steps."""
    round_to: int | None = _PRUNE_DEFAULTS.round_to
    """Keep channel counts multiples of this."""

    def spec(self) -> PruneSpec:
        """The :class:`PruneSpec` that ``prune_checkpoint`` takes."""
        return PruneSpec(**self.model_dump(exclude={"from_"}))


class StudentSpec(Strict):
    name: str
    """Row name in the report and folder name under students/."""
    model: str = "cnn_s"
    """Architecture (any `edgekt models` name); not given for a ``prune`` student."""
    prune: PruneStudentSpec | None = None
    """Make the student by pruning the teacher (its architecture and starting weights), then
    distil it from the unpruned teacher. Its scratch twin is the same pruned architecture,
    freshly initialised and trained without the teacher."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    config: str = "student_fashion.yaml"
    """Base training config of the student (optimiser, schedule, batch size)."""
    losses: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"name": "hinton_kd", "temperature": 4.0}])
    """KD loss terms (see `edgekt distill`); an empty list trains the student from scratch."""
    distill: dict[str, Any] = Field(default_factory=dict)
    """Further ``method_args`` of the distillation (``mix``, ``ce_weight``, ``transfer``, ...)."""
    epochs: int = Field(3, gt=0)
    set: list[str] = Field(default_factory=list)
    """Extra overrides of the student's run config."""
    scratch_twin: bool = True
    """Also train the same student without a teacher (same model, epochs, seed, data and
    augmentation), so the report shows what distillation bought. With a ``transfer`` set the
    twin trains for as many optimiser steps as the distilled run instead of as many epochs."""


class ExportSpec(ExportConfig):
    """``edgekt export``'s options (one ``ExportConfig``), with the pipeline's defaults: both
    CPU runtimes, FP32 and INT8, and a failed parity gate marked in the report, not fatal."""

    targets: list[str] = Field(default_factory=lambda: ["onnx", "openvino"])
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(
        default_factory=lambda: ["fp32", "int8"])
    allow_mismatch: bool = True
    optional_targets: list[str] = Field(default_factory=list)
    """Targets exported when their converter is installed, and skipped with a note otherwise
    (the quick preset's LiteRT: its converter is a large host-side extra)."""
    teacher: bool = True
    """Export the teacher too (FP32), to compare runtimes like for like."""

    def resolved_targets(self) -> tuple[list[str], list[str]]:
        """(targets to export, optional targets skipped because their converter is missing)."""
        from edgekt.exporters.base import target_installed

        extra = [t for t in self.optional_targets if t not in self.targets]
        have = [t for t in extra if target_installed(t)]
        return [*self.targets, *have], [t for t in extra if t not in have]

    def for_export(self, precisions: list[str]) -> ExportConfig:
        """The ``ExportConfig`` of one model of the pipeline."""
        return ExportConfig(**{**self.model_dump(exclude={"teacher", "optional_targets"}),
                               "targets": self.resolved_targets()[0], "precisions": precisions})


class ProfileSpec(ProfileConfig):
    """``edgekt profile``'s settings (one ``ProfileConfig``) with the pipeline's defaults, and
    where to profile."""

    devices: list[str] = Field(default_factory=lambda: ["local"])
    """Device names (devices/*.yaml) or device files; unreachable ones are marked, not fatal."""
    backends: list[str] = Field(default_factory=lambda: ["onnxruntime", "openvino"])
    threads: int | None = Field(1, ge=1)
    warmup: int = Field(20, ge=0)
    seconds: float = Field(2.0, gt=0)
    torch_eager: bool = True
    """Also time every model in PyTorch eager on this machine (the speed-up baseline)."""

    def settings(self) -> ProfileConfig:
        """How each model is measured (CDF samples kept for the report)."""
        return ProfileConfig(**{**self.model_dump(exclude={"devices", "backends",
                                                             "torch_eager"}), "samples": True})


class PipelineConfig(Strict):
    run_dir: str = "runs/pipeline"
    data: dict[str, Any] = Field(default_factory=dict)
    """Data settings shared by every stage (`name`, `data_dir`, `limit`, ...)."""
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    students: list[StudentSpec] = Field(default_factory=list)
    export: ExportSpec = Field(default_factory=ExportSpec)
    profile: ProfileSpec = Field(default_factory=ProfileSpec)


def resolve_config_path(name: str) -> Path:
    """A config given by path, or by the name of a packaged one (``quick_teacher.yaml``)."""
    p = Path(name)
    if p.is_file():
        return p
    packaged = PRESETS_DIR / name
    if packaged.is_file():
        return packaged
    raise EdgektError(f"config {name!r} not found (neither a file nor one of edgekt/configs: "
                      f"{', '.join(sorted(f.name for f in PRESETS_DIR.glob('*.yaml')))})")


def load_pipeline_config(path: str | Path | None, preset: str | None,
                         overrides: list[str]) -> PipelineConfig:
    """Load a pipeline YAML (or a preset: ``quick``/``full``) and apply ``--set`` overrides."""
    if path is None and preset is None:
        preset = "quick"
    if path is None:
        path = resolve_config_path(f"pipeline_{preset}.yaml")
    p = Path(path)
    raw = read_yaml_mapping(p, "pipeline config")
    apply_overrides(raw, overrides)
    cfg: PipelineConfig = validate(PipelineConfig, raw, str(p))
    names = [s.name for s in cfg.students]
    if not names:
        raise EdgektError(f"{p}: students: list at least one student")
    if len(set(names)) != len(names):
        raise EdgektError(f"{p}: students: names must be unique, got {names}")
    check_prune_students(cfg, p)
    return cfg


def check_prune_students(cfg: PipelineConfig, source: Path) -> None:
    """Refuse a pruned student that cannot be made, before anything runs: bad options, a model
    or kwargs beside ``prune``, an absolute target not below the teacher's size."""
    found: list[str] = []
    absolute: list[tuple[str, str, float]] = []
    for i, s in enumerate(cfg.students):
        if s.prune is None:
            continue
        where = f"students.{i}.prune"
        bad = problems(s.prune.spec(), flag=str)
        found += [f"{where}: {m}" for m in bad]
        extra = sorted({"model", "kwargs"} & s.model_fields_set)
        if extra:
            found.append(f"students.{i}: {' and '.join(extra)} cannot be given with prune "
                         f"(the pruned teacher is the student's architecture)")
        if not bad:
            mode = target_mode(s.prune.spec())
            value = getattr(s.prune, mode)
            if mode != "ratio" and value >= 1:  # a count: compare with the teacher's
                absolute.append((f"{where}.{mode}", mode, value))
    if absolute and not found:
        from edgekt.pipeline.sizes import teacher_size

        size = teacher_size(cfg)
        for field, mode, value in absolute:
            what = "MACs" if mode == "target_macs" else "parameters"
            base = size[0] if mode == "target_macs" else size[1]
            if absolute_target(value, base) >= base:
                found.append(f"{field}: {value:g} is not below the teacher's {base:,} {what} "
                             f"(give a count below it, or a fraction < 1)")
    if found:
        raise EdgektError("\n".join(f"{source}: {m}" for m in found))
