"""``edgead verify``: prove an export on this device, the way ``polygraphy run --trt --onnxrt`` does, but for a
whole detector and its decisions.

The export holds a small verification set (``verification.npz``: preprocessed held-out normals and
pseudo-anomalies with the PyTorch FP32 outputs, hashed in ``edgead.json``). Verify runs it through the backend
this device would use (TensorRT engine, ONNX Runtime on the CPU or with the CUDA execution provider), compares
every output with the reference and measures latency:

- per output, the largest absolute and relative error (the map's relative to its largest reference value);
- decision flips against the export's threshold;
- IoU of the maps thresholded at the reference maps' 90th percentile over the set;
- image AUROC (normals vs pseudo-anomalies) against the reference's;
- backend inference latency (median, p99 over ``runs`` calls after warm-up; the batch as exported).

Tolerances per precision (:data:`TOLERANCES`) are printed with the result. Exit codes (the CLI): 0 pass,
1 parity failure, 2 cannot run here (no GPU, missing package, engine for another GPU, no verification set).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgead.runtime.metadata import load_metadata, verified_artifact

#: What each precision must meet against the PyTorch FP32 reference.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"score_rel": 1e-3, "map_rel": 1e-3, "decision_flips": 0, "map_iou": 0.99, "auroc_drop": 0.0},
    "fp16": {"score_rel": 5e-2, "map_rel": 5e-2, "decision_flips": 0, "map_iou": 0.9, "auroc_drop": 0.02},
}
BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cuda")


class VerifyUnavailable(RuntimeError):
    """Verification cannot run on this machine (the reason says why); exit code 2."""


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Mann-Whitney image AUROC (ties count half); None without both classes."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def load_golden(export_dir: Path) -> dict[str, np.ndarray]:
    meta = load_metadata(export_dir)
    record = meta.artifacts.get("verification")
    if not isinstance(record, dict):
        raise VerifyUnavailable(f"{export_dir}: this export has no verification set; re-export with this edgead")
    path = verified_artifact(export_dir, record)
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in ("images", "labels", "maps", "scores")}


def _open(export_dir: Path, backend: str, precision: str | None) -> Any:
    from edgead.runtime.backends.base import BackendError
    from edgead.runtime.detector import Detector

    try:
        if backend == "onnxruntime-cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise VerifyUnavailable(
                    "ONNX Runtime has no CUDA execution provider here (install onnxruntime-gpu on a machine with an "
                    "NVIDIA GPU)"
                )
            return Detector.load(export_dir, backend="onnxruntime", precision=precision,
                                 providers=["CUDAExecutionProvider"])  # fmt: skip
        return Detector.load(export_dir, backend=backend, precision=precision)
    except BackendError as err:
        raise VerifyUnavailable(str(err)) from err
    except ImportError as err:
        raise VerifyUnavailable(f"a package this backend needs is missing: {err}") from err


def run_batches(backend: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``backend`` over ``images`` in its fixed batch size (the last batch padded with its last image)."""
    batch = int(backend.input_shape[0])
    maps, scores = [], []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        count = len(chunk)
        if count < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - count, axis=0)])
        out = backend.infer(np.ascontiguousarray(chunk))
        maps.append(np.asarray(out["anomaly_map"], dtype=np.float32)[:count])
        scores.append(np.asarray(out["score"], dtype=np.float32)[:count])
    return np.concatenate(maps), np.concatenate(scores)


def compare(golden: dict[str, np.ndarray], maps: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """The export's parity figures (``edgead.export.parity.compare``: map and score errors, decision flips)
    plus what a device check adds: score absolute error, IoU of thresholded maps, AUROC, finiteness."""
    from edgead.export.parity import compare as parity  # numpy only, like this module

    ref_maps, ref_scores, labels = (
        golden["maps"].astype(np.float64),
        golden["scores"].astype(np.float64),
        golden["labels"],
    )
    maps, scores = maps.astype(np.float64), scores.astype(np.float64)
    report = parity(ref_maps, ref_scores, maps, scores, threshold)
    cut = float(np.quantile(ref_maps, 0.9))
    ref_hot, hot = ref_maps >= cut, maps >= cut
    union = int((ref_hot | hot).sum())
    report.update(
        score_max_abs_error=float(np.abs(scores - ref_scores).max()),
        map_iou=float((ref_hot & hot).sum() / union) if union else 1.0,
        map_iou_cut=cut,
        auroc_reference=auroc(labels, ref_scores),
        auroc=auroc(labels, scores),
        finite=bool(np.isfinite(maps).all() and np.isfinite(scores).all()),
    )
    return report


def judge(report: dict[str, Any], precision: str) -> list[str]:
    """The failed checks, each naming the output, the error and the tolerance (empty: pass)."""
    tol = TOLERANCES[precision]
    failures = []
    if not report["finite"]:
        failures.append("outputs contain NaN or infinity")
    if report["score_max_rel_error"] > tol["score_rel"]:
        failures.append(f"score: max relative error {report['score_max_rel_error']:.3e} > {tol['score_rel']:g}")
    if report["map_max_rel_error"] > tol["map_rel"]:
        failures.append(f"anomaly_map: max relative error {report['map_max_rel_error']:.3e} > {tol['map_rel']:g}")
    if report["decision_flips"] > tol["decision_flips"]:
        failures.append(f"decisions: {report['decision_flips']} flipped against the threshold")
    if report["map_iou"] < tol["map_iou"]:
        failures.append(f"anomaly_map: IoU of thresholded maps {report['map_iou']:.3f} < {tol['map_iou']:g}")
    if report["auroc"] is not None and report["auroc_reference"] - report["auroc"] > tol["auroc_drop"]:
        failures.append(f"image AUROC {report['auroc']:.4f} vs reference {report['auroc_reference']:.4f}")
    return failures


def verify_export(
    export_dir: str | Path, backend: str = "auto", precision: str | None = None, runs: int = 50
) -> dict[str, Any]:
    """Run the export's verification set on ``backend``; returns the report (``passed`` says the verdict).

    Raises:
        VerifyUnavailable: The backend or the verification set is not available here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    export_dir = Path(export_dir)
    golden = load_golden(export_dir)
    detector = _open(export_dir, backend, precision)
    try:
        used = detector.describe()
        if hasattr(detector.backend, "session"):
            used["providers"] = list(detector.backend.session.get_providers())
        maps, scores = run_batches(detector.backend, golden["images"])
        report = compare(golden, maps, scores, detector.metadata.threshold_value)
        batch = golden["images"][: int(detector.backend.input_shape[0])]
        if len(batch) < detector.backend.input_shape[0]:
            batch = np.repeat(golden["images"][:1], detector.backend.input_shape[0], axis=0)
        for _ in range(3):  # warm-up
            detector.backend.infer(batch)
        times = []
        for _ in range(max(runs, 1)):
            start = time.perf_counter()
            detector.backend.infer(batch)
            times.append((time.perf_counter() - start) * 1000.0)
    finally:
        detector.close()
    failures = judge(report, used["precision"])
    return {
        "export": str(export_dir),
        "backend": used,
        "tolerances": TOLERANCES[used["precision"]],
        "parity": report,
        "latency_ms": {
            "median": float(np.median(times)),
            "p99": float(np.percentile(times, 99)),
            "runs": len(times),
            "batch": int(detector.backend.input_shape[0]),
        },  # fmt: skip
        "failures": failures,
        "passed": not failures,
    }
