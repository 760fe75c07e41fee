"""Run the runner on a device: in a local subprocess, or over SSH with the system OpenSSH client.

SSH: ``ssh`` is called with an argument list (never through a local shell); the one string
the remote shell sees is built with ``shlex.quote`` for every argument. Host keys are always
checked (``StrictHostKeyChecking=yes``, ``BatchMode=yes``): an unknown or changed host key is
refused with the command to inspect and trust it. ``~/.ssh/config`` and ssh-agent keep working.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgekt.devices.bundle import build_runner
from edgekt.devices.config import DeviceConfig, local_python
from edgekt.devices.runner import EXIT_MISSING, MARKER
from edgekt.errors import EdgektError


class TransportError(EdgektError):
    """The device could not be reached or the connection broke; later runs would fail too."""


def parse_runner_output(stdout: str) -> dict[str, Any] | None:
    """The runner's JSON line, or None when it printed none (crash, disconnect)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARKER):
            try:
                result = json.loads(line[len(MARKER):])
            except json.JSONDecodeError:
                return None  # a line cut by a crash or a dropped connection
            return result if isinstance(result, dict) else None
    return None


class Transport(ABC):
    def __init__(self, cfg: DeviceConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def stage(self, files: list[Path]) -> str:
        """Make the files (one model: .onnx, or .xml + .bin) available on the device; returns
        the device path of the first one."""

    @abstractmethod
    def run_runner(self, args: list[str]) -> dict[str, Any]:
        """Run the runner with ``args``; returns its JSON (status ok or error)."""

    def _result(self, rc: int, stdout: str, stderr: str, python: str) -> dict[str, Any]:
        result = parse_runner_output(stdout)
        if result is None:
            tail = stderr.strip()[-800:] or stdout.strip()[-800:]
            if rc == 127 or "No such file or directory" in tail and python in tail:
                raise TransportError(f"device {self.cfg.name!r}: Python {python!r} was not found "
                                     "there; set 'python:' in the device file")
            raise TransportError(f"device {self.cfg.name!r}: the runner exited with code {rc} "
                                 f"and no result: {tail or '(no output)'}")
        if rc == EXIT_MISSING or result.get("error_kind") == "missing_module":
            module = result.get("module") or "onnxruntime"
            pip = result.get("pip") or module
            raise TransportError(
                f"device {self.cfg.name!r}: Python module {module!r} is missing there "
                f"({result.get('executable', python)}); install it on the device with: "
                f"{result.get('executable', python)} -m pip install {pip}")
        return result


class LocalTransport(Transport):
    """This machine; each call is a fresh process so runtimes never share one."""

    def stage(self, files: list[Path]) -> str:
        return str(files[0].resolve())

    def run_runner(self, args: list[str]) -> dict[str, Any]:
        python = local_python(self.cfg)
        cmd = [python, str(build_runner()), *args]
        try:
            # A runtime may print non-UTF-8 bytes on stderr; they must not hide its result.
            proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace",
                                  timeout=self.cfg.timeout)
        except FileNotFoundError:
            raise TransportError(f"device {self.cfg.name!r}: Python {python!r} not found; set "
                                 "'python:' in the device file") from None
        except subprocess.TimeoutExpired:
            raise TransportError(f"device {self.cfg.name!r}: profiling took longer than "
                                 f"{self.cfg.timeout:.0f} s ('timeout:' in the device "
                                 "file)") from None
        return self._result(proc.returncode, proc.stdout, proc.stderr, python)


class SSHTransport(Transport):
    """A board reached with the system ``ssh`` client."""

    def __init__(self, cfg: DeviceConfig) -> None:
        super().__init__(cfg)
        self.control_path: str | None = None
        """ControlMaster socket while inside :meth:`multiplexed`."""
        self.python = cfg.python or "python3"
        # "~/x" would not expand once quoted; ssh commands start in the home directory anyway.
        self.workdir = cfg.workdir[2:] if cfg.workdir.startswith("~/") else cfg.workdir

    def ssh_argv(self, remote_command: str) -> list[str]:
        return [*self._options(), "--", str(self.cfg.host), remote_command]

    def _options(self) -> list[str]:
        cfg = self.cfg
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"ConnectTimeout={cfg.connect_timeout}",
                # Notice a board that vanishes mid-run within ~15 s instead of hanging.
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if cfg.port:
            argv += ["-p", str(cfg.port)]
        if cfg.user:
            argv += ["-l", cfg.user]
        if cfg.identity_file:
            argv += ["-i", str(Path(cfg.identity_file).expanduser()), "-o", "IdentitiesOnly=yes"]
        if cfg.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={Path(cfg.known_hosts).expanduser()}"]
        if self.control_path:
            argv += ["-o", f"ControlPath={self.control_path}"]
        return argv

    @contextmanager
    def multiplexed(self) -> Iterator[None]:
        """Run every command inside over one SSH connection (OpenSSH's ControlMaster).

        Each command then costs a channel on an open connection instead of a new handshake
        (seconds per command to a board on Wi-Fi). The master connection checks the host key
        like any other; it is closed on the way out.
        """
        if self.control_path is not None:  # already inside
            yield
            return
        tmp = tempfile.mkdtemp(prefix="edgekt-ssh-")  # short: a socket path has ~100 bytes
        path = os.path.join(tmp, "master")
        argv = [*self._options(), "-o", f"ControlPath={path}", "-M", "-N",
                "-o", "ControlPersist=no", "--", str(self.cfg.host)]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
        except FileNotFoundError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise TransportError("the OpenSSH client 'ssh' is not installed (Debian: apt-get "
                                 "install openssh-client)") from None
        try:
            deadline = time.monotonic() + self.cfg.connect_timeout + 10
            while not os.path.exists(path):
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    _, err = proc.communicate()
                    raise TransportError(explain_ssh_failure(
                        self.cfg, err.decode(errors="replace") or "no connection"))
                time.sleep(0.02)
            self.control_path = path
            yield
        finally:
            self.control_path = None
            if proc.poll() is None:
                proc.terminate()  # the master ends its connection cleanly on SIGTERM
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
            shutil.rmtree(tmp, ignore_errors=True)

    def _ssh(self, remote: list[str] | str, *, stdin: Path | bytes | None = None,
             timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        command = remote if isinstance(remote, str) else shlex.join(remote)
        try:
            if stdin is None:
                return subprocess.run(self.ssh_argv(command), capture_output=True,
                                      encoding="utf-8", errors="replace",
                                      timeout=timeout or self.cfg.timeout,
                                      stdin=subprocess.DEVNULL)
            if isinstance(stdin, bytes):  # a secret, say: never a file or an argument
                proc = subprocess.run(self.ssh_argv(command), capture_output=True, input=stdin,
                                      timeout=timeout or self.cfg.timeout)
            else:
                with open(stdin, "rb") as f:
                    proc = subprocess.run(self.ssh_argv(command), capture_output=True, stdin=f,
                                          timeout=timeout or self.cfg.timeout)
            return subprocess.CompletedProcess(proc.args, proc.returncode,
                                               proc.stdout.decode(errors="replace"),
                                               proc.stderr.decode(errors="replace"))
        except FileNotFoundError:
            raise TransportError("the OpenSSH client 'ssh' is not installed (Debian: apt-get "
                                 "install openssh-client)") from None
        except subprocess.TimeoutExpired:
            raise TransportError(f"device {self.cfg.name!r}: no answer within "
                                 f"{timeout or self.cfg.timeout:.0f} s") from None

    def _check(self, proc: subprocess.CompletedProcess[str]) -> None:
        if proc.returncode == 255:
            raise TransportError(explain_ssh_failure(self.cfg, proc.stderr))

    def exec(self, remote: list[str] | str, *, stdin: Path | bytes | None = None,
             timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command on the device (a list is quoted argument by argument; a string is
        one shell command line, quote its parts yourself); SSH failures raise."""
        proc = self._ssh(remote, stdin=stdin, timeout=timeout)
        self._check(proc)
        return proc

    def run_python(self, args: list[str], *, timeout: float | None = None) -> dict[str, Any]:
        """Run the device's Python with ``args`` and read its ``EDGEKT-JSON`` result."""
        proc = self.exec([self.python, *args], timeout=timeout)
        return self._result(proc.returncode, proc.stdout, proc.stderr, self.python)

    def stage(self, files: list[Path]) -> str:
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.read_bytes())
        remote_dir = f"{self.workdir}/models/{digest.hexdigest()[:16]}"
        for f in files:
            self.upload(f, f"{remote_dir}/{f.name}")
        return f"{remote_dir}/{files[0].name}"

    def upload(self, local: Path, remote: str) -> None:
        """Copy with ``cat`` over ssh (no scp/sftp subsystem needed); skip files already there.

        The file is written under a temporary name and renamed, so an interrupted copy never
        leaves a truncated model that a later run would trust.
        """
        q = shlex.quote
        tmp = f"{remote}.part"
        size = local.stat().st_size
        script = (f"if [ \"$(wc -c < {q(remote)} 2>/dev/null)\" -eq {size} ] 2>/dev/null; "
                  f"then cat > /dev/null; else mkdir -p {q(str(Path(remote).parent))} && "
                  f"cat > {q(tmp)} && mv -f {q(tmp)} {q(remote)}; fi")
        proc = self.exec(script, stdin=local)
        if proc.returncode != 0:
            raise TransportError(f"device {self.cfg.name!r}: copying {local.name} to {remote} "
                                 f"failed: {proc.stderr.strip()[-500:]}")

    def run_runner(self, args: list[str]) -> dict[str, Any]:
        runner = build_runner()
        return self.run_python([self.stage([runner]), *args])


def explain_ssh_failure(cfg: DeviceConfig, stderr: str) -> str:
    """Turn OpenSSH's stderr into what went wrong and how to fix it."""
    text = stderr.strip()
    target = f"{cfg.user + '@' if cfg.user else ''}{cfg.host}{f':{cfg.port}' if cfg.port else ''}"
    keyscan = shlex.join(["ssh-keyscan", *(["-p", str(cfg.port)] if cfg.port else []),
                          str(cfg.host)])
    known = cfg.known_hosts or "~/.ssh/known_hosts"
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key for" in text \
            and "has changed" in text:
        host_id = f"[{cfg.host}]:{cfg.port}" if cfg.port and cfg.port != 22 else str(cfg.host)
        return (f"device {cfg.name!r} ({target}): its SSH host key does not match the one in "
                f"{known}; refusing to connect (a reinstalled board, or someone in the middle). "
                f"If you know why it changed: ssh-keygen -R {shlex.quote(host_id)} -f {known}, "
                f"then trust the new key with: {keyscan} >> {known}")
    if "Host key verification failed" in text or "host key is known" in text:
        return (f"device {cfg.name!r} ({target}): its SSH host key is not known, so edgekt "
                f"refuses to connect. Check the key's fingerprint, then trust it with: "
                f"{keyscan} >> {known}")
    if "Permission denied" in text or "Too many authentication failures" in text:
        return (f"device {cfg.name!r} ({target}): SSH authentication failed; check 'user' and "
                f"'identity_file' in the device file and that the public key is in the device's "
                f"~/.ssh/authorized_keys ({text.splitlines()[-1]})")
    for marker in ("Connection refused", "timed out", "No route to host", "Network is unreachable",
                   "Could not resolve hostname", "Name or service not known"):
        if marker in text:
            return (f"device {cfg.name!r} ({target}) is unreachable: {marker.lower()}. Is it "
                    "powered, on the network, and running sshd on that port?")
    if "closed by remote host" in text or "Broken pipe" in text or "not responding" in text \
            or "Connection reset" in text:
        return f"device {cfg.name!r} ({target}): the SSH connection dropped ({text[-300:]})"
    return f"device {cfg.name!r} ({target}): ssh failed: {text[-500:] or '(no message)'}"


TRANSPORTS: dict[str, type[Transport]] = {"local": LocalTransport, "ssh": SSHTransport}


def make_transport(cfg: DeviceConfig) -> Transport:
    return TRANSPORTS[cfg.transport](cfg)
