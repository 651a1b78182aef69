"""Every discovered method, end to end through the command line: train -> (dataset moved away) -> export FP32 and
FP16 (parity, TensorRT-RTX engine where installed) -> torch-free runtime agrees with PyTorch -> live loop.

Parametrised by ``implemented_methods()``, so a new method folder is covered without editing this file; each
method's ``smoke`` settings keep its fit to seconds on 32 px generated data.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgead.cli import app
from edgead.data.mvtec import load_images
from edgead.data.synthetic import generate_dataset
from edgead.methods import get_method, implemented_methods, load_method
from edgead.runtime.detector import Detector
from edgead.runtime.metadata import load_metadata

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
runner = CliRunner()


def _invoke(args: list[str]) -> str:
    result = runner.invoke(app, args, env={"COLUMNS": "240"})
    assert result.exit_code == 0, f"edgead {' '.join(args)} failed:\n{result.output}"
    return result.output


def _method_params() -> list:
    """Every method; those whose smoke export takes minutes are marked slow (CI runs them, `-m "not slow"` not)."""
    return [
        pytest.param(name, marks=pytest.mark.slow) if get_method(name).slow_smoke_export else name
        for name in implemented_methods()
    ]


@pytest.fixture(scope="module", params=_method_params())
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """``(method, runs root, test images)`` after `edgead train` with the method's smoke settings; the dataset
    itself is moved away afterwards, so everything after training must use what the run stored."""
    name = request.param
    cls = get_method(name)
    root = tmp_path_factory.mktemp(name)
    data = generate_dataset(root / "data", size=32, n_train=24, n_test_good=4, n_test_defect=4, seed=7)
    smoke = cls.smoke
    args = [
        "train",
        "--method",
        name,
        "--data",
        str(data),
        "--image-size",
        "32",
        "--runs-root",
        str(root / "runs"),
        "--steps",
        str(smoke.get("steps", 1)),
        "--batch-size",
        str(smoke.get("batch_size", 8)),
        "--lr",
        str(smoke.get("lr", 1e-3)),
        "--lr-schedule",
        "constant",
        "--no-progress",
    ]
    if cls.uses_preset:
        args += ["--preset", smoke.get("preset", "tiny")]
    for key, value in smoke.get("params", {}).items():
        args += ["--param", f"{key}={json.dumps(value)}"]
    _invoke(args)
    tests = root / "test-images"
    shutil.copytree(data / "test", tests)
    shutil.rmtree(data)
    return name, root / "runs", tests


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_export_parity_engine_runtime_and_live_loop(
    trained: tuple[str, Path, Path], precision: str, tmp_path: Path
) -> None:
    name, runs, tests = trained
    out = tmp_path / "export"
    args = [
        "export",
        "--method",
        name,
        "--runs-root",
        str(runs),
        "--out",
        str(out),
        "--precision",
        precision,
        "--engine-cache",
        str(tmp_path / "cache"),
    ]
    if HAS_RTX:
        args += ["--format", "tensorrt", "--trt-flavour", "tensorrt_rtx"]
    _invoke(args)

    meta = load_metadata(out)
    assert meta.method == name and meta.format_version >= 2
    assert (
        meta.parity["torch_vs_onnxruntime_fp32"]["score_max_rel_error"] < 1e-4
        or meta.parity["fp32_conditioning"]["within"]
    )
    assert "stored in the run" in meta.threshold["source"]  # the dataset is gone: the run was self-contained
    steps = [step["step"] for step in meta.steps]
    assert steps[:6] == ["load run", "validation sets", "ONNX FP32", "PyTorch reference", "threshold", "parity FP32"]
    assert meta.steps[2]["files"] == ["model.onnx"] and meta.steps[2]["bytes"] > 0
    assert "fp32_parts" in meta.notes
    if precision == "fp16":
        assert meta.parity["fp32_vs_onnxruntime_fp16"]["score_max_rel_error"] < 0.05
    if HAS_RTX:
        engine = meta.artifacts["engines"][0]
        assert engine["precision"] == precision and engine["layers"] > 0
        assert (out / engine["file"]).stat().st_size > 10_000

    # The torch-free runtime computes what PyTorch computes, on frames as a camera delivers them (BGR).
    paths = sorted(tests.rglob("*.png"))[:6]
    detector = Detector.load(out, backend="onnxruntime", precision=precision)
    results = detector.predict_batch([cv2.imread(str(p)) for p in paths])
    run_dir = Path(meta.run["dir"])
    method = load_method(run_dir)
    with torch.no_grad():
        _, scores = method.build_graph()(torch.from_numpy(load_images(paths, method.preprocess_config)))
    rtol = 1e-3 if precision == "fp32" else 5e-2
    np.testing.assert_allclose([r.score for r in results], scores.numpy(), rtol=rtol, atol=1e-6)

    # The live loop on a folder of images, headless, with the one threshold override.
    log = tmp_path / "frames.jsonl"
    _invoke(
        [
            "run",
            "--camera",
            str(tests / "good"),
            "--export",
            str(out),
            "--headless",
            "--max-frames",
            "3",
            "--log",
            str(log),
            "--threshold",
            "-1",
            "--precision",
            precision,
            "--backend",
            "onnxruntime",
        ]
    )
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 3 and all(r["is_anomaly"] and r["threshold"] == -1.0 for r in records)


def test_every_graph_traces_with_a_dynamic_batch(trained: tuple[str, Path, Path], tmp_path: Path) -> None:
    """What `--format triton` adds per method: the graph traced with a dynamic batch (1..4) scores batches of 1
    and 4 as PyTorch does; with TensorRT-RTX installed it builds with a 1..4 optimisation profile. (The export
    step around it is tested once, in tests/runtime/test_triton.py.)"""
    from edgead.config import resolve_latest
    from edgead.export.onnx import export_onnx

    name, runs, tests = trained
    method = load_method(resolve_latest(name, runs))
    graph, pre = method.build_graph().eval(), method.preprocess_config
    shape = (4, pre.channels, pre.image_size, pre.image_size)
    record = export_onnx(graph, tmp_path / "batched.onnx", shape, max_batch=4)
    assert record["batch"] == "dynamic 1..4"
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "batched.onnx"), providers=["CPUExecutionProvider"])
    images = load_images(sorted(tests.rglob("*.png"))[:4], pre)
    for batch in (images[:1], images):
        with torch.no_grad():
            ref_maps, ref_scores = graph(torch.from_numpy(batch))
        maps, scores = session.run(None, {"image": batch})
        np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(maps, ref_maps.numpy(), rtol=1e-3, atol=1e-3 * float(ref_maps.abs().max()))
    if HAS_RTX:
        from edgead.export.tensorrt import BuildSettings, build_engine, detect_flavour

        settings = BuildSettings("fp32", shape, max_batch=4)
        info = build_engine(tmp_path / "batched.onnx", tmp_path / "batched.engine", settings,
                            flavour=detect_flavour("tensorrt_rtx"), log=lambda _: None)  # fmt: skip
        assert info.layers > 0 and info.profile[0][0] == 1


def test_info_shows_every_method_and_its_parameters() -> None:
    listing = _invoke(["info"])
    for name in implemented_methods():
        assert name in listing
        cls = get_method(name)
        details = _invoke(["info", "--method", name])
        for row in cls.Params.describe():
            assert row["name"] in details and row["ref"], f"{name}.{row['name']} has no paper reference"
