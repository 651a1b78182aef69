"""Nothing a user owns is ever overwritten or deleted, and every output path is checked before the work: eval
reports, export folders and links, predictions, the ``latest`` pointer, ``--json`` files, bench's table."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import edgead.runtime.predict as predict_module
from edgead.cli import app
from edgead.config import LatestNotUpdated, RunConfig, mark_latest, resolve_latest
from edgead.data.synthetic import generate_dataset
from edgead.export.publish import PublishError, check_target, export_lock, publish, start_version, versions_dir
from edgead.report import REPORT_MANIFEST, ReportFolderError, write_report

runner = CliRunner()


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(result: Any, *words: str) -> None:
    """Exit code 2 from the command's own error handling (not a crash) and every word in the message."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    message = " ".join(result.output.split())
    for word in words:
        assert word in message, (word, result.output)


def _read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make ``folder`` behave like a read-only mount for edgead's write checks (chmod does not stop root)."""
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        if Path(kwargs.get("dir") or "").resolve() == folder.resolve():
            raise OSError(errno.EROFS, "Read-only file system", str(folder))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def _user_folder(folder: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return _snapshot(folder)


def _toy_report(out: Path, top_k: int, threshold: float | None = None) -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = rng.random(6) + labels
    images = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    paths = [f"test/{'crack' if label else 'good'}/{i:03d}.png" for i, label in enumerate(labels)]
    write_report(out, {"image_auroc": 1.0}, labels, scores, paths, images, rng.random((6, 8, 8)), top_k=top_k,
                 threshold=threshold)  # fmt: skip


# ------------------------------------------------------------------------------------------ 1. eval reports
def test_eval_refuses_a_folder_holding_the_users_files_before_any_work(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    mine = tmp_path / "holiday"
    before = _user_folder(
        mine,
        {
            "metrics.json": b'{"my": "numbers"}',
            "roc.png": b"my roc",
            "overlays/2024_summer_trip.png": b"summer",
            "overlays/12_apostles.png": b"apostles",
        },
    )
    args = ["eval", "--run", str(tmp_path / "no-run-needed"), "--data", str(data), "--out", str(mine)]
    result = runner.invoke(app, args)
    _refused(result, str(mine), "metrics.json", "edgead did not write")
    assert "delete" not in result.output  # a user's folder: no advice to delete it
    assert _snapshot(mine) == before and not (mine / REPORT_MANIFEST).exists()


def test_a_report_replaces_only_the_files_its_manifest_lists(tmp_path: Path) -> None:
    out = tmp_path / "report"
    _toy_report(out, top_k=3, threshold=0.5)
    (out / "decisions.csv").write_text("file\n")  # as edgead.pipeline writes it with a threshold
    _toy_report(out, top_k=3, threshold=0.5)
    first = set(_snapshot(out))
    assert "decisions.csv" in json.loads((out / REPORT_MANIFEST).read_text())["files"]
    _toy_report(out, top_k=1)  # an earlier report of its own: replaced, its extra overlays and decisions removed
    second = set(_snapshot(out))
    assert len(second) < len(first) and "decisions.csv" not in second
    listed = set(json.loads((out / REPORT_MANIFEST).read_text())["files"])
    assert listed == second - {REPORT_MANIFEST}

    (out / "overlays" / "12_apostles.png").write_bytes(b"apostles")  # a user's file among the overlays
    (out / "overlays" / "top_00_mine.png").write_bytes(b"named like an overlay, not written by edgead")
    before = _snapshot(out)
    with pytest.raises(ReportFolderError, match="12_apostles.png.*top_00_mine.png"):
        _toy_report(out, top_k=1)
    assert _snapshot(out) == before


def test_a_report_without_manifest_is_refused_not_cleaned(tmp_path: Path) -> None:
    out = tmp_path / "old-report"
    old = {"metrics.json": b'{"metrics": {}, "run": {}, "images": []}', "overlays/07_stale.png": b"old"}
    before = _user_folder(out, old)
    with pytest.raises(ReportFolderError, match="07_stale.png.*older than the manifest"):
        _toy_report(out, top_k=1)
    assert _snapshot(out) == before


def test_eval_into_a_read_only_folder_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _read_only(monkeypatch, tmp_path)
    args = ["eval", "--run", str(tmp_path / "run"), "--data", str(data), "--out", str(tmp_path / "report")]
    _refused(runner.invoke(app, args), str(tmp_path / "report"), "Read-only file system")


# ---------------------------------------------------------------------------------------- 2. export folders
def _fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # export's own checks come before the run is loaded
    return run


def test_export_refuses_a_folder_with_foreign_files_every_time(tmp_path: Path) -> None:
    out = tmp_path / "exports" / "m"
    before = _user_folder(out, {"edgead.json": b'{"artifacts": {}}', "thesis.txt": b"four years of work"})
    args = ["export", "--run", str(_fake_run(tmp_path)), "--out", str(out)]
    for _ in range(2):  # the probe lost the folder on the second export
        _refused(runner.invoke(app, args), str(out), "thesis.txt")
        assert not out.is_symlink() and _snapshot(out) == before
    assert not versions_dir(out).exists()
    with pytest.raises(PublishError, match="thesis.txt"):  # publish itself re-checks under the lock
        with export_lock(out):
            publish(start_version(out), out)
    assert not out.is_symlink() and _snapshot(out) == before


def test_an_older_export_is_adopted_only_when_it_holds_export_files_only(tmp_path: Path) -> None:
    out = tmp_path / "exports" / "m"
    _user_folder(out, {"edgead.json": b'{"artifacts": {"onnx": {"file": "model.onnx"}}}', "model.onnx": b"old"})
    (out / "triton").mkdir()
    check_target(out)  # its own files: fine
    (out / "notes.md").write_text("mine")
    with pytest.raises(PublishError, match="notes.md"):
        check_target(out)


def test_export_refuses_a_link_it_did_not_make(tmp_path: Path) -> None:
    mine = tmp_path / "my-models"
    before = _user_folder(mine, {"edgead.json": b"{}", "model.onnx": b"mine"})
    link = tmp_path / "exports" / "m"
    link.parent.mkdir()
    link.symlink_to(mine, target_is_directory=True)
    args = ["export", "--run", str(_fake_run(tmp_path)), "--out", str(link)]
    _refused(runner.invoke(app, args), str(link), "link", str(mine))
    assert link.is_symlink() and Path(os.readlink(link)) == mine and _snapshot(mine) == before


def test_export_into_a_read_only_folder_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    _read_only(monkeypatch, exports)
    args = ["export", "--run", str(_fake_run(tmp_path)), "--out", str(exports / "m")]
    _refused(runner.invoke(app, args), str(exports / "m"), "Read-only file system")
    assert list(exports.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through chmod")
def test_export_into_a_chmod_read_only_folder_fails_before_any_work(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    exports.chmod(0o555)
    try:
        args = ["export", "--run", str(_fake_run(tmp_path)), "--out", str(exports / "m")]
        _refused(runner.invoke(app, args), str(exports / "m"), "cannot write")
    finally:
        exports.chmod(0o755)


# ------------------------------------------------------------------------------------------- 3. predictions
def test_a_folder_being_written_by_a_predict_is_refused_to_a_second(tmp_path: Path) -> None:
    out = tmp_path / "pred"
    claimed, created = predict_module._claim(out)
    assert claimed == out and created
    with pytest.raises(ValueError, match="unfinished predict"):
        predict_module._claim(out)


def test_default_prediction_folders_are_unique_within_a_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(predict_module.time, "strftime", lambda _: "20250101-120000")
    folders = {predict_module._new_default_folder() for _ in range(3)}
    assert len(folders) == 3 and all(f.is_dir() and not any(f.iterdir()) for f in folders)


# ------------------------------------------------------------------------------------------------ 4. latest
def _run(parent: Path, name: str) -> Path:
    run = parent / name
    run.mkdir(parents=True)
    RunConfig(method="gaussian", preprocess={}, method_params={}).save(run)
    return run


@pytest.mark.parametrize("kind", ["file", "folder", "link elsewhere"])
def test_latest_is_replaced_only_when_it_is_edgeads_own(tmp_path: Path, kind: str) -> None:
    parent = tmp_path / "runs"
    latest = parent / "latest"
    parent.mkdir()
    if kind == "file":
        latest.write_bytes(b"my notes")
    elif kind == "folder":
        _user_folder(latest, {"keep.txt": b"mine"})
    else:
        (tmp_path / "elsewhere").mkdir()
        latest.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    state = lambda: os.readlink(latest) if latest.is_symlink() else _snapshot(parent)  # noqa: E731
    before = state()
    run = _run(parent, "run1")
    with pytest.warns(LatestNotUpdated, match="latest"):
        why = mark_latest(run)  # never raises: the run is saved either way
    assert why is not None and str(run) in why
    after = state()
    if isinstance(before, dict):
        after = {name: content for name, content in after.items() if not name.startswith("run1/")}
    assert after == before


def test_edgeads_own_latest_moves_on(tmp_path: Path) -> None:
    parent = tmp_path / "gaussian"
    first, second = _run(parent, "a"), _run(parent, "b")
    assert mark_latest(first) is None and mark_latest(second) is None
    assert resolve_latest("gaussian", tmp_path) == second.resolve()
    (parent / "latest").unlink()
    (parent / "latest").write_text("a")  # the text pointer edgead writes where links are not allowed
    assert mark_latest(second) is None and os.readlink(parent / "latest") == "b"


# ------------------------------------------------------------------------------------------ 5. --json paths
@pytest.mark.parametrize("command", ["verify", "bench"])
def test_json_into_a_folder_or_a_missing_folder_fails_before_the_run(tmp_path: Path, command: str) -> None:
    where = ["--exports-root", str(tmp_path / "no-exports")]  # the run would fail later: the --json check is first
    folder = tmp_path / "reports"
    folder.mkdir()
    _refused(runner.invoke(app, [command, "--json", str(folder), *where]), str(folder), "is a folder")
    missing = tmp_path / "nowhere" / "r.json"
    _refused(runner.invoke(app, [command, "--json", str(missing), *where]), str(missing), "does not exist")


def test_json_into_a_read_only_folder_fails_before_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _read_only(monkeypatch, tmp_path)
    result = runner.invoke(app, ["verify", "--json", str(tmp_path / "r.json"), "--exports-root", str(tmp_path)])
    _refused(result, str(tmp_path / "r.json"), "Read-only file system")


# ------------------------------------------------------------------------------- slow: a real run and export
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One gaussian run at 32 px (trained with a user's file at ``latest`` beside it) and its export."""
    root = tmp_path_factory.mktemp("reliability")
    data = generate_dataset(root / "data", size=32, n_train=12, n_test_good=4, n_test_defect=4, seed=2)
    parent = root / "runs"
    parent.mkdir()
    (parent / "latest").write_bytes(b"my own latest notes")
    args = ["train", "--method", "gaussian", "--data", str(data), "--image-size", "32", "--no-progress"]
    trained = runner.invoke(app, [*args, "--out", str(parent / "run1")])
    exports = root / "exports"
    exported = runner.invoke(app, ["export", "--run", str(parent / "run1"), "--out", str(exports / "g")])
    assert exported.exit_code == 0, exported.output
    return {"root": root, "data": data, "run": parent / "run1", "train": trained, "export": exports / "g"}


@pytest.mark.slow
def test_train_leaves_a_users_latest_alone_with_a_one_line_warning(built: dict[str, Any]) -> None:
    result, run = built["train"], built["run"]
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert (run.parent / "latest").read_bytes() == b"my own latest notes" and (run / "config.json").is_file()
    warning = [line for line in result.output.splitlines() if line.startswith("warning:") and "latest" in line]
    assert len(warning) == 1 and str(run) in " ".join(result.output.split())


@pytest.mark.slow
def test_eval_replaces_its_own_report_and_refuses_when_a_user_file_joins_it(built: dict[str, Any]) -> None:
    out = built["root"] / "eval-report"
    args = ["eval", "--run", str(built["run"]), "--data", str(built["data"]), "--out", str(out), "--no-progress"]
    assert runner.invoke(app, [*args, "--threshold", "0"]).exit_code == 0
    first = set(_snapshot(out))
    result = runner.invoke(app, [*args, "--top-k", "1"])
    assert result.exit_code == 0, result.output
    second = set(_snapshot(out))
    assert "decisions.csv" in first - second and len(second) < len(first)
    (out / "overlays" / "2024_summer_trip.png").write_bytes(b"summer")
    before = _snapshot(out)
    _refused(runner.invoke(app, args), str(out), "2024_summer_trip.png")
    assert _snapshot(out) == before


@pytest.mark.slow
def test_export_on_a_full_disk_fails_clearly_and_keeps_the_previous_version(
    built: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgead.runtime.metadata as metadata_module

    out = built["export"]
    before = _snapshot(out.resolve())

    def full(path: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(metadata_module, "write_json_atomic", full)
    result = runner.invoke(app, ["export", "--run", str(built["run"]), "--out", str(out)])
    _refused(result, str(out), "No space left on device", "previous export")
    assert _snapshot(out.resolve()) == before and not list(versions_dir(out).glob("*.partial"))


@pytest.mark.slow
def test_predicts_in_one_second_write_separate_folders(built: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(built["root"])
    monkeypatch.setattr(predict_module.time, "strftime", lambda _: "20250101-120000")
    source = built["data"] / "test" / "good"
    args = ["predict", str(source), "--export", str(built["export"]), "--no-progress"]
    for _ in range(2):
        assert runner.invoke(app, args).exit_code == 0
    folders = sorted((built["root"] / "predictions").iterdir())
    assert [f.name for f in folders] == ["20250101-120000", "20250101-120000-2"]
    for folder in folders:
        assert len((folder / "predictions.csv").read_text().splitlines()) == 1 + 4  # header + every image


@pytest.mark.slow
def test_predict_on_a_full_disk_removes_its_partial_output_and_runs_again(
    built: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = built["root"] / "pred-full"
    args = ["predict", str(built["data"] / "test" / "good"), "--export", str(built["export"]), "--out", str(out)]
    args += ["--save", "all", "--no-progress"]

    def full(path: Any, *a: Any, **k: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(predict_module, "write_bytes_atomic", full)  # the CSV, after every overlay was written
        _refused(runner.invoke(app, args), str(out), "No space left on device", "removed")
    assert not out.exists()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "predictions.csv").is_file() and len(list((out / "overlays").iterdir())) == 4


@pytest.mark.slow
def test_verify_json_is_written_whole(built: dict[str, Any]) -> None:
    report = built["root"] / "verify.json"
    result = runner.invoke(app, ["verify", str(built["export"]), "--runs", "3", "--json", str(report), "--no-progress"])
    assert result.exit_code in (0, 1), result.output
    assert json.loads(report.read_text())["export"] == str(built["export"])
    assert [p.name for p in report.parent.glob(".verify.json.*")] == []


@pytest.mark.slow
def test_bench_table_shows_the_torch_row_as_not_measured_when_the_run_is_gone(
    built: dict[str, Any], tmp_path: Path
) -> None:
    copy = tmp_path / "export-copy"
    shutil.copytree(built["export"].resolve(), copy)
    meta = json.loads((copy / "edgead.json").read_text())
    meta["run"]["dir"] = str(tmp_path / "deleted-run")
    (copy / "edgead.json").write_text(json.dumps(meta))
    args = ["bench", "--export", str(copy), "--warmup", "0.05", "--duration", "0.2", "--no-camera-loop"]
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    row = [line for line in result.output.splitlines() if line.startswith("torch eager")]
    assert len(row) == 1 and "not measured" in row[0] and "deleted-run" in row[0]
