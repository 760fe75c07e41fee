"""Device files (``devices/*.yaml``): where and how to run a model, validated strictly."""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgekt.errors import EdgektError

_HOST = re.compile(r"^[A-Za-z0-9_.:%\[\]-]+$")


class DeviceConfig(BaseModel):
    """One device. Unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    description: str = ""
    transport: Literal["local", "ssh"] = "local"
    host: str | None = None
    """SSH host name or address (an alias from ~/.ssh/config works)."""
    user: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    identity_file: str | None = None
    """Private key for SSH (default: what ssh and its agent would use)."""
    known_hosts: str | None = None
    """Extra known_hosts file (default: ssh's own); host keys are always checked."""
    python: str | None = None
    """Python on the device (default: this Python locally, ``python3`` over SSH)."""
    workdir: str = ".cache/edgekt"
    """Directory on the device for the runner and models (relative to the SSH login home)."""
    backend: list[str] = Field(default_factory=lambda: ["onnxruntime"])
    """Backends to profile when ``--backend`` is not given."""
    threads: int | None = Field(None, ge=1)
    """Intra-op threads (default: the runtime's choice)."""
    target: str = "CPU"
    """Execution device inside the runtime (OpenVINO: CPU, GPU, NPU)."""
    connect_timeout: int = Field(10, ge=1)
    """Seconds to wait for the SSH connection."""
    timeout: float = Field(900, gt=0)
    """Seconds one profiling command may take on the device."""

    @field_validator("backend", mode="before")
    @classmethod
    def _split_backends(cls, value: object) -> object:
        return [b.strip() for b in value.split(",")] if isinstance(value, str) else value

    @field_validator("host")
    @classmethod
    def _safe_host(cls, value: str | None) -> str | None:
        # A host like "-oProxyCommand=..." would be read by ssh as an option.
        if value is not None and (value.startswith("-") or not _HOST.match(value)):
            raise ValueError("must be a host name, address or ssh alias (no spaces, no leading -)")
        return value

    @model_validator(mode="after")
    def _ssh_needs_host(self) -> DeviceConfig:
        if self.transport == "ssh" and not self.host:
            raise ValueError("transport 'ssh' needs 'host'")
        return self


def device_dirs() -> list[Path]:
    """Where device names are looked up: $EDGEKT_DEVICES, ./devices, the packaged examples."""
    dirs = [Path(p) for p in os.environ.get("EDGEKT_DEVICES", "").split(os.pathsep) if p]
    return dirs + [Path.cwd() / "devices", Path(__file__).parent]


def available_devices() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in device_dirs():
        for f in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            found.setdefault(f.stem, f)
    return found


def load_device(spec: str | Path | None = None) -> DeviceConfig:
    """A device by name (``local``, ``rpi4``) or by YAML file path."""
    spec = str(spec or "local")
    path = Path(spec).expanduser()
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        known = available_devices()
        if spec not in known:
            close = difflib.get_close_matches(spec, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise EdgektError(f"unknown device {spec!r}{hint} (known: {', '.join(known)}; "
                              f"searched {', '.join(str(d) for d in device_dirs())}); or pass "
                              "a device file path")
        path = known[spec]
    return parse_device(path)


def parse_device(path: Path) -> DeviceConfig:
    from edgekt.config import read_yaml_mapping, validate

    raw = read_yaml_mapping(path, "device file")
    raw.setdefault("name", path.stem)

    return validate(DeviceConfig, raw, str(path))


def local_python(cfg: DeviceConfig) -> str:
    return cfg.python or sys.executable
