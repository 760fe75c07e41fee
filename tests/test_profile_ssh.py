"""Profiling through a REAL sshd on 127.0.0.1 (generated host and user keys), and its refusals.

The sshd runs as this user with a throw-away config; the client is the system OpenSSH ``ssh``
with host-key checking on, exactly as against a board.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import _devices_support
import pytest
import yaml
from typer.testing import CliRunner

from edgekt.cli.app import app
from edgekt.devices.campaign import fingerprint, run_profiles
from edgekt.devices.config import DeviceConfig, parse_device
from edgekt.devices.profiler import ProfileConfig
from edgekt.devices.transport import TransportError

device_models = _devices_support.device_models  # the session fixture
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A running sshd; yields a dict with port, user key, known_hosts lines."""
    d = tmp_path_factory.mktemp("sshd")
    host_pub = _keygen(d / "host_key")
    user_pub = _keygen(d / "user_key")
    _keygen(d / "other_key")
    (d / "authorized_keys").write_text(user_pub + "\n")
    port = _free_port()
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
    wrong_type, wrong = _keygen(d / "impostor").split()[:2]
    (d / "wrong_known_hosts").write_text(f"[127.0.0.1]:{port} {wrong_type} {wrong}\n")
    (d / "empty_known_hosts").write_text("")
    yield {"dir": d, "port": port}
    proc.terminate()
    proc.wait(timeout=10)


def _device(sshd, **over) -> DeviceConfig:
    d = sshd["dir"]
    raw = {"name": "loopback", "transport": "ssh", "host": "127.0.0.1", "port": sshd["port"],
           "user": getpass.getuser(), "identity_file": str(d / "user_key"),
           "known_hosts": str(d / "known_hosts"),
           "python": sys.executable,  # the device's Python: this venv (numpy + runtimes)
           "workdir": str(d / "remote"), "connect_timeout": 5, "timeout": 120}
    raw.update(over)
    return DeviceConfig(**raw)


FAST = ProfileConfig(warmup=2, iters=30, threads=1)


def test_profile_over_ssh_end_to_end(sshd, device_models, tmp_path):
    """edgekt profile --device FILE: model copied, runner run remotely, table + results file."""
    dev_file = tmp_path / "loopback.yaml"
    dev_file.write_text(yaml.safe_dump(_device(sshd).model_dump()))
    out, store = tmp_path / "out.json", tmp_path / "store.jsonl"
    res = CliRunner().invoke(app, [
        "profile", str(device_models.package), "--device", str(dev_file), "--backend", "ort,ov",
        "--threads", "1", "--iters", "30", "--warmup", "2", "--out", str(out),
        "--store", str(store)])
    assert res.exit_code == 0, res.output
    assert "loopback" in res.output and "p50 ms" in res.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:
        assert r["latency_ms"]["model"]["n"] == 30 and r["latency_ms"]["e2e"]["n"] == 30
        assert r["transport"] == "ssh" and r["host"]["id"]
        # The remote copy ran from the bundle and the copied model, not from this checkout.
        assert ".pyz" in r["runner"]["edgekt_from"]
        assert r["model"]["path"].startswith(str(sshd["dir"] / "remote" / "models"))
    assert {r["model"]["file"] for r in rows} == {"model.onnx", "model.fp32.xml"}
    assert rows[1]["backend"]["inference_precision_hint"] == "f32"  # manifest runtime_config
    assert rows[0]["artifact"]["accuracy"] == 0.81
    copied = list((sshd["dir"] / "remote" / "models").glob("*/model.fp32.bin"))
    assert len(copied) == 1 and copied[0].stat().st_size == \
        (device_models.package / "model.fp32.bin").stat().st_size
    assert len(store.read_text().splitlines()) == 2


def test_devices_check_prints_the_fingerprint(sshd):
    result = fingerprint(_device(sshd))
    assert result["host"]["cores_logical"] == os.cpu_count()
    assert result["host"]["runtimes"]["onnxruntime"]


def test_unknown_host_key_is_refused_with_the_keyscan_command(sshd, device_models):
    dev = _device(sshd, known_hosts=str(sshd["dir"] / "empty_known_hosts"))
    with pytest.raises(TransportError) as err:
        run_profiles([device_models.classifier], dev, ["ort"], FAST)
    msg = str(err.value)
    assert "host key is not known" in msg
    assert f"ssh-keyscan -p {sshd['port']} 127.0.0.1 >>" in msg


def test_changed_host_key_is_refused(sshd, device_models):
    dev = _device(sshd, known_hosts=str(sshd["dir"] / "wrong_known_hosts"))
    with pytest.raises(TransportError, match="does not match"):
        run_profiles([device_models.classifier], dev, ["ort"], FAST)


def test_bad_user_key_is_an_auth_failure(sshd, device_models):
    dev = _device(sshd, identity_file=str(sshd["dir"] / "other_key"))
    with pytest.raises(TransportError, match="authentication failed"):
        run_profiles([device_models.classifier], dev, ["ort"], FAST)


def test_unreachable_port(sshd, device_models):
    dev = _device(sshd, port=_free_port())
    with pytest.raises(TransportError, match="unreachable: connection refused"):
        run_profiles([device_models.classifier], dev, ["ort"], FAST)


def _fake_python(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_missing_onnxruntime_on_the_device_says_how_to_install(sshd, device_models, tmp_path):
    # A device Python where "import onnxruntime" fails, like a fresh Raspberry Pi.
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named onnxruntime', "
                                        "name='onnxruntime')\n")
    py = _fake_python(tmp_path / "py", f'PYTHONPATH={shadow.parent} exec {sys.executable} "$@"')
    dev = _device(sshd, python=py)
    with pytest.raises(TransportError) as err:
        run_profiles([device_models.classifier], dev, ["ort"], FAST)
    assert "'onnxruntime' is missing" in str(err.value)
    assert "-m pip install onnxruntime" in str(err.value)


def test_disconnect_mid_run_keeps_finished_rows(sshd, device_models, tmp_path):
    """The second model's run drops the connection: row 1 kept, row 2 error, row 3 not run."""
    dropped = tmp_path / "disconnect.onnx"
    shutil.copy(device_models.classifier, dropped)
    # Kill the sshd session process serving this command: the client sees the link drop.
    py = _fake_python(tmp_path / "py", 'case "$*" in *disconnect*) kill -9 $PPID;; esac\n'
                      f'exec {sys.executable} "$@"')
    dev = _device(sshd, python=py)
    rows = run_profiles([device_models.classifier, dropped, device_models.fixed], dev, ["ort"],
                        FAST)
    assert [r["status"] for r in rows] == ["ok", "error", "not-run"]
    assert "not run:" in rows[2]["error"]
    dev_file = tmp_path / "dev.yaml"
    dev_file.write_text(yaml.safe_dump(dev.model_dump()))
    store = tmp_path / "store.jsonl"
    res = CliRunner().invoke(app, ["profile", str(device_models.classifier), str(dropped),
                                   "--device", str(dev_file), "--backend", "ort", "--iters",
                                   "20", "--store", str(store)])
    assert res.exit_code == 2, res.output
    records = [json.loads(line) for line in store.read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "error"]
    assert all(r["partial"] for r in records)


def test_device_file_rejects_unsafe_hosts(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("name: evil\ntransport: ssh\nhost: -oProxyCommand=touch\n")
    from edgekt.errors import EdgektError

    with pytest.raises(EdgektError, match="no leading -"):
        parse_device(f)
