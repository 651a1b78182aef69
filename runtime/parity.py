"""Agreement between two implementations of the same graph: maps, scores and anomaly decisions.

These figures (score relative error, decisions that flip at the calibrated threshold) are specific to
anomaly detection; polygraphy compares raw tensors, which ``elementwise`` reports in the same spirit
(max and median absolute error).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgead.runtime.decision import is_anomalous

FP32_SCORE_RTOL = 1e-4
#: Where PyTorch's own FP32 scores are less accurate than FP32_SCORE_RTOL (a graph that subtracts two
#: nearly equal network passes, e.g. score-tscale), ONNX Runtime may be this many times as far from a
#: float64 evaluation as PyTorch FP32 is. Correct FP32 kernels differ in rounding by small factors
#: (measured: ONNX Runtime 1.6e-4 vs PyTorch 5.0e-5 on a score-tscale run); a wrong export is off by
#: orders of magnitude.
FP32_ENVELOPE_FACTOR = 10.0


#: Scores smaller than this share of the largest reference score count as this size in the relative error.
SCORE_FLOOR = 1e-2


def relative_errors(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``|scores - reference| / |reference|`` per score, the denominator floored at :data:`SCORE_FLOOR` of the
    largest ``|reference|``: a score that crosses zero (a standardised or fused score) would otherwise make the
    FP32 rounding of a near-zero value look like a large error."""
    reference, scores = np.asarray(reference, np.float64), np.asarray(scores, np.float64)
    floor = max(SCORE_FLOOR * float(np.abs(reference).max(initial=0.0)), 1e-12)
    return np.abs(scores - reference) / np.maximum(np.abs(reference), floor)


def fp32_envelope(ref_scores: np.ndarray, scores: np.ndarray, f64_scores: np.ndarray) -> dict[str, Any]:
    """Errors of PyTorch FP32 (``ref_scores``) and of the export (``scores``) against a float64 evaluation.

    The export is within the envelope when its error is at most ``max(FP32_SCORE_RTOL,
    FP32_ENVELOPE_FACTOR * PyTorch's error)``: it is then as accurate as FP32 arithmetic allows for this graph.
    """
    f64 = np.asarray(f64_scores, np.float64)
    torch_error = float(np.max(relative_errors(f64, ref_scores)))
    export_error = float(np.max(relative_errors(f64, scores)))
    allowed = max(FP32_SCORE_RTOL, FP32_ENVELOPE_FACTOR * torch_error)
    return {
        "torch_fp32_vs_float64": torch_error,
        "export_vs_float64": export_error,
        "allowed": allowed,
        "within": export_error <= allowed,
    }


def compare(
    ref_maps: np.ndarray, ref_scores: np.ndarray, maps: np.ndarray, scores: np.ndarray, threshold: float
) -> dict[str, Any]:
    """Compare ``(maps, scores)`` against the reference ``(ref_maps, ref_scores)``."""
    ref_maps, maps = np.asarray(ref_maps, np.float64), np.asarray(maps, np.float64)
    ref_scores, scores = np.asarray(ref_scores, np.float64), np.asarray(scores, np.float64)
    if ref_maps.shape != maps.shape or ref_scores.shape != scores.shape:
        raise ValueError(
            f"shape mismatch: maps {ref_maps.shape} vs {maps.shape}, scores {ref_scores.shape} vs {scores.shape}"
        )
    map_error = np.abs(ref_maps - maps)
    score_rel = relative_errors(ref_scores, scores)
    flips = int(np.sum(is_anomalous(ref_scores, threshold) != is_anomalous(scores, threshold)))
    return {
        "n_images": int(len(ref_scores)),
        "map_max_abs_error": float(map_error.max()),
        "map_median_abs_error": float(np.median(map_error)),
        "map_max_rel_error": float(map_error.max() / max(np.abs(ref_maps).max(), 1e-12)),
        "score_max_rel_error": float(score_rel.max()),
        "score_median_rel_error": float(np.median(score_rel)),
        "decision_flips": flips,
        "threshold": float(threshold),
    }
