"""benchmarks/gpu_proof.py: refuses to write GPU figures without a GPU; its dry run goes end to end on a CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_proof.py"


def test_without_a_gpu_it_writes_nothing_and_names_what_is_missing(tmp_path: Path) -> None:
    import importlib.util as util

    spec = util.spec_from_file_location("edgead_gpu_proof", SCRIPT)  # not on sys.path: benchmarks/ shadows packages
    gpu_proof = util.module_from_spec(spec)
    sys.modules[spec.name] = gpu_proof  # its dataclasses look their module up there
    spec.loader.exec_module(gpu_proof)

    record = gpu_proof.machine()
    if not gpu_proof.missing_for_gpu(record):
        pytest.skip("this machine has everything for GPU figures")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no GPU figures will be written" in done.stderr
    assert "pip install" in done.stderr  # the install line for a GPU machine
    fake = {"gpus": [{"name": "NVIDIA L4"}], "torch_cuda_available": True, "tensorrt": "10.3.0", "pycuda": "2024.1",
            "onnxruntime_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}  # fmt: skip
    assert gpu_proof.missing_for_gpu(fake) == []
    assert len(gpu_proof.missing_for_gpu({"tensorrt": "broken: stub"})) == 5


@pytest.mark.slow  # the dry run: trains, exports (with TensorRT-RTX engines), verifies and benches two methods
@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt-rtx-cu13 not installed")
def test_dry_run_goes_end_to_end_within_its_budget(tmp_path: Path) -> None:
    out = tmp_path / "proof"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--budget-s", "150",
         "--methods", "gaussian,score-resilience"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert summary["dry_run"] and summary["seconds"] <= 150 + 60
    for name in ("gaussian: export fp16", "gaussian: verify fp16 on onnxruntime", "gaussian: bench fp16"):
        assert steps[name]["status"] == "ok", (name, steps[name])
    assert (out / steps["gaussian: bench fp16"]["json"]).is_file() and (out / "summary.md").is_file()
    assert not (out / "work").exists()  # runs and exports are removed; the JSONs stay
    assert str(out) not in (out / "summary.json").read_text()  # the summary names no path of this machine
    assert all(s["status"] in ("ok", "skipped", "failed", "cannot run here", "timed out") for s in steps.values())
