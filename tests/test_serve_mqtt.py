"""MQTT events of ``edgekt serve`` against a real mosquitto broker on 127.0.0.1, and a broker
that is down (HTTP keeps serving, healthz says so). ``scripts/test.sh`` installs mosquitto."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time

import _serve_support as sup
import pytest
from _serve_support import BAG

from edgekt.devices.serve.app import create_app
from edgekt.devices.serve.events import MqttEvents
from edgekt.devices.serve.service import Service

device_models, photos = sup.device_models, sup.photos  # session fixtures

PREFIX = "edgekt-test/cam1"


def _start_broker(port: int, tmp_path) -> subprocess.Popen:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not shutil.which(exe):
        pytest.fail("the MQTT test needs Debian's mosquitto (apt-get install mosquitto; "
                    "scripts/test.sh does it)")
    conf = tmp_path / f"mosquitto-{port}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / f"mosquitto-{port}.log", "w"))
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / f"mosquitto-{port}.log").read_text()
            time.sleep(0.05)


class Subscriber:
    """Collects every message under PREFIX/#."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict]] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-sub")
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe(f"{PREFIX}/#", qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.messages.append((msg.topic, json.loads(msg.payload)))
            self._cond.notify_all()

    def wait_for(self, topic: str, n: int = 1, timeout: float = 10) -> list[dict]:
        with self._cond:
            assert self._cond.wait_for(
                lambda: len([m for t, m in self.messages if t == topic]) >= n, timeout), \
                (topic, self.messages)
            return [m for t, m in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_events_reach_a_real_broker_and_a_dead_one_degrades_health(device_models, photos,
                                                                    tmp_path):
    from fastapi.testclient import TestClient

    port = sup.free_port()
    events = MqttEvents("127.0.0.1", port, PREFIX)
    service = Service(device_models.package, tmp_path / "state", threads=1)
    png = {"Content-Type": "image/png"}
    broker = sub = None
    try:
        with TestClient(create_app(service, events=events)) as client:
            # The broker is down: HTTP serves, healthz and the metrics say so.
            h = client.get("/healthz").json()
            assert h["status"] == "degraded" and h["mqtt"]["connected"] is False
            assert h["mqtt"]["broker"] == f"127.0.0.1:{port}"
            r = client.post("/v1/predict", content=sup.png(photos.images[0]), headers=png)
            assert r.status_code == 200
            assert "edgekt_serve_mqtt_connected 0.0" in client.get("/metrics").text

            # The broker comes up: the client reconnects by itself; events flow.
            broker = _start_broker(port, tmp_path)
            assert events.wait_connected(15), events.status()
            assert client.get("/healthz").json()["status"] == "ok"
            sub = Subscriber(port)
            r = client.post("/v1/predict", content=sup.png(photos.images[1]), headers=png).json()
            pred = sub.wait_for(f"{PREFIX}/prediction")[-1]
            assert pred["label"] == r["label"] and pred["head"] == "classifier"
            assert pred["model_version"] == service.package.version
            files = [("images", (f"b{i}.png", sup.png(img), "image/png"))
                     for i, img in enumerate(photos.of(BAG, 3))]
            assert client.post("/v1/fewshot/enroll", data={"label": "bag"},
                               files=files).status_code == 200
            enrolled = sub.wait_for(f"{PREFIX}/enrolled")[0]
            assert enrolled["label"] == "bag" and enrolled["shots"] == 3
            assert enrolled["event"] == "enrolled"
            client.delete("/v1/fewshot/labels/bag")
            assert sub.wait_for(f"{PREFIX}/removed")[0]["classes"] == 0
            client.post("/v1/continual/observe?label=bag", content=sup.png(photos.of(BAG, 1)[0]),
                        headers=png)
            assert sub.wait_for(f"{PREFIX}/observed")[0]["new_labels"] == ["bag"]
            assert "edgekt_serve_mqtt_connected 1.0" in client.get("/metrics").text

            # The broker dies: still serving, health degraded again.
            broker.terminate()
            broker.wait(10)
            deadline = time.monotonic() + 10
            while events.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.get("/healthz").json()["status"] == "degraded"
            assert client.post("/v1/predict", content=sup.png(photos.images[2]),
                               headers=png).status_code == 200
    finally:
        if sub is not None:
            sub.close()
        if broker is not None and broker.poll() is None:
            broker.terminate()
            broker.wait(10)
        service.close()
