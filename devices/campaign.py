"""Profile models x backends on one device, each run in its own fresh process (host side).

Timing several runtimes in one process inflates their tails (ENVIRONMENT.md), so every
(model, backend) pair is one runner process, locally or over SSH. A failure of one pair is
recorded in its row; a broken connection stops the campaign and marks the rest as not run,
so finished rows are kept and the run is marked partial.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekt.devices.artifacts import Artifact, find_artifacts, select_artifact
from edgekt.devices.backends import canonical_name
from edgekt.devices.config import DeviceConfig
from edgekt.devices.profiler import ProfileConfig
from edgekt.devices.transport import Transport, TransportError, make_transport
from edgekt.errors import EdgektError


def runner_args(path: str, backend: str, s: ProfileConfig) -> list[str]:
    args = ["profile", path, "--backend", backend, "--batch", str(s.batch),
            "--warmup", str(s.warmup), "--seconds", str(s.seconds), "--target", s.target]
    if s.iters is not None:
        args += ["--iters", str(s.iters)]
    if s.threads is not None:
        args += ["--threads", str(s.threads)]
    if s.config:
        args += ["--config", json.dumps(s.config, sort_keys=True)]
    if not s.e2e:
        args.append("--no-e2e")
    if not s.samples:
        args.append("--no-samples")
    return args


def plan(models: list[str | Path], backends: list[str],
         precisions: list[str] | None = None) -> list[tuple[str, str, Artifact | str]]:
    """(model argument, backend, artifact or the error finding it) for every row to run.

    ``precisions`` None picks one artifact per backend (fp32 first); ``["all"]`` takes every
    artifact of the backend's own runtime (fp32, fp16, int8, ...).
    """
    jobs: list[tuple[str, str, Artifact | str]] = []
    for model in models:
        try:
            found = find_artifacts(model)
        except EdgektError as exc:
            jobs += [(str(model), canonical_name(b), str(exc)) for b in backends]
            continue
        for backend in (canonical_name(b) for b in backends):
            if precisions == ["all"]:
                chosen = [a for a in found if a.runtime == backend] or [backend]
            else:
                chosen = list(precisions or [None])
            for p in chosen:
                if isinstance(p, Artifact):
                    jobs.append((str(model), backend, p))
                    continue
                try:
                    jobs.append((str(model), backend, select_artifact(found, backend, precision=p)))
                except EdgektError as exc:
                    jobs.append((str(model), backend, str(exc)))
    return jobs


def run_profiles(models: list[str | Path], device: DeviceConfig, backends: list[str],
                 settings: ProfileConfig, *, precisions: list[str] | None = None,
                 transport: Transport | None = None,
                 on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """One row per model x backend (x precision); ``status`` is ok, error or not-run."""
    transport = transport or make_transport(device)
    rows: list[dict[str, Any]] = []
    broken: str | None = None
    for model, backend, artifact in plan(models, backends, precisions):
        row: dict[str, Any] = {"device": device.name, "transport": device.transport,
                               "model_arg": model, "backend_name": backend,
                               "settings": settings.model_dump()}
        if isinstance(artifact, Artifact):
            row["artifact"] = _describe(artifact)
        if broken:
            row.update(status="not-run", error=f"not run: {broken}")
        elif isinstance(artifact, str):
            row.update(status="error", error=artifact)
        else:
            try:
                row.update(_one(artifact, backend, settings, transport))
            except TransportError as exc:
                broken = str(exc)
                row.update(status="error", error=broken)
                if not any(r["status"] == "ok" for r in rows):
                    raise  # nothing measured yet: say why at once
            except EdgektError as exc:
                row.update(status="error", error=str(exc))
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def _describe(a: Artifact) -> dict[str, Any]:
    return {"file": str(a.path), "runtime": a.runtime, "precision": a.precision, "part": a.part,
            "accuracy": a.accuracy}


def _one(artifact: Artifact, backend: str, s: ProfileConfig,
         transport: Transport) -> dict[str, Any]:
    if artifact.runtime == backend and artifact.runtime_config:
        s = s.model_copy(update={"config": {**artifact.runtime_config, **s.config}})
    remote = transport.stage(artifact.files())
    result = transport.run_runner(runner_args(remote, backend, s))
    if result.get("status") != "ok":
        raise EdgektError(result.get("error") or "the runner failed without a message")
    return result


def fingerprint(device: DeviceConfig) -> dict[str, Any]:
    """Probe a device once: its host fingerprint and where its Python is."""
    result = make_transport(device).run_runner(["fingerprint"])
    if result.get("status") != "ok":
        raise EdgektError(f"device {device.name!r}: {result.get('error')}")
    return result
