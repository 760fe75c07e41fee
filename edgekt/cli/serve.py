"""``edgekt serve PACKAGE``: the on-device HTTP service (JSON API, metrics, a page, MQTT)."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shlex
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from edgekt.errors import EdgektError

if TYPE_CHECKING:
    from edgekt.devices.serve.remote import RemoteServe

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
    ctx: typer.Context,
    package: Annotated[Path | None, typer.Argument(
        help="Edge package (export directory) or model file.", show_default=False)] = None,
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
    inline_ms: Annotated[float | None, typer.Option(
        help="Predictions whose decode + inference take under this many ms run on the event "
             "loop, not a worker thread (default 2; 0: always a thread).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    device: Annotated[str | None, typer.Option(
        help="Serve on this board instead (device name or file with transport ssh): copy the "
             "package, start the service detached, check its health over SSH.")] = None,
    status: Annotated[bool, typer.Option("--status", help="With --device: whether the "
                                         "service runs there, and its health.")] = False,
    stop: Annotated[bool, typer.Option("--stop", help="With --device: stop the service "
                                       "there.")] = False,
) -> None:
    """Serve predictions, few-shot enrollment, continual learning, metrics and a page."""
    if device is not None:
        _remote(ctx, device, package, status=status, stop=stop, token_file=token_file,
                host=host, state_dir=state_dir)
        return
    if status or stop:
        raise EdgektError("--status and --stop need --device (a service on this machine is "
                          "stopped with Ctrl-C, SIGTERM or systemctl)")
    if package is None:
        raise EdgektError("give the PACKAGE to serve (an export directory or a model file)")
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
    if inline_ms is not None and not 0 <= inline_ms < float("inf"):
        raise EdgektError(f"--inline-ms {inline_ms}: expected a number of ms >= 0")
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
        tuning = {} if inline_ms is None else {"inline_ms": inline_ms}
        app = create_app(service, ServeSettings(token=token, limits=limits, page=page,
                                                cors_origins=tuple(cors_origin or ()),
                                                **tuning),
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


# ---- on a board over SSH -----------------------------------------------------------------------
LOCAL_ONLY = {"package", "device", "status", "stop", "state_dir", "token_file"}


def forwarded_options(ctx: typer.Context) -> list[str]:
    """The serve options given on this command line, as arguments for the board's edgekt
    serve (defaults are left to it; paths and the token are handled apart)."""
    out: list[str] = []
    for param in ctx.command.params:
        # Duck-typed: Typer may carry its own copy of click, whose classes are not click's.
        source = ctx.get_parameter_source(param.name)
        if param.param_type_name != "option" or param.name in LOCAL_ONLY \
                or getattr(source, "name", None) != "COMMANDLINE":
            continue
        value, flag = ctx.params[param.name], param.opts[0]
        if param.is_flag:
            out += [flag] if value else list(param.secondary_opts[:1])
        elif param.multiple:
            for v in value or ():
                out += [flag, str(v)]
        else:
            out += [flag, str(value)]
    return out


def _remote(ctx: typer.Context, device: str, package: Path | None, *, status: bool,
            stop: bool, token_file: Path | None, host: str, state_dir: Path | None) -> None:
    from edgekt.devices.config import load_device
    from edgekt.devices.serve.remote import RemoteServe

    if status and stop:
        raise EdgektError("--status or --stop, not both")
    remote = RemoteServe(load_device(device))
    where = f"{remote.cfg.name} ({remote.cfg.host})"
    token = None
    if not (status or stop):  # everything checkable here is checked before connecting
        if package is None:
            raise EdgektError("give the PACKAGE to serve on the device (or --status / --stop)")
        if state_dir is not None:
            raise EdgektError(f"--state-dir is a path on this machine; on device {device!r} "
                              f"the state lives in {remote.root}/state (kept across versions)")
        token = read_token(token_file)
        if token is None and not is_loopback(host):
            raise EdgektError(f"--host {host} is reachable from other machines: set a bearer "
                              f"token for the state-changing routes with --token-file FILE or "
                              f"${TOKEN_ENV} (or serve on 127.0.0.1)")
    with remote.ssh.multiplexed():  # one SSH connection for the few commands below
        if stop:
            r = remote.stop()
            console.print(f"edgekt serve on {where}: " + (
                f"stopped (pid {r['pid']}, {r['signal']})" if r["was_running"]
                else "not running"), highlight=False)
            return
        if status:
            r = remote.status()
            if not r["running"]:
                console.print(f"edgekt serve on {where}: not running (package "
                              f"{r.get('current') or 'none deployed'})", highlight=False)
            else:
                _print_running(where, r, remote)
            if r.get("log_tail"):
                console.print(f"[dim]log ({remote.root}/serve.log):\n"
                              f"{escape(r['log_tail'])}[/]", highlight=False)
            return
        assert package is not None
        r = remote.up(package, forwarded_options(ctx), token)
    if r["action"] == "started":
        console.print(f"deployed version {r['version']} of {package}", highlight=False)
    else:
        console.print(f"deployed version {r['version']} of {package} to the running service: "
                      f"{r['action']} ({r['reload'].get('message') or 'new version live'}); "
                      "its options and token are unchanged (--stop, then start, to change "
                      "them)", highlight=False)
    _print_running(where, r, remote)


def _print_running(where: str, r: dict[str, Any], remote: RemoteServe) -> None:
    health = r.get("health") or {}
    url = r.get("url") or "?"
    console.print(f"edgekt serve on {where}: running, pid {r['pid']}, {url}, version "
                  f"{health.get('version', '?')}, health {health.get('status', 'no answer')}, "
                  f"token {'required' if health.get('auth_required') else 'off'}",
                  highlight=False, soft_wrap=True)
    m = re.match(r"http://(\[[^\]]+\]|[^:/]+):(\d+)/", url)
    if m and is_loopback(m.group(1)):
        cfg = remote.cfg
        forward = ["ssh", "-N", "-L", f"{m.group(2)}:{m.group(1).strip('[]')}:{m.group(2)}"]
        forward += ["-p", str(cfg.port)] if cfg.port else []
        forward += [f"{cfg.user}@{cfg.host}" if cfg.user else str(cfg.host)]
        console.print(f"[dim]it listens on the board's loopback; reach it from here with: "
                      f"{escape(shlex.join(forward))}[/]", highlight=False, soft_wrap=True)
