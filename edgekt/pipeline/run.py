"""``edgekt pipeline``: teacher -> students -> export (+ parity) -> profile -> report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekt.config import Config, apply_overrides, load_config, validate
from edgekt.errors import EdgektError
from edgekt.exporters.base import TARGETS
from edgekt.io import atomic_write_text
from edgekt.pipeline.config import PipelineConfig, StudentSpec, resolve_config_path
from edgekt.pipeline.sizes import checkpoint_size
from edgekt.pipeline.stages import StageRunner, input_hash

SECTIONS = ("data", "model", "optim", "sched", "finetune", "train", "run")


def run_config(cfg_path: Path, updates: dict[str, Any], user_sets: list[str],
               run_dir: Path) -> Config:
    """A stage's run config: its YAML file, the pipeline's typed values (merged into the config
    sections, replacing ``method``/``method_args``), then the stage's own ``set:`` strings, which
    win as on the command line; validated like a config file."""
    merged = load_config(cfg_path).model_dump()
    for key, value in updates.items():
        merged[key] = {**merged[key], **value} if key in SECTIONS else value
    merged["run"] = {**merged["run"], "dir": str(run_dir)}
    apply_overrides(merged, user_sets)
    out: Config = validate(Config, merged, f"{cfg_path} (pipeline stage config)")
    out._source = str(cfg_path)
    return out


def _train(run_cfg: Config, fresh: bool) -> dict[str, Any]:
    """Train (or resume) one run and describe its best checkpoint."""
    from edgekt.checkpoint import file_sha256, load_checkpoint
    from edgekt.engine import fit

    run_dir = Path(run_cfg.run.dir)
    done = run_dir / "summary.json"
    if fresh or not done.exists():
        resume = not fresh and (run_dir / "last.pt").exists()
        fit(run_cfg, resume=resume, force=not resume)
    best = run_dir / "best.pt"
    ck = load_checkpoint(run_dir / "last.pt")
    summary = json.loads(done.read_text())
    return {"checkpoint": str(best), "sha256": file_sha256(best), "model": ck["model"]["name"],
            "params": summary["params"], "macs": checkpoint_size(str(best))[0],
            "test_acc": summary["test_acc"], "best_val_acc": summary["best_val_acc"],
            "steps": summary["step"]}


def stage_teacher(cfg: PipelineConfig, run_dir: Path, fresh: bool) -> dict[str, Any]:
    spec = cfg.teacher
    if spec.checkpoint:
        from edgekt.checkpoint import file_sha256, load_checkpoint
        from edgekt.engine.setup import model_from_checkpoint
        from edgekt.models import count_params

        ck = load_checkpoint(spec.checkpoint)
        model, _ = model_from_checkpoint(ck, spec.checkpoint)
        return {"checkpoint": spec.checkpoint, "sha256": file_sha256(spec.checkpoint),
                "model": ck["model"]["name"], "params": count_params(model),
                "macs": checkpoint_size(spec.checkpoint)[0],
                "test_acc": ck.get("metrics", {}).get("test_acc")}
    return _train(run_config(resolve_config_path(spec.config), {"data": cfg.data}, spec.set,
                             run_dir / "teacher"), fresh)


def student_config(cfg: PipelineConfig, s: StudentSpec, teacher_ckpt: str | None,
                   run_dir: Path, pruned: str | None = None) -> Config:
    """The student's run config; ``teacher_ckpt=None`` gives its scratch twin.

    ``pruned``: the pruned checkpoint of a ``prune`` student, which it starts from (its twin
    gets the same architecture freshly initialised).
    """
    if not s.losses or teacher_ckpt is None:
        method: dict[str, Any] = {"method": "supervised", "method_args": {}}
    else:
        method = {"method": "distill", "method_args": {
            **s.distill, "teacher": {"checkpoint": teacher_ckpt}, "losses": s.losses}}
    model = {"name": s.model, "kwargs": s.kwargs}
    if pruned is not None:
        from edgekt.models import PRUNED_PREFIX

        model = {"name": f"{PRUNED_PREFIX}{pruned}",
                 "kwargs": {"reinit": True} if teacher_ckpt is None else {}}
    updates = {**method, "model": model, "train": {"epochs": s.epochs}, "data": cfg.data}
    return run_config(resolve_config_path(s.config), updates, s.set, run_dir)


def stage_students(cfg: PipelineConfig, run_dir: Path, teacher: dict[str, Any], fresh: bool
                   ) -> dict[str, Any]:
    out = {}
    for s in cfg.students:
        pruned = _prune_student(cfg, s, run_dir, teacher, fresh) if s.prune else None
        res = _train_student(cfg, s, run_dir / "students" / s.name, teacher, fresh, pruned)
        if pruned:
            res["prune"] = {"from": s.prune.from_, **pruned["record"]}
        if s.losses and s.scratch_twin:
            twin_spec = s
            if s.distill.get("transfer"):  # an epoch there is a pass over the unlabelled set
                twin_spec = s.model_copy(update={"epochs": _same_steps_epochs(cfg, s, res)})
            twin = _train_student(cfg, twin_spec, run_dir / "students" / f"{s.name}.scratch",
                                  None, fresh, pruned)
            res["scratch"] = twin
            res["kd_gain_pt"] = 100.0 * (res["test_acc"] - twin["test_acc"])
        out[s.name] = res
    return out


def _same_steps_epochs(cfg: PipelineConfig, s: StudentSpec, kd: dict[str, Any]) -> int:
    """Epochs of the scratch twin of a transfer-set student that give it as many optimiser
    steps as the distilled run (whose epochs are passes over the unlabelled images)."""
    from edgekt.data import build_splits

    run_cfg = student_config(cfg, s, None, Path("unused"))
    n = len(build_splits(run_cfg.data).train)
    per_epoch = -(-n // (run_cfg.data.batch_size * run_cfg.train.grad_accum))
    return max(1, -(-kd["steps"] // per_epoch))


def _prune_student(cfg: PipelineConfig, s: StudentSpec, run_dir: Path,
                   teacher: dict[str, Any], fresh: bool) -> dict[str, Any]:
    """Prune the teacher for a ``prune`` student (kept and reused while its inputs match)."""
    from edgekt.checkpoint import file_sha256
    from edgekt.pruning.prune import prune_checkpoint

    assert s.prune is not None
    dest = run_dir / "pruned" / f"{s.name}.pt"
    marker = dest.with_suffix(".json")
    key = input_hash(s.prune.model_dump(), teacher["sha256"])
    done = json.loads(marker.read_text()) if marker.exists() else {}
    if fresh or done.get("hash") != key or not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            record = prune_checkpoint(teacher["checkpoint"], dest, s.prune.spec(), force=True,
                                      data_dir=cfg.data.get("data_dir"))
        except EdgektError as exc:
            raise EdgektError(f"student {s.name!r}: pruning the teacher failed: {exc}") from None
        done = {"hash": key, "record": record}
        atomic_write_text(marker, json.dumps(done, indent=2))
    return {"checkpoint": str(dest), "sha256": file_sha256(dest), "record": done["record"]}


def _train_student(cfg: PipelineConfig, s: StudentSpec, sdir: Path,
                   teacher: dict[str, Any] | None, fresh: bool,
                   pruned: dict[str, Any] | None = None) -> dict[str, Any]:
    """One student run (its scratch twin when ``teacher`` is None), resumable on its own."""
    spec = s.model_dump(exclude={"scratch_twin"})
    if teacher is None:
        spec = {k: v for k, v in spec.items() if k not in ("losses", "distill")}
    key = input_hash(spec, cfg.data, teacher["sha256"] if teacher else "scratch",
                     *([pruned["sha256"]] if pruned else []))
    marker = sdir / "pipeline.json"
    # A student whose inputs changed starts over; an unfinished one resumes from last.pt.
    stale = marker.exists() and json.loads(marker.read_text())["hash"] != key
    res = _train(student_config(cfg, s, teacher["checkpoint"] if teacher else None, sdir,
                                pruned["checkpoint"] if pruned else None),
                 fresh=fresh or stale)
    atomic_write_text(marker, json.dumps({"hash": key}))
    return res


def stage_export(cfg: PipelineConfig, run_dir: Path, teacher: dict[str, Any],
                 students: dict[str, Any]) -> dict[str, Any]:
    from edgekt.exporters import export_package

    e = cfg.export
    jobs = {name: (r["checkpoint"], e.precisions) for name, r in students.items()}
    if e.teacher:
        jobs["teacher"] = (teacher["checkpoint"], ["fp32"])
    out = {}
    for name, (ckpt, precisions) in jobs.items():
        dest = run_dir / "export" / name
        manifest = export_package(ckpt, dest, e.for_export(precisions), force=True,
                                  data_dir=cfg.data.get("data_dir"))
        out[name] = {"dir": str(dest), "artifacts": manifest.artifacts}
    return out


def stage_profile(cfg: PipelineConfig, exports: dict[str, Any],
                  log: Callable[[str], None]) -> dict[str, Any]:
    from edgekt.devices.campaign import run_profiles
    from edgekt.devices.config import load_device
    from edgekt.devices.transport import TransportError

    p = cfg.profile
    settings = p.settings()
    rows: list[dict[str, Any]] = []
    for dev_name in p.devices:
        device = load_device(dev_name)
        for name, exp in exports.items():
            precisions = sorted({a["precision"] for a in exp["artifacts"]})
            # A target listed in export.targets (LiteRT) is profiled on its own runtime too.
            backends = list(dict.fromkeys([*p.backends, *(a["runtime"] for a in exp["artifacts"])]))
            try:
                got = run_profiles([exp["dir"]], device, backends, settings,
                                   precisions=precisions)
            except (TransportError, EdgektError) as exc:
                log(f"[yellow]device {device.name}: {exc} (marked unreachable, continuing)[/]")
                rows.append({"name": name, "device": device.name, "status": "unreachable",
                             "error": str(exc)})
                continue
            for r in got:
                rows.append({"name": name, **_slim(r)})
    eager = _torch_eager(cfg, exports) if p.torch_eager else {}
    return {"rows": rows, "torch_eager": eager}


def _slim(row: dict[str, Any]) -> dict[str, Any]:
    """Keep what the report needs (the JSONL store of `edgekt profile` keeps everything)."""
    lat = (row.get("latency_ms") or {}).get("model") or {}
    return {
        "device": row.get("device"), "status": row.get("status"), "error": row.get("error"),
        "backend": row.get("backend_name"),
        "precision": (row.get("artifact") or {}).get("precision"),
        "runtime": (row.get("artifact") or {}).get("runtime"),
        "file": Path((row.get("artifact") or {}).get("file", "")).name,
        "p50_ms": lat.get("p50"), "p90_ms": lat.get("p90"), "p99_ms": lat.get("p99"),
        "load_ms": row.get("load_ms"), "first_ms": row.get("first_ms"),
        "peak_rss_mb": (row.get("rss_mb") or {}).get("peak"),
        "samples_ms": (row.get("samples_ms") or {}).get("model"),
        "loadavg": (row.get("loadavg") or {}).get("before"),
    }


def _torch_eager(cfg: PipelineConfig, exports: dict[str, Any]) -> dict[str, Any]:
    """Batch-1 latency of each model in PyTorch eager on this machine (the baseline)."""
    import numpy as np
    import torch

    from edgekt.checkpoint import load_checkpoint
    from edgekt.devices.profiler import summarize, time_loop
    from edgekt.engine.setup import model_from_checkpoint

    p = cfg.profile
    if p.threads:
        torch.set_num_threads(p.threads)
    out = {}
    for name, exp in exports.items():
        src = json.loads((Path(exp["dir"]) / "manifest.json").read_text())["source"]
        model, info = model_from_checkpoint(load_checkpoint(src["checkpoint"]))
        x = torch.zeros(p.batch, info.in_channels, info.image_size, info.image_size)
        with torch.inference_mode():
            ns = time_loop(lambda m=model, x=x: m(x), warmup=p.warmup, iters=None,
                           seconds=p.seconds)
        s = summarize(np.asarray(ns))
        out[name] = {"p50_ms": s["p50"], "p99_ms": s["p99"], "samples_ms": (ns / 1e6).tolist()}
    return out


def run_pipeline(cfg: PipelineConfig, *, redo_from: str | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every stage; returns the report dict and writes report.md/json/png."""
    from edgekt.pipeline.report import build_report

    targets, skipped = cfg.export.resolved_targets()  # an unknown target fails here, early
    for t in skipped:
        log(f"[yellow]export: optional target {t!r} skipped, its converter is not installed "
            f"(pip install '{TARGETS.get(t).extra}')[/]")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "pipeline.yaml", json.dumps(cfg.model_dump(), indent=2))
    st = StageRunner(run_dir, redo_from, log)
    teacher_key = input_hash(cfg.teacher.model_dump(), cfg.data, _file_text(cfg.teacher.config))
    teacher = st.run("teacher", teacher_key, lambda fresh: stage_teacher(cfg, run_dir, fresh))
    students_key = input_hash([s.model_dump() for s in cfg.students], cfg.data, teacher)
    students = st.run("students", students_key,
                      lambda fresh: stage_students(cfg, run_dir, teacher, fresh))
    export_key = input_hash(cfg.export.model_dump(), targets, students, teacher)
    exports = st.run("export", export_key,
                     lambda fresh: stage_export(cfg, run_dir, teacher, students))
    profile_key = input_hash(cfg.profile.model_dump(), exports)
    profile = st.run("profile", profile_key, lambda fresh: stage_profile(cfg, exports, log))
    report_key = input_hash(teacher, students, exports, profile)
    st.run("report", report_key,
           lambda fresh: build_report(run_dir, teacher, students, exports, profile))
    report = json.loads((run_dir / "report.json").read_text())
    report["stages"] = dict(st.ran)
    return report


def _file_text(name: str) -> str:
    try:
        return resolve_config_path(name).read_text()
    except EdgektError:
        return name
