"""The Avalanche peer's venv: a missing or failed install is one clear line, never a traceback."""

from __future__ import annotations

import pytest

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
