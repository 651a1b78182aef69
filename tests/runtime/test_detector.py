"""Runtime: predictions match the PyTorch graph, preprocessing is the training function, errors are clear,
the camera loop and bench work, and the runtime never imports torch."""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from edgead.cli import app
from edgead.data.io import read_image
from edgead.data.mvtec import list_test, load_images
from edgead.data.preprocess import bgr_to_rgb, preprocess
from edgead.export.exporter import ExportOptions, export_run
from edgead.methods import load_method
from edgead.runtime.backends.base import BackendError
from edgead.runtime.detector import Detector
from edgead.runtime.live import LiveOptions, run_live
from edgead.runtime.metadata import MetadataError, load_metadata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from integration_helpers import make_tiny_run  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("runtime")
    data, run_dir = make_tiny_run(root)
    out = root / "export"
    export_run(run_dir, out, ExportOptions(data=data), log=lambda _: None)
    return data, run_dir, out


def _copy_export(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_predictions_match_the_torch_graph(exported: tuple[Path, Path, Path]) -> None:
    data, run_dir, out = exported
    detector = Detector.load(out, backend="onnxruntime")
    samples = list_test(data)
    frames = [cv2.imread(str(s.path)) for s in samples]
    results = detector.predict_batch(frames)
    method = load_method(run_dir)
    maps, scores = method.build_graph()(torch.from_numpy(load_images(samples, method.preprocess_config)))
    got = np.array([r.score for r in results])
    np.testing.assert_allclose(got, scores.detach().numpy(), rtol=1e-4)
    np.testing.assert_allclose(results[0].anomaly_map, maps[0].detach().numpy(), rtol=1e-4, atol=1e-5)
    height, width = frames[0].shape[:2]
    expected = cv2.resize(results[0].anomaly_map, (width, height), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(results[0].map_at(height, width), expected)
    assert all(r.is_anomaly == (r.score >= detector.threshold) for r in results)
    assert set(results[0].timings) == {"preprocess", "infer", "postprocess"}


def test_runtime_preprocessing_is_the_training_function_bit_for_bit(exported: tuple[Path, Path, Path]) -> None:
    data, run_dir, out = exported
    detector = Detector.load(out, backend="onnxruntime")
    path = list_test(data)[-1].path
    frame_bgr = cv2.imread(str(path))
    training_side = load_images([path], load_method(run_dir).preprocess_config)[0]
    assert np.array_equal(detector.preprocess(frame_bgr), training_side)
    assert np.array_equal(detector.preprocess(frame_bgr), preprocess(read_image(path), detector.preprocess_config))
    assert np.array_equal(bgr_to_rgb(frame_bgr), read_image(path))


def test_threshold_override(exported: tuple[Path, Path, Path]) -> None:
    _, _, out = exported
    detector = Detector.load(out, backend="onnxruntime", threshold=-1.0)
    assert detector.predict(np.zeros((40, 50, 3), np.uint8)).is_anomaly


def test_tampered_onnx_is_refused(exported: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, out = exported
    copy = _copy_export(out, tmp_path / "copy")
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(MetadataError, match="SHA-256"):
        Detector.load(copy, backend="onnxruntime")


def test_corrupted_onnx_with_matching_hash_is_a_clear_error(exported: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, out = exported
    copy = _copy_export(out, tmp_path / "copy")
    (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes()[:500])
    meta = load_metadata(copy)
    from edgead.runtime.metadata import artifact_record

    meta["artifacts"]["onnx"] = artifact_record(copy, "model.onnx")
    meta.save(copy)
    with pytest.raises(BackendError, match="model.onnx"):
        Detector.load(copy, backend="onnxruntime")


def test_missing_metadata_and_missing_engine(exported: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, out = exported
    with pytest.raises(MetadataError, match="edgead export"):
        Detector.load(tmp_path)
    with pytest.raises(BackendError, match="--format tensorrt"):
        Detector.load(out, backend="tensorrt")


def test_run_on_a_video_writes_n_log_lines_and_saves_anomalies(
    exported: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    data, _, out = exported
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    for sample in list_test(data):
        writer.write(cv2.imread(str(sample.path)))
    writer.release()
    log = tmp_path / "log.jsonl"
    result = runner.invoke(
        app,
        [
            "run",
            "--camera",
            str(video),
            "--export",
            str(out),
            "--headless",
            "--max-frames",
            "7",
            "--log",
            str(log),
            "--save-anomalies",
            str(tmp_path / "anom"),
            "--threshold",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 7 and all(line["is_anomaly"] for line in lines)
    assert len(list((tmp_path / "anom").glob("*_map.npy"))) == 7


def test_run_errors_missing_camera_and_bad_folder_file(exported: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, out = exported
    result = runner.invoke(app, ["run", "--camera", "9", "--export", str(out), "--headless"])
    assert result.exit_code == 2 and "camera9" in result.output
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((32, 32, 3), np.uint8))
    (folder / "b.png").write_text("not an image")
    result = runner.invoke(app, ["run", "--camera", str(folder), "--export", str(out), "--headless"])
    assert result.exit_code == 2 and "b.png" in result.output


def test_run_on_a_truncated_video_logs_its_frames_then_says_truncated(
    exported: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, _, out = exported
    video = tmp_path / "line3.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    for index in range(30):
        writer.write(np.full((48, 64, 3), 6 * index, np.uint8))
    writer.release()
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    log = tmp_path / "run.jsonl"
    args = ["run", "--camera", str(video), "--export", str(out), "--headless", "--log", str(log)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "truncated" in result.output, result.output
    match = re.search(r"ended after (\d+) of the 30 frames", result.output)
    assert match and len(log.read_text().splitlines()) == int(match.group(1)) > 0  # every frame read was logged
    result = runner.invoke(app, [*args, "--stall-timeout", "0"])
    assert result.exit_code == 2 and "--stall-timeout 0" in result.output


def test_bench_reports_percentiles_and_the_torch_ratio(exported: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from edgead.bench.report import run_bench

    _, _, out = exported
    report = run_bench(
        out, backend="onnxruntime", warmup_s=0.05, duration_s=0.2, min_runs=5, json_path=tmp_path / "bench.json"
    )
    stats = report["backend"]["stages"]["total"]
    assert stats["n"] >= 5 and stats["min"] <= stats["median"] <= stats["p99"] <= stats["max"]
    assert report["speedup_vs_torch_eager_fp32"] > 0 and report["camera_loop"]["frames"] > 0
    assert json.loads((tmp_path / "bench.json").read_text())["method"] == "score-resilience"
    table = report["table"]
    assert report["frame"] == {"width": 1280, "height": 720, "source": "generated"} and "frame 1280x720" in table
    for word in ("min ms", "mean ms", "infer:", "predict:", "x predict's FPS", "onnxruntime fp32 infer"):
        assert word in table, word

    # --video: its first frame is timed and the camera loop reads the file itself; --frame-size is checked first
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (320, 200))
    for index in range(12):
        writer.write(np.full((200, 320, 3), 10 * index, np.uint8))
    writer.release()
    args = ["bench", "--export", str(out), "--backend", "onnxruntime", "--warmup", "0.05", "--duration", "0.2",
            "--no-torch"]  # fmt: skip
    result = runner.invoke(app, [*args, "--video", str(video)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "frame 320x200" in result.output and "over 12 frames" in result.output
    result = runner.invoke(app, [*args, "--frame-size", "640by480"])
    assert result.exit_code == 2 and "WIDTHxHEIGHT" in result.output
    result = runner.invoke(app, [*args, "--video", str(tmp_path / "missing.avi")])
    assert result.exit_code == 2 and "missing.avi" in result.output


def test_runtime_runs_without_torch(exported: tuple[Path, Path, Path]) -> None:
    """Block torch entirely, then load and run the detector through the whole runtime package."""
    _, _, out = exported
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        import edgead.bench.timing, edgead.runtime.capture, edgead.runtime.live, edgead.runtime.overlay
        import edgead.runtime.backends.onnxruntime, edgead.runtime.backends.tensorrt
        from edgead.runtime import Detector  # the README's import
        result = Detector.load({str(out)!r}, backend="auto").predict(np.zeros((48, 64, 3), np.uint8))
        assert np.isfinite(result.score)
        assert result.map_at(48, 64).shape == (48, 64)
        assert sys.modules["torch"] is None and "sklearn" not in sys.modules
        print("torch-free ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch-free ok" in done.stdout


@pytest.mark.parametrize("name", ["../other/model.onnx", "/tmp/model.onnx", "sub/model.onnx", "..", "", 7])
def test_artifact_paths_are_confined_to_the_export(exported: tuple[Path, Path, Path], tmp_path: Path, name) -> None:
    _, _, out = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "edgead.json").read_text())
    meta["artifacts"]["onnx"]["file"] = name
    (copy / "edgead.json").write_text(json.dumps(meta))
    with pytest.raises((MetadataError, ValueError), match="file name inside the export|artifact"):
        Detector.load(copy, backend="onnxruntime")


def test_predict_writes_csv_json_and_overlays_and_never_overwrites(
    exported: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    data, _, out = exported
    folder = data / "test" / "good"
    n_images = len(list(folder.glob("*.png")))
    target = tmp_path / "pred"
    args = ["predict", str(folder), "--export", str(out), "--out", str(target), "--save", "all", "--threshold", "0"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert f"{n_images} images, {n_images} anomalous" in result.output  # threshold 0: every image is flagged
    assert f"predict: {n_images}/{n_images} images (100 %)" in result.output  # progress, as lines off a terminal
    rows = list(csv.DictReader((target / "predictions.csv").open()))
    assert [r["file"] for r in rows] == sorted(p.name for p in folder.glob("*.png"))
    assert all(r["is_anomaly"] == "True" and float(r["threshold"]) == 0.0 for r in rows)
    record = json.loads((target / "predictions.json").read_text())
    assert record["export"]["method"] == "score-resilience" and record["export"]["backend"] == "onnxruntime"
    assert record["summary"]["images"] == n_images
    assert len(list((target / "overlays").iterdir())) == n_images
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "never overwrite" in again.output

    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (32, 32))
    for index in range(4):
        writer.write(np.full((32, 32, 3), 40 * index, dtype=np.uint8))
    writer.release()
    args = ["predict", str(video), "--export", str(out), "--out", str(tmp_path / "v"), "--save", "none"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(list(csv.DictReader((tmp_path / "v" / "predictions.csv").open()))) == 4
    assert not (tmp_path / "v" / "overlays").exists()


def test_run_log_lines_name_the_export_method_backend_and_precision(
    exported: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    data, _, out = exported
    log = tmp_path / "run.jsonl"
    args = ["run", "--export", str(out), "--camera", str(data / "test" / "good"), "--headless", "--log", str(log)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "running score-resilience from" in result.output
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines and all(
        line["method"] == "score-resilience" and line["backend"] == "onnxruntime" and line["precision"] == "fp32"
        and line["export"] == str(out)
        for line in lines
    )  # fmt: skip


@pytest.mark.parametrize(
    "frame",
    [None, "frame.png", np.zeros((0, 0, 3), np.uint8), np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32)],
)
def test_bad_frames_are_a_clear_error(exported: tuple[Path, Path, Path], frame: object) -> None:
    detector = Detector.load(exported[2], backend="onnxruntime")
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 BGR frame"):
        detector.predict(frame)  # type: ignore[arg-type]


def test_run_skip_bad_goes_past_an_unreadable_image(exported: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, _, out = exported
    folder = tmp_path / "frames"
    shutil.copytree(data / "test" / "good", folder)
    (folder / "000_broken.png").write_bytes(b"not a png")
    args = ["run", "--export", str(out), "--camera", str(folder), "--headless"]
    stopped = CliRunner().invoke(app, args)
    assert stopped.exit_code == 2 and "000_broken.png" in stopped.output
    skipped = CliRunner().invoke(app, [*args, "--skip-bad"])
    assert skipped.exit_code == 0 and "skipping" in skipped.output, skipped.output


def _leaf_paths(value: object, prefix: tuple = ()) -> list[tuple]:
    if isinstance(value, dict):
        return [prefix] + [p for k, v in value.items() for p in _leaf_paths(v, (*prefix, k))]
    if isinstance(value, list):
        return [prefix] + [p for i, v in enumerate(value) for p in _leaf_paths(v, (*prefix, i))]
    return [prefix]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=4,
)


def test_fuzzed_metadata_loads_or_fails_with_a_documented_error(exported: tuple[Path, Path, Path]) -> None:
    """Any edit of edgead.json (a field deleted or replaced by any JSON value): the detector loads, or the
    error is MetadataError / ValueError / BackendError naming what is wrong, never another exception."""
    _, _, out = exported
    valid = json.loads((out / "edgead.json").read_text())
    paths = [p for p in _leaf_paths(valid) if p]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(out / "model.onnx", folder / "model.onnx")

        @settings(max_examples=60, deadline=None, derandomize=True)
        @given(data=st.data())
        def check(data: st.DataObject) -> None:
            meta = copy.deepcopy(valid)
            path = data.draw(st.sampled_from(paths))
            parent = meta
            for key in path[:-1]:
                parent = parent[key]
            if data.draw(st.booleans()) and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(JSON_VALUES)
            (folder / "edgead.json").write_text(json.dumps(meta))
            try:
                detector = Detector.load(folder, backend="onnxruntime")
            except (MetadataError, ValueError, BackendError) as err:
                assert str(err)
                return
            assert np.isfinite(detector.threshold)

        check()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    height=st.integers(0, 40),
    width=st.integers(0, 40),
    channels=st.sampled_from([1, 3, 4]),
    dtype=st.sampled_from([np.uint8, np.uint16, np.float32]),
)
def test_fuzzed_frames_give_a_result_or_a_clear_error(height: int, width: int, channels: int, dtype: type) -> None:
    detector = _FUZZ_DETECTOR.get("detector")
    if detector is None:
        pytest.skip("needs the exported fixture (run with the module)")
    frame = np.zeros((height, width, channels), dtype=dtype)
    try:
        result = detector.predict(frame)
    except ValueError as err:
        assert "expected an (H, W, 3) uint8 BGR frame" in str(err)
        return
    assert frame.shape[2] == 3 and frame.dtype == np.uint8 and np.isfinite(result.score)


_FUZZ_DETECTOR: dict[str, Detector] = {}


@pytest.fixture(autouse=True)
def _fuzz_detector(exported: tuple[Path, Path, Path]) -> None:
    if "detector" not in _FUZZ_DETECTOR:
        _FUZZ_DETECTOR["detector"] = Detector.load(exported[2], backend="onnxruntime")


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_soak_no_lost_log_lines_and_bounded_memory(exported: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A bounded soak: 1500 frames of a video through the real detector and live loop (with alarms saved):
    one log line per frame, none lost or torn, and resident memory grows by less than 50 MB."""
    _, _, out = exported
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (48, 32))
    rng = np.random.default_rng(0)
    for _ in range(1500):
        writer.write(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    writer.release()
    detector = Detector.load(out, backend="onnxruntime")
    options = LiveOptions(show=False, log_path=tmp_path / "run.jsonl", save_anomalies=tmp_path / "alarms")
    run_live(detector, str(video), options, on_event=lambda _: None)  # warm-up pass: allocators settle
    before = _rss_mb()
    summary = run_live(detector, str(video), options, on_event=lambda _: None)
    growth = _rss_mb() - before
    records = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    lines = [r for r in records if "event" not in r]  # frame lines (random frames also make drift records)
    assert summary.frames == 1500 and len(lines) == 2 * 1500
    assert [r["frame"] for r in lines[1500:]] == list(range(1500))
    assert growth < 50, f"resident memory grew by {growth:.1f} MB over 1500 frames"
