"""INT8 graphs: static post-training quantization of the FP32 ONNX, calibrated on the run's held-out normals.

The result is a QDQ ONNX (explicit quantization: QuantizeLinear / DequantizeLinear pairs around the quantized
operators), the form ONNX Runtime, OpenVINO and TensorRT (10, 11 and RTX, which accept only this form for INT8)
all run. Rules, the INT8 counterpart of ``edgead.export.fp16``'s:

- only the graph's networks (``fp16_modules``, by default every direct child with parameters) are quantized:
  their convolutions, matrix products and the element-wise operators between them (:data:`QDQ_OP_TYPES`, so
  that INT8 tensors flow from one convolution to the next without a float round trip; quantizing only
  convolutions and matrix products was measured on gaussian / magnetic_tile and lost more AUROC); a module that declares
  ``keep_fp32 = True`` (the U-Net's time embeddings) stays floating point. Batch normalisation is folded into the
  convolution before it by the ONNX exporter, so it quantizes with it; GroupNorm and LayerNorm are not quantized
  by the quantizer, so they stay floating point;
- everything outside the networks (normalisation of the input, noise, Mahalanobis and memory-bank distances,
  scoring, resizing, smoothing) stays FP32, as in the FP16 export;
- weights: signed INT8, symmetric, one scale per output channel; activations: signed INT8, symmetric (zero
  point 0), one scale per tensor, from the minimum and maximum over the calibration images (TensorRT accepts
  only symmetric signed INT8 Q/DQ, so the one artifact runs on every backend);
- calibration: the run's held-out normal images (never test images), the same preprocessed set the threshold is
  calibrated on.

Why ONNX Runtime's quantization tool (``onnxruntime.quantization.quantize_static``): measured on the gaussian
magnetic_tile run (``benchmarks/int8.py quantizers`` -> ``int8_quantizers_gaussian_magnetic_tile.json``), its
graph kept the pseudo-validation AUROC at 0.973 (FP32 0.977) where NNCF's ONNX PTQ (performance preset, the same
scope kept in floating point) fell to 0.950, at about the same OpenVINO speed, and it ships with the ONNX
Runtime edgead already depends on. The choice is made on pseudo-validation, as every choice here: on that run's
test split the order was the other way round (NNCF 0.914, ONNX Runtime's tool 0.864; reported, not used).
Per-tensor weight scales were tried too and lost much more (pseudo-validation 0.89). NVIDIA Model Optimizer's
ONNX PTQ was not tried.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edgead.export.fp16 import split_nodes
from edgead.runtime.backends.base import INPUT_NAME

#: Operators an INT8 graph must have inside its networks, or there is nothing for INT8 to speed up.
QUANTIZED_OP_TYPES: tuple[str, ...] = ("Conv", "ConvTranspose", "MatMul", "Gemm")
#: What the quantizer may quantize inside the networks: those, and the element-wise operators between them (so
#: INT8 tensors flow from one convolution to the next). Layout operators (Concat, Reshape, Transpose, Resize) are
#: left out: ONNX Runtime's quantizer cannot share Q/DQ parameters with a constant input of theirs. So is Mul: its
#: quantized scalar constants (attention's scale) are refused by TensorRT's Q/DQ optimizer.
QDQ_OP_TYPES: tuple[str, ...] = (*QUANTIZED_OP_TYPES, "Add", "Clip", "Relu")
#: The quantizer's settings, recorded in ``edgead.json``.
SETTINGS: dict[str, Any] = {
    "quantizer": "onnxruntime.quantization.quantize_static",
    "format": "QDQ",
    "weights": "int8, symmetric, per output channel",
    "activations": "int8, symmetric, per tensor",
    "calibration": "MinMax",
    "scope": "the graph's networks; the rest FP32",
    "op_types": list(QDQ_OP_TYPES),
}


class Int8Error(RuntimeError):
    """The INT8 graph could not be made (names the step and why)."""


def int8_node_names(graph: nn.Module, model: Any) -> tuple[list[str], list[str]]:
    """``(inside, excluded)``: the names of the nodes of ``model`` (the FP32 ONNX of ``graph``) that the rules
    above hand to the quantizer (the networks, less the modules that declare ``keep_fp32``), and of every other
    node (:func:`edgead.export.fp16.split_nodes`)."""
    return split_nodes(graph, model, lambda module: getattr(module, "keep_fp32", False))


class _NormalImages:
    """ONNX Runtime's calibration reader over preprocessed images, ``batch`` at a time (the graph's fixed batch)."""

    def __init__(self, images: np.ndarray, batch: int) -> None:
        self._batches = self._iterate(np.asarray(images, np.float32), batch)

    @staticmethod
    def _iterate(images: np.ndarray, batch: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(images) - batch + 1, batch):
            yield {INPUT_NAME: np.ascontiguousarray(images[start : start + batch])}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # pragma: no cover - ORT calls it only for some calibrators
        raise NotImplementedError


def quantize_int8(fp32_path: Path, out_path: Path, graph: nn.Module, calibration: np.ndarray) -> dict[str, Any]:
    """Write the INT8 QDQ twin of ``fp32_path`` to ``out_path``; ``calibration`` holds preprocessed normal images
    (N, C, S, S), at least one batch of the graph's input. Returns what was quantized (for ``edgead.json``)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(str(fp32_path), load_external_data=False)
    batch = int(model.graph.input[0].type.tensor_type.shape.dim[0].dim_value or 1)
    if len(calibration) < batch:
        raise Int8Error(f"INT8 calibration needs at least {batch} normal images (one batch), got {len(calibration)}")
    quantized, excluded = int8_node_names(graph, model)
    types = {node.op_type for node in model.graph.node if node.name in set(quantized)}
    if not types & set(QUANTIZED_OP_TYPES):
        raise Int8Error(
            f"{type(graph).__name__}: no convolution or matrix product inside its networks to quantize; "
            "export this method at fp32 or fp16"
        )
    reader = _NormalImages(calibration, batch)
    CalibrationDataReader.register(_NormalImages)  # ORT checks the reader's type
    try:
        quantize_static(
            str(fp32_path),
            str(out_path),
            reader,  # type: ignore[arg-type]
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=excluded,
            op_types_to_quantize=list(QDQ_OP_TYPES),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
        )
    except (ValueError, RuntimeError) as err:
        raise Int8Error(f"ONNX Runtime's quantizer failed on {fp32_path.name}: {err}") from err
    return {
        **SETTINGS,
        "network_nodes": len(quantized),
        "float_nodes": len(excluded),
        "calibration_images": int(len(calibration) // batch * batch),
    }


def int8_step(job: Any) -> list[Path]:
    """``edgead export --precision int8``'s step (an ``edgead.export.exporter.ExportJob``): quantize, run the INT8
    graph on ONNX Runtime over the held-out sets, calibrate its own threshold on the normals (same false-alarm
    rate), gate it against the FP32 reference (``edgead.runtime.parity.int8_gate``), add its outputs to the
    verification set and run ``edgead verify``'s check on them."""
    from edgead.export.calibration import pseudo_anomaly_check, threshold_from_normal_scores
    from edgead.export.exporter import (
        FP32_NAME,
        INT8_NAME,
        _auroc,
        _run_onnx,
        check_verification_set,
        write_golden_data,
    )
    from edgead.export.onnx import ExportError
    from edgead.runtime.drift import normal_quantiles
    from edgead.runtime.metadata import artifact_record
    from edgead.runtime.parity import int8_gate

    path = job.staging / INT8_NAME
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice lines go to the root logger
    try:
        info = quantize_int8(job.staging / FP32_NAME, path, job.graph, job.sets["normal"])
    except Int8Error as err:
        raise ExportError(str(err)) from err
    finally:
        logging.getLogger().setLevel(quiet)
    maps, scores = _run_onnx(path, job.all_images)
    sizes = {name: len(images) for name, images in job.sets.items()}
    ends = dict(zip(sizes, np.cumsum(list(sizes.values())), strict=True))
    normal = scores[: ends["normal"]]
    own = threshold_from_normal_scores(normal, job.options.false_alarm_rate)
    own["source"] = job.normal_source
    own["normal_quantiles"] = normal_quantiles(normal)
    if "pseudo" in job.sets:
        own["pseudo_anomalies"] = pseudo_anomaly_check(normal, scores[ends["normal"] : ends["pseudo"]], own["value"])
    job.threshold["int8"] = own
    held = ends.get("pseudo", ends["normal"])
    labels = np.concatenate([np.zeros(sizes["normal"]), np.ones(sizes.get("pseudo", 0))])
    gate = int8_gate(labels, job.ref_scores[:held], job.threshold["value"], scores[:held], own["value"])
    job.parity["fp32_vs_onnxruntime_int8"] = gate
    if job.test_labels is not None:  # the user's own test split: a further gate, never a choice
        n = len(job.test_labels)
        test = {"fp32": _auroc(job.test_labels, job.ref_scores[-n:]), "int8": _auroc(job.test_labels, scores[-n:])}
        job.parity.setdefault("test_image_auroc", {"n_images": n, "fp32": test["fp32"]})["int8"] = test["int8"]
        if (
            test["fp32"] is not None
            and test["int8"] is not None
            and test["fp32"] - test["int8"] > gate["tolerances"]["auroc_drop"]
        ):
            gate["failures"].append(
                f"test image AUROC of --data {test['int8']:.4f} (INT8) vs {test['fp32']:.4f} (FP32): a drop of "
                f"{test['fp32'] - test['int8']:.4f} > {gate['tolerances']['auroc_drop']:g}"
            )
            gate["passed"] = False
    auroc = f"AUROC {gate['auroc_int8']:.4f} (FP32 {gate['auroc_fp32']:.4f})" if gate["auroc_fp32"] is not None else ""
    job.log(
        f"  INT8 ({info['network_nodes']} network operators, calibrated on {info['calibration_images']} normal "
        f"images): threshold {own['value']:.6g}; on {gate['n_images']} held-out images {auroc}, "
        f"{gate['decision_flips']} decisions differ from FP32 ({gate['decision_flip_share']:.1%}), score rank "
        f"correlation {gate['score_rank_correlation']:.3f}"
    )
    if not gate["passed"] and job.options.accept_int8_loss:
        gate["accepted_by_user"] = True
        job.log(f"  warning: INT8 kept with --accept-int8-loss although {'; '.join(gate['failures'])}")
    elif not gate["passed"]:
        raise ExportError(
            f"the INT8 graph is too far from FP32: {'; '.join(gate['failures'])}; the export is not written. "
            "Export at --precision fp16 or fp32 instead (or keep it knowingly with --accept-int8-loss)"
        )
    golden_maps, golden_scores = _run_onnx(path, job.golden["images"])
    job.golden["maps_int8"], job.golden["scores_int8"] = golden_maps, golden_scores
    golden = write_golden_data(job)
    job.artifacts["onnx_int8"] = artifact_record(job.staging, INT8_NAME, precision="int8", quantization=info)
    check_verification_set(job, "int8", INT8_NAME)
    return [path, golden]


__all__ = ["QUANTIZED_OP_TYPES", "SETTINGS", "Int8Error", "int8_node_names", "int8_step", "quantize_int8"]
