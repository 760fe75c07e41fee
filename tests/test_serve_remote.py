"""``edgekt serve PACKAGE --device BOARD`` through a REAL sshd on 127.0.0.1: deploy, start
detached, health over SSH, hot reload of a new version, refusal and rollback of an
incompatible one, status, stop; and the refusals (no token off loopback, a local device, a
board without the serve extra, an unknown host key).

The "board" is this machine seen through sshd; its Python is this venv's (edgekt[serve]).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import stat
import time
from pathlib import Path

import _serve_support as sup
import _sshd_support
import yaml
from _serve_support import BAG, SNEAKER
from typer.testing import CliRunner

from edgekt.cli.app import app
from edgekt.devices.runner import MARKER

device_models, photos = sup.device_models, sup.photos  # session fixtures
sshd = _sshd_support.sshd  # module fixture: a real sshd on 127.0.0.1
TOKEN = "remote-serve-token-0123456789"


def _device_file(sshd, tmp_path: Path, **over) -> Path:
    dev = _sshd_support.ssh_device(sshd, name="board", workdir=str(tmp_path / "board"), **over)
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump(dev.model_dump()))
    return path


def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["serve", *args], env=env)
    text = res.output if res.exception is None or res.exit_code == 2 else \
        f"{res.output}\n{res.exception!r}"
    return res.exit_code, " ".join(text.split())


def _call(port: int, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _record(board: Path) -> dict:
    return json.loads((board / "serve" / "serve.json").read_text())


def test_serve_on_a_board_deploy_reload_rollback_status_stop(sshd, device_models, photos,
                                                             tmp_path):
    dev = _device_file(sshd, tmp_path)
    board = tmp_path / "board"
    pkg = sup.copy_package(device_models.package, tmp_path / "pkg")
    env = {"EDGEKT_SERVE_TOKEN": TOKEN}
    code, out = _cli(str(pkg), "--device", str(dev), "--port", "0", "--threads", "1",
                     "--log-level", "warning", "--no-continual", env=env)
    try:
        assert code == 0, out
        assert "running, pid" in out and "token required" in out and TOKEN not in out
        assert "ssh -N -L" in out  # how to reach a loopback-bound service from here
        record = _record(board)
        pid = record["pid"]
        port = int(re.search(r":(\d+)/$", record["url"]).group(1))
        # Copied, content-addressed; `current` points at it; the state lives beside.
        current = board / "serve" / "current"
        assert current.is_symlink() and (current / "manifest.json").is_file()
        assert (current / ".edgekt-complete").is_file()
        first = os.readlink(current)
        # The token reached the board through stdin: a mode-600 file, on no command line.
        token_file = board / "serve" / "token"
        assert token_file.read_text() == TOKEN
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert TOKEN.encode() not in b" ".join(cmdline) and b"--token-file" in cmdline
        assert b"--no-continual" in cmdline and b"--threads" in cmdline
        # Detached: it outlived the SSH session that started it, and answers.
        img = sup.png(photos.of(SNEAKER, 1, 50)[0])
        status, pred = _call(port, "POST", "/v1/predict", img, {"Content-Type": "image/png"})
        assert status == 200 and pred["label"] in device_models.labels
        enroll = "/v1/fewshot/enroll?label=bag"
        assert _call(port, "POST", enroll, sup.png(photos.of(BAG, 1)[0]),
                     {"Content-Type": "image/png"})[0] == 401
        for shot in photos.of(BAG, 3):
            status, r = _call(port, "POST", enroll, sup.png(shot),
                              {"Content-Type": "image/png", "Authorization": f"Bearer {TOKEN}"})
            assert status == 200, r
        old_version = _call(port, "GET", "/healthz")[1]["version"]

        # A new version of the same models: copied, `current` flipped, hot-reloaded (SIGHUP).
        sup.bump_version(pkg, "v2")
        code, out = _cli(str(pkg), "--device", str(dev), env=env)
        assert code == 0, out
        assert "reloaded" in out and _record(board)["pid"] == pid
        health = _call(port, "GET", "/healthz")[1]
        assert health["version"] != old_version and health["fewshot_classes"] == 1
        second = os.readlink(current)
        assert second != first

        # An embedding from another checkpoint while a class is enrolled: refused by the
        # running service, and `current` goes back to what it serves.
        other = sup.other_embedding_package(device_models.package, tmp_path / "other")
        code, out = _cli(str(other), "--device", str(dev), env=env)
        assert code == 2 and "refused" in out and "incompatible" in out, out
        assert os.readlink(current) == second
        assert _call(port, "GET", "/healthz")[1]["version"] == health["version"]

        code, out = _cli("--device", str(dev), "--status")
        assert code == 0 and f"running, pid {pid}" in out and "health ok" in out, out
    finally:
        code, out = _cli("--device", str(dev), "--stop")
    assert code == 0 and f"stopped (pid {pid}, SIGTERM)" in out, out
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and \
            Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.monotonic() < deadline, "the service is still running"
        time.sleep(0.1)
    code, out = _cli("--device", str(dev), "--status")
    assert code == 0 and "not running" in out, out
    # The enrollment was committed on the board and stays for the next start.
    assert (board / "serve" / "state" / "fewshot_state.npz").is_file()


def test_refusals_before_and_over_ssh(sshd, device_models, tmp_path):
    pkg = str(device_models.package)
    dev = _device_file(sshd, tmp_path)
    # Off loopback without a token: refused here, before anything is copied.
    code, out = _cli(pkg, "--device", str(dev), "--host", "0.0.0.0",
                     env={"EDGEKT_SERVE_TOKEN": ""})
    assert code == 2 and "reachable from other machines" in out, out
    assert not (tmp_path / "board").exists()
    code, out = _cli(pkg, "--device", str(dev), "--state-dir", str(tmp_path / "s"))
    assert code == 2 and "state lives in" in out, out
    code, out = _cli(pkg, "--device", "local")
    assert code == 2 and "on a board over SSH" in out, out
    code, out = _cli("--status")
    assert code == 2 and "need --device" in out, out
    # A board whose Python lacks the serve extra (a bare venv): the pip command to run there.
    import venv

    venv.create(tmp_path / "bare", with_pip=False)
    bare = tmp_path / "bare" / "bin" / "python"
    code, out = _cli(pkg, "--device", str(_device_file(sshd, tmp_path, python=str(bare))))
    assert code == 2 and "'edgekt' is missing" in out, out
    assert f"{bare} -m pip install 'edgekt[serve]'" in out, out
    # Host keys are checked as for profiling.
    code, out = _cli(pkg, "--device", str(_device_file(
        sshd, tmp_path, known_hosts=str(sshd["dir"] / "empty_known_hosts"))))
    assert code == 2 and "host key is not known" in out, out


def test_forwarded_options_are_what_was_typed(monkeypatch, tmp_path):
    """Only options given on the command line travel to the board, in their CLI form; the
    token file and the device stay here."""
    import edgekt.cli.serve as cli

    seen: list[list[str]] = []
    monkeypatch.setattr(cli, "_remote", lambda ctx, *a, **k: seen.append(
        cli.forwarded_options(ctx)))
    code, out = _cli(str(tmp_path), "--port", "0", "--no-page", "--cors-origin", "a",
                     "--cors-origin", "b", "--device", "x", "--token-file", "t",
                     "--inline-ms", "0.5", "--threads", "1")
    assert code == 0, out
    assert "--no-page" in seen[0] and "--device" not in seen[0] and "t" not in seen[0]
    flat = [x for x in seen[0] if x != "--no-page"]
    assert sorted(zip(flat[::2], flat[1::2], strict=True)) == sorted([
        ("--port", "0"), ("--cors-origin", "a"), ("--cors-origin", "b"), ("--inline-ms", "0.5"),
        ("--threads", "1")])


def test_the_control_script_is_standalone():
    """It is copied alone to the board: standard library only, the runner's marker."""
    import edgekt.devices.serve.control as control

    assert control.MARKER == MARKER
    source = Path(control.__file__).read_text()
    assert "import edgekt" not in source and "from edgekt" not in source
