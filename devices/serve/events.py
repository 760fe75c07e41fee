"""Optional MQTT events: each prediction and each state change as one JSON message.

Topics are ``PREFIX/prediction``, ``PREFIX/enrolled``, ``PREFIX/removed``, ``PREFIX/observed``
and ``PREFIX/reload``. Predictions go out with QoS 0 (a fresh one follows), state changes with
QoS 1. The client connects in the background and reconnects by itself; while the broker is down
the HTTP service keeps serving, ``healthz`` says so, and at most ``max_queued`` messages wait.
Credentials come from ``EDGEKT_MQTT_USERNAME`` / ``EDGEKT_MQTT_PASSWORD``, never the command line.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from edgekt.errors import EdgektError

log = logging.getLogger(__name__)

STATE_EVENTS = ("enrolled", "removed", "observed", "reload")


def parse_broker(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST``, port 1883) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "1883"
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EdgektError(f"--mqtt {text!r}: expected HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port)


def check_prefix(prefix: str) -> str:
    if not prefix or any(c in prefix for c in "#+\0") or prefix.startswith("/") \
            or prefix.endswith("/"):
        raise EdgektError(f"--topic-prefix {prefix!r}: expected a topic without wildcards "
                          f"(+, #) or leading/trailing '/', e.g. edgekt/camera-1")
    return prefix


class MqttEvents:
    """Publishes the service's events to an MQTT broker (paho-mqtt)."""

    def __init__(self, host: str, port: int, prefix: str, *, client_id: str | None = None,
                 max_queued: int = 1000, keepalive: int = 30) -> None:
        import paho.mqtt.client as mqtt

        self.host, self.port, self.prefix = host, port, check_prefix(prefix)
        self._connected = threading.Event()
        self.last_error = "not connected yet"
        self.published = 0
        self.dropped = 0
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                   client_id=client_id or f"edgekt-serve-{os.getpid()}")
        user = os.environ.get("EDGEKT_MQTT_USERNAME")
        if user:
            self._client.username_pw_set(user, os.environ.get("EDGEKT_MQTT_PASSWORD"))
        self._client.max_queued_messages_set(max_queued)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._keepalive = keepalive

    def start(self) -> None:
        """Connect in the background (a broker that is down is retried, never fatal)."""
        self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            self._connected.clear()
            self.last_error = f"broker refused the connection: {reason_code}"
            log.warning("MQTT %s:%d: %s", self.host, self.port, self.last_error)
            return
        self._connected.set()
        self.last_error = ""
        log.info("MQTT connected to %s:%d", self.host, self.port)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self._connected.clear()
        self.last_error = f"disconnected: {reason_code}"

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        """A service listener: publish ``payload`` (plus kind and time) on ``PREFIX/kind``."""
        import paho.mqtt.client as mqtt

        message = json.dumps({"event": kind, "time": time.time(), **payload}, default=str)
        info = self._client.publish(f"{self.prefix}/{kind}", message,
                                    qos=1 if kind in STATE_EVENTS else 0)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self.published += 1
        else:
            # Not connected and the queue is full (or no connection for QoS 0): dropped.
            self.dropped += 1

    def status(self) -> dict[str, Any]:
        return {"broker": f"{self.host}:{self.port}", "connected": self.connected,
                "topic_prefix": self.prefix, "published": self.published,
                "dropped": self.dropped, "error": self.last_error or None}
