"""The newcomer's path, as a new user walks it: `edgead demo`, then the next commands it prints, run exactly
as printed from the same folder, each producing the files it promises."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgead.cli import app

runner = CliRunner()
ENV = {"COLUMNS": "400"}


@pytest.mark.slow
def test_demo_then_its_printed_next_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    demo = runner.invoke(app, ["demo", "--steps", "300", "--max-time", "900", "--no-progress"], env=ENV)
    assert demo.exit_code == 0, demo.output
    commands = [line.strip() for line in demo.output.splitlines() if line.strip().startswith("edgead ")]
    assert [c.split()[1] for c in commands] == ["export", "run", "bench"], demo.output
    for command in commands:
        result = runner.invoke(app, shlex.split(command)[1:], env=ENV)
        assert result.exit_code == 0, f"{command}\n{result.output}"
    out = Path("edgead-demo")
    meta = json.loads((out / "export" / "edgead.json").read_text())
    assert meta["method"] == "score-resilience"
    folder = Path(shlex.split(commands[1])[shlex.split(commands[1]).index("--camera") + 1])
    frames = [json.loads(line) for line in (out / "run.jsonl").read_text().splitlines()]
    assert len(frames) == len([p for p in folder.iterdir() if p.suffix == ".png"])
    assert any(frame["is_anomaly"] for frame in frames)  # defective test images raise alarms
    assert any((out / "anomalies").iterdir())
