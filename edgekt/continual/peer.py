"""Run a peer library (Avalanche) on edgekt's continual stream, from a venv of its own.

avalanche-lib pulls in about 30 packages (wandb, tensorboard, qpsolvers, ...) that edgekt does
not need, so it is installed on request into ``~/.cache/edgekt/avalanche-<version>-<key>``
and never into the project's environment. That venv reuses the running interpreter's
packages (torch above all) through a ``.pth`` file, and pip runs with constraints that pin
torch, torchvision and numpy to the versions already installed: if avalanche-lib needed
others, the install fails rather than replacing them. (``venv --system-site-packages`` would
expose the base interpreter's packages, not those of the venv edgekt runs in.)
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import site
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgekt.errors import EdgektError

AVALANCHE_VERSION = "0.6.0"
PINNED = ("torch", "torchvision", "numpy")


def _site_dirs() -> list[str]:
    dirs = [*site.getsitepackages(), *(p for p in sys.path if p.endswith("site-packages"))]
    return list(dict.fromkeys(d for d in dirs if Path(d).is_dir()))


def _public(version: str) -> str:
    return version.split("+", 1)[0]  # 2.14.1+cu130 -> 2.14.1 (pip matches the local build)


def venv_dir(version: str = AVALANCHE_VERSION) -> Path:
    """Where the Avalanche venv for this interpreter and these torch/numpy versions lives."""
    key = json.dumps([sys.executable, _site_dirs(), [_installed(p) for p in PINNED]])
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgekt"
    return root / f"avalanche-{version}-{digest}"


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1][:300]


def ensure_avalanche(version: str = AVALANCHE_VERSION, *, install: bool = True,
                     timeout_s: float = 900.0) -> Path:
    """The python of a venv that imports avalanche-lib ``version`` and the running torch.

    Raises:
        EdgektError: one line saying why (not installed and ``install`` is False, pip failed,
            or the install would have replaced torch).
    """
    root = venv_dir(version)
    py = root / "bin" / "python"
    ok = root / ".edgekt-ok"
    if ok.exists() and py.exists():
        return py
    if not install:
        raise EdgektError(f"avalanche-lib {version} is not installed in {root} (pass "
                          "--avalanche to let the benchmark install it there)")
    missing = [p for p in PINNED if _installed(p) is None]
    if missing:
        raise EdgektError(f"avalanche needs {', '.join(missing)} in this environment")
    root.mkdir(parents=True, exist_ok=True)
    log = root / "install.log"
    try:
        if not py.exists():
            # No pip of its own: this environment's pip installs into it (``--python``).
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)],
                           check=True, capture_output=True, text=True, timeout=timeout_s)
        purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                  "['purelib'])"], check=True, capture_output=True, text=True,
                                 timeout=60).stdout.strip()
        # addsitedir (not a plain path) so .pth files there work too (editable installs).
        lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in _site_dirs())
        Path(purelib, "zz_edgekt_parent.pth").write_text(lines)
        constraints = root / "constraints.txt"
        constraints.write_text("".join(f"{p}=={_public(_installed(p))}\n" for p in PINNED))
        proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install",
                               "--disable-pip-version-check",
                               "-c", str(constraints), f"avalanche-lib=={version}"],
                              capture_output=True, text=True, timeout=timeout_s)
        log.write_text(proc.stdout + proc.stderr)
        if proc.returncode:
            raise EdgektError(f"pip install avalanche-lib=={version} failed: "
                              f"{_last_line(proc.stdout + proc.stderr)} (log: {log})")
        probe = subprocess.run([str(py), "-W", "ignore", "-c",
                                "import avalanche, torch; print(torch.__version__, "
                                "torch.__file__)"], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        raise EdgektError(f"installing avalanche-lib took over {exc.timeout:.0f} s") from None
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise EdgektError(f"could not create the avalanche venv in {root}: "
                          f"{_last_line(detail)}") from None
    if probe.returncode:
        raise EdgektError(f"avalanche-lib installed but does not import: "
                          f"{_last_line(probe.stderr)}")
    torch_version, torch_file = probe.stdout.split()
    if _public(torch_version) != _public(_installed("torch") or "") \
            or Path(torch_file).is_relative_to(root):
        raise EdgektError(f"the avalanche venv would use torch {torch_version} from "
                          f"{torch_file}, not this environment's {_installed('torch')}")
    ok.write_text(f"avalanche-lib {version}, torch {torch_version}\n")
    return py


def run_avalanche(python: Path, stream: dict[str, np.ndarray], *, seeds: list[int],
                  model: str = "mlp", epochs: int = 1, lr: float = 0.01, mem_size: int,
                  strategies: tuple[str, ...] = ("naive", "replay", "cumulative"),
                  threads: int = 1, timeout_s: float = 3600.0,
                  echo: Any = print) -> dict[str, Any]:
    """Run :mod:`edgekt.continual.avalanche_peer` in the Avalanche venv; its JSON result.

    ``stream``: ``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8 images, int labels) and
    ``class_order``. Each line the peer prints is passed to ``echo`` as it comes.
    """
    with tempfile.TemporaryDirectory(prefix="edgekt-avalanche-") as tmp:
        npz, out = Path(tmp, "stream.npz"), Path(tmp, "result.json")
        np.savez(npz, **stream)
        cmd = [str(python), "-W", "ignore", "-m", "edgekt.continual.avalanche_peer", str(npz),
               str(out), "--model", model, "--seeds", ",".join(map(str, seeds)),
               "--epochs", str(epochs), "--lr", str(lr), "--mem-size", str(mem_size),
               "--strategies", ",".join(strategies), "--threads", str(threads)]
        # Passive OpenMP waits: spinning threads collapse when other processes share the cores.
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
        tail: list[str] = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env) as proc:
            watchdog = threading.Timer(timeout_s, proc.kill)  # the read below blocks
            watchdog.start()
            try:
                for line in proc.stdout:
                    tail = (tail + [line.rstrip()])[-20:]
                    if line.startswith("avalanche "):
                        echo(line.rstrip())
                proc.wait()
            finally:
                timed_out = not watchdog.is_alive()
                watchdog.cancel()
        if timed_out:
            raise EdgektError(f"the Avalanche run took over {timeout_s:.0f} s and was stopped")
        if proc.returncode or not out.exists():
            raise EdgektError(f"the Avalanche run failed (exit {proc.returncode}): "
                              f"{_last_line(chr(10).join(tail))}")
        return json.loads(out.read_text())
