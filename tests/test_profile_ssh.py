"""Profiling through a REAL sshd on 127.0.0.1 (generated host and user keys), and its refusals.

The sshd runs as this user with a throw-away config; the client is the system OpenSSH ``ssh``
with host-key checking on, exactly as against a board.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import _devices_support
import _sshd_support
import pytest
import yaml
from typer.testing import CliRunner

from edgekt.cli.app import app
from edgekt.devices.campaign import fingerprint, run_profiles
from edgekt.devices.config import parse_device
from edgekt.devices.profiler import ProfileConfig
from edgekt.devices.transport import TransportError

device_models = _devices_support.device_models  # the session fixture
sshd = _sshd_support.sshd  # the module fixture: a real sshd on 127.0.0.1
_device, _free_port = _sshd_support.ssh_device, _sshd_support.free_port
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
