"""benchmarks/choices.py: list-valued choices (score-tscale's taps) and ``--calibrate`` on a copy of an old run."""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import pytest

from edgead.config import RunConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from integration_helpers import make_gaussian_run  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "choices.py"


def _choices():  # not on sys.path: benchmarks/ would shadow packages
    spec = importlib.util.spec_from_file_location("edgead_bench_choices", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tap_keys_are_lists_and_other_keys_json() -> None:
    choices = _choices()
    assert choices._value("enc3,mid", "feature_maps") == ["enc3", "mid"]
    assert choices._value("dec0", "feature_maps") == ["dec0"]
    assert choices._value("0.05", "opca_fraction") == 0.05
    assert choices._value("per_position", "map_statistics") == "per_position"


@pytest.mark.slow
def test_calibrate_chooses_on_a_copy_and_leaves_the_run_alone(tmp_path: Path) -> None:
    choices = _choices()
    _, run_dir = make_gaussian_run(tmp_path)
    config = RunConfig.load(run_dir)  # a run from before map_calibration: no statistics, no choice
    config.method_params.pop("map_calibration", None)
    for key in ("map_calibration", "map_calibration_selection"):
        config.state.pop(key, None)
    config.save(run_dir)
    before = (run_dir / "config.json").read_bytes()

    copy = choices.calibrated_copy(run_dir, tmp_path / "work")

    assert (run_dir / "config.json").read_bytes() == before
    state = json.loads((copy / "config.json").read_text())["state"]
    assert state["map_calibration_selection"]["chosen"] in ("none", "normal")
    assert set(state["map_calibration_selection"]["pseudo_validation"]) == {"none", "normal"}
    assert "map_calibration" in state  # the statistics, stored whatever was chosen


def test_a_saved_record_holds_no_path_of_this_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgead.bench.machine import save_record

    data_root = tmp_path / "shared" / "data"
    monkeypatch.setenv("EDGEAD_DATA_ROOT", str(data_root))
    monkeypatch.chdir(tmp_path)
    throwaway = Path(tempfile.mkdtemp()) / "export"
    record = {
        "table": f"gaussian export {throwaway}, input 1x3x224x224",
        "runs": [str(tmp_path / "runs" / "gaussian" / "latest"), f"{data_root}/bsdata"],
        "n": 3,
    }
    path = save_record(record, tmp_path / "results", "latency_{device}_probe.json")
    saved = json.loads(path.read_text())
    assert saved["table"] == "gaussian export <a temporary path>, input 1x3x224x224"
    assert saved["runs"] == ["runs/gaussian/latest", "$EDGEAD_DATA_ROOT/bsdata"] and saved["n"] == 3
    assert str(tmp_path) not in path.read_text() and tempfile.gettempdir() + "/" not in path.read_text()
