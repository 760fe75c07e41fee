"""The HTTP face of :class:`~edgekt.devices.serve.service.Service`: a FastAPI application.

Inputs (predict, enroll, observe) come as a raw image body (``image/*``), a ``.npy`` body
(``application/x-npy``), JSON (``{"array": [...], "dtype": "uint8"}``) or a multipart form
(``image``/``images`` files, ``label`` field). Errors are JSON ``{"error": {"code",
"message"}}`` with a meaningful status. State-changing routes need ``Authorization: Bearer
TOKEN`` when a token is configured (always, off loopback: the CLI enforces it).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import edgekt
from edgekt.devices.serve.events import MqttEvents
from edgekt.devices.serve.inputs import (
    Limits,
    ServeError,
    array_from_json,
    array_from_npy,
    check_label,
    decode_image,
    invalid,
    parse_json,
    too_large,
    unsupported,
)
from edgekt.devices.serve.metrics import ServeMetrics
from edgekt.devices.serve.offload import Offload
from edgekt.devices.serve.service import Package, Service
from edgekt.errors import EdgektError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")


@dataclass
class ServeSettings:
    """How the HTTP layer behaves (the CLI builds it; tests build it directly)."""

    token: str | None = None
    """Bearer token required by state-changing routes (None: none required)."""
    limits: Limits = field(default_factory=Limits)
    cors_origins: tuple[str, ...] = ()
    """Origins allowed by CORS; empty: no CORS headers at all (browsers then refuse
    cross-origin calls)."""
    page: bool = True
    """Serve the page for people at ``/``."""
    inline_ms: float = 2.0
    """Predictions run on the event loop, not a worker thread, while their recent decode +
    inference times stay under this many ms (:mod:`~edgekt.devices.serve.offload`); 0: always
    a thread."""


# ---- response bodies (they make the OpenAPI description) -------------------------------------
class Score(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    label: str | None = Field(description="Predicted class; null: few-shot 'unknown' (farther "
                              "than the threshold from every enrolled class).")
    head: str = Field(description="classifier, fewshot or continual.")
    scores: list[Score] | None = Field(None, description="Top classes with probabilities "
                                       "(classifier).")
    nearest: str | None = Field(None, description="Few-shot: the nearest enrolled class.")
    known: bool | None = None
    distance: float | None = None
    score: float | None = None
    novelty: float | None = Field(None, description="Few-shot: normalised open-set score of "
                                  "'nearest' (about 1 for a typical sample of that class).")
    threshold: float | None = None
    model_version: str
    latency_ms: dict[str, float] = Field(description="decode, inference and total (server "
                                         "side, body read included).")


class Enrolled(BaseModel):
    label: str
    shots: int = Field(description="Samples the class's prototype now averages.")
    classes: int
    generation: int = Field(description="State generation committed to disk.")
    model_version: str


class Removed(BaseModel):
    label: str
    classes: int
    generation: int


class LabelInfo(BaseModel):
    label: str
    shots: int


class Labels(BaseModel):
    labels: list[LabelInfo]
    threshold: float | None
    metric: str
    generation: int


class Observed(BaseModel):
    label: str
    updated: bool
    rolled_back: bool = Field(description="The guard refused the update (known classes would "
                              "have lost accuracy); the sample was not learnt.")
    reason: str
    drift: bool
    new_labels: list[str]
    errors: int = Field(description="1 if the head got this sample wrong before learning it.")
    update_ms: float
    generation: int
    labels: int
    model_version: str


class Reloaded(BaseModel):
    result: str = Field(description="reloaded or unchanged.")
    version: str
    previous: str
    message: str


class Health(BaseModel):
    status: str = Field(description="ok, or degraded (an optional part such as MQTT is down; "
                        "HTTP still serves).")
    version: str
    edgekt_version: str
    uptime_s: float
    auth_required: bool
    capabilities: dict[str, bool]
    fewshot_classes: int | None
    continual_labels: int | None
    last_reload: dict[str, Any] | None
    mqtt: dict[str, Any] | None


class ErrorBody(BaseModel):
    code: str
    message: str


class Error(BaseModel):
    error: ErrorBody


ERRORS = {s: {"model": Error} for s in (400, 401, 404, 409, 413, 415, 422)}

_IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
_ARRAY_JSON = {"type": "object", "properties": {
    "array": {"type": "array", "description": "Nested list: a uint8 image (H, W[, C]) or "
              "normalised float32 model input (C, H, W)."},
    "dtype": {"type": "string", "enum": ["uint8", "float32"], "default": "uint8"}}}


def _body_doc(*, label: bool, many: bool) -> dict[str, Any]:
    props: dict[str, Any] = {("images" if many else "image"): (
        {"type": "array", "items": {"type": "string", "format": "binary"}} if many
        else {"type": "string", "format": "binary"})}
    json_props = dict(_ARRAY_JSON["properties"])
    if many:
        json_props = {"arrays": {"type": "array", "items": _ARRAY_JSON},
                      "dtype": json_props["dtype"]}
    if label:
        props["label"] = json_props["label"] = {"type": "string", "maxLength": 64}
    return {"requestBody": {"required": True, "content": {
        "image/*": _IMAGE_BODY, "application/x-npy": _IMAGE_BODY,
        "application/json": {"schema": {"type": "object", "properties": json_props}},
        "multipart/form-data": {"schema": {"type": "object", "properties": props}}}}}


# ---- ASGI middleware ---------------------------------------------------------------------------
class _BodyTooLarge(ServeError):
    pass


def _error_json(status: int, code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class Guard:
    """Outermost layer: request body limit, security headers, request metrics."""

    def __init__(self, app: Any, max_body: int, metrics: ServeMetrics) -> None:
        self.app, self.max_body, self.metrics = app, max_body, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        limit = self.max_body

        async def send_with_headers(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"),
                            (b"content-security-policy", CSP.encode()),
                            (b"referrer-policy", b"no-referrer")]
                message = {**message, "headers": headers}
            await send(message)

        length = dict(scope.get("headers", [])).get(b"content-length")
        try:
            if length is not None and int(length) > limit:
                resp = JSONResponse(_error_json(413, "payload_too_large",
                                                f"request body of {int(length)} bytes; the "
                                                f"limit is {limit}"), 413)
                await resp(scope, receive, send_with_headers)
                return
        except ValueError:
            resp = JSONResponse(_error_json(400, "bad_request", "bad Content-Length"), 400)
            await resp(scope, receive, send_with_headers)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(f"request body over the limit of {limit} bytes", 413,
                                        "payload_too_large")
            return message

        try:
            await self.app(scope, limited_receive, send_with_headers)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(name, scope["method"], status, time.perf_counter() - t0)


# ---- the application ---------------------------------------------------------------------------
def create_app(service: Service, settings: ServeSettings | None = None, *,
               events: MqttEvents | None = None) -> FastAPI:
    """The FastAPI app for ``service``; ``events`` (MQTT) is started and stopped with it."""
    settings = settings or ServeSettings()
    limits = settings.limits
    metrics = ServeMetrics(service)
    offload = Offload(settings.inline_ms)
    if events is not None:
        service.listeners.append(events)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        await run_in_threadpool(_warm_up, service.package, limits)
        if events is not None:
            events.start()
        _install_sighup(service)
        try:
            yield
        finally:
            if events is not None:
                events.stop()

    app = FastAPI(title="edgekt serve", version=edgekt.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # Swagger UI would load from a CDN
                  description="On-device inference, few-shot enrollment and continual learning "
                              "of an edgekt package. State-changing routes need a bearer token "
                              "when one is configured.")
    app.state.service, app.state.metrics, app.state.events = service, metrics, events
    app.state.offload = offload

    # -- errors: always JSON with a code
    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(_error_json(exc.status, exc.code, str(exc)), exc.status,
                            headers=headers)

    @app.exception_handler(EdgektError)
    async def _edgekt_error(request: Request, exc: EdgektError) -> JSONResponse:
        # The runtime's own checks (shape, dtype, channels): the input does not fit the model.
        return JSONResponse(_error_json(422, "invalid_input", str(exc)), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        return JSONResponse(_error_json(exc.status_code, codes.get(exc.status_code, "error"),
                                        str(exc.detail)), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(_error_json(422, "invalid_input",
                                        f"{where}: {first.get('msg', 'invalid')}"), 422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(_error_json(500, "internal_error", f"internal error "
                                        f"({type(exc).__name__}); see the service log"), 500)

    # -- auth
    def require_token(request: Request) -> None:
        if settings.token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ServeError("this route changes the device state and needs 'Authorization: "
                             "Bearer TOKEN'", 401, "unauthorized")
        if not hmac.compare_digest(value.strip().encode(), settings.token.encode()):
            raise ServeError("wrong bearer token", 401, "unauthorized")

    writer = [Depends(require_token)]

    # -- inputs
    async def read_inputs(request: Request, pkg: Package, *, many: bool
                          ) -> tuple[Callable[[], list[Any]], dict[str, str]]:
        """A function decoding the request's samples (run it in a worker thread) and the
        request's text fields."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fields: dict[str, str] = {}
        blobs: list[tuple[str, bytes, str]] = []  # (name, bytes, kind)
        arrays: list[tuple[Any, Any, str]] = []  # JSON (value, dtype, name), converted later
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=limits.max_images, max_fields=8,
                                          max_part_size=limits.max_body_bytes)
            except StarletteHTTPException as exc:
                # Starlette says 400 for every multipart limit; too many files is a 413.
                if "too many files" in str(exc.detail).lower():
                    raise too_large(f"more than {limits.max_images} images in one request"
                                    ) from None
                raise ServeError(f"bad multipart form: {exc.detail}") from None
            for key, value in form.multi_items():
                if isinstance(value, str):
                    fields[key] = value
                else:
                    data = await value.read()
                    kind = "npy" if (value.filename or "").endswith(".npy") else "image"
                    blobs.append((value.filename or key, data, kind))
        elif ctype.startswith("image/") or ctype == "application/octet-stream":
            blobs.append(("image", await request.body(), "image"))
        elif ctype == "application/x-npy":
            blobs.append(("array", await request.body(), "npy"))
        elif ctype == "application/json":
            raw = await request.body()
            # A large body is parsed off the event loop (other requests keep flowing).
            body = parse_json(raw) if len(raw) < 65536 else \
                await run_in_threadpool(parse_json, raw)
            if not isinstance(body, dict):
                raise invalid("the JSON body must be an object")
            dtype = body.get("dtype", "uint8")
            if many and "arrays" in body:
                if not isinstance(body["arrays"], list):
                    raise invalid("'arrays' must be a list of arrays")
                arrays = [(a, dtype, f"arrays[{i}]") for i, a in enumerate(body["arrays"])]
            elif "array" in body:
                arrays = [(body["array"], dtype, "array")]
            else:
                raise invalid("the JSON body needs 'array'" + (" or 'arrays'" if many else ""))
            fields = {k: v for k, v in body.items() if isinstance(v, str) and k != "dtype"}
        elif not ctype:
            raise unsupported("no Content-Type: send an image (image/jpeg, image/png), a .npy "
                              "array (application/x-npy), JSON or a multipart form")
        else:
            raise unsupported(f"Content-Type {ctype!r} is not accepted: send an image "
                              "(image/*), application/x-npy, application/json or "
                              "multipart/form-data")
        if len(blobs) + len(arrays) > (limits.max_images if many else 1):
            n = len(blobs) + len(arrays)
            raise (too_large if many else invalid)(
                f"{n} samples in one request; the limit is {limits.max_images if many else 1}")

        if not blobs and not arrays:
            raise invalid("no image or array in the request")

        def decode() -> list[Any]:
            out = []
            for name, data, kind in blobs:
                if kind == "npy":
                    out.append(array_from_npy(data, limits, name))
                else:
                    out.append(decode_image(data, mode=pkg.mode, size=pkg.size, limits=limits,
                                            name=name))
            return out + [array_from_json(v, dtype, limits, name) for v, dtype, name in arrays]

        return decode, fields

    async def decode_and(decode: Callable[[], list[Any]], call: Callable[[list[Any]], Any],
                         *, kind: str | None = None, nbytes: int | None = None
                         ) -> tuple[Any, float]:
        """Decode, then ``call(samples)``, in one step; returns the result and the seconds
        spent decoding. With a ``kind``, where :class:`Offload` says; else in a worker thread
        (state changes wait for fsync)."""
        def job() -> tuple[Any, float]:
            t0 = time.perf_counter()
            samples = decode()
            seconds = time.perf_counter() - t0
            return call(samples), seconds

        if kind is None:
            return await run_in_threadpool(job)
        return await offload.run(kind, job, nbytes=nbytes)

    def label_of(request: Request, fields: dict[str, str]) -> str:
        label = fields.get("label", request.query_params.get("label"))
        if label is None:
            raise invalid("a 'label' is needed (form field, JSON key or ?label=)")
        return check_label(label, limits)

    def finish(result: dict[str, Any], t_start: float, decode_s: float) -> dict[str, Any]:
        """Latency fields of a prediction. Predictions are returned as built (no second pass
        through the pydantic model: it costs a noticeable share of a 0.1 ms model's time)."""
        infer = result.pop("inference_ms", 0.0)
        result["latency_ms"] = {"decode": decode_s * 1e3, "inference": infer,
                                "total": (time.perf_counter() - t_start) * 1e3}
        return result

    # -- routes
    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> dict[str, Any]:
        """Liveness and what is on: version, parts, classes, last reload, MQTT."""
        mqtt = events.status() if events is not None else None
        degraded = mqtt is not None and not mqtt["connected"]
        return {"status": "degraded" if degraded else "ok", **service.health(),
                "edgekt_version": edgekt.__version__, "auth_required": settings.token is not None,
                "mqtt": mqtt}

    @app.get("/metrics", tags=["service"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    def prometheus() -> Response:
        """Prometheus text format: requests, latency, predictions, classes, updates, drift,
        reloads."""
        from prometheus_client import CONTENT_TYPE_LATEST

        body = metrics.render(events.connected if events is not None else None)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info", tags=["service"])
    def info() -> dict[str, Any]:
        """The package served: version, models, input image mode and size, capabilities."""
        return {**service.package.describe(), "capabilities": service.capabilities(),
                "labels": (service.package.classifier.labels
                           if service.package.classifier else None),
                "limits": vars(limits)}

    async def classify(request: Request, fn: Callable[[Any], dict[str, Any]],
                       kind: str | None = None) -> JSONResponse:
        """Decode one image from the request, classify it with ``fn``, add the timings.

        ``kind``: the call may run on the event loop when it is short (:class:`Offload`);
        only for lock-free calls. Few-shot and continual predictions read state that an
        enrollment holds locked while it fsyncs, and that wait must not block the loop."""
        t0 = time.perf_counter()
        decode, _ = await read_inputs(request, service.package, many=False)
        length = request.headers.get("content-length") if kind else None
        result, dec = await decode_and(decode, lambda s: fn(s[0]), kind=kind,
                                       nbytes=int(length) if length else None)
        return JSONResponse(finish(result, t0, dec))  # already the documented shape

    @app.post("/v1/predict", response_model=Prediction, response_model_exclude_unset=True,
              tags=["predict"], responses=ERRORS, openapi_extra=_body_doc(label=False,
                                                                           many=False))
    async def predict(request: Request, top: int = 5) -> JSONResponse:
        """Classify one image with the package's classifier."""
        k = min(max(top, 1), 100)
        return await classify(request, lambda x: service.predict(x, k), "predict")

    @app.post("/v1/fewshot/predict", response_model=Prediction,
              response_model_exclude_unset=True, tags=["fewshot"], responses=ERRORS,
              openapi_extra=_body_doc(label=False, many=False))
    async def fewshot_predict(request: Request) -> JSONResponse:
        """Classify one image among the enrolled classes (label null: unknown)."""
        return await classify(request, service.fewshot_predict)

    @app.get("/v1/fewshot/labels", response_model=Labels, tags=["fewshot"], responses=ERRORS)
    def fewshot_labels() -> dict[str, Any]:
        """Enrolled classes with their shot counts."""
        return service.labels()

    @app.post("/v1/fewshot/enroll", response_model=Enrolled, tags=["fewshot"],
              responses=ERRORS, dependencies=writer,
              openapi_extra=_body_doc(label=True, many=True))
    async def fewshot_enroll(request: Request, replace: bool = False) -> dict[str, Any]:
        """Enroll a class from a few images (or add them to it); on disk before the answer."""
        decode, fields = await read_inputs(request, service.package, many=True)
        label = label_of(request, fields)
        return (await decode_and(decode, lambda s: service.enroll(label, s, replace)))[0]

    @app.delete("/v1/fewshot/labels/{label:path}", response_model=Removed, tags=["fewshot"],
                responses=ERRORS, dependencies=writer)
    async def fewshot_remove(label: str) -> dict[str, Any]:
        """Forget an enrolled class."""
        return await run_in_threadpool(service.remove, check_label(label, limits))

    async def observe(request: Request) -> dict[str, Any]:
        decode, fields = await read_inputs(request, service.package, many=False)
        label = label_of(request, fields)
        return (await decode_and(decode, lambda s: service.observe(s[0], label)))[0]

    for path in ("/v1/continual/observe", "/v1/continual/feedback"):
        app.post(path, response_model=Observed, tags=["continual"], responses=ERRORS,
                 dependencies=writer, openapi_extra=_body_doc(label=True, many=False),
                 summary="Learn from one labelled image (feedback)")(observe)

    @app.post("/v1/continual/predict", response_model=Prediction,
              response_model_exclude_unset=True, tags=["continual"], responses=ERRORS,
              openapi_extra=_body_doc(label=False, many=False))
    async def continual_predict(request: Request) -> JSONResponse:
        """Classify one image with the continually learnt head."""
        return await classify(request, service.continual_predict)

    @app.get("/v1/continual", tags=["continual"], responses=ERRORS)
    def continual_status() -> dict[str, Any]:
        """Labels, counters (updates, rollbacks, drift events) and memory of the learner."""
        return service.continual_status()

    @app.post("/v1/admin/reload", response_model=Reloaded, tags=["service"], responses=ERRORS,
              dependencies=writer)
    async def reload() -> dict[str, Any]:
        """Load the package path again: swap to the new version only if it loads, runs and is
        compatible with the state; otherwise keep serving the current one (409/422/500)."""
        return vars(await run_in_threadpool(service.reload))

    if settings.page:
        @app.get("/", include_in_schema=False)
        def page() -> FileResponse:
            return FileResponse(STATIC / "index.html", media_type="text/html")

        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, max_body=limits.max_body_bytes, metrics=metrics)
    return app


def _warm_up(pkg: Package, limits: Limits) -> None:
    """Decode a PNG and a JPEG and run each model once before the first request: the image
    plugins' imports and the runtime's first call would otherwise cost it tens of ms."""
    import io

    import numpy as np
    from PIL import Image

    size = pkg.size or (32, 32)
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (size[1], size[0])).save(buf, format=fmt)
        x = decode_image(buf.getvalue(), mode=pkg.mode, size=pkg.size, limits=limits)
    for model in (pkg.classifier, pkg.embedder):
        if model is not None and pkg.size is not None:
            model.logits(np.asarray(x))


def _install_sighup(service: Service) -> None:
    """``kill -HUP`` (systemd ExecReload) reloads the package, as POST /v1/admin/reload does."""
    loop = asyncio.get_running_loop()

    def on_hup() -> None:
        def run() -> None:
            try:
                service.reload()
            except EdgektError as exc:
                log.warning("SIGHUP reload: %s", exc)

        loop.run_in_executor(None, run)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    except (NotImplementedError, RuntimeError, ValueError):
        pass  # not the main thread (tests) or no signals on this platform


__all__ = ["ServeSettings", "create_app"]
