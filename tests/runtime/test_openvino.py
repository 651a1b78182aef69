"""OpenVINO backend: parity with ONNX Runtime (FP32 and INT8), devices, verify, predict, CLI, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgead.cli import app
from edgead.export.exporter import ExportOptions, export_run
from edgead.runtime.backends.base import BackendError
from edgead.runtime.detector import Detector
from edgead.runtime.verify import load_golden, run_batches, verify_export

pytest.importorskip("openvino")
pytestmark = pytest.mark.slow  # every test needs the exported, fitted gaussian run (about 20 s)
from edgead.runtime.backends.openvino import OpenVINOBackend, available_devices  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from integration_helpers import make_gaussian_run  # noqa: E402


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openvino")
    data, run_dir = make_gaussian_run(root)
    out = root / "export"
    export_run(run_dir, out, ExportOptions(precision="int8", data=data, accept_int8_loss=True), log=lambda _: None)
    return out


def test_openvino_agrees_with_onnxruntime_at_fp32(export_dir: Path) -> None:
    images = load_golden(export_dir)["images"]
    with Detector.load(export_dir, backend="onnxruntime") as ort, Detector.load(export_dir, backend="openvino") as ov:
        assert ov.backend.name == "openvino" and ov.describe()["device"] == "CPU"
        ort_maps, ort_scores = run_batches(ort.backend, images)
        ov_maps, ov_scores = run_batches(ov.backend, images)
    np.testing.assert_allclose(ov_scores, ort_scores, rtol=1e-4)
    assert np.abs(ov_maps - ort_maps).max() <= 1e-4 * np.abs(ort_maps).max()


def test_openvino_int8_passes_verify_and_keeps_the_int8_threshold(export_dir: Path) -> None:
    for precision in ("fp32", "int8"):
        report = verify_export(export_dir, backend="openvino", precision=precision, runs=3)
        assert report["passed"], (precision, report["failures"])
        assert report["backend"]["backend"] == "openvino" and report["backend"]["precision"] == precision
    with Detector.load(export_dir, backend="openvino", precision="int8") as detector:
        assert detector.threshold == detector.metadata.threshold_for("int8")
        frame = np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8)
        result = detector.predict(frame)
        assert np.isfinite(result.score) and result.anomaly_map.ndim == 2


def test_devices_and_their_errors(export_dir: Path) -> None:
    assert "CPU" in [d["device"] for d in available_devices()]
    with pytest.raises(BackendError, match=r"no device 'VPU7'.*found: .*CPU.*--device"):
        OpenVINOBackend(export_dir / "model.onnx", device="VPU7")
    with pytest.raises(ValueError, match="only for the openvino backend"):
        Detector.load(export_dir, backend="onnxruntime", device="GPU")
    with pytest.raises(BackendError, match="model not found"):
        OpenVINOBackend(export_dir / "missing.onnx")


def test_missing_openvino_names_the_extra(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # as on an install without the extra
    with pytest.raises(BackendError, match=r'pip install "edgead\[openvino\]"'):
        Detector.load(export_dir, backend="openvino")
    assert available_devices() == []


def test_cli_verify_predict_and_info_on_openvino(export_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app, ["verify", str(export_dir), "--backend", "openvino", "--precision", "int8", "--runs", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "openvino" in result.output and "PASS" in result.output
    import cv2

    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.full((48, 64, 3), 120, np.uint8))
    result = runner.invoke(
        app,
        ["predict", str(images), "--export", str(export_dir), "--backend", "openvino", "--device", "CPU",
         "--out", str(tmp_path / "out"), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "predictions.csv").is_file()
    result = runner.invoke(
        app,
        ["run", "--camera", str(images), "--export", str(export_dir), "--backend", "openvino", "--precision", "int8",
         "--headless", "--max-frames", "1", "--log", str(tmp_path / "live.jsonl")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "on openvino [CPU] (int8)" in result.output and (tmp_path / "live.jsonl").read_text().count("\n") == 1
    result = runner.invoke(
        app,
        ["bench", "--export", str(export_dir), "--backend", "openvino", "--precision", "int8", "--warmup", "0",
         "--duration", "0.1", "--no-torch", "--no-camera-loop", "--json", str(tmp_path / "bench.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "openvino int8" in result.output
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0 and "openvino devices" in result.output
