"""House style is checked, not hoped for: `ruff check` and `ruff format --check` pass on the whole tree."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (the dev extra has it)")
@pytest.mark.parametrize("command", [["ruff", "check", "."], ["ruff", "format", "--check", "."]])
def test_ruff(command: list[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_benchmark_script_shadows_an_installed_package() -> None:
    """`python benchmarks/X.py` puts benchmarks/ first on sys.path: a script named like a package (triton.py
    did) replaces that package for every import in every benchmark, torch's included."""
    import importlib.util

    clashes = [p.name for p in (ROOT / "benchmarks").glob("*.py") if importlib.util.find_spec(p.stem) is not None]
    assert not clashes, f"rename these benchmark scripts, they shadow installed packages: {clashes}"
