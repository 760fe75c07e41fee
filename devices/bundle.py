"""Build the self-contained runner: one ``.pyz`` file holding the torch-free runtime modules.

A device needs only Python 3.10+, numpy and a runtime (onnxruntime, openvino, ai-edge-litert);
it does not
need edgekt installed. The bundle is built from the very modules this edgekt imports, so host
and device run the same code; its name carries a content hash so a device keeps one copy per
version.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import tempfile
import zipfile
from pathlib import Path

from edgekt.io import atomic_write

MODULES = (
    "edgekt", "edgekt.errors", "edgekt.io", "edgekt.metadata", "edgekt.registry",
    "edgekt.devices", "edgekt.devices.artifacts", "edgekt.devices.backends",
    "edgekt.devices.backends.base", "edgekt.devices.backends.amx", "edgekt.devices.preprocess",
    "edgekt.devices.model",
    "edgekt.devices.fingerprint", "edgekt.devices.profiler", "edgekt.devices.runner",
)
"""The runner's own modules; every registered backend module is added by :func:`modules`."""
_MAIN = b"import sys\nfrom edgekt.devices.runner import main\nsys.exit(main())\n"


def _arcname(module: str, origin: Path) -> str:
    parts = module.split(".")
    if origin.name == "__init__.py":
        return "/".join(parts) + "/__init__.py"
    return "/".join(parts[:-1] + [origin.name])


def modules() -> tuple[str, ...]:
    """Everything the bundle holds: the runner's modules and one module per runtime backend."""
    from edgekt.devices.backends import BACKENDS

    return MODULES + tuple(BACKENDS.get(n).module for n in BACKENDS)


def bundle_bytes() -> bytes:
    """The runner zip (deterministic: fixed timestamps, sorted entries)."""
    entries = {"__main__.py": _MAIN}
    for module in modules():
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"cannot find module {module} to bundle")
        origin = Path(spec.origin)
        entries[_arcname(module, origin)] = origin.read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, entries[name])
    return buf.getvalue()


def build_runner(directory: str | Path | None = None) -> Path:
    """Write the bundle (if not there yet) and return its path: ``edgekt-runner-<hash>.pyz``."""
    data = bundle_bytes()
    name = f"edgekt-runner-{hashlib.sha256(data).hexdigest()[:12]}.pyz"
    # Not ".../edgekt": a directory of that name in the cwd would shadow the edgekt package.
    directory = Path(directory or os.environ.get("EDGEKT_CACHE")
                     or Path(tempfile.gettempdir()) / "edgekt-runners")
    path = directory / name
    if not path.is_file():
        atomic_write(path, lambda f: f.write(data))
    return path
