"""Shared pieces of the ``edgekt serve`` tests: real images, PNG bytes, packages, a server thread.

The package is the device-runtime test package (``_devices_support``: a cnn_xs trained for one
epoch on real Fashion-MNIST, exported with its classifier and embedding parts).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import _devices_support
import numpy as np
import pytest

device_models = _devices_support.device_models  # the session fixture

SNEAKER, BAG = 7, 8


@dataclass
class Photos:
    """Real Fashion-MNIST test images (uint8 28x28) by class."""

    images: np.ndarray
    targets: np.ndarray

    def of(self, cls: int, n: int, start: int = 0) -> np.ndarray:
        return self.images[self.targets == cls][start:start + n]


@pytest.fixture(scope="session")
def photos(fashion_splits) -> Photos:
    test = fashion_splits.test
    return Photos(test.images[:, 0].numpy(), test.targets.numpy())


def png(img: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    pic = Image.fromarray(img)
    (pic.convert(mode) if mode else pic).save(buf, format="PNG")
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def copy_package(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def bump_version(package: Path, note: str) -> None:
    """A new version of the same models: the manifest changes, the model files do not."""
    manifest = package / "manifest.json"
    data = json.loads(manifest.read_text())
    data["release_note"] = note
    manifest.write_text(json.dumps(data))


def other_embedding_package(src: Path, dst: Path) -> Path:
    """A package whose embedding part comes from another checkpoint (a random projection with
    the same input, output size and metadata but another source_sha256)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekt.devices import EdgeModel
    from edgekt.metadata import METADATA_KEY

    copy_package(src, dst)
    emb = EdgeModel.load(src, part="embedding")
    meta = emb.meta
    dim = meta.embedding_dim
    weight = np.random.default_rng(1).normal(0, 0.05, (28 * 28, dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["output"])],
        "other", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", dim])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta.source_sha256 = "f" * 64
    meta.input.name, meta.output_name = "input", "output"
    helper.set_model_props(model, {METADATA_KEY: meta.to_json()})
    onnx.save(model, dst / "model.embedding.onnx")
    bump_version(dst, "other embedding")
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """A real uvicorn server for ``app`` on 127.0.0.1 (any free port) in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


ROOT = Path(__file__).resolve().parents[1]


class Server:
    """``python -m edgekt.cli.app serve ...`` with --port 0; the printed URL tells the port.
    ``python``/``cwd``: another environment's interpreter (a fresh device venv) run away from
    the checkout, whose edgekt/ directory would shadow the installed package."""

    def __init__(self, package: Path, state: Path, log: Path, *extra: str,
                 env: dict[str, str] | None = None, python: str = sys.executable,
                 cwd: Path = ROOT) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [python, "-m", "edgekt.cli.app", "serve", str(package), "--port", "0",
             "--state-dir", str(state), "--threads", "1", "--log-level", "warning", *extra],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, cwd=cwd,
            env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, (line, log.read_text())
        self.port = int(m.group(1))
        self.banner = line
        deadline = time.monotonic() + 30
        while True:  # bound before the banner; listening once uvicorn has started
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, log.read_text()
            time.sleep(0.05)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read().decode()
            ctype = resp.getheader("content-type", "")
            return resp.status, json.loads(data) if "json" in ctype else data
        finally:
            conn.close()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(20)
        finally:
            self.proc.stdout.close()
