"""The run spec: one typed record behind `train`, `tune`, `train_run` and `tune_run`; `train --config FILE`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgead.cli import app
from edgead.config import RunConfig, TrainConfig
from edgead.data.synthetic import generate_dataset
from edgead.spec import RunSpec

runner = CliRunner()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_spec_round_trips_through_its_dict() -> None:
    spec = RunSpec(method="gaussian", data=["a", "b"], image_size=64, params={"opca_fraction": 0.05})
    spec.train.steps, spec.train.max_time_s = 7, 1.5
    again = RunSpec.from_dict(spec.to_dict())
    assert again == spec
    assert isinstance(again.train, TrainConfig) and again.train.adam_betas == (0.9, 0.999)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"methd": "gaussian"}, "unknown key 'methd'; known keys: method, data"),
        ({"train": {"stepz": 3}}, r"unknown key 'train.stepz'"),
        ({"image_size": "224"}, 'image_size must be an integer, got "224"'),
        ({"image_size": True}, "image_size must be an integer, got true"),
        ({"channels": 2}, "channels must be 1 or 3, got 2"),
        ({"data": "folder"}, "data must be a list"),
        ({"data": [1]}, r"data\[0\] must be a string"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number"),
        ({"train": {"adam_betas": [0.9]}}, "train.adam_betas must have 2 items"),
        ({"train": {"steps": 0}}, "steps must be >= 1"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        ({"params": [1, 2]}, "params must be a mapping"),
        ([1, 2], "must be a mapping of settings, got list"),
    ],
)
def test_bad_specs_name_the_file_the_key_and_what_was_expected(data: object, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        RunSpec.from_dict(data, "spec.json")
    assert str(err.value).startswith("spec.json")


def test_spec_files_refuse_duplicate_keys_and_deep_nesting(tmp_path: Path) -> None:
    dup_json = _write(tmp_path / "dup.json", '{"method": "gaussian", "method": "lafite"}')
    with pytest.raises(ValueError, match=r"dup.json: key 'method' appears twice"):
        RunSpec.load(dup_json)
    dup_yaml = _write(tmp_path / "dup.yaml", "method: gaussian\nimage_size: 32\nmethod: lafite\n")
    with pytest.raises(ValueError, match=r"dup.yaml: key 'method' appears twice \(line 3\)"):
        RunSpec.load(dup_yaml)
    deep = _write(tmp_path / "deep.json", '{"params": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="nested deeper than"):
        RunSpec.load(deep)
    with pytest.raises(ValueError, match="not valid YAML"):
        RunSpec.load(_write(tmp_path / "bad.yml", "method: [gaussian\n"))
    with pytest.raises(FileNotFoundError, match="no spec file here"):
        RunSpec.load(tmp_path / "missing.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("spec") / "data", size=32, n_train=12, n_test_good=1,
                            n_test_defect=1, seed=5)  # fmt: skip


def test_train_from_a_yaml_spec_then_again_from_the_runs_config(data: Path, tmp_path: Path) -> None:
    spec = _write(
        tmp_path / "spec.yaml",
        f"method: gaussian\ndata: [{json.dumps(str(data))}]\nimage_size: 32\nval_fraction: 0.25\n"
        "params:\n  opca_fraction: 0.05\n  stages: [3, 4]\ndevice: cpu\n",
    )
    first = runner.invoke(app, ["train", "--config", str(spec), "--out", str(tmp_path / "run1"), "--no-progress"])
    assert first.exit_code == 0, first.output
    one = RunConfig.load(tmp_path / "run1")
    assert one.method == "gaussian" and one.preprocess["image_size"] == 32
    assert one.method_params["opca_fraction"] == 0.05
    assert one.spec["val_fraction"] == 0.25 and one.spec["data"] == [str(data.resolve())]
    assert len(one.data["validation_paths"]) == 3  # 25 % of 12

    # the run's config.json starts the same run again; an option typed on the command line overrides it
    second = runner.invoke(
        app, ["train", "--config", str(tmp_path / "run1" / "config.json"), "--out", str(tmp_path / "run2"),
              "--no-progress"],
    )  # fmt: skip
    assert second.exit_code == 0, second.output
    two = RunConfig.load(tmp_path / "run2")
    for key in ("method", "preprocess", "method_params", "model", "train", "spec"):
        assert getattr(two, key) == getattr(one, key), key
    assert two.data["validation_paths"] == one.data["validation_paths"]

    third = runner.invoke(
        app, ["train", "--config", str(spec), "--image-size", "48", "--param", "opca_fraction=0.1",
              "--out", str(tmp_path / "run3"), "--no-progress"],
    )  # fmt: skip
    assert third.exit_code == 0, third.output
    three = RunConfig.load(tmp_path / "run3")
    assert three.preprocess["image_size"] == 48 and three.spec["val_fraction"] == 0.25
    assert three.method_params["opca_fraction"] == 0.1 and three.method_params["stages"] == [3, 4]


def test_train_config_errors_are_clear_and_leave_nothing(data: Path, tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.json", json.dumps({"method": "gaussian", "data": [str(data)], "imagesize": 32}))
    result = runner.invoke(app, ["train", "--config", str(bad), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "bad.json: unknown key 'imagesize'" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
    old = {"method": "gaussian", "preprocess": {"image_size": 32}, "method_params": {}, "data": {"root": str(data)}}
    old_style = _write(tmp_path / "config.json", json.dumps(old))
    assert RunSpec.load(old_style).data == [str(data)]  # a run made before specs were recorded


def test_epochs_derive_the_steps_from_the_training_set(data: Path, tmp_path: Path) -> None:
    """The score-resilience paper states its length in epochs (Sec. 5.3: 3000): steps = ceil(epochs * n / batch)."""
    args = ["train", "--method", "gaussian", "--data", str(data), "--image-size", "32", "--param", "opca_fraction=0.05"]
    result = runner.invoke(
        app, [*args, "--epochs", "2", "--batch-size", "4", "--val-fraction", "0.25", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    config = RunConfig.load(tmp_path / "r")
    assert config.data["n_train"] == 9 and config.train["epochs"] == 2
    assert config.train["steps"] == 5  # ceil(2 * 9 / 4)
    assert "2 epochs of 9 images at batch 4: 5 steps" in " ".join(result.output.split())
    bad = runner.invoke(app, [*args, "--epochs", "0", "--out", str(tmp_path / "r0")])
    assert bad.exit_code == 2 and "epochs must be >= 1, got 0" in bad.output
