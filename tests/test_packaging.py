"""`pip install .` and `pip install -e .` both expose edgekt, edgekt.exporters, edgekt.devices."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BASE_PYTHON = Path(sys.base_prefix) / "bin" / "python3"
IMPORTS = ("import edgekt, edgekt.exporters, edgekt.devices, edgekt.devices.state, "
           "edgekt.metadata; print(edgekt.devices.__file__)")


def sources() -> set[str]:
    """Every module and data file the wheel must carry, under its import path."""
    out = set()
    for folder, prefix in (("edgekt", "edgekt"), ("exporters", "edgekt/exporters"),
                           ("devices", "edgekt/devices")):
        for f in (ROOT / folder).rglob("*"):
            if f.suffix in (".py", ".yaml", ".html", ".js", ".css") \
                    and "__pycache__" not in f.parts:
                out.add(f"{prefix}/{f.relative_to(ROOT / folder).as_posix()}")
    return out


def venv(path: Path) -> Path:
    # --system-site-packages: numpy/pydantic/yaml come from the base interpreter, so the test
    # checks our packaging without reinstalling the world.
    subprocess.run([str(BASE_PYTHON), "-m", "venv", "--system-site-packages", str(path)],
                   check=True)
    return path / "bin" / "python"


@pytest.mark.slow
def test_wheel_carries_every_module_and_installs(tmp_path):
    # Build from a copy: an in-tree build leaves build/lib behind, whose stale files could
    # leak into later wheels.
    src = tmp_path / "src"
    for name in ("edgekt", "exporters", "devices"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w",
                            str(tmp_path), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    # -v shows the build backend's output: no deprecated license table, no undeclared data.
    warnings = [line for line in (build.stdout + build.stderr).splitlines()
                if "Warning" in line and "byte-compiling" not in line]
    assert not warnings, warnings
    wheel = next(tmp_path.glob("edgekt-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(sources() - names)
    assert not missing, f"not packaged (add them to [tool.setuptools] packages): {missing}"
    py = venv(tmp_path / "v")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    out = subprocess.run([str(py), "-c", IMPORTS], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "site-packages/edgekt/devices" in out.stdout


@pytest.mark.slow
def test_editable_install_maps_the_folders(tmp_path):
    py = venv(tmp_path / "v")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)],
                   check=True)
    out = subprocess.run([str(py), "-c", IMPORTS], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(ROOT / "devices" / "__init__.py")


def test_readme_refers_to_no_file_outside_the_repository():
    import re

    text = (ROOT / "README.md").read_text()
    outside = re.findall(r"[\w.~-]*\.\./[\w./-]+|/work/[\w./-]+|/home/[\w./-]+", text)
    assert not outside, outside
    # Every repository file the README names in backquotes exists.
    named = set(re.findall(r"`((?:edgekt|devices|exporters|scripts|tests)/[\w./-]+\.\w+)`", text))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing
