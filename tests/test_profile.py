"""Profiler, runner bundle, device files and ``edgekt profile`` on this machine."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import _devices_support
import numpy as np
import pytest
from typer.testing import CliRunner

from edgekt.cli.app import app
from edgekt.devices.bundle import build_runner
from edgekt.devices.config import load_device, parse_device
from edgekt.devices.profiler import summarize, time_loop
from edgekt.devices.transport import parse_runner_output
from edgekt.errors import EdgektError

device_models = _devices_support.device_models  # the session fixtures
litert_models = _devices_support.litert_models
REPO = Path(__file__).resolve().parents[1]


def test_summarize_known_samples():
    s = summarize(np.arange(1, 101, dtype=np.int64) * 1_000_000)  # 1..100 ms
    assert s["n"] == 100 and s["min"] == 1 and s["max"] == 100
    assert s["p50"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.01)
    assert s["mean"] == pytest.approx(50.5) and s["std"] == pytest.approx(28.866, rel=1e-3)


def test_time_loop_counts_and_budget():
    calls = []
    out = time_loop(lambda: calls.append(1), warmup=3, iters=7, seconds=99)
    assert len(out) == 7 and len(calls) == 10 and (out >= 0).all()
    t0 = time.perf_counter()
    out = time_loop(lambda: time.sleep(0.001), warmup=0, iters=None, seconds=0.05, min_iters=3)
    assert 0.05 <= time.perf_counter() - t0 < 1.0 and len(out) >= 3
    assert np.median(out) >= 1_000_000  # nanoseconds: each call slept >= 1 ms


def test_time_loop_paired_reads_outside_the_timed_window():
    from edgekt.devices.profiler import time_loop_paired

    reads = []

    def read():
        time.sleep(0.002)  # a slow read must not show in the wall-clock samples
        reads.append(1)
        return 0.5

    wall, inner = time_loop_paired(lambda: None, read, warmup=2, iters=5, seconds=99)
    assert len(wall) == len(inner) == len(reads) == 5
    assert wall.max() < 2_000_000 and (inner == 500_000).all()  # ns


def test_openvino_rows_carry_the_runtimes_own_latency(device_models):
    from edgekt.devices.profiler import ProfileConfig, profile_model

    ov = profile_model(device_models.classifier, "openvino",
                       ProfileConfig(warmup=5, iters=200, threads=1, e2e=False))
    inner, wall = ov["latency_ms"]["runtime"], ov["latency_ms"]["model"]
    assert inner["n"] == wall["n"] == 200
    # Timed inside the call, so never longer than the call timed around it.
    assert 0 < inner["min"] <= wall["min"] and inner["p50"] <= wall["p50"]
    ort = profile_model(device_models.classifier, "onnxruntime",
                        ProfileConfig(warmup=1, iters=5, threads=1, e2e=False))
    assert ort["latency_ms"]["runtime"] is None  # onnxruntime keeps no per-call timing


def test_runner_bundle_is_self_contained(device_models, tmp_path):
    """The .pyz profiles a model from a directory where no edgekt checkout is importable."""
    runner = build_runner(tmp_path)
    assert build_runner(tmp_path) == runner  # content-addressed, built once
    proc = subprocess.run(
        [sys.executable, "-I", str(runner), "profile", str(device_models.classifier),
         "--threads", "1", "--iters", "20", "--warmup", "2"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    res = parse_runner_output(proc.stdout)
    assert proc.returncode == 0 and res["status"] == "ok", proc.stderr
    assert res["runner"]["edgekt_from"].startswith(str(runner))
    assert res["latency_ms"]["model"]["n"] == 20
    assert res["load_ms"] > 0 and res["first_ms"] > 0 and res["rss_mb"]["peak"] > 0
    assert res["model"]["size_bytes"] == device_models.classifier.stat().st_size
    assert set(res["host"]["flags"]) >= {"avx2", "avx512", "vnni", "amx", "neon"}
    assert res["backend"]["intra_op_num_threads"] == 1
    bad = subprocess.run([sys.executable, "-I", str(runner), "profile", "/nonexistent.onnx"],
                         capture_output=True, text=True, timeout=60)
    err = parse_runner_output(bad.stdout)
    assert bad.returncode == 3 and err["error_kind"] == "user" and "no such" in err["error"]


def test_model_without_metadata_is_profiled_model_only(device_models):
    from edgekt.devices.profiler import ProfileConfig, profile_model

    res = profile_model(device_models.nometa, "onnxruntime",
                        ProfileConfig(warmup=1, iters=5, threads=1))
    assert res["latency_ms"]["e2e"] is None and res["model"]["preprocessing"] == "unknown"
    assert "preprocessing unknown" in res["notes"][0]


def test_device_files_are_strict(tmp_path):
    assert load_device("local").transport == "local"
    for name in ("rpi4", "jetson", "intel-npu"):
        assert load_device(name).name == name
    typo = tmp_path / "board.yaml"
    typo.write_text("transport: ssh\nhost: pi.local\nthreds: 4\n")
    with pytest.raises(EdgektError, match="unknown key 'threds'; did you mean 'threads'"):
        parse_device(typo)
    nohost = tmp_path / "nohost.yaml"
    nohost.write_text("transport: ssh\n")
    with pytest.raises(EdgektError, match="needs 'host'"):
        parse_device(nohost)
    with pytest.raises(EdgektError, match="did you mean 'rpi4'"):
        load_device("rpi5")


def test_cli_profile_local_json_plot_compare(device_models, tmp_path):
    """Two backends in their own processes; store, --compare against the previous run, plot."""
    store, out, png = tmp_path / "s.jsonl", tmp_path / "r.json", tmp_path / "p.png"
    args = ["profile", str(device_models.package), "--backend", "ort,ov", "--threads", "1",
            "--iters", "40", "--warmup", "3", "--store", str(store)]
    first = CliRunner().invoke(app, [*args, "--out", str(out), "--plot", str(png)])
    assert first.exit_code == 0, first.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["backend"]["name"] for r in rows] == ["onnxruntime", "openvino"]
    assert len({r["runner"]["executable"] for r in rows}) == 1
    for r in rows:
        lat = r["latency_ms"]["model"]
        assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert len(r["samples_ms"]["model"]) == 40 and r["loadavg"]["before"] is not None
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    second = CliRunner().invoke(app, [*args, "--compare"])
    assert second.exit_code == 0 and "Δp50" in second.output and "%" in second.output
    recs = [json.loads(line) for line in store.read_text().splitlines()]
    assert len(recs) == 4 and recs[0]["key"] == recs[2]["key"]
    assert "samples_ms" not in recs[0]
    again = CliRunner().invoke(app, ["profile", "--compare", "--store", str(store)])
    assert again.exit_code == 0 and recs[-1]["run_id"] in again.output
    js = CliRunner().invoke(app, ["profile", str(device_models.classifier), "--json", "--iters",
                                  "5", "--threads", "1", "--backend", "ort", "--no-save"])
    assert js.exit_code == 0 and json.loads(js.stdout)[0]["status"] == "ok"


def test_cli_bad_inputs_exit_non_zero_and_keep_good_rows(device_models, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    store = tmp_path / "s.jsonl"
    res = CliRunner().invoke(app, ["profile", str(device_models.classifier), str(junk),
                                   "--backend", "ort", "--iters", "5", "--store", str(store)])
    assert res.exit_code == 2
    assert "truncated, corrupt or not a model" in res.output
    assert [json.loads(x)["status"] for x in store.read_text().splitlines()] == ["ok", "error"]
    both = CliRunner().invoke(app, ["profile", str(junk), "--iters", "5", "--seconds", "1"])
    assert both.exit_code == 2 and "either --iters or --seconds" in both.output


def test_cli_profile_litert_in_its_own_process(litert_models, tmp_path):
    """``--backend litert`` (alias tflite) through the runner bundle, in a fresh process."""
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["profile", str(litert_models.classifier), "--backend",
                                   "tflite", "--threads", "1", "--iters", "30", "--warmup", "3",
                                   "--out", str(out), "--no-save"])
    assert res.exit_code == 0, res.output
    (lite,) = json.loads(out.read_text())["rows"]
    assert lite["status"] == "ok" and lite["backend"]["name"] == "litert"
    assert lite["model"]["file"] == "classifier.tflite" and len(lite["samples_ms"]["model"]) == 30
    assert lite["backend"]["num_threads"] == 1 and lite["backend"]["version"].startswith("2.")
    assert lite["latency_ms"]["e2e"] is not None and lite["model"]["has_metadata"]
    assert lite["host"]["runtimes"]["ai-edge-litert"] == lite["backend"]["version"]


def test_cli_devices_check_and_list():
    res = CliRunner().invoke(app, ["devices", "check", "local"])
    assert res.exit_code == 0, res.output
    assert "cpu_model" in res.output and "onnxruntime=" in res.output
    listing = CliRunner().invoke(app, ["devices", "list"])
    assert all(n in listing.output for n in ("local", "rpi4", "jetson", "intel-npu"))


def test_device_runtime_never_imports_torch(device_models, litert_models):
    code = (
        "import sys, numpy as np\n"
        "import edgekt.devices, edgekt.devices.profiler, edgekt.devices.runner\n"
        "import edgekt.devices.campaign, edgekt.devices.transport, edgekt.devices.store\n"
        "import edgekt.devices.backends.onnxruntime, edgekt.devices.backends.openvino\n"
        "import edgekt.devices.backends.litert\n"
        "from edgekt.devices import EdgeModel\n"
        "from edgekt.devices.profiler import ProfileConfig, profile_model\n"
        f"m = EdgeModel.load({str(device_models.package)!r})\n"
        "m.predict(np.zeros((28, 28), np.uint8)); m.embed(np.zeros((28, 28), np.uint8))\n"
        f"profile_model({str(device_models.classifier)!r}, 'ov', ProfileConfig(iters=3))\n"
        f"EdgeModel.load({str(litert_models.classifier)!r}).predict(np.zeros((2, 28, 28), "
        "np.uint8))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')]\n"
        "assert not bad, bad\n"
        "print('clean')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_device_extra_installs_and_runs_in_a_fresh_venv_without_torch(device_models,
                                                                      litert_models, tmp_path):
    """``pip install edgekt[device,litert,serve]`` into a fresh venv, then run an ONNX and a
    LiteRT model there, prove torch (and litert-torch's jax) is absent, and serve the package
    with ``edgekt serve`` from that venv: predict, enroll, few-shot predict, metrics."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           f"{REPO}[device,litert,serve]"], timeout=900, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code = ("import importlib.util, numpy as np\n"
            "for absent in ('torch', 'jax', 'litert_torch'):\n"
            "    assert importlib.util.find_spec(absent) is None, absent + ' is installed'\n"
            "from edgekt.devices import EdgeModel\n"
            f"images = np.load({str(device_models.root / 'reference.npz')!r})['images'][:3]\n"
            f"for path in ({str(device_models.package)!r}, {str(litert_models.classifier)!r}):\n"
            "    print(EdgeModel.load(path, threads=1).predict(images))\n")
    # cwd: away from the checkout, whose edgekt/ directory would shadow the installed package.
    proc = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    want = [device_models.labels[i] for i in device_models.logits[:3].argmax(1)]
    assert proc.stdout.split("\n")[:2] == [str(want), str(want)]
    import _serve_support as sup

    images = np.load(device_models.root / "reference.npz")["images"]
    server = sup.Server(device_models.package, tmp_path / "state", tmp_path / "serve.log",
                        python=py, cwd=tmp_path)
    try:
        status, pred = server.request("POST", "/v1/predict", sup.png(images[0]),
                                      {"Content-Type": "image/png"})
        assert status == 200 and pred["label"] == want[0], pred
        for shot in images[:3]:
            status, r = server.request("POST", "/v1/fewshot/enroll?label=mine", sup.png(shot),
                                       {"Content-Type": "image/png"})
            assert status == 200, r
        status, r = server.request("POST", "/v1/fewshot/predict", sup.png(images[0]),
                                   {"Content-Type": "image/png"})
        assert status == 200 and r["nearest"] == "mine", r
        assert "edgekt_serve_enrolled_classes 1.0" in server.request("GET", "/metrics")[1]
    finally:
        server.stop()
