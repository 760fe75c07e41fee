"""``edgekt serve`` as a real process on 127.0.0.1: end to end, SIGTERM, SIGKILL then restart
(every acknowledged enrollment is back), and the refusals of the command line."""

from __future__ import annotations

import signal
import threading
import time

import _serve_support as sup
from _serve_support import BAG, SNEAKER, Server
from typer.testing import CliRunner

from edgekt.cli.app import app

device_models, photos = sup.device_models, sup.photos  # session fixtures

TOKEN = "cli-test-token-0123456789abcdef"


def _png_headers(extra=None):
    return {"Content-Type": "image/png", **(extra or {})}


def test_serve_end_to_end(device_models, photos, tmp_path):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    server = Server(device_models.package, tmp_path / "state", tmp_path / "log",
                    env={"EDGEKT_SERVE_TOKEN": TOKEN})
    try:
        assert "token required" in server.banner and TOKEN not in server.banner
        status, health = server.request("GET", "/healthz")
        assert health["status"] == "ok" and health["auth_required"]
        img = photos.of(SNEAKER, 1, 50)[0]
        status, pred = server.request("POST", "/v1/predict", sup.png(img), _png_headers())
        assert status == 200 and pred["label"] in device_models.labels
        assert server.request("POST", "/v1/fewshot/enroll?label=shoe", sup.png(img),
                              _png_headers())[0] == 401
        for label, cls in (("shoe", SNEAKER), ("bag", BAG)):
            for k, shot in enumerate(photos.of(cls, 3)):
                status, r = server.request("POST", f"/v1/fewshot/enroll?label={label}",
                                           sup.png(shot), _png_headers(auth))
                assert status == 200 and r["shots"] == k + 1, r
        status, r = server.request("POST", "/v1/fewshot/predict", sup.png(img), _png_headers())
        assert status == 200 and r["nearest"] in ("shoe", "bag")
        status, text = server.request("GET", "/metrics")
        assert "edgekt_serve_enrolled_classes 2.0" in text
        assert server.request("GET", "/")[0] == 200
        assert "/v1/predict" in server.request("GET", "/openapi.json")[1]["paths"]
        server.proc.send_signal(signal.SIGHUP)  # systemd's ExecReload: reload the package
        deadline = time.monotonic() + 20
        while server.request("GET", "/healthz")[1]["last_reload"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert server.request("GET", "/healthz")[1]["last_reload"]["result"] == "unchanged"
    finally:
        code = server.stop(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises SIGTERM (systemd counts that as clean).
    assert code in (0, -signal.SIGTERM), code
    assert "Traceback" not in (tmp_path / "log").read_text()


def test_acknowledged_enrollments_survive_sigkill(device_models, photos, tmp_path):
    state = tmp_path / "state"
    server = Server(device_models.package, state, tmp_path / "log1")
    acked: list[str] = []
    stop = threading.Event()
    shots = [sup.png(img) for img in photos.of(BAG, 8)]

    def client(tid: int) -> None:
        i = 0
        while not stop.is_set():
            label = f"c{tid}-{i}"
            try:
                status, _ = server.request("POST", f"/v1/fewshot/enroll?label={label}",
                                           shots[i % len(shots)], _png_headers())
            except OSError:
                return  # the server is gone
            if status == 200:
                acked.append(label)  # the server said: committed
            i += 1

    threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 16 and time.monotonic() < deadline:
        time.sleep(0.01)
    code = server.stop(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(30)
    assert code == -signal.SIGKILL and len(acked) >= 16

    again = Server(device_models.package, state, tmp_path / "log2")  # the lock was released
    try:
        status, listed = again.request("GET", "/v1/fewshot/labels")
    finally:
        again.stop()
    labels = {x["label"] for x in listed["labels"]}
    assert set(acked) <= labels
    assert len(labels - set(acked)) <= 4  # at most the enrollments in flight at the kill


def test_cli_refusals_are_clear(device_models, tmp_path):
    runner = CliRunner()

    def run(*args, env=None):
        """The user error's message, whether the command raised it or printed it (exit 2)."""
        res = runner.invoke(app, ["serve", str(device_models.package), *args], env=env)
        assert res.exit_code != 0
        text = res.output if res.exit_code == 2 else str(res.exception)
        return res.exit_code, " ".join(text.split())

    code, exc = run("--host", "0.0.0.0", "--port", "0", env={"EDGEKT_SERVE_TOKEN": ""})
    assert "reachable from other machines" in exc and "--token-file" in exc
    short = tmp_path / "token"
    short.write_text("short\n")
    code, exc = run("--host", "0.0.0.0", "--token-file", str(short))
    assert "at least 16 characters" in exc
    _, exc = run("--token-file", str(tmp_path / "missing"))
    assert "cannot read it" in exc
    _, exc = run("--mqtt", "localhost:notaport", "--state-dir", str(tmp_path / "s"))
    assert "HOST:PORT" in exc
    # There is no --token option: a token on the command line is visible to every user (ps).
    res = runner.invoke(app, ["serve", str(device_models.package), "--token", "x" * 20])
    assert res.exit_code == 2 and "No such option" in res.output
