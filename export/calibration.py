"""Decision threshold from held-out normal images, checked on pseudo-anomalies where available, and where those
normal images come from when a run holds none (``edgead export --data``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgead.data.io import list_images
from edgead.data.mvtec import GOOD, DatasetLayoutError
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


def calibration_normals(data: str | Path) -> tuple[list[Path], str]:
    """The normal images ``edgead export --data DATA`` calibrates on when the run holds none, in the layouts
    ``--data`` accepts: an MVTec-layout root (its ``test/good`` images, which no training saw, else its
    ``train/good``), or a plain folder of normal images (the images directly inside it).

    Returns:
        ``(paths, description)``, the description naming the folder used.

    Raises:
        DatasetLayoutError: None of these layouts holds an image; the message names ``data`` and the layouts.
    """
    root = Path(data)
    for folder, what in ((root / "test" / GOOD, "test/good"), (root / "train" / GOOD, "train/good")):
        paths = list_images(folder) if folder.is_dir() else []
        if paths:
            return paths, f"normal images of {root.name} ({what})"
    paths = list_images(root) if root.is_dir() else []
    if paths:
        return paths, f"normal images in {root.name}"
    raise DatasetLayoutError(
        f"--data {root}: no normal images found; expected an MVTec-layout root (<root>/test/good or "
        "<root>/train/good) or a folder of normal images"
    )
