"""benchmarks/results/README.md is rendered from the JSON records beside it: its tables are what
benchmarks/render_results.py writes now, and the prose around them holds no measured figure a record lacks."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = RESULTS / "README.md"

# Numbers with decimals in the README's prose that are not measurements, each with why.
NOT_MEASUREMENTS = {
    "0.9999": "the paper's EMA decay, quoted in the GPU recipe (Sec. 5.3), not a measured figure",
}
FIGURE = re.compile(r"(?<![\w.])\d+(?:\.\d+)+")
# Section, equation, figure and table numbers of papers ("Sec. 5.3") are references, not figures.
REFERENCE = re.compile(r"(?:Sec\.|Fig\.|eq\.|section|Table|App\.)\s*$", re.IGNORECASE)


@pytest.fixture(scope="module")
def renderer() -> Iterator[Any]:
    # Loaded under a name no script has: registered as "render_results" it would look like an installed
    # package to the test that keeps benchmark scripts from shadowing one.
    name = "_benchmarks_render_results"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "render_results.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


def test_readme_is_what_the_renderer_writes(renderer: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code = renderer.main(["--check"])
    assert code == 0, "stale: run `python benchmarks/render_results.py`\n" + capsys.readouterr().out[-4000:]


def test_check_fails_on_a_stale_table_and_the_rewrite_fixes_it(renderer: Any, tmp_path: Path) -> None:
    current = README.read_text()
    stale = tmp_path / "README.md"
    stale.write_text(current.replace("| magnetic_tile | opca | 0.862 |", "| magnetic_tile | opca | 0.870 |", 1))
    assert stale.read_text() != current, "the probe edit found no cell to change"
    assert renderer.main(["--check", "--readme", str(stale)]) == 1
    assert renderer.main(["--readme", str(stale)]) == 0
    assert stale.read_text() == current
    assert renderer.main(["--check", "--readme", str(stale)]) == 0


def test_every_marked_block_has_a_renderer_and_back(renderer: Any) -> None:
    marked = [match.group(2) for match in renderer.BLOCK.finditer(README.read_text())]
    assert sorted(marked) == sorted(renderer.RENDERERS)
    for block in renderer.RENDERERS.values():
        missing = [name for name in block.files if not (RESULTS / name).is_file()]
        assert not missing, f"{block.name} reads records that do not exist: {missing}"


def _numbers(value: Any) -> Iterator[float]:
    """Every number a record holds: values, numeric keys, and numbers written inside strings."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, str):
        yield from (float(m) for m in re.findall(r"\d+(?:\.\d+)?", value))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(key)
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)


@pytest.fixture(scope="module")
def recorded(renderer: Any) -> set[str]:
    """Every number of every record, formatted as the renderer would with 1 to 6 decimals."""
    figures = set()
    for path in RESULTS.glob("*.json"):
        for value in _numbers(json.loads(path.read_text())):
            figures.update(renderer.num(abs(value), decimals) for decimals in range(1, 7))
    return figures


def unbacked(prose: str, recorded: set[str]) -> list[str]:
    found = []
    for match in FIGURE.finditer(prose):
        figure = match.group()
        if figure.count(".") > 1 or REFERENCE.search(prose[max(0, match.start() - 10) : match.start()]):
            continue  # a version (2.14.1) or a paper's section number
        if figure not in recorded and figure not in NOT_MEASUREMENTS:
            found.append(f"{figure} (prose line {prose.count(chr(10), 0, match.start()) + 1})")
    return found


def test_every_figure_in_the_prose_is_in_a_record(renderer: Any, recorded: set[str]) -> None:
    figures = unbacked(renderer.BLOCK.sub("", README.read_text()), recorded)
    assert not figures, f"figures in the README's prose that no record in {RESULTS.name}/ holds: {figures}"


def test_the_figure_check_sees_an_unbacked_figure(recorded: set[str]) -> None:
    probe = "Sec. 5.3 of the paper; torch 2.14.1; the old defaults gave 12.345 and 0.948."
    assert unbacked(probe, recorded) == ["12.345 (prose line 1)"]


MACHINE = re.compile(r"Intel Xeon|AMD EPYC|Apple M\d|Graviton\d?|NVIDIA (?:GeForce )?(?:RTX )?[A-Z]*\d+\w*")
DATE = re.compile(r"\b\d{4}-\d\d-\d\d\b")
RECORD_NAME = re.compile(r"[\w<>+.-]+\.json")


def _short_cpu(name: str) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'Intel Xeon', the way the prose names a machine."""
    return " ".join(re.sub(r"\((?:R|TM)\)|\bProcessor\b|\bCPU\b", " ", name).split())


def misattributed(prose: str) -> list[str]:
    """Machines and dates a paragraph names that none of the records it names was measured on."""
    names = [path.name for path in RESULTS.glob("*.json")]
    found = []
    for paragraph in re.split(r"\n\s*\n", prose):
        machines, dates = MACHINE.findall(paragraph), DATE.findall(paragraph)
        if not machines and not dates:
            continue
        patterns = {re.sub(r"<[^>]+>", "*", ref) for ref in RECORD_NAME.findall(paragraph)}
        files = [name for name in names if any(fnmatch.fnmatch(name, p) for p in patterns)]
        if not files:
            found.append(f"names a machine or date but no record: {paragraph[:120]!r}")
            continue
        held_machines, held_dates = set(), set()
        for name in files:
            data = json.loads((RESULTS / name).read_text())
            for record in data if isinstance(data, list) else [data]:
                machine = record.get("machine") or {}
                held_machines.update(_short_cpu(v) for v in (machine.get("cpu"), machine.get("gpu")) if v)
                held_dates.update([str(machine.get("date", ""))[:10]])
        found += [f"{m} not the machine of {files}" for m in machines if m not in held_machines]
        found += [f"{d} not the date of {files}" for d in dates if d not in held_dates]
    return found


def test_every_machine_and_date_in_the_prose_is_its_records(renderer: Any) -> None:
    wrong = misattributed(renderer.BLOCK.sub("", README.read_text()))
    assert not wrong, wrong


def test_the_machine_check_sees_a_wrong_machine() -> None:
    right = "`cmd` (2026-12-04, AMD EPYC, 2 cores) -> `lafite_magnetic_tile_selection.json`"
    assert misattributed(right) == []
    assert len(misattributed(right.replace("AMD EPYC", "Intel Xeon"))) == 1
    assert len(misattributed(right.replace("2026-12-04", "2026-11-30"))) == 1
