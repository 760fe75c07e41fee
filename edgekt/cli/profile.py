"""``edgekt profile`` and ``edgekt devices``: latency on this machine or on a board over SSH."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgekt.cli.options import field_option, make_console
from edgekt.devices.profiler import ProfileConfig
from edgekt.errors import EdgektError

console = make_console()
err_console = Console(stderr=True)
devices_app = typer.Typer(help="Device files (devices/*.yaml): list them, probe one.",
                          no_args_is_help=True)


_opt = partial(field_option, ProfileConfig)


def profile(
    models: Annotated[list[Path] | None, typer.Argument(
        help="Export directories (manifest.json) or .onnx/.xml/.tflite files.",
        show_default=False)] = None,
    device: Annotated[str, typer.Option(help="Device name (devices/NAME.yaml) or file.")] = "local",
    backend: Annotated[str | None, typer.Option(
        help="Comma-separated backends: onnxruntime (ort), openvino (ov), litert (tflite). "
             "Default: the device file's.")] = None,
    precision: Annotated[str | None, typer.Option(
        help="Artifact precision(s) from an export directory: fp32, int8, ... or 'all'.")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="YAML file of profile settings (the fields below, e.g. a pipeline's "
                         "profile: section); flags override it.")] = None,
    threads: Annotated[int | None, _opt("threads")] = None,
    batch: Annotated[int | None, _opt("batch")] = None,
    warmup: Annotated[int | None, _opt("warmup")] = None,
    iters: Annotated[int | None, _opt("iters")] = None,
    seconds: Annotated[float | None, _opt("seconds")] = None,
    e2e: Annotated[bool | None, _opt("e2e", "--e2e/--no-e2e")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    out: Annotated[Path | None, typer.Option(
        help="Write the results (with samples) as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG: latency CDF (+ accuracy vs "
                                                   "latency when the manifests have it).")] = None,
    compare: Annotated[bool, typer.Option(
        help="Show the change against the last stored run of each row; with no MODEL, compare "
             "the last stored run with its predecessors.")] = False,
    store: Annotated[Path | None, typer.Option(
        help="JSONL results store (default: $EDGEKT_PROFILE_STORE or ~/.edgekt/profiles.jsonl).")
    ] = None,
    save: Annotated[bool, typer.Option(help="Append the results to the store.")] = True,
) -> None:
    """Profile models x backends on a device: load, first call, steady-state latency, memory."""
    from edgekt.devices import store as results
    from edgekt.devices.campaign import run_profiles
    from edgekt.devices.config import load_device
    from edgekt.devices.profiler import profile_config

    store_path = store or results.default_store()
    records = results.read(store_path)
    if not models:
        if not compare:
            raise EdgektError("give at least one MODEL (export directory, .onnx, .xml or "
                              ".tflite), or --compare to show the last stored run")
        last = results.last_run(records)
        if not last:
            raise EdgektError(f"{store_path}: no stored profile runs to compare")
        _table(last, [results.previous(records, r, r["run_id"]) for r in last],
               f"last run {last[0]['run_id']}")
        return
    if iters is not None and seconds is not None:
        raise EdgektError("use either --iters or --seconds, not both")
    from edgekt.io import check_writable

    for path, what in ((out, "--out"), (plot, "--plot"), (store_path if save else None, "--store")):
        if path is not None:
            check_writable(path, what)
    cfg = load_device(device)
    backends = [b for b in (backend.split(",") if backend else cfg.backend) if b.strip()]
    given = {"warmup": warmup, "iters": iters, "seconds": seconds, "batch": batch,
             "threads": threads, "e2e": e2e}
    settings = profile_config(config, "edgekt profile",
                              **{k: v for k, v in given.items() if v is not None})
    # The device file fills what neither --config nor a flag set; CDF samples only when kept.
    settings = settings.model_copy(update={
        "threads": cfg.threads if settings.threads is None else settings.threads,
        "target": cfg.target, "samples": bool(plot or out)})
    precisions = [p.strip() for p in precision.split(",")] if precision else None

    def progress(row: dict[str, Any]) -> None:
        err_console.print(f"  {escape(_label(row))}: {row['status']}"
                          + (f" p50 {row['latency_ms']['model']['p50']:.3f} ms"
                             if row["status"] == "ok" else ""), highlight=False)

    rows = run_profiles([str(m) for m in models], cfg, backends, settings,
                        precisions=precisions, on_row=progress)
    run_id = results.append(store_path, rows) if save else None
    partial = any(r["status"] != "ok" for r in rows)
    if out:
        from edgekt.io import atomic_write_text

        atomic_write_text(out, json.dumps({"run_id": run_id, "device": cfg.model_dump(),
                                           "partial": partial, "rows": rows}, indent=1))
    if plot:
        from edgekt.devices.plot import plot_rows

        plot_rows(rows, plot)
    if as_json:
        print(json.dumps([results.summary(r) for r in rows], indent=1))
    else:
        prev = [results.previous(records, r) for r in rows] if compare else None
        _table(rows, prev, f"device {cfg.name} ({cfg.transport})")
        if save:
            console.print(f"[dim]stored in {store_path} (run {run_id})[/]", highlight=False)
    if partial:
        raise typer.Exit(2)  # like every user error; the failed rows are in the table above


def _label(row: dict[str, Any]) -> str:
    art = row.get("artifact") or {}
    name = Path(art.get("file") or row.get("model_arg", "?")).name
    prec = art.get("precision") or (row.get("model") or {}).get("precision") or "?"
    return f"{name} [{row.get('backend_name')}, {prec}]"


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _table(rows: list[dict[str, Any]], previous: list[dict[str, Any] | None] | None,
           title: str) -> None:
    table = Table(title=f"edgekt profile — {title}", title_justify="left")
    for col in ("model", "backend", "device", "load ms", "1st ms", "p50 ms", "rt p50", "p90 ms",
                "p99 ms", "mean±std", "e2e p50", "img/s", "RSS MB"):
        table.add_column(col, justify="left" if col in ("model", "backend", "device") else "right",
                         no_wrap=col != "model")
    if previous is not None:
        table.add_column("Δp50", justify="right")
    notes = []
    for i, r in enumerate(rows):
        art = r.get("artifact") or {}
        name = escape(Path(art.get("file") or r.get("model_arg", "?")).name)
        if r.get("status") != "ok":
            cells = [name, r.get("backend_name", "?"), r["device"],
                     f"[red]{r['status']}[/]", *[""] * 9]
            notes.append(f"{name} \\[{r.get('backend_name')}]: {escape(str(r.get('error')))}")
        else:
            lat, e2e = r["latency_ms"]["model"], r["latency_ms"]["e2e"]
            inner = r["latency_ms"].get("runtime")
            prec = art.get("precision") or r["model"].get("precision") or "?"
            b = r["backend"]
            cells = [f"{name} {prec} {_size(r['model']['size_bytes'])}",
                     f"{b['name']} {b['version'].split('-')[0]} ×{b.get('threads')}", r["device"],
                     _ms(r["load_ms"]), _ms(r["first_ms"]), _ms(lat["p50"]),
                     _ms(inner["p50"]) if inner else "-", _ms(lat["p90"]), _ms(lat["p99"]),
                     f"{_ms(lat['mean'])}±{_ms(lat['std'])}",
                     _ms(e2e["p50"]) if e2e else "n/a", f"{r['throughput_ips']:.0f}",
                     f"{r['rss_mb']['peak']:.0f}" if r["rss_mb"].get("peak") else "-"]
            notes += [f"{name} \\[{b['name']}]: {escape(n)}" for n in r.get("notes", [])]
        if previous is not None:
            cells.append(_delta(r, previous[i]))
        table.add_row(*cells)
    console.print(table)
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        host, la = ok[0]["host"], ok[0]["loadavg"]
        flags = ",".join(k for k, v in host["flags"].items() if v) or "none"
        console.print(f"[dim]{host['cpu_model']}, {host['cores_logical']} cores, flags {flags}, "
                      f"{host['os']}; load average before/after {la['before']} / {la['after']}. "
                      "Latencies are per batch, model-only unless 'e2e' (raw uint8 -> "
                      "prediction); 'rt p50' is the runtime's own timing of the call where it "
                      "keeps one (OpenVINO, as benchmark_app reports).[/]", highlight=False)
    for n in notes:
        console.print(f"[yellow]note:[/] {n}", highlight=False, soft_wrap=True)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f}M" if n >= 2**20 else f"{n / 1024:.0f}K"


def _delta(row: dict[str, Any], prev: dict[str, Any] | None) -> str:
    if prev is None or row.get("status") != "ok":
        return "new" if row.get("status") == "ok" else ""
    now, then = row["latency_ms"]["model"]["p50"], prev["latency_ms"]["model"]["p50"]
    change = (now - then) / then * 100
    color = "red" if change > 5 else "green" if change < -5 else "dim"
    return f"[{color}]{change:+.1f}%[/]"


@devices_app.command("check")
def devices_check(
    name: Annotated[str, typer.Argument(help="Device name or device file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Probe a device once (connect, run the runner) and print its fingerprint."""
    from edgekt.devices.campaign import fingerprint
    from edgekt.devices.config import load_device

    cfg = load_device(name)
    result = fingerprint(cfg)
    host = result["host"]
    if as_json:
        print(json.dumps(result, indent=1))
        return
    table = Table(title=f"device {cfg.name} ({cfg.transport}"
                        f"{', ' + str(cfg.host) if cfg.host else ''})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key in ("id", "hostname", "cpu_model", "machine", "cores_logical", "cores_physical",
                "cores_usable", "mem_total_mb", "os", "python"):
        table.add_row(key, str(host.get(key)))
    flags, runtimes = host["flags"].items(), host["runtimes"].items()
    table.add_row("flags", " ".join(f"{k}={'yes' if v else 'no'}" for k, v in flags))
    table.add_row("runtimes", " ".join(f"{k}={v or 'missing'}" for k, v in runtimes))
    table.add_row("python path", str(result.get("executable")))
    console.print(table)


@devices_app.command("list")
def devices_list() -> None:
    """List the device files edgekt finds."""
    from edgekt.devices.config import available_devices, parse_device

    table = Table("name", "transport", "host", "backends", "file")
    for name, path in available_devices().items():
        try:
            cfg = parse_device(path)
            table.add_row(name, cfg.transport, cfg.host or "", ",".join(cfg.backend), str(path))
        except EdgektError as exc:
            table.add_row(name, "[red]invalid[/]", "", "", f"{path}: {exc}")
    console.print(table)
