"""Decision threshold from held-out normal images, checked on pseudo-anomalies where available."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgead.runtime.decision import is_anomalous

DEFAULT_FALSE_ALARM_RATE = 0.01


def threshold_from_normal_scores(normal_scores: np.ndarray, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE) -> dict:
    """Just above the ``1 - false_alarm_rate`` quantile of scores on normal images (``method="higher"``: an
    observed score), so at most that fraction of the held-out normals is flagged.

    With fewer than ``1 / false_alarm_rate`` images the quantile is the maximum normal score, and the
    record says the achievable rate is coarser than asked.
    """
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        raise ValueError("threshold calibration needs at least one finite normal score")
    quantile = float(np.quantile(scores, 1.0 - false_alarm_rate, method="higher"))
    # ``is_anomalous`` flags ``score >= threshold``; stepping just above the quantile keeps that score normal.
    value = float(np.nextafter(np.float32(quantile), np.float32(np.inf)))
    return {
        "value": value,
        "method": "quantile of held-out normal scores",
        "false_alarm_rate": false_alarm_rate,
        "n_normal": int(scores.size),
        "observed_false_alarm_rate": float(np.mean(is_anomalous(scores, value))),
        "resolution_note": (
            f"only {scores.size} normal images: the threshold is the largest normal score"
            if scores.size < 1.0 / false_alarm_rate
            else None
        ),
    }


def pseudo_anomaly_check(normal_scores: np.ndarray, pseudo_scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """How the threshold does on pseudo-anomalies (LafitE section 3.4 fragments pasted into normals)."""
    from edgead.metrics import image_auroc

    pseudo = np.asarray(pseudo_scores, dtype=np.float64)
    labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(pseudo))]
    return {
        "n_pseudo_anomalies": int(pseudo.size),
        "recall_at_threshold": float(np.mean(is_anomalous(pseudo, threshold))),
        "auroc_vs_normal": float(image_auroc(labels, np.r_[normal_scores, pseudo])),
    }
