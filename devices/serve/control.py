"""Device side of ``edgekt serve --device``: start, reload, inspect and stop a detached service.

The host copies this one file to the board and runs it with the device file's Python
(``python serve-control-HASH.py start ROOT ...``). It uses only the standard library and
imports nothing of edgekt, so it runs before anything is known about the board. Each call
prints one line ``EDGEKT-JSON {...}`` (the runner's marker) for the host to read.

Layout under ``ROOT`` (``WORKDIR/serve`` of the device file)::

    packages/HASH/...   each deployed version (content-addressed, copied by the host)
    current             symlink to the version served (flipped atomically on deploy)
    state/              the few-shot / continual state (kept across versions)
    token               the bearer token (mode 600), when one is used
    serve.json          pid, process start time, argv and URL of the running service
    serve.log           its output

The service runs in a session of its own (``start_new_session``), so it outlives the SSH
connection that started it. A recorded pid is trusted only while the process's start time
(``/proc/PID/stat``) still matches, so a recycled pid is never signalled.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MARKER = "EDGEKT-JSON "  # edgekt.devices.runner.MARKER (this file imports nothing of edgekt)
EXIT_USER, EXIT_MISSING = 3, 4
BANNER = re.compile(r"edgekt serve: http://(\[[^\]]+\]|[^:/\s]+):(\d+)/")
# What `edgekt serve` needs on the board; all of it comes with the serve extra.
NEEDED = ("edgekt", "numpy", "onnxruntime", "PIL", "fastapi", "uvicorn", "multipart",
          "prometheus_client")
PIP = "'edgekt[serve]'"

class ControlError(Exception):
    """A refusal with a message for the host to show as is."""


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(MARKER + json.dumps(obj) + "\n")
    sys.stdout.flush()


# ---- the recorded service ------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None without /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(record: dict[str, Any]) -> bool:
    pid = int(record["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: the pid was recycled
    started = record.get("proc_start")
    if started is not None and _start_time(pid) != started:
        return False
    try:  # a zombie (killed, not yet reaped) is not a running service
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _read_record(root: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((root / "serve.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "pid" in record else None


def _write_record(root: Path, record: dict[str, Any]) -> None:
    tmp = root / "serve.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, root / "serve.json")


def _running(root: Path) -> dict[str, Any] | None:
    record = _read_record(root)
    return record if record is not None and _alive(record) else None


def _log_tail(root: Path, offset: int = 0, lines: int = 15) -> str:
    try:
        with open(root / "serve.log", "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _health(url: str, timeout: float = 3.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url + "healthz", timeout=timeout) as resp:  # noqa: S310
            return json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None


def _probe_url(host: str, port: int) -> str:
    """Where this board reaches the service: loopback for a wildcard bind."""
    bare = host.strip("[]")
    if bare in ("0.0.0.0", ""):
        bare = "127.0.0.1"
    elif bare == "::":
        bare = "::1"
    return f"http://[{bare}]:{port}/" if ":" in bare else f"http://{bare}:{port}/"


# ---- commands ------------------------------------------------------------------------------
def probe(_: argparse.Namespace) -> dict[str, Any]:
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        return {"status": "error", "error_kind": "missing_module", "module": missing[0],
                "pip": PIP, "error": f"missing: {', '.join(missing)}",
                "executable": sys.executable}
    from importlib.metadata import PackageNotFoundError, version

    try:
        edgekt_version = version("edgekt")
    except PackageNotFoundError:
        edgekt_version = None
    return {"status": "ok", "executable": sys.executable, "edgekt_version": edgekt_version,
            "python": sys.version.split()[0]}


def activate(args: argparse.Namespace) -> dict[str, Any]:
    """Point ``current`` at ``packages/VERSION`` (atomic rename of a new symlink)."""
    root = Path(args.root)
    if not re.fullmatch(r"[0-9a-f]{8,64}", args.version):
        raise ControlError(f"{args.version!r} is not a package version (a hex content hash)")
    target = Path("packages") / args.version
    if not (root / target).is_dir():
        raise ControlError(f"{root / target} is not on the device")
    current = root / "current"
    previous = os.readlink(current) if current.is_symlink() else None
    tmp = root / "current.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, current)
    return {"status": "ok", "current": str(target), "previous": previous}


def start(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root).resolve()
    running = _running(root)
    if running is not None:
        return {"status": "ok", "already_running": True, **running}
    package = root / "current" / args.entry if args.entry else root / "current"
    if not package.exists():
        raise ControlError(f"{package} does not exist: deploy a package first")
    argv = [sys.executable, "-m", "edgekt.cli.app", "serve", str(package),
            "--state-dir", str(root / "state")]
    if (root / "token").is_file():
        argv += ["--token-file", str(root / "token")]
    argv += args.serve_args
    log_path = root / "serve.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd=root, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    record: dict[str, Any] = {"pid": proc.pid, "proc_start": _start_time(proc.pid),
                              "argv": argv, "started": time.time(), "url": None}
    _write_record(root, record)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            (root / "serve.json").unlink(missing_ok=True)
            raise ControlError(f"edgekt serve exited with code {code} on the device; its log "
                               f"({log_path}):\n{_log_tail(root, offset)}")
        if record["url"] is None:
            m = BANNER.search(_log_tail(root, offset, lines=1000))
            if m:
                record["url"] = f"http://{m.group(1)}:{m.group(2)}/"
                record["probe_url"] = _probe_url(m.group(1), int(m.group(2)))
                _write_record(root, record)
        if record["url"] is not None:
            health = _health(record["probe_url"])
            if health is not None:
                return {"status": "ok", "already_running": False, **record, "health": health}
        time.sleep(0.2)
    raise ControlError(f"edgekt serve (pid {proc.pid}) did not answer /healthz within "
                       f"{args.wait:.0f} s; it keeps running (stop it with --stop). Its log "
                       f"({log_path}):\n{_log_tail(root, offset)}")


def status(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root).resolve()
    record = _read_record(root)
    current = root / "current"
    version = os.readlink(current) if current.is_symlink() else None
    if record is None or not _alive(record):
        return {"status": "ok", "running": False, "current": version,
                "log_tail": _log_tail(root, lines=args.lines)}
    health = _health(record["probe_url"]) if record.get("probe_url") else None
    return {"status": "ok", "running": True, **record, "current": version, "health": health,
            "log_tail": _log_tail(root, lines=args.lines)}


def reload(args: argparse.Namespace) -> dict[str, Any]:
    """SIGHUP (as systemd's ExecReload), then wait until the service reports the reload."""
    root = Path(args.root).resolve()
    record = _running(root)
    if record is None:
        raise ControlError("edgekt serve is not running on the device")
    before = (_health(record["probe_url"]) or {}).get("last_reload")
    os.kill(int(record["pid"]), signal.SIGHUP)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        health = _health(record["probe_url"])
        if health is not None and health.get("last_reload") not in (None, before):
            return {"status": "ok", **record, "health": health,
                    "reload": health["last_reload"]}
        time.sleep(0.2)
    raise ControlError(f"edgekt serve (pid {record['pid']}) did not report the reload within "
                       f"{args.wait:.0f} s; its log:\n{_log_tail(root)}")


def stop(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root).resolve()
    record = _read_record(root)
    if record is None or not _alive(record):
        (root / "serve.json").unlink(missing_ok=True)
        return {"status": "ok", "was_running": False}
    pid = int(record["pid"])
    used = "SIGTERM"
    os.kill(pid, signal.SIGTERM)  # uvicorn finishes the requests in flight, then exits
    deadline = time.monotonic() + args.timeout
    while _alive(record):
        if time.monotonic() > deadline:
            used = "SIGKILL"
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
            break
        time.sleep(0.1)
    (root / "serve.json").unlink(missing_ok=True)
    return {"status": "ok", "was_running": True, "pid": pid, "signal": used,
            "stopped": not _alive(record)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgekt-serve-control")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("probe")
    a = sub.add_parser("activate")
    a.add_argument("root")
    a.add_argument("version")
    s = sub.add_parser("start")
    s.add_argument("root")
    s.add_argument("--entry", default="", help="model file inside the package (else the dir)")
    s.add_argument("--wait", type=float, default=60.0)
    s.add_argument("serve_args", nargs=argparse.REMAINDER,
                   help="edgekt serve options (everything after ROOT; a leading -- is dropped)")
    st = sub.add_parser("status")
    st.add_argument("root")
    st.add_argument("--lines", type=int, default=10)
    r = sub.add_parser("reload")
    r.add_argument("root")
    r.add_argument("--wait", type=float, default=60.0)
    k = sub.add_parser("stop")
    k.add_argument("root")
    k.add_argument("--timeout", type=float, default=20.0)
    return p


COMMANDS = {"probe": probe, "activate": activate, "start": start, "status": status,
            "reload": reload, "stop": stop}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "serve_args", None) and args.serve_args[0] == "--":
        args.serve_args = args.serve_args[1:]
    try:
        result = COMMANDS[args.cmd](args)
    except ControlError as exc:
        emit({"status": "error", "error_kind": "user", "error": str(exc),
              "executable": sys.executable})
        return EXIT_USER
    except OSError as exc:
        emit({"status": "error", "error_kind": "user", "error": f"{type(exc).__name__}: {exc}",
              "executable": sys.executable})
        return EXIT_USER
    emit(result)
    return EXIT_MISSING if result.get("error_kind") == "missing_module" else 0


if __name__ == "__main__":
    sys.exit(main())
