"""Run configs, atomic writes and the ``latest`` pointer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgead.config import RunConfig, mark_latest, new_run_dir, resolve_latest, write_json_atomic


def test_run_config_round_trip(tmp_path: Path) -> None:
    config = RunConfig(method="score-resilience", preprocess={"image_size": 64}, method_params={"k": 0.001})
    config.save(tmp_path)
    loaded = RunConfig.load(tmp_path)
    assert loaded.method_params == {"k": 0.001} and loaded.preprocess == {"image_size": 64}


def test_missing_and_broken_config_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="edgead train"):
        RunConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RunConfig.load(tmp_path)


def test_latest_pointer_follows_the_newest_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--run"):
        resolve_latest("score-resilience", tmp_path)
    first = new_run_dir("score-resilience", tmp_path)
    second = new_run_dir("score-resilience", tmp_path)
    assert first != second
    for run in (first, second):
        RunConfig(method="score-resilience", preprocess={}, method_params={}).save(run)
        mark_latest(run)
    assert resolve_latest("score-resilience", tmp_path) == second.resolve()


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_json_atomic(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
