"""Export: FP32 parity within 1e-4, FP16 with FP32 islands, engines, metadata, staging, errors."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgead.export import exporter as exporter_module
from edgead.export.calibration import threshold_from_normal_scores
from edgead.export.exporter import ExportOptions, export_run
from edgead.export.fp16 import FP32Island, fp32_node_names, mixed_precision_graph
from edgead.export.onnx import ExportError
from edgead.export.publish import versions_dir
from edgead.export.tensorrt import TensorRTUnavailable
from edgead.methods import load_method
from edgead.runtime.metadata import load_metadata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from integration_helpers import make_tiny_run  # noqa: E402

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("export")
    data, run_dir = make_tiny_run(root)
    out = root / "exports" / "score-resilience"
    export_run(run_dir, out, ExportOptions(precision="fp32", data=data), log=lambda _: None)
    return data, run_dir, out


def test_fp32_export_agrees_with_torch_and_records_everything(tiny: tuple[Path, Path, Path]) -> None:
    _, _, out = tiny
    meta = load_metadata(out)
    parity = meta["parity"]["torch_vs_onnxruntime_fp32"]
    assert parity["score_max_rel_error"] < 1e-4 and parity["decision_flips"] == 0
    assert parity["n_images"] >= 12  # held-out normals + pseudo-anomalies + test split
    assert meta["input"]["shape"] == [1, 3, 32, 32] and meta["input"]["channel_order"] == "RGB"
    assert meta["threshold"]["value"] > 0 and "pseudo_anomalies" in meta["threshold"]
    assert meta["method_params"]["n_draws"] == 2 and meta["versions"]["torch"] == torch.__version__
    model = onnx.load(str(out / "model.onnx"))
    assert model.opset_import[0].version >= 18
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["anomaly_map", "score"]
    assert out.is_symlink() and not list(versions_dir(out).glob("*.partial")), "staging folder left behind"


def test_threshold_is_just_above_the_normal_quantile() -> None:
    scores = np.arange(1, 201, dtype=np.float64)
    record = threshold_from_normal_scores(scores, 0.01)
    assert 198 < record["value"] < 199.001 and record["observed_false_alarm_rate"] <= 0.01
    with pytest.raises(ValueError, match="false_alarm_rate"):
        threshold_from_normal_scores(scores, 1.5)


def test_fp16_graph_keeps_sensitive_parts_fp32(tiny: tuple[Path, Path, Path]) -> None:
    _, run_dir, _ = tiny
    graph = load_method(run_dir).build_graph()
    mixed = mixed_precision_graph(graph)
    islands = [m for m in mixed.modules() if isinstance(m, FP32Island)]
    assert islands and all(p.dtype == torch.float32 for m in islands for p in m.parameters())
    assert mixed.unet.module.conv_in.weight.dtype == torch.float16
    assert mixed.noise.dtype == torch.float32  # the noise injection and error reduction stay FP32
    image = torch.rand(1, 3, 32, 32)
    ref_map, ref_score = graph(image)
    half_map, half_score = mixed(image)
    assert half_map.dtype == torch.float32
    assert torch.allclose(half_score, ref_score, rtol=2e-2)


def test_weakly_typed_fp16_keeps_the_same_parts_fp32(tiny: tuple[Path, Path, Path]) -> None:
    """For TensorRT 10's FP16 flag, the FP32 ONNX nodes held in FP32 are what the FP16 ONNX keeps FP32: the
    U-Net's normalisations and everything outside the U-Net (noise, error, scoring); its convolutions, matmuls
    and activations may run in FP16. With TensorRT-RTX's parser: each of those nodes is a layer of that name,
    so the constraints reach every one."""
    _, run_dir, out = tiny
    graph = load_method(run_dir).build_graph()
    model = onnx.load(str(out / "model.onnx"))
    fp32 = set(fp32_node_names(graph, model))
    ops = {node.name: node.op_type for node in model.graph.node}
    fp16_ops = {ops[name] for name in ops if name not in fp32}
    assert {"Conv", "MatMul"} <= fp16_ops and "InstanceNormalization" not in fp16_ops  # GroupNorm's export
    assert {"InstanceNormalization", "ReduceMean"} <= {ops[name] for name in fp32}  # norms; the error reduction
    assert not {"Conv", "MatMul"} & {ops[name] for name in fp32}
    if HAS_RTX:
        import tensorrt_rtx as trt

        logger = trt.Logger(trt.Logger.ERROR)
        network = trt.Builder(logger).create_network(0)
        assert trt.OnnxParser(network, logger).parse_from_file(str(out / "model.onnx"))
        assert fp32 <= {network.get_layer(i).name for i in range(network.num_layers)}


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx-cu13 not installed")
def test_fp32_export_builds_a_tensorrt_rtx_engine(tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, run_dir, _ = tiny
    meta = export_run(
        run_dir,
        tmp_path / "fp32",
        ExportOptions(format="tensorrt", data=data, trt_flavour="tensorrt_rtx"),
        log=lambda _: None,
    )
    engine = meta["artifacts"]["engines"][0]
    assert engine["precision"] == "fp32" and engine["built_from"] == "model.onnx" and engine["layers"] > 0
    assert (tmp_path / "fp32" / engine["file"]).stat().st_size > 100_000


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx-cu13 not installed")
def test_fp16_export_builds_a_tensorrt_rtx_engine(tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, run_dir, _ = tiny
    out = tmp_path / "fp16"
    meta = export_run(
        run_dir,
        out,
        ExportOptions(
            precision="fp16", format="tensorrt", data=data, trt_flavour="tensorrt_rtx", engine_cache=tmp_path / "cache"
        ),
        log=lambda _: None,
    )
    engine = meta["artifacts"]["engines"][0]
    assert engine["flavour"] == "tensorrt_rtx" and engine["built_from"] == "model.fp16.onnx"
    assert (out / engine["file"]).stat().st_size > 100_000
    assert any((tmp_path / "cache").glob("*.engine")), "engine cache not filled"
    fp16 = meta["parity"]["fp32_vs_onnxruntime_fp16"]
    assert fp16["score_max_rel_error"] < 0.05
    assert set(meta["parity"]["test_image_auroc"]) == {"fp32", "fp16", "n_images"}
    fp16_model = onnx.load(str(out / "model.fp16.onnx"))
    assert any(n.op_type == "Cast" for n in fp16_model.graph.node)


def test_missing_tensorrt_is_a_clear_error(
    tiny: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, run_dir, _ = tiny
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable, match=r"edgead\[trt\]"):
        export_run(
            run_dir,
            tmp_path / "x",
            ExportOptions(format="tensorrt", trt_flavour="tensorrt", data=data),
            log=lambda _: None,
        )
    assert not (tmp_path / "x" / "edgead.json").exists()


def test_reexport_leaves_no_stale_files(tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, run_dir, _ = tiny
    out = tmp_path / "exports" / "again"
    export_run(run_dir, out, ExportOptions(precision="fp16", data=data), log=lambda _: None)
    assert (out / "model.fp16.onnx").is_file()
    lines: list[str] = []
    export_run(run_dir, out, ExportOptions(precision="fp32", data=data), log=lines.append)
    assert sorted(p.name for p in out.iterdir()) == ["edgead.json", "model.onnx", "verification.npz"]  # no fp16
    assert not any(".partial" in line for line in lines), "the log names the staging folder"
    assert any("pseudo-anomalies are flagged" in line for line in lines)
    assert any("warning: the threshold rests on only" in line for line in lines)  # 2 held-out normals here
    assert any("decision flips 0 of" in line for line in lines)
    assert len([v for v in versions_dir(out).iterdir()]) == 2  # this version and the previous one


def test_failed_parity_leaves_the_previous_export_intact(
    tiny: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, run_dir, out = tiny
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(exporter_module, "FP32_SCORE_RTOL", -1.0)
    monkeypatch.setattr("edgead.runtime.parity.FP32_SCORE_RTOL", -1.0)
    monkeypatch.setattr("edgead.runtime.parity.FP32_ENVELOPE_FACTOR", 0.0)
    with pytest.raises(ExportError, match="not written"):
        export_run(run_dir, out, ExportOptions(data=data), log=lambda _: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_options_are_rejected(tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, run_dir, _ = tiny
    with pytest.raises(ValueError, match="--format"):
        export_run(run_dir, tmp_path, ExportOptions(format="tflite"), log=lambda _: None)
    with pytest.raises(ValueError, match="--precision"):
        export_run(run_dir, tmp_path, ExportOptions(precision="int4"), log=lambda _: None)
    with pytest.raises(ValueError, match="--format triton is made at precision fp32, fp16"):
        export_run(run_dir, tmp_path, ExportOptions(precision="int8", format="triton"), log=lambda _: None)


def test_metadata_is_valid_json_with_hashes(tiny: tuple[Path, Path, Path]) -> None:
    _, _, out = tiny
    meta = json.loads((out / "edgead.json").read_text())
    assert len(meta["artifacts"]["onnx"]["sha256"]) == 64
