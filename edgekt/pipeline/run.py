"""``edgekt pipeline``: teacher -> students -> export (+ parity) -> profile -> report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekt.config import load_config
from edgekt.errors import EdgektError
from edgekt.io import atomic_write_text
from edgekt.pipeline.config import PipelineConfig, StudentSpec, resolve_config_path
from edgekt.pipeline.stages import StageRunner, input_hash


def _data_overrides(cfg: PipelineConfig) -> list[str]:
    return [f"data.{k}={json.dumps(v) if not isinstance(v, str) else v}"
            for k, v in cfg.data.items()]


def _train(cfg_path: Path, overrides: list[str], run_dir: Path, fresh: bool) -> dict[str, Any]:
    """Train (or resume) one run and describe its best checkpoint."""
    from edgekt.engine import fit
    from edgekt.engine.checkpoint import file_sha256, load_checkpoint

    run_cfg = load_config(cfg_path, [*overrides, f"run.dir={run_dir}"])
    done = run_dir / "summary.json"
    if fresh or not done.exists():
        resume = not fresh and (run_dir / "last.pt").exists()
        fit(run_cfg, resume=resume, force=not resume)
    best = run_dir / "best.pt"
    ck = load_checkpoint(run_dir / "last.pt")
    summary = json.loads(done.read_text())
    return {"checkpoint": str(best), "sha256": file_sha256(best), "model": ck["model"]["name"],
            "params": summary["params"], "test_acc": summary["test_acc"],
            "best_val_acc": summary["best_val_acc"]}


def stage_teacher(cfg: PipelineConfig, run_dir: Path, fresh: bool) -> dict[str, Any]:
    spec = cfg.teacher
    if spec.checkpoint:
        from edgekt.engine.checkpoint import file_sha256, load_checkpoint
        from edgekt.engine.setup import model_from_checkpoint
        from edgekt.models import count_params

        ck = load_checkpoint(spec.checkpoint)
        model, _ = model_from_checkpoint(ck, spec.checkpoint)
        return {"checkpoint": spec.checkpoint, "sha256": file_sha256(spec.checkpoint),
                "model": ck["model"]["name"], "params": count_params(model),
                "test_acc": ck.get("metrics", {}).get("test_acc")}
    return _train(resolve_config_path(spec.config), [*_data_overrides(cfg), *spec.set],
                  run_dir / "teacher", fresh)


def student_overrides(cfg: PipelineConfig, s: StudentSpec, teacher_ckpt: str) -> list[str]:
    method = ["method=supervised"] if not s.losses else [
        "method=distill",
        "method_args=" + json.dumps({"teacher": {"checkpoint": teacher_ckpt},
                                     "losses": s.losses}),
    ]
    return [*method, f"model.name={s.model}", f"model.kwargs={json.dumps(s.kwargs)}",
            f"train.epochs={s.epochs}", *_data_overrides(cfg), *s.set]


def stage_students(cfg: PipelineConfig, run_dir: Path, teacher: dict[str, Any], fresh: bool
                   ) -> dict[str, Any]:
    out = {}
    for s in cfg.students:
        sdir = run_dir / "students" / s.name
        key = input_hash(s.model_dump(), cfg.data, teacher["sha256"])
        marker = sdir / "pipeline.json"
        # A student whose inputs changed starts over; an unfinished one resumes from last.pt.
        stale = marker.exists() and json.loads(marker.read_text())["hash"] != key
        res = _train(resolve_config_path(s.config),
                     student_overrides(cfg, s, teacher["checkpoint"]), sdir,
                     fresh=fresh or stale)
        atomic_write_text(marker, json.dumps({"hash": key}))
        out[s.name] = res
    return out


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
        manifest = export_package(ckpt, dest, targets=e.targets, precisions=precisions,
                                  force=True, allow_mismatch=e.allow_mismatch,
                                  calib_samples=e.calib_samples, max_drop=e.max_drop,
                                  data_dir=cfg.data.get("data_dir"))
        out[name] = {"dir": str(dest), "artifacts": manifest.artifacts}
    return out


def stage_profile(cfg: PipelineConfig, exports: dict[str, Any],
                  log: Callable[[str], None]) -> dict[str, Any]:
    from edgekt.devices.campaign import run_profiles
    from edgekt.devices.config import load_device
    from edgekt.devices.profiler import ProfileSettings
    from edgekt.devices.transport import TransportError

    p = cfg.profile
    settings = ProfileSettings(warmup=p.warmup, seconds=p.seconds, batch=p.batch,
                               threads=p.threads, samples=True)
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

    from edgekt.devices.profiler import summarize, time_loop
    from edgekt.engine.checkpoint import load_checkpoint
    from edgekt.engine.setup import model_from_checkpoint

    p = cfg.profile
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

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pipeline.yaml").write_text(json.dumps(cfg.model_dump(), indent=2))
    st = StageRunner(run_dir, redo_from, log)
    teacher_key = input_hash(cfg.teacher.model_dump(), cfg.data, _file_text(cfg.teacher.config))
    teacher = st.run("teacher", teacher_key, lambda fresh: stage_teacher(cfg, run_dir, fresh))
    students_key = input_hash([s.model_dump() for s in cfg.students], cfg.data, teacher)
    students = st.run("students", students_key,
                      lambda fresh: stage_students(cfg, run_dir, teacher, fresh))
    export_key = input_hash(cfg.export.model_dump(), students, teacher)
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
