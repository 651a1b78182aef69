"""``edgead verify``: prove an export on this device, the way ``polygraphy run --trt --onnxrt`` does, but for a
whole detector and its decisions.

The export holds a small verification set (``verification.npz``: preprocessed held-out normals and
pseudo-anomalies with the PyTorch FP32 outputs, hashed in ``edgead.json``). Verify runs it through the backend
this device would use (TensorRT engine, ONNX Runtime on the CPU or with its CUDA or TensorRT execution provider,
checked to be the one that ran), compares
every output with the reference and measures latency:

- per output, the largest absolute and relative error (the map's relative to its largest reference value);
- decision flips against the export's threshold;
- IoU of the maps thresholded at the reference maps' 90th percentile over the set;
- image AUROC (normals vs pseudo-anomalies) against the reference's;
- backend inference latency (median, p99 over ``runs`` calls after warm-up; the batch as exported) and, on a GPU,
  the device memory the process holds after the runs (its peak: TensorRT and ONNX Runtime keep their pools);
- where polygraphy is installed, its comparator's verdict per output with the same tolerances
  (:func:`polygraphy_compare`); the command works without it.

Tolerances per precision (``edgead.runtime.parity.tolerances``: the rule export applies to the same set before
it publishes, widened where export's float64 check showed the graph's FP32 result to be inexact) are printed with
the result. Exit codes (the CLI): 0 pass,
1 parity failure, 2 cannot run here (no GPU, missing package, engine for another GPU, no verification set).
"""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgead.progress import Progress
from edgead.runtime.batching import padded_batches
from edgead.runtime.machine import device_record, gpu_memory_used_mb
from edgead.runtime.metadata import MetadataError, load_metadata, verified_artifact
from edgead.runtime.parity import TOLERANCES, tolerances
from edgead.runtime.parity import compare as parity
from edgead.runtime.parity import judge as judge_parity

#: Untimed inference calls before the latency runs.
WARMUP_CALLS = 3
BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "openvino")
#: ONNX Runtime's execution providers behind the verify backends that name one (checked, never fallen back from).
ORT_PROVIDERS = {"onnxruntime-cuda": "CUDAExecutionProvider", "onnxruntime-trt": "TensorrtExecutionProvider"}


def ort_trt_cache() -> Path:
    """Where ONNX Runtime's TensorRT provider caches its engines (building one takes minutes)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "edgead" / "onnxruntime-tensorrt"


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


#: The arrays of ``verification.npz``: what each holds and the dtype kind it must have (f: float, i: integer).
GOLDEN_ARRAYS = {
    "images": ("preprocessed model inputs (N, C, S, S)", "f"),
    "labels": ("0 normal / 1 pseudo-anomaly (N,)", "iu"),
    "maps": ("reference anomaly maps (N, H, W)", "f"),
    "scores": ("reference image scores (N,)", "f"),
}


#: Arrays an INT8 export adds: the INT8 graph's own outputs on ONNX Runtime (CPU) at export, the reference an INT8
#: backend is held to (INT8 is compared with INT8; how far INT8 is from FP32 export measured and gated).
INT8_ARRAYS = {"maps_int8": "INT8 reference anomaly maps (N, H, W)", "scores_int8": "INT8 reference scores (N,)"}


def reference_for(golden: dict[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
    """The verification set with the reference ``precision`` is compared with: PyTorch FP32 for FP32 and FP16,
    the export's INT8 outputs for INT8.

    Raises:
        VerifyUnavailable: An INT8 check on a verification set without INT8 references.
    """
    if precision != "int8":
        return golden
    if not all(key in golden for key in INT8_ARRAYS):
        raise VerifyUnavailable("this export's verification set has no INT8 reference; re-export with --precision int8")
    return {**golden, "maps": golden["maps_int8"], "scores": golden["scores_int8"]}


def load_golden(export_dir: Path) -> dict[str, np.ndarray]:
    """The export's verification set, checked: plain numeric arrays (never pickled objects), one entry per image.

    Raises:
        VerifyUnavailable: The export has no verification set.
        MetadataError: ``verification.npz`` is not the archive ``edgead export`` writes (names the file, the array
            and what was expected).
    """
    meta = load_metadata(export_dir)
    record = meta.artifacts.get("verification")
    if not isinstance(record, dict):
        raise VerifyUnavailable(f"{export_dir}: this export has no verification set; re-export with this edgead")
    path = verified_artifact(export_dir, record)
    expected = "an .npz archive of plain numeric arrays " + ", ".join(GOLDEN_ARRAYS) + " written by `edgead export`"
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise MetadataError(f"{path}: cannot read it ({err}); expected {expected}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise MetadataError(f"{path}: holds a single array; expected {expected}")
    golden = {}
    with archive as data:
        for key, (what, kinds) in GOLDEN_ARRAYS.items():
            if key not in data.files:
                raise MetadataError(f"{path}: no array {key!r} ({what}); expected {expected}")
            try:
                array = data[key]
            except ValueError:  # numpy refuses an object (pickled) array under allow_pickle=False
                raise MetadataError(
                    f"{path}: array {key!r} holds Python objects (loading it would need pickle, which edgead never "
                    f"uses); expected {what} as numbers. Re-run `edgead export`"
                ) from None
            except (OSError, EOFError, zipfile.BadZipFile) as err:
                raise MetadataError(f"{path}: cannot read array {key!r} ({err}); expected {expected}") from None
            if array.dtype.kind not in kinds:
                raise MetadataError(f"{path}: array {key!r} has dtype {array.dtype}; expected {what} as numbers")
            golden[key] = array
        for key, what in INT8_ARRAYS.items():
            if key in data.files:
                array = data[key]
                if array.dtype.kind != "f":
                    raise MetadataError(f"{path}: array {key!r} has dtype {array.dtype}; expected {what} as numbers")
                golden[key] = array
    counts = {key: len(array) if array.ndim else 0 for key, array in golden.items()}
    if len(set(counts.values())) != 1 or not counts["images"]:
        raise MetadataError(f"{path}: arrays hold {counts} entries; expected the same number (> 0) of images in each")
    return golden


def _open(export_dir: Path, backend: str, precision: str | None, device: str | None = None) -> Any:
    from edgead.runtime.backends.base import BackendError
    from edgead.runtime.detector import Detector

    try:
        if backend in ORT_PROVIDERS:
            import onnxruntime as ort

            wanted = ORT_PROVIDERS[backend]
            if wanted not in ort.get_available_providers():
                raise VerifyUnavailable(
                    f"ONNX Runtime has no {wanted} here (available: {', '.join(ort.get_available_providers())}); "
                    "install onnxruntime-gpu on a machine with an NVIDIA GPU"
                    + (" and TensorRT's libraries" if backend == "onnxruntime-trt" else "")
                )
            providers: list[Any] = ["CUDAExecutionProvider"]
            if backend == "onnxruntime-trt":
                cache = ort_trt_cache()
                cache.mkdir(parents=True, exist_ok=True)
                providers.insert(0, (wanted, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}))
            detector = Detector.load(export_dir, backend="onnxruntime", precision=precision, providers=providers)
            ran = detector.backend.session.get_providers()
            if not ran or ran[0] != wanted:  # ORT falls back quietly when a provider fails to initialise
                detector.close()
                raise VerifyUnavailable(f"ONNX Runtime could not start {wanted} here and would run on {ran}")
            return detector
        return Detector.load(export_dir, backend=backend, precision=precision, device=device)
    except BackendError as err:
        raise VerifyUnavailable(str(err)) from err
    except ImportError as err:
        raise VerifyUnavailable(f"a package this backend needs is missing: {err}") from err


def run_batches(backend: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``backend`` over ``images`` in its fixed batch size (the last batch padded with its last image)."""
    maps, scores = [], []
    for chunk, count in padded_batches(images, int(backend.input_shape[0]), images.shape[1:], images.dtype):
        out = backend.infer(chunk)
        maps.append(np.asarray(out["anomaly_map"], dtype=np.float32)[:count])
        scores.append(np.asarray(out["score"], dtype=np.float32)[:count])
    return np.concatenate(maps), np.concatenate(scores)


def compare(golden: dict[str, np.ndarray], maps: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """The export's parity figures (``edgead.runtime.parity.compare``: map and score errors, decision flips)
    plus what a device check adds: score absolute error, IoU of thresholded maps, AUROC, finiteness."""
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


def polygraphy_compare(
    golden: dict[str, np.ndarray],
    maps: np.ndarray,
    scores: np.ndarray,
    precision: str,
    runner: str,
    tol: dict[str, float] | None = None,
) -> dict[str, Any] | None:
    """Polygraphy's comparator (``Comparator.compare_accuracy`` with its simple compare function, max error
    statistic) on both outputs, with this precision's tolerances; None when polygraphy is not installed.

    Polygraphy passes an output when its largest absolute error is within ``atol`` or its largest relative
    error within ``rtol``; ``atol`` of the map is ``map_rel`` times the reference map's largest magnitude, the
    same scale as :func:`compare`'s map error, so the two verdicts use one tolerance.
    """
    try:
        from polygraphy.comparator import Comparator, IterationResult, RunResults
        from polygraphy.comparator import compare as polygraphy_compare_module
        from polygraphy.logger import G_LOGGER
    except ImportError:
        return None
    import polygraphy

    tol = tol if tol is not None else TOLERANCES[precision]
    ref_maps, ref_scores = golden["maps"].astype(np.float32), golden["scores"].astype(np.float32)
    rtol = {"anomaly_map": tol["map_rel"], "score": tol["score_rel"]}
    atol = {"anomaly_map": tol["map_rel"] * float(np.abs(ref_maps).max() or 1.0), "score": 0.0}
    simple = getattr(polygraphy_compare_module, "SimpleCompareFunc", None)
    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # its per-output log lines would repeat our report
    try:
        compare_func = (simple or polygraphy_compare_module.CompareFunc.simple)(
            rtol=rtol, atol=atol, check_error_stat="max"
        )
        results = RunResults([
            ("pytorch-fp32-reference", [IterationResult({"anomaly_map": ref_maps, "score": ref_scores})]),
            (runner, [IterationResult({"anomaly_map": maps.astype(np.float32), "score": scores.astype(np.float32)})]),
        ])  # fmt: skip
        accuracy = Comparator.compare_accuracy(results, compare_func=compare_func)
    finally:
        G_LOGGER.module_severity = severity
    outputs: dict[str, Any] = {}
    for result in accuracy:
        for _, iterations in result.items():
            for name, output in iterations[0].items():
                outputs[name] = {
                    "passed": bool(output),
                    "max_abs_error": float(output.max_absdiff),
                    "max_rel_error": float(output.max_reldiff),
                    "atol": atol[name],
                    "rtol": rtol[name],
                }
    return {
        "version": polygraphy.__version__,
        "passed": bool(outputs) and all(o["passed"] for o in outputs.values()),
        "outputs": outputs,
    }


def judge(report: dict[str, Any], precision: str, tol: dict[str, float] | None = None) -> list[str]:
    """The failed checks, each naming the output, the error and the tolerance (empty: pass):
    ``edgead.runtime.parity.judge`` with ``tol`` (default: the precision's :data:`TOLERANCES`)."""
    return judge_parity(report, tol if tol is not None else TOLERANCES[precision])


def verify_export(
    export_dir: str | Path,
    backend: str = "auto",
    precision: str | None = None,
    runs: int = 50,
    progress: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Run the export's verification set on ``backend``; returns the report (``passed`` says the verdict).
    ``progress`` shows the inference calls (verification batches, warm-up, timed runs) with an ETA.

    Raises:
        VerifyUnavailable: The backend or the verification set is not available here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    export_dir = Path(export_dir)
    golden = load_golden(export_dir)
    detector = _open(export_dir, backend, precision, device)
    try:
        used = detector.describe()  # names ONNX Runtime's registered providers too
        size = int(detector.backend.input_shape[0])
        n_batches = -(-len(golden["images"]) // size)
        with Progress("verify", n_batches + WARMUP_CALLS + max(runs, 1), unit="calls", enabled=progress) as bar:
            maps, scores = run_batches(detector.backend, golden["images"])
            bar.advance(n_batches)
            reference = reference_for(golden, used["precision"])
            report = compare(reference, maps, scores, detector.metadata.threshold_for(used["precision"]))
            tol = tolerances(used["precision"], detector.metadata.parity)  # export's rule, on its parity record
            report["polygraphy"] = polygraphy_compare(reference, maps, scores, used["precision"], used["backend"], tol)
            if used["precision"] == "int8":  # how far this device's INT8 is from the FP32 reference (reported)
                report["vs_fp32"] = {
                    "auroc_fp32": auroc(golden["labels"], golden["scores"]),
                    "auroc_int8": report["auroc"],
                }
            batch = golden["images"][:size]
            if len(batch) < size:
                batch = np.repeat(golden["images"][:1], size, axis=0)
            for _ in range(WARMUP_CALLS):
                detector.backend.infer(batch)
                bar.advance()
            times = []
            for _ in range(max(runs, 1)):
                start = time.perf_counter()
                detector.backend.infer(batch)
                times.append((time.perf_counter() - start) * 1000.0)
                bar.advance()
        gpu = used["backend"] == "tensorrt" or any(p != "CPUExecutionProvider" for p in used.get("providers", []))
        memory = gpu_memory_used_mb() if gpu else {"used_mb": None, "reason": "runs on the CPU"}
    finally:
        detector.close()
    failures = judge(report, used["precision"], tol)
    return {
        "export": str(export_dir),
        "backend": used,
        "tolerances": tol,
        "parity": report,
        "latency_ms": {
            "median": float(np.median(times)),
            "p99": float(np.percentile(times, 99)),
            "runs": len(times),
            "batch": int(detector.backend.input_shape[0]),
        },  # fmt: skip
        "device_memory": memory,
        "machine": device_record(),
        "failures": failures,
        "passed": not failures,
    }
