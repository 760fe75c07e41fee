"""Who measured: CPU model, cores, ISA flags, OS, memory and runtime versions (stdlib only)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

# The ISA extensions that decide which kernels a runtime picks (INT8 without VNNI is slow, ...).
_FLAG_GROUPS = {
    "avx2": ("avx2",),
    "fma": ("fma",),
    "avx512": ("avx512f",),
    "vnni": ("avx512_vnni", "avx_vnni", "avx512vnni"),
    "bf16": ("avx512_bf16", "amx_bf16", "bf16"),
    "amx": ("amx_tile", "amx_int8", "amx_bf16"),
    "neon": ("neon", "asimd"),
    "dotprod": ("asimddp", "dotprod"),
    "sve": ("sve",),
    "i8mm": ("i8mm",),
}
# Host ids of runs stored before LiteRT existed hashed exactly these; runtimes added since count
# only when installed, so an id does not change until the host does.
_LEGACY_RUNTIMES = ("onnxruntime", "openvino", "numpy")


def runtime_dists() -> list[str]:
    """pip distributions whose versions describe a host: every registered runtime and numpy."""
    from edgekt.devices.backends import BACKENDS

    return [*(BACKENDS.get(n).dist for n in BACKENDS), "numpy"]


def _cpuinfo() -> tuple[str, set[str], int | None]:
    """(CPU model, ISA flags, physical cores) from /proc/cpuinfo or sysctl (macOS)."""
    model, flags, cores = "", set(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    phys = ""
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        key = key.lower()
        if key in ("model name", "hardware", "cpu model", "processor") and not model \
                and value and not value.isdigit():
            model = value
        elif key in ("flags", "features"):
            flags.update(value.lower().split())
        elif key == "physical id":
            phys = value
        elif key == "core id":
            cores.add((phys, value))
    for board in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:  # Raspberry Pi / Jetson: the board name says more than "ARMv8 Processor"
            model = f"{Path(board).read_text().strip(chr(0)).strip()} ({model or 'arm'})"
            break
        except OSError:
            continue
    if not model and platform.system() == "Darwin":
        model = _sysctl("machdep.cpu.brand_string")
        flags.update(_sysctl("machdep.cpu.features").lower().split())
        if platform.machine() == "arm64":
            flags.add("neon")
    return model or platform.processor() or platform.machine(), flags, len(cores) or None


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _mem_total_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def runtime_versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (does not import the runtimes)."""
    out: dict[str, str | None] = {}
    for name in runtime_dists():
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def host_fingerprint() -> dict[str, Any]:
    """A description of this machine; ``id`` hashes the parts that change latency."""
    model, flags, physical = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    uname = platform.uname()
    fp: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_model": model,
        "machine": uname.machine,
        "cores_logical": os.cpu_count(),
        "cores_physical": physical,
        "cores_usable": usable,
        "flags": {g: any(f in flags for f in names) for g, names in _FLAG_GROUPS.items()},
        "mem_total_mb": _mem_total_mb(),
        "os": f"{uname.system} {uname.release}",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "runtimes": runtime_versions(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                           "OPENBLAS_NUM_THREADS") if k in os.environ},
    }
    stable = {k: fp[k] for k in ("cpu_model", "machine", "cores_logical", "flags", "os")}
    stable["runtimes"] = {k: v for k, v in fp["runtimes"].items()
                          if v is not None or k in _LEGACY_RUNTIMES}
    fp["id"] = hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:12]
    return fp
