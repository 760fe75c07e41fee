"""The Avalanche peer's venv: a missing or failed install is one clear line, never a traceback."""

from __future__ import annotations

import argparse
import importlib.util
import io
from pathlib import Path

import pytest
from rich.console import Console

from edgekt.continual import peer
from edgekt.errors import EdgektError


def test_missing_install_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(EdgektError) as err:
        peer.ensure_avalanche(install=False)
    msg = str(err.value)
    assert "\n" not in msg and "--avalanche" in msg and str(tmp_path) in msg
    assert not any(tmp_path.iterdir())  # nothing created without being asked


def test_failed_install_is_one_line_and_leaves_no_ok_marker(tmp_path, monkeypatch):
    # No index and an empty wheel directory: pip cannot find avalanche-lib (offline, fast).
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(EdgektError) as err:
        peer.ensure_avalanche(timeout_s=300)
    msg = str(err.value)
    assert "\n" not in msg and "pip install avalanche-lib==" in msg and "install.log" in msg
    root = peer.venv_dir()
    assert (root / "install.log").exists() and not (root / ".edgekt-ok").exists()
    assert "torch==" in (root / "constraints.txt").read_text()  # torch is pinned, not replaced


def test_venv_is_keyed_by_interpreter_and_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a = peer.venv_dir()
    assert a.parent == tmp_path / "edgekt" and a.name.startswith("avalanche-0.6.0-")
    monkeypatch.setattr(peer, "_installed", lambda name: "0.0.1")
    assert peer.venv_dir() != a  # another torch/numpy gets another venv


def _bench_script():
    spec = importlib.util.spec_from_file_location(
        "bench_continual", Path(__file__).parents[1] / "scripts" / "bench_continual.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_prints_our_rows_and_one_line_when_the_avalanche_install_fails(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip cannot find avalanche-lib: a real failure
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    bench = _bench_script()
    args = argparse.Namespace(avalanche=True, buffer_bytes=1_000_000, cumulative_seeds=None,
                              avalanche_model="mlp", avalanche_epochs=1, avalanche_lr=0.01,
                              avalanche_threads=1)
    ours = {"implementation": "edgekt device", "model": "MLP 800-128-C",
            "memory_bytes": 1_434_000, "update_ms_p50": 1.2, "update_cpu_ms_p50": 1.2,
            "seconds": 1.0, "final_avg_acc": 0.8247, "final_avg_acc_std": 0.006,
            "forgetting": 0.121}
    rows = {"edgekt replay (latent)": ours}
    out = io.StringIO()
    console = Console(file=out, width=80)  # narrow: a long reason must still be one line
    info = bench.avalanche_rows(args, (None, None), [0], lambda *a: pytest.fail("no rows"),
                                console)
    bench.print_table(console, rows, "results")
    text = out.getvalue()
    said = [line for line in text.splitlines() if "Avalanche" in line]
    assert len(said) == 1 and said[0].startswith("Avalanche not run: pip install avalanche-lib")
    assert "Traceback" not in text and "error" in info and "\n" not in info["error"]
    assert "edgekt" in text and "0.8247" in text  # our rows still printed
    assert list(rows) == ["edgekt replay (latent)"]
