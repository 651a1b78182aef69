"""The command line: help for every command and option, clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgead.cli import app
from edgead.data.synthetic import generate_dataset

runner = CliRunner()


@pytest.mark.parametrize("command", ["train", "tune", "eval", "demo", "info", "export", "predict", "run", "bench"])
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_every_train_option_is_explained() -> None:
    import click
    import typer.main

    command = typer.main.get_command(app).commands["train"]
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"--{param.name} has no help text"


def test_info_lists_the_methods() -> None:
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0
    assert "score-resilience" in result.output and "onnxruntime" in result.output


def test_train_on_missing_data_names_the_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "nowhere"), "--runs-root", str(tmp_path)])
    assert result.exit_code == 2
    assert "nowhere" in result.output


def test_square_brackets_in_paths_print_literally(tmp_path: Path) -> None:
    """User text is never read as console markup: ``[...]`` stays, ``[/x]`` does not crash the printer."""
    for name in ("line[3]", "odd[/x]", "edgead[trt]"):
        result = runner.invoke(app, ["train", "--data", str(tmp_path / name), "--runs-root", str(tmp_path)])
        assert result.exit_code == 2, result.output
        assert name in result.output.replace("\n", "")


def test_train_on_empty_train_folder_fails_before_training(tmp_path: Path) -> None:
    (tmp_path / "data" / "train" / "good").mkdir(parents=True)
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "data"), "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert "train" in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("weights.safetensors"))


def test_train_with_truncated_image_names_the_file(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path / "data", size=32, n_train=6, n_test_good=2, n_test_defect=2, seed=1)
    victim = sorted((data / "train" / "good").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60])
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(data),
            "--preset",
            "tiny",
            "--image-size",
            "32",
            "--steps",
            "1",
            "--runs-root",
            str(tmp_path / "runs"),
        ],
    )
    assert result.exit_code == 2
    assert victim.name in result.output


def test_unknown_method_and_param_are_rejected(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path / "data", size=32, n_train=6, n_test_good=2, n_test_defect=2, seed=1)
    result = runner.invoke(app, ["train", "--data", str(data), "--method", "nope"])
    assert result.exit_code == 2 and "unknown method" in result.output
    result = runner.invoke(app, ["train", "--data", str(data), "--param", "n_drawz=2", "--runs-root", str(tmp_path)])
    assert result.exit_code == 2 and "n_drawz" in result.output
    for command in ("eval", "export"):  # no "train one" advice for a typo: the methods are listed
        args = [command, "--method", "lafitte", "--runs-root", str(tmp_path)]
        result = runner.invoke(app, args + (["--data", str(data)] if command == "eval" else []))
        assert result.exit_code == 2 and "unknown method 'lafitte'" in result.output, result.output
        assert "lafite" in result.output and "edgead train" not in result.output


def test_values_that_do_not_apply_are_refused(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path / "data", size=32, n_train=6, n_test_good=2, n_test_defect=2, seed=1)
    args = ["train", "--data", str(data), "--method", "gaussian", "--preset", "tiny", "--runs-root", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "no network" in result.output
    result = runner.invoke(app, ["run", "--export", str(tmp_path), "--precision", "fp8", "--camera", "0"])
    assert result.exit_code == 2 and "fp8" in result.output, result.output


def test_training_above_the_images_size_is_warned_before_it_starts(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path / "data", size=32, n_train=10, n_test_good=2, n_test_defect=2, seed=1)
    args = ["train", "--data", str(data), "--method", "gaussian", "--runs-root", str(tmp_path / "runs")]
    result = runner.invoke(app, [*args, "--image-size", "64"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "32x32) are smaller than the training size 64 px" in result.output and "--image-size 32" in result.output
    summary = json.loads((tmp_path / "runs" / "gaussian" / "latest" / "config.json").read_text())["state"]["summary"]
    assert summary["warnings"] and "smaller than the training size" in summary["warnings"][0]
    result = runner.invoke(app, [*args, "--image-size", "32"])
    assert result.exit_code == 0 and "smaller than the training size" not in result.output


def test_eval_without_a_run_says_how_to_get_one(tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "--data", str(tmp_path), "--runs-root", str(tmp_path)])
    assert result.exit_code == 2
    assert "edgead train" in result.output


def test_train_then_eval_through_the_cli(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path / "data", size=32, n_train=12, n_test_good=4, n_test_defect=4, seed=2)
    runs = tmp_path / "runs"
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(data),
            "--preset",
            "tiny",
            "--image-size",
            "32",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--runs-root",
            str(runs),
            "--no-progress",
            "--param",
            "n_draws=2",
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", "--data", str(data), "--runs-root", str(runs)])
    assert result.exit_code == 0, result.output
    assert "image_auroc" in result.output
    assert (runs / "score-resilience" / "latest" / "eval" / "metrics.json").is_file()
    # What a deployed threshold does: one below every score flags all 8 test images (4 of them normal).
    out = tmp_path / "at-threshold"
    result = runner.invoke(
        app, ["eval", "--data", str(data), "--runs-root", str(runs), "--threshold", "-1e9", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["at_threshold_false_alarms"] == 4 and metrics["at_threshold_misses"] == 0
    rows = (out / "decisions.csv").read_text().splitlines()
    assert rows[0] == "file,defect_type,label,score,is_anomaly,correct" and len(rows) == 1 + 8
    assert all(row.split(",")[4] == "True" for row in rows[1:])


def test_export_without_a_run_says_how_to_get_one(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", "--method", "score-resilience", "--runs-root", str(tmp_path)])
    assert result.exit_code == 2
    assert "edgead train" in result.output


def test_export_fuse_with_a_folder_that_is_no_run_names_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    result = runner.invoke(app, ["export", "--run", str(run), "--fuse", str(tmp_path / "elsewhere")])
    assert result.exit_code == 2
    assert "--fuse" in result.output and "elsewhere" in result.output and "edgead train" in result.output


def test_tile_without_a_frame_size_is_refused_before_any_work(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--method", "gaussian", "--data", str(tmp_path), "--tile", "64"])
    assert result.exit_code == 2 and "image_size" in result.output


def test_run_and_bench_without_an_export_say_how_to_get_one(tmp_path: Path) -> None:
    for command in (["run", "--camera", "0"], ["bench"]):
        result = runner.invoke(app, [*command, "--exports-root", str(tmp_path)])
        assert result.exit_code == 2
        assert "edgead export" in result.output


def test_resume_needs_no_data_and_takes_the_runs_method(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path / "data", size=32, n_train=8, n_test_good=2, n_test_defect=2, seed=1)
    run = tmp_path / "run"
    args = ["train", "--method", "score-resilience", "--data", str(data), "--preset", "tiny", "--image-size", "32"]
    result = runner.invoke(app, [*args, "--steps", "4", "--batch-size", "4", "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "--resume", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "trained" in result.output
    result = runner.invoke(app, ["train", "--resume", str(run), "--data", str(data)])
    assert result.exit_code == 2 and "leave --data out" in result.output
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2 and "--data is required" in result.output


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "--data", "nowhere"], "nowhere: data directory not found"),
        (["train", "--data", "x", "--method", "nope"], "unknown method 'nope'"),
        (["eval", "--data", "nowhere", "--run", "."], "nowhere: test data directory not found"),
        (["export", "--run", "not-a-run"], "no config.json here"),
    ],
)
def test_argument_mistakes_are_reported_without_importing_torch(args: list[str], expected: str) -> None:
    """A typo must answer in a blink: the error comes before torch (seconds to import) is ever loaded."""
    code = f"import sys; sys.modules['torch'] = None\nfrom edgead.cli import app\napp({args!r}, prog_name='edgead')\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in " ".join(done.stderr.split()), done.stderr[-2000:]
