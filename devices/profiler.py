"""Latency profiler that runs wherever the model runs (numpy + the runtime, no torch).

One call profiles one model on one backend: load/compile time, the first (cold) inference,
then warm-up and a steady-state loop, model-only (pre-made input through the runtime) and
end-to-end (raw uint8 image -> preprocessing -> runtime -> labels) reported separately.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgekt.config import merge_options
from edgekt.devices.fingerprint import host_fingerprint
from edgekt.devices.model import EdgeModel
from edgekt.errors import EdgektError

SCHEMA = 1


class ProfileConfig(BaseModel):
    """How to measure; one model shared by the library, ``edgekt profile`` (a flag per field,
    ``--config`` for a YAML file of them) and the pipeline's ``profile:`` section. ``iters``
    (a fixed count) wins over ``seconds`` (a time budget)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)

    warmup: int = Field(10, ge=0)
    """Untimed warm-up iterations."""
    iters: int | None = Field(None, ge=1)
    """Timed iterations (instead of a time budget)."""
    seconds: float = Field(3.0, gt=0)
    """Time budget per timed loop, in seconds."""
    min_iters: int = Field(10, ge=1)
    """With a time budget, run at least this many iterations."""
    batch: int = Field(1, ge=1)
    """Batch size."""
    threads: int | None = Field(None, ge=1)
    """Intra-op threads (None: the device file's, then the runtime's choice)."""
    target: str = "CPU"
    """Runtime device (OpenVINO: CPU, GPU, NPU)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Runtime settings (an export's ``runtime_config``, e.g. OpenVINO's precision hint)."""
    e2e: bool = True
    """Also time raw image -> prediction (needs the model's preprocessing metadata)."""
    samples: bool = True
    """Return every latency sample (for CDF plots)."""


PROFILE_FLAGS = {"e2e": "--e2e/--no-e2e"}


def profile_config(base: ProfileConfig | str | Path | dict[str, Any] | None = None,
                   source: str = "profile", **changes: Any) -> ProfileConfig:
    """``base`` (settings, a YAML file of them, a mapping, or the defaults) with ``changes``
    applied; a bad value is an ``EdgektError`` naming its flag."""
    return merge_options(ProfileConfig, base, changes, source, PROFILE_FLAGS)


def time_loop(fn: Callable[[], object], *, warmup: int, iters: int | None, seconds: float,
              min_iters: int = 10) -> np.ndarray:
    """Per-call latencies in nanoseconds after ``warmup`` untimed calls.

    The timed loop does nothing but two clock reads and a list store around ``fn``, so its
    overhead is a few hundred nanoseconds (measured by scripts/bench_profile.py).
    """
    clock = time.perf_counter_ns
    for _ in range(warmup):
        fn()
    if iters is not None:
        out = [0] * iters
        for i in range(iters):
            t0 = clock()
            fn()
            out[i] = clock() - t0
        return np.asarray(out, np.int64)
    samples: list[int] = []
    append = samples.append
    deadline = clock() + int(seconds * 1e9)
    while True:
        t0 = clock()
        fn()
        t1 = clock()
        append(t1 - t0)
        if t1 >= deadline and len(samples) >= min_iters:
            return np.asarray(samples, np.int64)


def time_loop_paired(fn: Callable[[], object], read: Callable[[], float], *, warmup: int,
                     iters: int | None, seconds: float, min_iters: int = 10
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``time_loop`` that also reads the runtime's own latency (ms) after every call.

    ``read`` runs outside the timed window, so the wall-clock samples are those of the plain
    loop; returns (wall ns, runtime ns).
    """
    clock = time.perf_counter_ns
    for _ in range(warmup):
        fn()
    wall: list[int] = []
    inner: list[float] = []
    deadline = None if iters is not None else clock() + int(seconds * 1e9)
    while True:
        t0 = clock()
        fn()
        t1 = clock()
        wall.append(t1 - t0)
        inner.append(read())
        n = len(wall)
        if (n >= iters) if iters is not None else (t1 >= deadline and n >= min_iters):
            return np.asarray(wall, np.int64), np.asarray(inner, np.float64) * 1e6


def summarize(samples_ns: np.ndarray) -> dict[str, float]:
    """min/p50/p90/p99/max/mean/std in milliseconds, and the sample count."""
    ms = samples_ns.astype(np.float64) / 1e6
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"n": int(ms.size), "min": float(ms.min()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": float(ms.max()), "mean": float(ms.mean()),
            "std": float(ms.std())}


def rss_mb() -> dict[str, float | None]:
    """Current and peak resident memory of this process in MiB.

    Linux: VmRSS/VmHWM of this process image (``ru_maxrss`` would report the parent's peak
    in a child spawned from a big parent, since it survives fork + exec).
    """
    status: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    status[line[:5]] = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    if status:
        return {"current": status.get("VmRSS"), "peak": status.get("VmHWM")}
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"current": None, "peak": peak / 2**20 if sys.platform == "darwin" else peak / 1024}
    except ImportError:  # Windows
        return {"current": None, "peak": None}


def file_digest(files: list[Path]) -> tuple[str, int]:
    """(sha256 over the files' bytes, total size) — the model's identity in result stores."""
    h, size = hashlib.sha256(), 0
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
    return h.hexdigest(), size


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def model_input(model: EdgeModel, batch: int, rng: np.random.Generator) -> np.ndarray:
    """A normalised input batch of the model's declared shape."""
    shape = list(model.backend.input.shape)
    if model.fixed_batch is not None and batch != model.fixed_batch:
        raise EdgektError(f"{model.artifact.path.name} has a fixed batch of {model.fixed_batch}; "
                          f"--batch {batch} needs a model exported with a dynamic batch")
    shape[0] = batch
    if any(d < 1 for d in shape[1:]):
        raise EdgektError(f"{model.artifact.path.name}: input shape {model.backend.input.shape} "
                          "has dynamic dimensions besides the batch; edgekt needs them static")
    if model.preprocess.pre is not None:
        lo, hi = model.preprocess.range
        return rng.uniform(lo, hi, shape).astype(model.backend.input.dtype)
    return rng.standard_normal(shape).astype(model.backend.input.dtype)


def raw_images(model: EdgeModel, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Random uint8 images (N, H, W, C) of the size the model was trained on."""
    pre = model.preprocess.pre
    assert pre is not None
    return rng.integers(0, 256, (batch, *pre.image_size, pre.channels), dtype=np.uint8)


def profile_model(path: str | Path, backend: str,
                  settings: ProfileConfig | None = None) -> dict[str, Any]:
    """Profile one model file on one backend in this process; returns a JSON-able dict."""
    s = settings or ProfileConfig()
    rng = np.random.default_rng(0)
    load_before = _loadavg()
    rss0 = rss_mb()["current"]
    clock = time.perf_counter_ns
    t0 = clock()
    model = EdgeModel.load(path, backend, s.threads, target=s.target, config=s.config or None)
    load_ms = (clock() - t0) / 1e6
    rss_loaded = rss_mb()["current"]
    x = model_input(model, s.batch, rng)
    run = model.backend.bind(x)
    t0 = clock()
    run()
    first_ms = (clock() - t0) / 1e6
    runtime = None
    if model.backend.last_latency_ms() is None:
        samples = time_loop(run, warmup=s.warmup, iters=s.iters, seconds=s.seconds,
                            min_iters=s.min_iters)
    else:  # the runtime times each call itself: keep that too, as its own tools report it
        samples, inner = time_loop_paired(run, model.backend.last_latency_ms, warmup=s.warmup,
                                          iters=s.iters, seconds=s.seconds,
                                          min_iters=s.min_iters)
        runtime = summarize(inner)
    result_e2e, e2e_note = None, None
    e2e_samples = None
    if s.e2e and model.meta is not None:
        raw = raw_images(model, s.batch, rng)
        call = model.embed if model.task == "embedding" else model.predict
        e2e_samples = time_loop(lambda: call(raw), warmup=s.warmup, iters=s.iters,
                                seconds=s.seconds, min_iters=s.min_iters)
        result_e2e = summarize(e2e_samples)
    elif s.e2e:
        e2e_note = "preprocessing unknown (no edgekt metadata): model-only latency only"
    digest, size = file_digest(model.artifact.files())
    lat = summarize(samples)
    rss = rss_mb()
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "status": "ok",
        "model": {**model.describe(), "file": model.artifact.path.name, "sha256": digest,
                  "size_bytes": size},
        "backend": {"name": model.backend.name, "version": model.backend.version(),
                    **model.backend.settings()},
        "settings": s.model_dump(),
        "load_ms": load_ms,
        "first_ms": first_ms,
        "latency_ms": {"model": lat, "runtime": runtime, "e2e": result_e2e},
        "throughput_ips": s.batch * 1000.0 / lat["mean"],
        "rss_mb": {"before_load": rss0, "after_load": rss_loaded, "current": rss["current"],
                   "peak": rss["peak"]},
        "loadavg": {"before": load_before, "after": _loadavg()},
        "host": host_fingerprint(),
        "notes": [n for n in (e2e_note,) if n],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if s.samples:
        out["samples_ms"] = {"model": (samples / 1e6).round(5).tolist(),
                             "e2e": None if e2e_samples is None
                             else (e2e_samples / 1e6).round(5).tolist()}
    return out

