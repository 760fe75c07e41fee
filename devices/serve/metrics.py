"""Prometheus metrics of the service (``GET /metrics``), on a registry of its own.

Request metrics are labelled by route template (``/v1/fewshot/labels/{label}``), never by the
raw path, so their number stays bounded whatever clients send.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edgekt.devices.serve.service import Service

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)


class ServeMetrics:
    """Counters and histograms fed by the HTTP layer and by the service's events."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.registry = r = CollectorRegistry()
        self.requests = Counter("edgekt_serve_requests", "HTTP requests by route, method and "
                                "status code", ["route", "method", "status"], registry=r)
        self.latency = Histogram("edgekt_serve_request_seconds", "HTTP request latency (body "
                                 "read, decode, inference, JSON) by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("edgekt_serve_inference_seconds", "Model time of a "
                                   "prediction by head", ["head"], buckets=LATENCY_BUCKETS,
                                   registry=r)
        self.predictions = Counter("edgekt_serve_predictions", "Predictions by head",
                                   ["head"], registry=r)
        self.state_changes = Counter("edgekt_serve_state_changes", "Committed state changes "
                                     "by kind", ["kind"], registry=r)
        self.updates = Counter("edgekt_serve_continual_updates", "Continual head updates by "
                               "result (accepted, rolled_back)", ["result"], registry=r)
        self.drift = Counter("edgekt_serve_drift_alarms", "Drift alarms raised by the "
                             "continual learner", registry=r)
        self.reloads = Counter("edgekt_serve_reloads", "Package reloads by result (reloaded, "
                               "unchanged, rolled_back)", ["result"], registry=r)
        self.classes = Gauge("edgekt_serve_enrolled_classes", "Few-shot classes enrolled",
                             registry=r)
        self.continual_labels = Gauge("edgekt_serve_continual_labels", "Labels known to the "
                                      "continual head", registry=r)
        self.model = Gauge("edgekt_serve_model_info", "The package version served (value 1)",
                           ["version"], registry=r)
        self.mqtt = Gauge("edgekt_serve_mqtt_connected", "1 when the MQTT broker is connected "
                          "(absent without --mqtt)", registry=r)
        self._version: str | None = None
        for result in ("reloaded", "unchanged", "rolled_back"):
            self.reloads.labels(result)
        for result in ("accepted", "rolled_back"):
            self.updates.labels(result)
        service.listeners.append(self.on_event)

    def on_event(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "prediction":
            self.predictions.labels(payload["head"]).inc()
            self.inference.labels(payload["head"]).observe(payload["inference_ms"] / 1e3)
        elif kind in ("enrolled", "removed"):
            self.state_changes.labels(kind).inc()
        elif kind == "observed":
            self.state_changes.labels(kind).inc()
            if payload["updated"]:
                self.updates.labels("accepted").inc()
            if payload["rolled_back"]:
                self.updates.labels("rolled_back").inc()
            if payload["drift"]:
                self.drift.inc()
        elif kind == "reload":
            self.reloads.labels(payload["result"]).inc()

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self, mqtt_connected: bool | None = None) -> bytes:
        """The Prometheus text exposition, gauges refreshed from the service first."""
        rt = self.service.runtime
        self.classes.set(len(rt.fewshot.labels()) if rt.fewshot else 0)
        self.continual_labels.set(len(rt.continual.labels) if rt.continual else 0)
        version = rt.package.version
        if version != self._version:
            if self._version is not None:
                self.model.remove(self._version)
            self.model.labels(version).set(1)
            self._version = version
        if mqtt_connected is not None:
            self.mqtt.set(1 if mqtt_connected else 0)
        return generate_latest(self.registry)
