"""INT8 export: QDQ graph of the networks only, its own threshold, the gate against FP32, verify, engines."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgead.export.exporter import ExportOptions, export_run
from edgead.export.int8 import int8_node_names
from edgead.export.onnx import ExportError
from edgead.export.trt_flavours import Flavour, choose_onnx_for
from edgead.methods import load_method
from edgead.runtime import parity
from edgead.runtime.detector import Detector
from edgead.runtime.metadata import MetadataError, load_metadata
from edgead.runtime.verify import VerifyUnavailable, load_golden, reference_for, verify_export

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from integration_helpers import make_tiny_run  # noqa: E402

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny score-resilience run exported at INT8. Five training steps leave the U-Net near its random start,
    whose INT8 ranking need not match FP32: the loss is accepted here, and the gate is tested on its own."""
    root = tmp_path_factory.mktemp("int8")
    data, run_dir = make_tiny_run(root)
    out = root / "exports" / "int8"
    export_run(run_dir, out, ExportOptions(precision="int8", data=data, accept_int8_loss=True), log=lambda _: None)
    return data, run_dir, out


@pytest.mark.slow  # an export of a trained run
def test_int8_graph_quantizes_the_networks_and_nothing_else(int8_export: tuple[Path, Path, Path]) -> None:
    _, run_dir, out = int8_export
    fp32 = onnx.load(str(out / "model.onnx"))
    int8 = onnx.load(str(out / "model.int8.onnx"))
    inside, excluded = int8_node_names(load_method(run_dir).build_graph(), fp32)
    ops = {node.name: node.op_type for node in fp32.graph.node}
    assert {"Conv", "MatMul"} <= {ops[name] for name in inside}
    assert "ReduceMean" in {ops[name] for name in excluded}  # the restoration error's reduction stays FP32
    produced_by = {output: node for node in int8.graph.node for output in node.output}
    int8_weights = {
        node.name
        for node in int8.graph.node
        if node.op_type in ("Conv", "MatMul")
        and len(node.input) > 1
        and getattr(produced_by.get(node.input[1]), "op_type", None) == "DequantizeLinear"
    }
    convs_inside = {name for name in inside if ops[name] == "Conv"}
    assert convs_inside and convs_inside <= int8_weights, "a U-Net convolution kept float weights"
    assert not int8_weights & set(excluded), "an operator outside the networks was quantized"
    zero_points = [
        onnx.numpy_helper.to_array(init) for init in int8.graph.initializer if init.name.endswith("_zero_point")
    ]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # TensorRT's Q/DQ form


@pytest.mark.slow  # an export of a trained run
def test_int8_export_records_its_threshold_gate_and_references(int8_export: tuple[Path, Path, Path]) -> None:
    _, _, out = int8_export
    meta = load_metadata(out)
    record = meta.artifacts["onnx_int8"]
    assert record["precision"] == "int8" and record["quantization"]["format"] == "QDQ"
    assert record["quantization"]["calibration_images"] >= 2
    own = meta.threshold["int8"]
    assert own["n_normal"] == meta.threshold["n_normal"] and meta.threshold_for("int8") == own["value"]
    gate = meta.parity["fp32_vs_onnxruntime_int8"]
    assert set(gate["tolerances"]) == set(parity.INT8_GATE) and gate["n_images"] >= 4
    assert gate["passed"] or gate.get("accepted_by_user") is True
    assert "int8" in meta.parity["test_image_auroc"]
    golden = load_golden(out)
    assert golden["scores_int8"].shape == golden["scores"].shape
    assert reference_for(golden, "int8")["scores"] is golden["scores_int8"]
    with Detector.load(out, backend="onnxruntime", precision="int8") as detector:
        assert detector.precision == "int8" and detector.threshold == own["value"]
    with Detector.load(out, backend="onnxruntime") as detector:
        assert detector.precision == "fp32" and detector.threshold == meta.threshold_value


@pytest.mark.slow  # an export of a trained run
def test_verify_checks_int8_against_the_exports_int8_outputs(int8_export: tuple[Path, Path, Path]) -> None:
    _, _, out = int8_export
    report = verify_export(out, backend="onnxruntime", precision="int8", runs=3)
    assert report["passed"], report["failures"]
    assert report["backend"]["precision"] == "int8" and report["tolerances"] == parity.TOLERANCES["int8"]
    assert report["parity"]["score_max_rel_error"] < 1e-5  # the same kernels as at export
    assert "auroc_fp32" in report["parity"]["vs_fp32"]


@pytest.mark.slow  # an export of a trained run
def test_int8_gate_refuses_an_export_and_keeps_the_previous_one(
    tmp_path: Path, int8_export: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, run_dir, _ = int8_export
    out = tmp_path / "export"
    export_run(run_dir, out, ExportOptions(data=data), log=lambda _: None)
    before = load_metadata(out).created
    monkeypatch.setitem(parity.INT8_GATE, "rank_correlation", 1.01)  # no INT8 graph ranks exactly as FP32 here
    with pytest.raises(ExportError, match=r"INT8 graph is too far from FP32: .*ranking.*--accept-int8-loss"):
        export_run(run_dir, out, ExportOptions(precision="int8", data=data), log=lambda _: None)
    assert load_metadata(out).created == before and not (out / "model.int8.onnx").exists()


def test_int8_gate_figures() -> None:
    labels = np.array([0] * 20 + [1] * 20)
    ref = np.concatenate([np.linspace(0, 1, 20), np.linspace(2, 3, 20)])
    same = parity.int8_gate(labels, ref, 1.5, 3 * ref, 4.5)  # a scaled score: same ranking, same decisions
    assert same["passed"] and same["decision_flips"] == 0 and same["score_rank_correlation"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = parity.int8_gate(labels, ref, 1.5, rng.permutation(ref), 1.5)
    assert not noisy["passed"] and noisy["auroc_int8"] < noisy["auroc_fp32"] - 0.02
    assert any("AUROC" in f for f in noisy["failures"]) and any("ranking" in f for f in noisy["failures"])
    assert any("another decision" in f for f in noisy["failures"])


def test_accept_int8_loss_needs_int8() -> None:
    with pytest.raises(ValueError, match="--accept-int8-loss goes with --precision int8"):
        ExportOptions(accept_int8_loss=True).validate()


def test_int8_engines_build_from_the_qdq_graph(tmp_path: Path) -> None:
    fp32, int8 = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    rtx = Flavour(name="tensorrt_rtx", version="1.7", major=1, module=None)
    trt10 = Flavour(name="tensorrt", version="10.3", major=10, module=None)
    assert choose_onnx_for(rtx, "int8", fp32, None, int8) == (int8, frozenset())
    assert choose_onnx_for(trt10, "int8", fp32, None, int8) == (int8, frozenset({"INT8"}))
    with pytest.raises(FileNotFoundError, match="--precision int8"):
        choose_onnx_for(rtx, "int8", fp32, None, None)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx-cu13 not installed")
def test_int8_export_builds_a_tensorrt_rtx_engine(int8_export: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, run_dir, _ = int8_export
    meta = export_run(
        run_dir,
        tmp_path / "int8",
        ExportOptions(
            precision="int8", format="tensorrt", data=data, trt_flavour="tensorrt_rtx", accept_int8_loss=True
        ),
        log=lambda _: None,
    )
    engine = meta["artifacts"]["engines"][0]
    assert engine["precision"] == "int8" and engine["built_from"] == "model.int8.onnx" and engine["layers"] > 0


@pytest.mark.slow  # an export of a trained run
def test_int8_threshold_must_be_a_number(int8_export: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import json

    _, _, out = int8_export
    data = json.loads((out / "edgead.json").read_text())
    data["threshold"]["int8"]["value"] = "high"
    from edgead.runtime.metadata import ExportMetadata

    with pytest.raises(MetadataError, match=r"threshold\.int8\.value"):
        ExportMetadata.from_dict(data)
    del data["threshold"]["int8"]
    meta = ExportMetadata.from_dict(data)
    with pytest.raises(MetadataError, match="threshold.int8"):
        meta.threshold_for("int8")


@pytest.mark.slow  # an export of a trained run
def test_fp32_export_has_no_int8_to_verify(tmp_path: Path, int8_export: tuple[Path, Path, Path]) -> None:
    data, run_dir, _ = int8_export
    out = tmp_path / "fp32"
    export_run(run_dir, out, ExportOptions(data=data), log=lambda _: None)
    with pytest.raises(VerifyUnavailable, match="no int8 ONNX"):
        verify_export(out, backend="onnxruntime", precision="int8", runs=1)
