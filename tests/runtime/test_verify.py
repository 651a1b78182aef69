"""`edgead verify`: an export proves itself against its stored PyTorch reference on this device's backend."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgead.cli import app
from edgead.export.exporter import ExportOptions, export_run
from edgead.runtime.metadata import artifact_record, load_metadata
from edgead.runtime.verify import auroc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from integration_helpers import make_tiny_run  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def export_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    data, run_dir = make_tiny_run(root)
    out = root / "exports" / "score-resilience"
    export_run(run_dir, out, ExportOptions(precision="fp16", data=data), log=lambda _: None)
    return out


def test_every_export_carries_a_hashed_verification_set(export_fp16: Path) -> None:
    record = load_metadata(export_fp16).artifacts["verification"]
    assert record["file"] == "verification.npz" and len(record["sha256"]) == 64
    assert record["bytes"] < 5_000_000
    with np.load(export_fp16 / "verification.npz", allow_pickle=False) as data:
        count = data["images"].shape[0]  # up to 4 held-out normals and as many pseudo-anomalies
        assert 2 <= count <= 8 and data["scores"].shape[0] == data["maps"].shape[0] == count
        assert set(data["labels"].tolist()) == {0, 1}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_verify_passes_on_onnxruntime(export_fp16: Path, precision: str, tmp_path: Path) -> None:
    report_path = tmp_path / "verify.json"
    args = ["verify", str(export_fp16), "--backend", "onnxruntime", "--precision", precision, "--runs", "5"]
    result = runner.invoke(app, [*args, "--json", str(report_path)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and f"({precision})" in result.output and "tolerances" in result.output
    assert re.search(r"verify: (\d+)/\1 calls \(100 %\)", result.output)  # progress with the timed runs
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["parity"]["decision_flips"] == 0
    assert report["backend"]["providers"] == ["CPUExecutionProvider"]
    assert report["latency_ms"]["median"] > 0
    assert report["device_memory"] == {"used_mb": None, "reason": "runs on the CPU"}
    poly = report["parity"]["polygraphy"]  # polygraphy comes with the rtx extra the tests install
    assert poly["passed"] and set(poly["outputs"]) == {"anomaly_map", "score"}
    assert "polygraphy" in result.output and "anomaly_map pass, score pass" in result.output


def test_a_perturbed_reference_fails_with_exit_1_naming_the_output(export_fp16: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(export_fp16, copy)
    with np.load(copy / "verification.npz", allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["scores"] = arrays["scores"] * 1.01  # as if the graph computed something else
    with open(copy / "verification.npz", "wb") as handle:
        np.savez_compressed(handle, **arrays)
    meta = json.loads((copy / "edgead.json").read_text())
    meta["artifacts"]["verification"] = artifact_record(copy, "verification.npz", images=8)
    (copy / "edgead.json").write_text(json.dumps(meta))
    result = runner.invoke(app, ["verify", str(copy), "--backend", "onnxruntime", "--runs", "2"])
    assert result.exit_code == 1, result.output
    assert "FAIL score: max relative error" in result.output
    assert "FAIL score: polygraphy's comparator failed it" in result.output  # the second opinion agrees


def test_a_corrupted_verification_file_is_refused(export_fp16: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(export_fp16, copy)
    (copy / "verification.npz").write_bytes(b"broken")
    result = runner.invoke(app, ["verify", str(copy), "--backend", "onnxruntime"])
    assert result.exit_code == 2 and "SHA-256" in result.output


def test_tensorrt_without_an_engine_or_gpu_exits_2_with_the_reason(export_fp16: Path) -> None:
    result = runner.invoke(app, ["verify", str(export_fp16), "--backend", "tensorrt"])
    assert result.exit_code == 2 and "cannot verify here" in result.output
    result = runner.invoke(app, ["verify", str(export_fp16), "--backend", "onnxruntime-cuda"])
    assert result.exit_code == 2 and "CUDA" in result.output
    result = runner.invoke(app, ["verify", str(export_fp16), "--backend", "onnxruntime-trt"])
    assert result.exit_code == 2 and "TensorrtExecutionProvider" in result.output


def test_device_memory_is_read_from_nvidia_smi_for_this_process(tmp_path: Path, monkeypatch) -> None:
    """The per-process figure comes from `nvidia-smi --query-compute-apps` (a stand-in script prints what the
    driver's tool prints); without the tool the reason is given instead of a number."""
    from edgead.runtime.machine import gpu_memory_used_mb

    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_memory_used_mb(1234)["used_mb"] is None and "nvidia-smi not found" in gpu_memory_used_mb(1234)["reason"]
    tool = tmp_path / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho '999, 80'\necho '1234, 512'\necho '77, [N/A]'\n")
    tool.chmod(0o755)
    assert gpu_memory_used_mb(1234) == {"used_mb": 512.0, "source": "nvidia-smi"}
    assert "not available" in gpu_memory_used_mb(77)["reason"]
    assert "no device memory for this process" in gpu_memory_used_mb(5)["reason"]


def test_auroc_counts_ties_half() -> None:
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert auroc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    assert auroc(np.array([1, 1]), np.array([0.5, 0.5])) is None
