"""The floors of ARCHITECTURE.md, checked on the source: every import of an edgead module (at module level or
inside a function) goes to the same floor or one below, and the torch-free runtime imports neither torch nor
anything that builds, benchmarks, fits or tunes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: import name -> source folder (as setup.py installs them)
ROOTS = {"edgead": "edgead", "edgead.export": "export", "edgead.runtime": "runtime"}
#: top floor first; a module belongs to the floor of its longest matching prefix
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("face", ("edgead.cli",)),
    ("flows", ("edgead.pipeline", "edgead.tune", "edgead.update", "edgead.report", "edgead.demo", "edgead.bench")),
    ("build", ("edgead.export",)),
    ("methods", ("edgead.methods",)),
    ("core", ("edgead.train", "edgead.nn", "edgead.diffusion", "edgead.metrics")),
    ("ground", ("edgead.data", "edgead.runtime", "edgead.config", "edgead")),
]
RUNTIME_FORBIDDEN = ("torch", "edgead.export", "edgead.bench", "edgead.methods", "edgead.tune", "edgead.pipeline")


def module_name(path: Path) -> str:
    for name, folder in sorted(ROOTS.items(), key=lambda item: -len(item[0])):
        try:
            rel = path.relative_to(REPO / folder)
        except ValueError:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        return ".".join([name, *parts])
    raise ValueError(path)


def imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every absolute import in the three source roots."""
    found = []
    for folder in ROOTS.values():
        for path in sorted((REPO / folder).rglob("*.py")):
            module = module_name(path)
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    found += [(module, alias.name, node.lineno) for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.append((module, node.module, node.lineno))
                    # ``from edgead import tune`` imports the module edgead.tune
                    found += [(module, f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def floor(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def test_the_floor_table_knows_every_source_module() -> None:
    modules = {module for module, _, _ in imports()}
    assert len(modules) > 50
    assert all(floor(module) is not None for module in modules)


def test_no_import_runs_upward() -> None:
    upward = []
    for module, target, line in imports():
        if not target.startswith("edgead"):
            continue
        here, there = floor(module), floor(target)
        if there is not None and there < here:
            upward.append(f"{module}:{line} ({FLOORS[here][0]}) imports {target} ({FLOORS[there][0]})")
    assert not upward, "\n".join(upward)


def test_runtime_is_the_ground_floor() -> None:
    bad = [
        f"{module}:{line} imports {target}"
        for module, target, line in imports()
        if module.startswith("edgead.runtime")
        and any(target == name or target.startswith(name + ".") for name in RUNTIME_FORBIDDEN)
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("target", ["edgead.export.parity", "edgead.tune", "torch"])
def test_the_checks_see_a_violation(target: str) -> None:
    """The walk would report an upward import (the test above is not vacuous)."""
    here, there = floor("edgead.runtime.verify"), floor(target)
    assert target == "torch" or there < here
    assert any(target == name or target.startswith(name + ".") for name in RUNTIME_FORBIDDEN)
