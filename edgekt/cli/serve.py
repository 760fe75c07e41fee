"""``edgekt serve PACKAGE``: the on-device HTTP service (JSON API, metrics, a page, MQTT)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from edgekt.errors import EdgektError

console = Console()
TOKEN_ENV = "EDGEKT_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def read_token(token_file: Path | None) -> str | None:
    """The bearer token from ``--token-file`` or ``$EDGEKT_SERVE_TOKEN`` (never a CLI value)."""
    if token_file is not None:
        try:
            mode = token_file.stat().st_mode
            token = token_file.read_text().strip()
        except OSError as exc:
            raise EdgektError(f"--token-file {token_file}: cannot read it ({exc})") from None
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            logging.getLogger(__name__).warning(
                "%s is readable by other users; chmod 600 it", token_file)
        source = str(token_file)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        source = f"${TOKEN_ENV}"
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise EdgektError(f"{source}: the token must be at least {MIN_TOKEN_CHARS} characters "
                          f"without spaces (e.g. python -c 'import secrets; "
                          f"print(secrets.token_urlsafe(32))')")
    return token


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
    # and without it Nagle holds each response body back for the client's delayed ACK (40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise EdgektError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def serve(
    package: Annotated[Path, typer.Argument(help="Edge package (export directory) or model "
                                                 "file.", show_default=False)],
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback needs "
                                           f"a token (--token-file or ${TOKEN_ENV}).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port, printed).")] = 8080,
    state_dir: Annotated[Path | None, typer.Option(
        help="Few-shot/continual state directory (default: the package directory; use a "
             "directory of its own when packages are swapped).")] = None,
    token_file: Annotated[Path | None, typer.Option(
        help=f"File holding the bearer token for state-changing routes (else ${TOKEN_ENV}).")]
    = None,
    threads: Annotated[int | None, typer.Option(help="Runtime intra-op threads.")] = None,
    backend: Annotated[str | None, typer.Option(help="onnxruntime or openvino.")] = None,
    continual: Annotated[bool, typer.Option(help="Serve continual learning (needs the "
                                                 "embedding part).")] = True,
    recover: Annotated[bool, typer.Option(help="If the few-shot state is damaged, restore its "
                                               "intact previous generation.")] = False,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body (MB).")] = 8.0,
    max_megapixels: Annotated[float, typer.Option(help="Largest image decoded (megapixels).")]
    = 24.0,
    max_images: Annotated[int, typer.Option(help="Most images per enrollment.")] = 32,
    max_connections: Annotated[int, typer.Option(help="Concurrent connections before 503.")]
    = 64,
    cors_origin: Annotated[list[str] | None, typer.Option(
        help="Allow this browser origin (repeat); default: no CORS.")] = None,
    mqtt: Annotated[str | None, typer.Option(help="Publish events to this MQTT broker "
                                                  "(HOST:PORT).")] = None,
    topic_prefix: Annotated[str, typer.Option(help="MQTT topic prefix.")] = "edgekt",
    page: Annotated[bool, typer.Option(help="Serve the page for people at /.")] = True,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Serve predictions, few-shot enrollment, continual learning, metrics and a page."""
    try:
        import uvicorn

        from edgekt.devices.serve.app import ServeSettings, create_app
        from edgekt.devices.serve.events import MqttEvents, parse_broker
    except ImportError as exc:
        raise EdgektError(f"edgekt serve needs the serve extra ({exc.name} is missing): "
                          "python -m pip install 'edgekt[serve]'") from None
    from edgekt.devices.serve.inputs import Limits
    from edgekt.devices.serve.service import Service

    level = log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise EdgektError(f"--log-level {log_level!r}: expected debug, info, warning or error")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = read_token(token_file)
    if token is None and not is_loopback(host):
        raise EdgektError(f"--host {host} is reachable from other machines: set a bearer token "
                          f"for the state-changing routes with --token-file FILE or "
                          f"${TOKEN_ENV} (or serve on 127.0.0.1)")
    limits = Limits(max_body_bytes=int(max_body_mb * 2**20),
                    max_pixels=int(max_megapixels * 1e6), max_images=max_images)
    events = None
    if mqtt is not None:
        broker_host, broker_port = parse_broker(mqtt)
        events = MqttEvents(broker_host, broker_port, topic_prefix)
    sock = _bind(host, port)
    service = Service(package, state_dir, backend=backend, threads=threads, continual=continual,
                      recover=recover)
    try:
        app = create_app(service, ServeSettings(token=token, limits=limits,
                                                cors_origins=tuple(cors_origin or ())),
                         events=events)
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
        caps = ", ".join(k for k, v in service.capabilities().items() if v) or "none"
        console.print(f"edgekt serve: http://{shown}:{bound[1]}/ (package {package}, version "
                      f"{service.package.version}; {caps}; state {service.state_dir}; "
                      f"token {'required' if token else 'off'})", highlight=False,
                      soft_wrap=True)
        config = uvicorn.Config(app, log_level=level.lower(), access_log=level == "DEBUG",
                                limit_concurrency=max_connections, server_header=False,
                                timeout_keep_alive=5, log_config=None)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.close()
        sock.close()
