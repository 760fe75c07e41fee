"""The CLI end to end: real subprocesses where exit codes and start-up cost matter."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgekt.checkpoint import load_checkpoint
from edgekt.cli.app import app
from edgekt.config import load_config
from edgekt.engine import fit

EDGEKT = str(Path(sys.executable).with_name("edgekt"))
TINY = ["--set", "model.name=cnn_xs", "--set", "train.threads=1", "--set", "data.val_fraction=0.02",
        "--set", "train.progress=false"]


def run(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([EDGEKT, *args], capture_output=True, text=True, env=env, **kw)


def test_help_is_fast_and_torch_free():
    code = "import sys, edgekt.cli.app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    t0 = time.perf_counter()
    out = run("--help")
    assert out.returncode == 0 and "distil" in out.stdout.lower()
    assert time.perf_counter() - t0 < 5  # about 0.3 s here; generous for loaded CI machines


def test_bad_config_exits_2_with_one_clear_message(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lrr: 0.1\n")
    out = run("train", str(cfg))
    assert out.returncode == 2
    assert "unknown key 'optim.lrr'" in out.stderr and "did you mean 'lr'" in out.stderr
    assert "Traceback" not in out.stderr


def test_info_and_eval_of_a_checkpoint(tiny_checkpoint):
    runner = CliRunner()
    res = runner.invoke(app, ["info", str(tiny_checkpoint), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["params"] > 10_000 and info["flops"] > 1e6 and info["dataset"] == "fashion-mnist"
    res = runner.invoke(app, ["eval", str(tiny_checkpoint), "--json"])
    ev = json.loads(res.stdout)
    assert ev["n"] == 10000 and abs(ev["acc"] - info["metrics"]["test_acc"]) < 1e-9


def test_eval_of_corrupt_checkpoint_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    res = CliRunner().invoke(app, ["eval", str(bad)])
    assert res.exit_code == 2 and "corrupt or truncated" in res.output


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    sets = ["model.name=cnn_xs", "train.threads=1", "data.val_fraction=0.02", "data.limit=2000",
            "data.batch_size=32", "train.epochs=2", "train.deterministic=true",
            "data.augment=true", "train.progress=false"]
    killed = tmp_path / "killed"
    args = ["train", "--run-dir", str(killed), "--checkpoint-every", "5"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.Popen([EDGEKT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpt = killed / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = load_checkpoint(ckpt)["step"]
    assert 0 < step < 126 and not (killed / "summary.json").exists()  # killed mid-run

    res = run(*args, "--resume")
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stderr

    ref = fit(load_config(None, [*sets, f"run.dir={tmp_path / 'ref'}"]))
    a = load_checkpoint(tmp_path / "ref" / "last.pt")
    b = load_checkpoint(ckpt)
    assert all(torch.equal(a["model"]["state_dict"][k], b["model"]["state_dict"][k])
               for k in a["model"]["state_dict"])
    assert b["metrics"]["test_acc"] == ref.metrics["test_acc"]
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


@pytest.mark.slow
def test_torchrun_ddp_two_processes_gloo(tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--no-python",
           EDGEKT, "train", "--run-dir", str(run_dir), "--set", "data.limit=640",
           "--set", "data.batch_size=32", "--set", "train.device=cpu", "--set", "train.epochs=2",
           "--set", "optim.lr=0.005", "--set", "sched.name=none", *TINY]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # rank 0 alone writes
    assert [r["step"] for r in rows] == [10, 20]  # each rank saw half of the 640 images
    assert rows[-1]["val_acc"] > 0.3
    assert load_checkpoint(run_dir / "last.pt")["metrics"]["test_acc"] > 0.3


def test_tables_are_not_squeezed_to_80_columns_when_piped(tmp_path, monkeypatch):
    deep = tmp_path / ("a_rather_long_directory_name_for_device_files_" * 2) / "devices"
    deep.mkdir(parents=True)
    (deep / "bench-board.yaml").write_text("transport: local\nbackend: onnxruntime,openvino\n")
    monkeypatch.setenv("EDGEKT_DEVICES", str(deep))
    res = CliRunner().invoke(app, ["devices", "list"])
    assert res.exit_code == 0, res.output
    assert str(deep / "bench-board.yaml") in res.output  # whole path on one line, no "…"
    assert "…" not in res.output
