"""The Jetson install line of README.md keeps an OpenCV that is already installed, and pulls no ONNX Runtime.

Simulated: a fresh virtual environment holding another OpenCV build (``opencv-contrib-python-headless``, as
JetPack's own OpenCV would be there) runs the README's line; the other build must still be the one that
imports, and neither ``opencv-python-headless`` nor ``onnxruntime`` may have been installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
MARK = "# keeps JetPack's OpenCV and ONNX Runtime"


def jetson_line() -> str:
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.rstrip().endswith(MARK)]
    assert len(lines) == 1, "README.md must hold exactly one Jetson install line"
    return lines[0].split("#")[0].strip()


def test_jetson_line_lists_every_base_dependency_but_opencv_and_onnxruntime() -> None:
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    kept = {dep for dep in base if not re.match(r"(opencv-python-headless|onnxruntime)\b", dep)}
    listed = set(re.findall(r'"([^"]+)"', jetson_line()))
    assert listed == kept, f"README's Jetson line {sorted(listed)} != pyproject's pure-Python dependencies"
    assert "pip install --no-deps -e ." in jetson_line()


@pytest.mark.slow  # a fresh virtual environment and two installs (about a minute)
def test_jetson_line_keeps_an_installed_opencv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_dir = venv / ("Scripts" if sys.platform == "win32" else "bin")

    def run(command: str) -> str:
        done = subprocess.run(
            f'. "{bin_dir}/activate" && {command}', shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    run("pip install -q opencv-contrib-python-headless")
    run(jetson_line())
    installed = run("pip list --format=freeze").lower()
    assert "opencv-contrib-python-headless==" in installed
    assert "opencv-python-headless==" not in installed.replace("opencv-contrib-python-headless", "")
    assert "onnxruntime" not in installed
    run("python -c \"import edgead.runtime.sources, edgead.runtime.machine; print('ok')\"")
    run("edgead --help")
