"""A REAL sshd on 127.0.0.1 for the SSH tests (profiling, remote serve): generated host and
user keys, a throw-away config, run as this user; clients use the system OpenSSH ``ssh`` with
host-key checking on, exactly as against a board."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekt.devices.config import DeviceConfig

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A running sshd; yields a dict with port, user key, known_hosts lines."""
    d = tmp_path_factory.mktemp("sshd")
    host_pub = keygen(d / "host_key")
    user_pub = keygen(d / "user_key")
    keygen(d / "other_key")
    (d / "authorized_keys").write_text(user_pub + "\n")
    port = free_port()
    (d / "sshd_config").write_text(f"""
Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
AuthorizedKeysFile {d / 'authorized_keys'}
PidFile {d / 'sshd.pid'}
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
LogLevel ERROR
""")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                            stderr=open(d / "sshd.log", "w"))
    deadline = time.time() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"sshd did not start: {(d / 'sshd.log').read_text()}") from None
            time.sleep(0.1)
    key_type, key = host_pub.split()[:2]
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {key_type} {key}\n")
    wrong_type, wrong = keygen(d / "impostor").split()[:2]
    (d / "wrong_known_hosts").write_text(f"[127.0.0.1]:{port} {wrong_type} {wrong}\n")
    (d / "empty_known_hosts").write_text("")
    yield {"dir": d, "port": port}
    proc.terminate()
    proc.wait(timeout=10)


def ssh_device(sshd, **over) -> DeviceConfig:
    d = sshd["dir"]
    raw = {"name": "loopback", "transport": "ssh", "host": "127.0.0.1", "port": sshd["port"],
           "user": getpass.getuser(), "identity_file": str(d / "user_key"),
           "known_hosts": str(d / "known_hosts"),
           "python": sys.executable,  # the device's Python: this venv (numpy + runtimes)
           "workdir": str(d / "remote"), "connect_timeout": 5, "timeout": 120}
    raw.update(over)
    return DeviceConfig(**raw)
