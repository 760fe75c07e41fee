"""Host side of ``edgekt serve PACKAGE --device BOARD``: deploy, start, reload, stop over SSH.

It reuses the profiler's SSH layer (:class:`~edgekt.devices.transport.SSHTransport`): the
system OpenSSH client, host keys always checked, every remote argument quoted. The board needs
``edgekt[serve]`` in the device file's Python; nothing is installed by edgekt.

* **Deploy.** The package's files go to ``WORKDIR/serve/packages/HASH/`` (content-addressed,
  so a version already there is not copied again), then ``current`` is flipped to it.
* **Start.** :mod:`~edgekt.devices.serve.control`, copied next to them, starts ``edgekt serve
  WORKDIR/serve/current`` detached with its state in ``WORKDIR/serve/state`` and waits until
  ``/healthz`` answers on the board itself (through the SSH connection: no port has to be
  open to the host).
* **Deploy to a running service** flips ``current`` and reloads it (SIGHUP): the service loads
  the new version beside the old one and swaps; if it refuses the version, ``current`` is
  flipped back, so a restart serves what was running.
* **Token.** The bearer token travels on SSH's standard input into a mode-600 file on the
  board, and the service reads it with ``--token-file``: it is never on a command line, here
  or there.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import Any

from edgekt.devices.config import DeviceConfig
from edgekt.devices.transport import SSHTransport, TransportError
from edgekt.errors import EdgektError

CONTROL = Path(__file__).with_name("control.py")
COMPLETE = ".edgekt-complete"
"""Written into a version's directory once all its files are there: the next deploy of that
version sends nothing."""
# Files of a served package directory that are state, not package (a package served locally
# with the default --state-dir holds them); they stay behind.
STATE_FILES = ("serve.lock", "serve.json", "continual_state.npz")


def package_files(package: Path) -> tuple[list[tuple[Path, str]], str]:
    """(local file, path inside the package) pairs, and the entry served: ``""`` for a
    directory, the model file's name for a single model (with its IR ``.bin``)."""
    from edgekt.devices.artifacts import find_artifacts

    artifacts = find_artifacts(package)  # refuses what edgekt serve would refuse
    if package.is_file():
        return [(f, f.name) for f in artifacts[0].files()], package.name
    files = []
    for f in sorted(p for p in package.rglob("*") if p.is_file()):
        rel = f.relative_to(package).as_posix()
        name = f.name
        if name in STATE_FILES or name.endswith((".tmp", ".prev", ".part")) \
                or (name.startswith(("fewshot_state.npz.", "continual_state.npz."))):
            continue
        files.append((f, rel))
    return files, ""


def version_of(files: list[tuple[Path, str]]) -> str:
    """Content hash of a package (paths and bytes): the name of its directory on the board."""
    h = hashlib.sha256()
    for local, rel in files:
        h.update(rel.encode() + b"\0")
        with open(local, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:16]


class RemoteServe:
    """``edgekt serve`` on the board of an SSH device file."""

    def __init__(self, cfg: DeviceConfig) -> None:
        if cfg.transport != "ssh":
            raise EdgektError(f"device {cfg.name!r} has transport {cfg.transport!r}: --device "
                              "starts edgekt serve on a board over SSH; on this machine run "
                              "edgekt serve without --device")
        self.cfg = cfg
        self.ssh = SSHTransport(cfg)
        self.root = f"{self.ssh.workdir}/serve"
        self._control: str | None = None

    # ---- plumbing -----------------------------------------------------------------------------
    def control(self, *args: str, timeout: float | None = None) -> dict[str, Any]:
        """Run the control script on the board; its JSON, or a clear error."""
        if self._control is None:
            self._control = self.ssh.stage([CONTROL])
        result = self.ssh.run_python([self._control, *args], timeout=timeout)
        if result.get("status") != "ok":
            raise TransportError(f"device {self.cfg.name!r}: {result.get('error')}")
        return result

    def _shell(self, script: str, *, stdin: bytes | None = None, what: str) -> None:
        proc = self.ssh.exec(script, stdin=stdin)
        if proc.returncode != 0:
            raise TransportError(f"device {self.cfg.name!r}: {what} failed: "
                                 f"{proc.stderr.strip()[-500:]}")

    # ---- operations ---------------------------------------------------------------------------
    def probe(self) -> dict[str, Any]:
        """The board's Python has what edgekt serve needs (else: the pip command)."""
        return self.control("probe")

    def deploy(self, package: Path) -> tuple[str, str]:
        """Copy the package (unless that version is there); returns (version, entry)."""
        files, entry = package_files(package)
        version = version_of(files)
        base = f"{self.root}/packages/{version}"
        done = shlex.quote(f"{base}/{COMPLETE}")
        if self.ssh.exec(f"test -f {done}").returncode != 0:
            for local, rel in files:
                self.ssh.upload(local, f"{base}/{rel}")
            self._shell(f"touch {done}", what="marking the copy complete")
        return version, entry

    def put_token(self, token: str | None) -> None:
        """Write the token to ``ROOT/token`` (mode 600) from standard input, or remove it."""
        q = shlex.quote
        path = f"{self.root}/token"
        if token is None:
            self._shell(f"rm -f {q(path)}", what="removing the old token")
            return
        self._shell(f"umask 077 && mkdir -p {q(self.root)} && cat > {q(path + '.part')} && "
                    f"mv -f {q(path + '.part')} {q(path)}", stdin=token.encode(),
                    what="writing the token")

    def activate(self, version: str) -> str | None:
        """Flip ``current`` to ``version``; returns the version it pointed at before."""
        previous = self.control("activate", self.root, version)["previous"]
        return Path(previous).name if previous else None

    def start(self, entry: str, serve_args: list[str], wait: float = 90.0) -> dict[str, Any]:
        # The options first: everything after ROOT is edgekt serve's.
        return self.control("start", "--entry", entry, "--wait", str(wait), self.root, "--",
                            *serve_args, timeout=wait + self.cfg.connect_timeout + 30)

    def reload(self, wait: float = 90.0) -> dict[str, Any]:
        return self.control("reload", self.root, "--wait", str(wait),
                            timeout=wait + self.cfg.connect_timeout + 30)

    def status(self, lines: int = 10) -> dict[str, Any]:
        return self.control("status", self.root, "--lines", str(lines))

    def stop(self, timeout: float = 20.0) -> dict[str, Any]:
        return self.control("stop", self.root, "--timeout", str(timeout),
                            timeout=timeout + self.cfg.connect_timeout + 30)

    def up(self, package: Path, serve_args: list[str], token: str | None,
           wait: float = 90.0) -> dict[str, Any]:
        """Deploy ``package`` and serve it: start the service, or hot-reload the running one.

        Returns the control script's answer plus ``version`` and ``action`` (``started`` or
        ``reloaded``/``unchanged``). A version the running service refuses is rolled back on
        disk too, and raises.
        """
        self.probe()
        version, entry = self.deploy(package)
        previous = self.activate(version)
        running = self.status(lines=0)
        if running["running"]:
            try:
                result = self.reload(wait)
            except TransportError:
                if previous and previous != version:
                    self.activate(previous)
                raise
            outcome = result["reload"]
            if outcome.get("result") == "rolled_back":
                if previous and previous != version:
                    self.activate(previous)
                raise EdgektError(f"device {self.cfg.name!r}: the running service refused "
                                  f"package {package} and still serves version "
                                  f"{outcome.get('version')}: {outcome.get('message')}")
            return {**result, "version": version, "action": outcome.get("result")}
        self.put_token(token)
        result = self.start(entry, serve_args, wait)
        return {**result, "version": version, "action": "started"}


__all__ = ["RemoteServe", "package_files", "version_of"]
