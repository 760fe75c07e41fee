"""``edgekt serve`` under load and under fire, on loopback only, bounded in count and time.

    python scripts/bench_serve.py --out runs/bench_serve.json            # the issue's sizes
    python scripts/bench_serve.py --requests 2000 --kills 5 --quick      # a reduced run

Load: the same student (a cnn_xs trained for one epoch on 2,000 Fashion-MNIST images, exported
by ``export_package``) answers one 28x28 image in process (``EdgeModel.predict``, 1 thread;
measured before and after the HTTP runs) and over HTTP from a real ``edgekt serve`` process
(1 runtime thread), with 1 and 8 concurrent keep-alive clients (threads of this process).
Bodies: ``.npy`` (what an IoT app sends) and PNG (what a camera sends; the decode is part of
the cost). Latency is the client's wall time per request; the HTTP overhead is HTTP p50 minus
in-process p50. Two references in the same run: the floor (a bare uvicorn app answering a
constant JSON of the same size, same client) and the server with ``--inline-ms 0`` (every
prediction through the worker thread pool, as before the offload policy). The server's CPU
time per request (``/proc/PID/stat``, warm-up requests included) is the figure a busy machine
disturbs least.

State under fire: 8 clients enroll (one PNG each, a new label every time) and predict while
the server is SIGKILLed at random moments and restarted; every acknowledged enrollment must be
in the state afterwards, and every restart must load the state (a corrupt state is refused by
the service, so a failed restart counts as one).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

console = Console(width=140)
ROOT = Path(__file__).resolve().parents[1]


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted({f for f in ("avx2", "avx512f", "avx512_vnni") if re.search(rf"\b{f}\b", text)})


# ---- the student ------------------------------------------------------------------------------
def build_packages(root: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Train the student once and export its classifier and embedding packages."""
    from edgekt.config import DataConfig, load_config
    from edgekt.data import build_splits
    from edgekt.engine import fit
    from edgekt.exporters.package import export_package

    splits = build_splits(DataConfig(name="fashion-mnist", limit=2000))
    cfg = load_config(None, [f"run.dir={root / 'run'}", "model.name=cnn_xs", "train.epochs=1",
                             "optim.lr=0.005", "data.batch_size=32", "sched.name=none",
                             "train.progress=false", "train.threads=1", "data.limit=2000"])
    fit(cfg, splits=splits)
    ckpt = root / "run" / "last.pt"
    for part in ("classifier", "embedding"):
        export_package(ckpt, root / part, part=part, splits=splits, val_samples=200,
                       test_samples=200)
    images = splits.test.images[:, 0].numpy()
    return root / "classifier", root / "embedding", images, splits.test.targets.numpy()


def png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# ---- the server -------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


FLOOR_APP = """
import json, sys
import uvicorn
BODY = json.dumps({body!r}).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({{"type": "http.response.start", "status": 200, "headers": HEADERS}})
    await send({{"type": "http.response.body", "body": BODY}})


uvicorn.run(app, host="127.0.0.1", port={port}, log_level="warning")
"""


class FloorServer:
    """A bare uvicorn app answering ``body`` to every request: the HTTP floor on this machine."""

    def __init__(self, body: dict[str, Any], log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FLOOR_APP.format(body=body, port=self.port)],
            stderr=open(log, "a"), env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"the floor server did not start; see {log}") from None
                time.sleep(0.05)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(30)


class Server:
    def __init__(self, package: Path, state: Path, log: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgekt.cli.app", "serve", str(package), "--port", "0",
             "--state-dir", str(state), "--threads", "1", "--log-level", "warning",
             "--max-connections", "256", *extra],
            stdout=subprocess.PIPE, stderr=open(log, "a"), text=True, cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"edgekt serve did not start: {line!r}; see {log}")
        self.port = int(m.group(1))
        deadline = time.monotonic() + 30
        while True:
            try:
                if request(self.port, "GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"edgekt serve did not answer; see {log}")
            time.sleep(0.02)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(30)
        self.proc.stdout.close()


class Connection(http.client.HTTPConnection):
    """Keep-alive client connection with TCP_NODELAY, as urllib3/requests/curl set it:
    http.client sends headers and body in two writes, and Nagle would hold the body back for
    the server's delayed ACK (about 40 ms on Linux)."""

    def __init__(self, port: int) -> None:
        super().__init__("127.0.0.1", port, timeout=30)

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, conn: Connection | None = None
            ) -> tuple[int, Any]:
    own = conn is None
    conn = conn or Connection(port)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data[:1] in (b"{", b"[") else data
    finally:
        if own:
            conn.close()


# ---- load -------------------------------------------------------------------------------------
def stats(samples_ms: list[float], wall_s: float, errors: int) -> dict[str, Any]:
    s = sorted(samples_ms)
    return {"requests": len(s), "errors": errors, "wall_s": wall_s,
            "throughput_rps": len(s) / wall_s if wall_s else 0.0,
            "p50_ms": statistics.median(s) if s else None,
            "p99_ms": s[min(len(s) - 1, int(0.99 * len(s)))] if s else None}


def in_process(package: Path, image: np.ndarray, n: int, seconds: float) -> dict[str, Any]:
    from edgekt.devices import EdgeModel

    model = EdgeModel.load(package, threads=1)
    for _ in range(50):
        model.predict(image)
    times, t_end = [], time.perf_counter() + seconds
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        model.predict(image)
        times.append((time.perf_counter() - t) * 1e3)
        if t > t_end:
            break
    return stats(times, time.perf_counter() - t0, 0)


def http_load(port: int, body: bytes, ctype: str, clients: int, n: int, seconds: float,
              pid: int | None = None, server_timing: bool = True) -> dict[str, Any]:
    times: list[float] = []
    server: list[tuple[float, float]] = []  # the server's own (total, inference) ms
    errors = [0]
    lock = threading.Lock()
    remaining = [n]
    deadline = time.perf_counter() + seconds

    def client() -> None:
        conn = Connection(port)
        for _ in range(20):  # warm-up, not counted
            request(port, "POST", "/v1/predict", body, {"Content-Type": ctype}, conn)
        local, mine, bad = [], [], 0
        while time.perf_counter() < deadline:
            with lock:
                if remaining[0] <= 0:
                    break
                remaining[0] -= 1
            t = time.perf_counter()
            try:
                status, answer = request(port, "POST", "/v1/predict", body,
                                         {"Content-Type": ctype}, conn)
                if status == 200 and "latency_ms" in answer and "inference" in \
                        answer["latency_ms"]:
                    mine.append((answer["latency_ms"]["total"],
                                 answer["latency_ms"]["inference"]))
            except OSError:
                status = 0
                conn.close()
                conn = Connection(port)
            local.append((time.perf_counter() - t) * 1e3)
            bad += status != 200
        conn.close()
        with lock:
            times.extend(local)
            server.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=client) for _ in range(clients)]
    cpu0 = cpu_seconds(pid) if pid else None
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = stats(times, time.perf_counter() - t0, errors[0])
    cpu1 = cpu_seconds(pid) if pid else None
    if cpu0 is not None and cpu1 is not None:
        out["server_cpu_us_per_request"] = (cpu1 - cpu0) * 1e6 / (len(times) + 20 * clients)
    if server and server_timing:
        # The server's view (body read to JSON built) separates its own cost from the
        # client's and the scheduler's: on 2 shared cores the client-side numbers carry both.
        out["server_total_p50_ms"] = statistics.median(t for t, _ in server)
        out["server_inference_p50_ms"] = statistics.median(i for _, i in server)
    return out


# ---- state under fire -------------------------------------------------------------------------
def under_fire(package: Path, work: Path, images: np.ndarray, clients: int, kills: int,
               seconds: float) -> dict[str, Any]:
    state, log = work / "fire-state", work / "fire.log"
    server = Server(package, state, log)
    port = [server.port]
    acked: list[str] = []
    counts = {"enroll_ok": 0, "predict_ok": 0, "refused": 0, "connection_errors": 0}
    lock = threading.Lock()
    stop = threading.Event()
    shots = [png(img) for img in images[:32]]

    def client(tid: int) -> None:
        i = 0
        while not stop.is_set():
            label = f"c{tid}-{i}"
            try:
                status, _ = request(port[0], "POST", f"/v1/fewshot/enroll?label={label}",
                                    shots[(tid + i) % len(shots)], {"Content-Type": "image/png"})
                with lock:
                    if status == 200:
                        acked.append(label)
                        counts["enroll_ok"] += 1
                    else:
                        counts["refused"] += 1
                status, _ = request(port[0], "POST", "/v1/fewshot/predict", shots[i % 32],
                                    {"Content-Type": "image/png"})
                with lock:
                    counts["predict_ok"] += status == 200
            except (OSError, http.client.HTTPException):
                with lock:
                    counts["connection_errors"] += 1
                time.sleep(0.02)  # the server is down: wait for the restart
            i += 1

    threads = [threading.Thread(target=client, args=(t,)) for t in range(clients)]
    for t in threads:
        t.start()
    rng = random.Random(0)
    failed_restarts, restart_s = 0, []
    t_end = time.monotonic() + seconds
    done = 0
    try:
        for _ in range(kills):
            if time.monotonic() > t_end:
                break
            time.sleep(rng.uniform(0.3, 1.2))
            server.kill()
            t = time.perf_counter()
            try:
                server = Server(package, state, log)
            except RuntimeError:
                failed_restarts += 1
                break
            restart_s.append(time.perf_counter() - t)
            port[0] = server.port
            done += 1
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    status, listed = request(port[0], "GET", "/v1/fewshot/labels")
    server.kill(signal.SIGTERM)
    labels = {x["label"] for x in listed["labels"]} if status == 200 else set()
    lost = sorted(set(acked) - labels)
    # Load the final state directly too: checksum verified, no fallback to the previous file.
    from edgekt.devices.state import load_state

    final = load_state(state / "fewshot_state.npz")
    corrupt = failed_restarts + (final is None or "_recovered_from" in final.meta)
    return {"clients": clients, "kills": done, "acknowledged": len(acked),
            "present_after": len(labels), "lost": len(lost), "lost_labels": lost[:10],
            "unacknowledged_but_present": len(labels - set(acked)),
            "corrupt_states": int(corrupt), "restart_s_median": statistics.median(restart_s)
            if restart_s else None, **counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000, help="Requests per load scenario.")
    ap.add_argument("--seconds", type=float, default=120.0, help="Time cap per scenario.")
    ap.add_argument("--kills", type=int, default=20, help="SIGKILL/restart cycles.")
    ap.add_argument("--fire-seconds", type=float, default=180.0, help="Time cap under fire.")
    ap.add_argument("--quick", action="store_true", help="Skip the PNG-body scenarios.")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_serve.json"))
    args = ap.parse_args()

    results: dict[str, Any] = {"host": {"cpu_flags": cpu_flags(), "cpus": os.cpu_count(),
                                        "python": platform.python_version(),
                                        "loadavg_before": os.getloadavg()},
                               "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        work = Path(tmp)
        console.print("training and exporting the student (cnn_xs, 1 epoch, 2,000 images)...")
        cls_pkg, emb_pkg, images, _ = build_packages(work)
        image = images[0]
        load: dict[str, Any] = {"in_process": in_process(cls_pkg, image, args.requests,
                                                        args.seconds)}
        bodies = {"npy": (npy(image), "application/x-npy")}
        if not args.quick:
            bodies["png"] = (png(image), "image/png")
        server = Server(cls_pkg, work / "load-state", work / "load.log")
        try:
            # The floor answers what the server answers, so both move the same bytes.
            answer = request(server.port, "POST", "/v1/predict", bodies["npy"][0],
                             {"Content-Type": "application/x-npy"})[1]
            for body_name, (body, ctype) in bodies.items():
                for clients in (1, 8):
                    load[f"http_{body_name}_{clients}"] = http_load(
                        server.port, body, ctype, clients, args.requests, args.seconds,
                        server.proc.pid)
        finally:
            server.kill(signal.SIGTERM)
        floor = FloorServer(answer, work / "floor.log")
        try:
            load["floor_npy_1"] = http_load(floor.port, *bodies["npy"], 1, args.requests,
                                            args.seconds, floor.proc.pid, server_timing=False)
        finally:
            floor.kill()
        server = Server(cls_pkg, work / "thread-state", work / "thread.log", "--inline-ms", "0")
        try:
            load["thread_npy_1"] = http_load(server.port, *bodies["npy"], 1, args.requests,
                                             args.seconds, server.proc.pid)
        finally:
            server.kill(signal.SIGTERM)
        load["in_process_after"] = in_process(cls_pkg, image, args.requests, args.seconds)
        results["load"] = load
        results["under_fire"] = under_fire(emb_pkg, work, images, 8, args.kills,
                                           args.fire_seconds)
    results["host"]["loadavg_after"] = os.getloadavg()

    base = (load["in_process"]["p50_ms"] + load["in_process_after"]["p50_ms"]) / 2
    results["in_process_p50_ms"] = base
    t = Table(title=f"predict, one 28x28 image (cnn_xs; CPU flags: "
                    f"{' '.join(results['host']['cpu_flags']) or 'none'})")
    for col in ("path", "clients", "requests", "errors", "req/s", "p50 ms", "p99 ms",
                "p50 overhead ms", "server p50 ms (model)", "server CPU us/req"):
        t.add_column(col, justify="right")
    names = {"in_process": "in-process EdgeModel.predict (before)",
             "in_process_after": "in-process EdgeModel.predict (after)",
             "floor_npy_1": "floor: bare uvicorn, constant JSON",
             "thread_npy_1": "HTTP npy body, --inline-ms 0"}
    for name, r in load.items():
        local = name.startswith("in_process")
        clients = "1" if local else name.rsplit("_", 1)[1]
        t.add_row(names.get(name, f"HTTP {name.split('_')[1]} body"), clients,
                  str(r["requests"]), str(r["errors"]), f"{r['throughput_rps']:.0f}",
                  f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
                  "" if local else f"{r['p50_ms'] - base:.3f}",
                  f"{r['server_total_p50_ms']:.3f} ({r['server_inference_p50_ms']:.3f})"
                  if "server_total_p50_ms" in r else "",
                  f"{r['server_cpu_us_per_request']:.0f}"
                  if "server_cpu_us_per_request" in r else "")
    console.print(t)
    f = results["under_fire"]
    console.print(f"under fire: {f['clients']} clients, {f['kills']} SIGKILL/restarts, "
                  f"{f['acknowledged']} acknowledged enrollments, {f['lost']} lost, "
                  f"{f['corrupt_states']} corrupt states, {f['unacknowledged_but_present']} "
                  f"in flight at a kill and kept; restart median "
                  f"{f['restart_s_median'] or 0:.2f} s")
    console.print(f"[dim]load average before/after: {results['host']['loadavg_before']} / "
                  f"{results['host']['loadavg_after']} (2 shared cores: compare within a run)[/]")
    from edgekt.io import atomic_write_text

    atomic_write_text(args.out, json.dumps(results, indent=2))
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
